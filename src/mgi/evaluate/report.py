"""metrics.json (for `dvc metrics`) and a self-contained report.html of one cohort's run."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import h5py
import jinja2
import numpy as np
import pandas as pd

from mgi.evaluate import plots
from mgi.evaluate.stats import bootstrap_ci, paired_comparison
from mgi.imaging.bank import read_bank
from mgi.io import atomic_path, read_tsv

log = logging.getLogger(__name__)

# Published results on TCGA-LGG, shown for context only: not measured by this workflow.
PUBLISHED_ANCHORS = [
    {"model": "MGI (Zhou et al. 2024)", "dice": "0.901", "source": "paper, TCGA-LGG"},
    {"model": "U-Net (Buda et al. 2019)", "dice": "0.82–0.84", "source": "paper, TCGA-LGG FLAIR"},
]
BASELINE_ORDER = ["mgi_image_only", "vit_scratch"]


def _metric_summary(patients: pd.DataFrame, *, n_boot: int) -> dict:
    """Mean and bootstrap 95% interval over patients of each metric."""
    summary: dict[str, float | int] = {"n_patients": len(patients)}
    for key in ("dice", "iou", "hd95"):
        values = patients[key].to_numpy(dtype=float)
        lo, hi = bootstrap_ci(values, n_boot=n_boot)
        summary[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        summary[f"{key}_ci_low"], summary[f"{key}_ci_high"] = lo, hi
    return summary


def load_patients(results_dir: Path, variants: list[str]) -> dict[str, pd.DataFrame]:
    """Each variant's per-patient test metrics, numeric (an empty HD95 is NaN)."""
    patients = {v: read_tsv(results_dir / "finetune" / v / "test_patients.tsv") for v in variants}
    for table in patients.values():
        for key in ("dice", "iou", "hd95"):
            table[key] = pd.to_numeric(table[key].replace("", "nan"))
    return patients


def build_metrics(*, cohort: str, splits: pd.DataFrame, retrieval: dict,
                  patients: dict[str, pd.DataFrame], n_boot: int) -> dict:
    """The numbers of the report: split sizes, retrieval, per-variant metrics and comparisons."""
    variants = list(patients)
    test = retrieval["test"]
    metrics = {
        "cohort": cohort,
        "patients": {s: int((splits["split"] == s).sum()) for s in ("train", "val", "test")},
        "pretrain": {
            "test_patients": test["n_patients"],
            "best_epoch": retrieval["best_epoch"],
            **{f"gene_to_image_{k.replace('@', '_at_')}": v
               for k, v in test["gene_to_image"].items()},
            **{f"image_to_gene_{k.replace('@', '_at_')}": v
               for k, v in test["image_to_gene"].items()},
        },
        "segmentation": {v: _metric_summary(p, n_boot=n_boot) for v, p in patients.items()},
        "comparison": {},
    }
    if "mgi" in patients:
        mgi = patients["mgi"].set_index("case_id")
        for baseline in [v for v in variants if v != "mgi"]:
            other = patients[baseline].set_index("case_id").reindex(mgi.index)
            paired = paired_comparison(mgi["dice"].to_numpy(), other["dice"].to_numpy(),
                                       n_boot=n_boot)
            metrics["comparison"][f"mgi_vs_{baseline}"] = {
                "dice_mean_diff": paired["mean_diff"], "dice_diff_ci_low": paired["ci"][0],
                "dice_diff_ci_high": paired["ci"][1], "p_wilcoxon": paired["p_wilcoxon"],
                "n_patients": paired["n"]}
    return metrics


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _run_facts(training_device: str) -> dict:
    """What ran where: versions, commit, hardware, time."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    versions = {}
    for package in ("mgi", "torch", "timm", "monai", "scanpy", "snakemake", "openslide-python"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"commit": commit, "versions": versions, "training_device": training_device,
            "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _display_slice(image: np.ndarray, channel: int) -> np.ndarray:
    """A bank item as something imshow can show: one MR channel, or an RGB tile."""
    if image.dtype == np.uint8 and image.shape[0] == 3:
        return np.moveaxis(image, 0, -1)
    return image[channel].astype(np.float32)


def _overlays(results_dir: Path, variants: list[str], mgi_patients: pd.DataFrame) -> list[dict]:
    """Best, median and worst test patients of the first variant: their largest-tumour slice."""
    qc = read_tsv(results_dir / "images" / "qc.tsv")
    ranked = mgi_patients.sort_values("dice", kind="stable").reset_index(drop=True)
    picks = {"worst": 0, "median": len(ranked) // 2, "best": len(ranked) - 1}
    predictions = {}
    for variant in variants:
        with h5py.File(results_dir / "finetune" / variant / "test_predictions.h5", "r") as h5:
            predictions[variant] = (h5["image_id"][:].astype(str), h5["index"][:],
                                    h5["probabilities"][:], float(h5.attrs["threshold"]))
    figures = []
    for label, row in picks.items():
        case = ranked.loc[row, "case_id"]
        image_ids = qc[(qc["case_id"] == case) & (qc["status"] == "ok")]["image_id"]
        image_id = image_ids.iloc[0]
        bank = read_bank(results_dir / "images" / f"{image_id}.h5")
        if bank.masks is None:
            continue
        item = int(np.argmax(bank.masks.reshape(len(bank.masks), -1).sum(1)))
        sequences = json.loads(bank.attrs.get("sequences", "[]") or "[]")
        channel = sequences.index("FLAIR") if "FLAIR" in sequences else 0
        preds = {}
        for variant, (images, indices, probs, threshold) in predictions.items():
            match = np.flatnonzero((images == image_id) & (indices == item))
            if len(match):
                preds[variant] = probs[match[0]] / 255.0 >= threshold
        dice = float(ranked.loc[row, "dice"])
        figures.append({
            "label": label, "case": case, "dice": dice,
            "png": _b64(plots.overlay(_display_slice(bank.images[item], channel), bank.masks[item],
                                      preds, title=f"{label}: {case} (Dice {dice:.3f})")),
        })
    return figures


def write_report(*, cohort: str, results_dir: Path, settings: dict, metrics_path: Path,
                 html_path: Path) -> dict:
    """Write metrics.json and report.html; return the metrics."""
    variants = list(settings["finetune"]["variants"])
    n_boot = settings["evaluate"]["bootstrap"]
    retrieval = json.loads((results_dir / "pretrain" / "retrieval.json").read_text())
    patients = load_patients(results_dir, variants)
    splits = read_tsv(results_dir / "splits.tsv", required=["case_id", "split"])
    metrics = build_metrics(cohort=cohort, splits=splits, retrieval=retrieval,
                            patients=patients, n_boot=n_boot)
    with atomic_path(metrics_path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))

    pre_history = read_tsv(results_dir / "pretrain" / "history.tsv").apply(pd.to_numeric)
    histories = {v: read_tsv(results_dir / "finetune" / v / "history.tsv").apply(pd.to_numeric)
                 for v in variants}
    seg = metrics["segmentation"]
    intervals = {v: (seg[v]["dice_ci_low"], seg[v]["dice_ci_high"]) for v in variants}
    qc = read_tsv(results_dir / "images" / "qc.tsv")
    n_val = retrieval["val"]["n_patients"]
    figures = {
        "pretrain": _b64(plots.pretrain_curves(pre_history, chance=1.0 / max(1, n_val))),
        "similarity": _b64(plots.similarity_matrix(retrieval["test"]["similarity"],
                                                   retrieval["test"]["cases"])),
        "finetune": _b64(plots.finetune_curves(histories)),
        "dice": _b64(plots.dice_by_variant(patients, intervals)),
    }
    template = jinja2.Environment(
        loader=jinja2.PackageLoader("mgi.evaluate", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
    ).get_template("report.html")
    html = template.render(
        cohort=cohort, metrics=metrics, retrieval=retrieval, variants=variants,
        figures=figures, overlays=_overlays(results_dir, variants, patients[variants[0]]),
        anchors=PUBLISHED_ANCHORS, qc_counts=qc["status"].value_counts().to_dict(),
        n_images=len(qc), facts=_run_facts(retrieval.get("device", "unknown")), settings=settings,
        pretrain_seconds=float(pre_history["seconds"].iloc[-1]),
        finetune_seconds={v: float(h["seconds"].iloc[-1]) for v, h in histories.items()},
    )
    with atomic_path(html_path, suffix=".html") as tmp:
        tmp.write_text(html, encoding="utf-8")
    log.info("report written to %s", html_path)
    return metrics
