"""metrics.json (for `dvc metrics`) and a self-contained report.html of one cohort's run.

Each variant's evaluation writes `finetune/{variant}/status.json`: {"variant", "status": "ok",
...} or {"variant", "status": "failed", "stage", "error"}. A failed variant stays in the report
as a row that says so; its curves, overlays and comparisons are left out. Results from before
status files existed (no status.json) count as ok.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import textwrap
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import h5py
import jinja2
import numpy as np
import pandas as pd

from mgi.errors import MgiError
from mgi.evaluate import crossval, plots
from mgi.evaluate.stats import (
    bootstrap_ci,
    interval_verdict,
    mgi_comparisons,
    p_words,
    paired_comparison,
    signed,
)
from mgi.imaging.bank import bank_attrs, read_bank
from mgi.io import atomic_path, read_tsv
from mgi.layout import results_path
from mgi.options import ReportSettings
from mgi.variants import ordered_variants

log = logging.getLogger(__name__)

# Published results on TCGA-LGG, shown for context only: not measured by this workflow.
PUBLISHED_ANCHORS = [
    {"model": "MGI (Zhou et al. 2024)", "dice": "0.901", "source": "paper, TCGA-LGG"},
    {"model": "U-Net (Buda et al. 2019)", "dice": "0.82–0.84", "source": "paper, TCGA-LGG FLAIR"},
]
TOP_GENES = 20  # genes shown in the attribution chart and table, and scored against the truth
# How the metrics treat slices and patients without tumour (mgi.models.metrics), in words.
EMPTY_MASKS = (
    "A slice whose truth mask is empty scores Dice 1 and IoU 1 when the prediction is empty too, "
    "and 0 when any pixel is predicted (MONAI's ignore_empty=False); HD95 is undefined for it, "
    "and for an empty prediction, and such slices are left out of the HD95 means. The primary "
    "score is the 3D Dice over all slices of a patient (as Buda et al. scored TCGA-LGG), so "
    "slices without tumour count through their false-positive pixels rather than as a Dice of "
    "their own."
)
# How the pre-training epoch kept in model.pt was chosen (pretrain.keep_by), for the report.
KEPT_BY = {
    "val_mean_rank": "the best validation mean rank of each patient's true partner, both ways",
    "val_loss": "the lowest validation loss",
    "last": "the last epoch",
}


@dataclass(frozen=True)
class VariantFiles:
    """The files of one fine-tuned variant that the report reads (finetune/{variant}/)."""

    patients: Path  # test_patients.tsv
    slices: Path  # test_slices.tsv
    predictions: Path  # test_predictions.h5
    status: Path  # status.json
    history: Path  # history.tsv


@dataclass(frozen=True)
class ReportInputs:
    """Every file the report reads, named by its rule (no path is rebuilt here)."""

    retrieval: Path
    pretrain_history: Path
    splits: Path
    qc: Path
    banks: dict[str, Path]  # image_id -> image bank (the overlays' slices)
    variants: dict[str, VariantFiles]  # in the config's order
    attribution: Path | None = None
    attribution_summary: Path | None = None
    # folds and seeds (splits.folds > 1 or several seeds): every run's files, and each fold's
    # pre-training retrieval by (fold, seed); `variants` are then the first run's (fold 0)
    runs: tuple[crossval.RunFiles, ...] = ()
    fold_retrievals: dict[tuple[int, int], Path] = field(default_factory=dict)

    @classmethod
    def from_results(cls, root: Path, variants: list[str], *,
                     attribution: bool = True) -> ReportInputs:
        """The inputs of a results folder laid out as mgi.layout.RESULTS says."""
        qc = results_path(root, "qc")
        image_ids = read_tsv(qc)["image_id"] if qc.exists() else []
        return cls(
            retrieval=results_path(root, "retrieval"),
            pretrain_history=results_path(root, "pretrain_history"),
            splits=results_path(root, "splits"),
            qc=qc,
            banks={i: results_path(root, "bank", image_id=i) for i in image_ids},
            variants={v: VariantFiles(*(results_path(root, name, variant=v) for name in (
                "test_patients", "test_slices", "test_predictions", "status",
                "finetune_history"))) for v in variants},
            attribution=results_path(root, "attribution") if attribution else None,
            attribution_summary=(results_path(root, "attribution_summary") if attribution
                                 else None),
        )


def load_status(files: dict[str, Path]) -> dict[str, dict]:
    """Each variant's status.json ({"status": "ok"} where there is none, as in older results)."""
    return {variant: {"variant": variant, **crossval.read_status(path, missing_ok=True)}
            for variant, path in files.items()}


def load_patients(files: dict[str, Path]) -> dict[str, pd.DataFrame]:
    """Each variant's per-patient test metrics, numeric (an empty HD95 is NaN)."""
    patients = {v: read_tsv(path) for v, path in files.items()}
    for table in patients.values():
        for key in ("dice", "iou", "hd95"):
            table[key] = pd.to_numeric(table[key].mask(table[key] == ""))  # "" = NaN
    return patients


def _metric_summary(patients: pd.DataFrame, *, n_boot: int) -> dict:
    """Mean and bootstrap 95% interval over patients of each metric."""
    summary: dict[str, float | int] = {"n_patients": len(patients)}
    for key in ("dice", "iou", "hd95"):
        values = patients[key].to_numpy(dtype=float)
        lo, hi = bootstrap_ci(values, n_boot=n_boot)
        summary[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        summary[f"{key}_ci_low"], summary[f"{key}_ci_high"] = lo, hi
    return summary


def comparison_finding(baseline: str, c: dict) -> str:
    """One sentence stating what the paired comparison of mgi with `baseline` shows."""
    name = f"mgi − {baseline}"
    if not c.get("available", True):
        return f"{name}: not available ({c['reason']})."
    n = c["n_patients"]
    if n == 0:
        return f"{name}: no test patient scored by both, not compared."
    lo, hi = c["dice_diff_ci_low"], c["dice_diff_ci_high"]
    verdict = interval_verdict(lo, hi)
    small = (" (with under 6 patients the Wilcoxon test cannot reach p < 0.05)"
             if n < 6 else "")
    return (f"{name}: Dice {signed(c['dice_mean_diff'])} [{signed(lo)}, {signed(hi)}], "
            f"Wilcoxon {p_words(c['p_wilcoxon'])}: {verdict} on n = {n} patients{small}.")


def build_metrics(*, cohort: str, splits: pd.DataFrame, retrieval: dict,
                  patients: dict[str, pd.DataFrame], n_boot: int,
                  status: dict[str, dict] | None = None) -> dict:
    """The numbers of the report: split sizes, retrieval, per-variant metrics and comparisons.

    `patients` holds the variants that were scored; `status` (default: all of `patients` ok)
    names every configured variant, failed ones included.
    """
    status = status or {v: {"variant": v, "status": "ok"} for v in patients}
    variants = ordered_variants(list(status))
    test = retrieval["test"]
    segmentation = {}
    for v in variants:
        if status[v]["status"] == "ok" and v in patients:
            segmentation[v] = {"status": "ok", **_metric_summary(patients[v], n_boot=n_boot)}
        else:
            segmentation[v] = {"status": "failed", "stage": status[v].get("stage", "finetune"),
                               "error": status[v].get("error", "no test results")}
    metrics = {
        "cohort": cohort,
        "patients": {s: int((splits["split"] == s).sum()) for s in ("train", "val", "test")},
        "pretrain": {
            "test_patients": test["n_patients"],
            "best_epoch": retrieval["best_epoch"],
            "kept_by": retrieval.get("kept_by", "val_loss"),
            **{f"gene_to_image_{k.replace('@', '_at_')}": v
               for k, v in test["gene_to_image"].items()},
            **{f"image_to_gene_{k.replace('@', '_at_')}": v
               for k, v in test["image_to_gene"].items()},
        },
        "segmentation": segmentation,
        "comparison": {},
    }

    def paired(baseline: str) -> dict:
        mgi = patients["mgi"].set_index("case_id")
        other = patients[baseline].set_index("case_id").reindex(mgi.index)
        found = paired_comparison(mgi["dice"].to_numpy(), other["dice"].to_numpy(), n_boot=n_boot)
        return {"dice_mean_diff": found["mean_diff"], "dice_diff_ci_low": found["ci"][0],
                "dice_diff_ci_high": found["ci"][1], "p_wilcoxon": found["p_wilcoxon"],
                "n_patients": found["n"]}

    metrics["comparison"] = mgi_comparisons(segmentation, paired=paired,
                                            finding=comparison_finding)
    return metrics


def retrieval_finding(retrieval: dict) -> str:
    """One sentence on whether pre-training's alignment carries over to the test patients:
    recall@1 and recall@5, both directions."""
    test = retrieval["test"]
    directions = (("gene_to_image", "gene → image"), ("image_to_gene", "image → gene"))
    clauses, above = [], {}
    for k in (1, 5):
        key = f"recall@{k}"
        ps = {d: test[d].get(f"p_{key}", float("nan")) for d, _ in directions}
        above[k] = [arrow for d, arrow in directions if ps[d] < 0.05]
        scores = " and ".join(f"{arrow} {test[d][key]:.2f} (permutation {p_words(ps[d])})"
                              for d, arrow in directions)
        clauses.append(f"{key} {scores} against chance {test['gene_to_image'][f'chance@{k}']:.2f}")

    def ways(arrows: list[str]) -> str:
        return "both ways" if len(arrows) == 2 else f"{arrows[0]} only"

    if above[1]:
        verdict = f"the nearest match is above chance {ways(above[1])}"
    elif above[5]:
        verdict = (f"the nearest match is not above chance either way; the top five are "
                   f"{ways(above[5])}")
    else:
        verdict = "alignment on held-out patients not shown"
    return (f"Pre-training, {test['n_patients']} test patients: {'; '.join(clauses)}: "
            f"{verdict}.")


def attribution_finding(summary: dict, table: pd.DataFrame, enrichment: dict | None) -> str:
    """One sentence on the genes the aligned embedding leans on (against the truth if known)."""
    top = ", ".join(table["gene_name"].astype(str).head(3))
    where = f"over {summary['n_patients']} held-out patients"
    if enrichment is None:
        return (f"Gene attribution {where}: the embedding leans most on {top}; this cohort has "
                "no known truth to check them against.")
    verdict = ("more than chance" if enrichment["p_hypergeometric"] < 0.05
               else "not more than chance")
    return (f"Gene attribution {where}: {enrichment['planted_in_top_k']} of the top "
            f"{enrichment['top_k']} genes are planted, against "
            f"{enrichment['expected_by_chance']:.1f} expected by chance "
            f"({enrichment['planted_scored']} planted among {enrichment['genes_scored']} scored "
            f"genes, hypergeometric {p_words(enrichment['p_hypergeometric'])}): {verdict}.")


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
    for package in ("mgi", "torch", "timm", "monai", "captum", "scanpy", "snakemake",
                    "openslide-python"):
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


def _read_predictions(path: Path) -> tuple | None:
    """(image ids, item indices, probabilities, threshold) of a predictions file, or None."""
    try:
        with h5py.File(path, "r") as h5:
            if "probabilities" not in h5 or not len(h5["probabilities"]):
                return None
            return (h5["image_id"][:].astype(str), h5["index"][:], h5["probabilities"][:],
                    float(h5.attrs["threshold"]))
    except (OSError, KeyError) as err:
        log.warning("%s: no predictions to overlay (%s)", path, err)
        return None


def _json_attr(attrs: dict, key: str) -> dict:
    try:
        value = json.loads(attrs.get(key) or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def image_sources(inputs: ReportInputs, qc: pd.DataFrame) -> list[dict]:
    """Per MR image: which series fed each channel (and how it got onto the reference grid),
    or why the bank failed; read from the banks' attributes and the QC table."""
    rows = []
    mri = qc[qc["modality"] == "mri"] if "modality" in qc else qc.iloc[0:0]
    for record in mri.itertuples(index=False):
        path = inputs.banks.get(record.image_id)
        row = {"case_id": record.case_id, "image_id": record.image_id,
               "status": record.status, "reason": getattr(record, "reason", "") or "",
               "channels": []}
        if record.status == "ok" and path is not None and path.exists():
            attrs = bank_attrs(path)
            descriptions = _json_attr(attrs, "series_descriptions")
            reasons = _json_attr(attrs, "series_choice")
            alignment = _json_attr(attrs, "alignment")
            filled = _json_attr(attrs, "sequences_filled")
            coverage = _json_attr({"c": getattr(record, "coverage", "")}, "c")
            metric = _json_attr({"m": getattr(record, "registration", "")}, "m")
            layout = attrs.get("source_layout", "dicom")
            roles = attrs.get("sequences") or "[]"
            for role in json.loads(roles) if isinstance(roles, str) else roles:
                source = filled.get(role, "series")
                if source == "series" and layout == "dicom":
                    what = descriptions.get(role, "?")
                elif source == "series":
                    what = f"{layout} file"
                else:
                    what = source
                row["channels"].append({
                    "role": role, "series": what, "reason": reasons.get(role, ""),
                    "how": alignment.get(role, ""), "coverage": coverage.get(role),
                    "metric": metric.get(role)})
        rows.append(row)
    return rows


def _overlays(inputs: ReportInputs, qc: pd.DataFrame, variants: list[str],
              ranked_by: pd.DataFrame) -> list[dict]:
    """Best, median and worst test patients of one variant: their largest-tumour slice, with
    the prediction of every (scored) variant (`qc`: the image QC table)."""
    if ranked_by.empty:
        return []
    ranked = ranked_by.sort_values("dice", kind="stable").reset_index(drop=True)
    picks = {"best": len(ranked) - 1, "median": len(ranked) // 2, "worst": 0}
    predictions = {}
    for variant in variants:
        found = _read_predictions(inputs.variants[variant].predictions)
        if found is not None:
            predictions[variant] = found
    figures = []
    for label, row in picks.items():
        case = ranked.loc[row, "case_id"]
        image_ids = qc[(qc["case_id"] == case) & (qc["status"] == "ok")]["image_id"]
        if image_ids.empty:
            continue
        image_id = image_ids.iloc[0]
        bank = read_bank(inputs.banks[image_id])
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


def _history(path: Path) -> pd.DataFrame:
    """A training history (epoch, ..., seconds), numeric; empty where the file is missing/empty."""
    try:
        return read_tsv(path).apply(pd.to_numeric)
    except MgiError:
        return pd.DataFrame()


def _seconds(history: pd.DataFrame) -> float | None:
    """Wall time of a training run: the history's last cumulative `seconds`."""
    if history.empty or "seconds" not in history:
        return None
    return float(history["seconds"].iloc[-1])


def _empty_slices(files: dict[str, Path]) -> dict:
    """Test slices with an empty truth mask, and per variant how many of them got a prediction."""
    counts: dict = {"slices": None, "empty_truth": None, "false_positive": {}}
    for variant, path in files.items():
        try:
            slices = read_tsv(path, required=["truth_pixels", "pred_pixels"])
        except MgiError:
            continue
        empty = pd.to_numeric(slices["truth_pixels"]) == 0
        counts["slices"], counts["empty_truth"] = len(slices), int(empty.sum())
        counts["false_positive"][variant] = int((pd.to_numeric(slices["pred_pixels"])[empty]
                                                 > 0).sum())
    return counts


def _finite(value):
    """NaN and infinities as null, so that metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _number(value, spec: str = ".3f") -> str:
    """A jinja filter: a number formatted, or an em dash where there is none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def write_report(*, cohort: str, inputs: ReportInputs, settings: ReportSettings,
                 metrics_path: Path, html_path: Path, figures_dir: Path | None = None,
                 patients_path: Path | None = None) -> dict:
    """Write metrics.json and report.html (and the figures as PNGs, and every variant's test
    patients in one table); return the metrics.

    With `inputs.runs` (folds and seeds), metrics.json's segmentation and comparison sections
    pool every run (mgi.evaluate.crossval) and gain `design` and `pretrain_folds`; the curves,
    retrieval, overlays and attribution are those of the first run (fold 0, first seed).
    """
    variants = ordered_variants(list(settings.finetune.variants))
    missing = [v for v in variants if v not in inputs.variants]
    if missing:
        raise MgiError(f"report: no result files given for the configured variant(s) {missing}")
    files = inputs.variants
    n_boot = settings.evaluate.bootstrap
    retrieval = json.loads(inputs.retrieval.read_text())
    status = load_status({v: files[v].status for v in variants})
    scored = [v for v in variants if status[v]["status"] == "ok"]
    for v in variants:
        if v not in scored:
            log.warning("variant %s failed (%s): shown as failed", v, status[v].get("error"))
    patients = load_patients({v: files[v].patients for v in scored})
    splits = read_tsv(inputs.splits, required=["case_id", "split"])
    metrics = build_metrics(cohort=cohort, splits=splits, retrieval=retrieval,
                            patients=patients, n_boot=n_boot, status=status)

    pooled = _pooled_single(patients, seed=settings.seed)
    primary = None
    if inputs.runs:
        seeds = sorted({run.seed for run in inputs.runs})
        primary = {"fold": min(r.fold for r in inputs.runs), "seed": seeds[0]}
        design = {"folds": settings.splits.folds, "seeds": seeds,
                  "pretrain_seeds": sorted({s for _, s in inputs.fold_retrievals}),
                  "stratify": settings.splits.stratify, "p_value": crossval.P_VALUE_TEST,
                  "detail_run": primary}
        pooled_metrics, pooled = crossval.summarise(
            runs=list(inputs.runs), variants=variants, seeds=seeds, n_boot=n_boot, design=design)
        metrics.update(pooled_metrics)
        metrics["pretrain_folds"] = crossval.fold_retrieval(inputs.fold_retrievals)
        scored = [v for v in variants if metrics["segmentation"][v]["status"] == "ok"
                  and status[v]["status"] == "ok"]

    pre_history = _history(inputs.pretrain_history)
    histories = {v: _history(files[v].history) for v in variants}
    seg = metrics["segmentation"]
    qc = read_tsv(inputs.qc)
    n_val = retrieval["val"]["n_patients"]
    pngs = {
        "pretrain_curves": plots.pretrain_curves(pre_history, chance=1.0 / max(1, n_val)),
        "similarity": plots.similarity_matrix(retrieval["test"]["similarity"],
                                              retrieval["test"]["cases"]),
    }
    curves = {v: histories[v] for v in scored if not histories[v].empty}
    if curves:
        pngs["finetune_curves"] = plots.finetune_curves(curves)
    with_patients = {v: patients[v] for v in scored if not patients[v].empty}
    if inputs.runs:
        pngs["dice_runs"] = plots.dice_over_runs(metrics["segmentation"])
    elif with_patients:
        intervals = {v: (seg[v]["dice_ci_low"], seg[v]["dice_ci_high"]) for v in with_patients}
        pngs["dice"] = plots.dice_by_variant(with_patients, intervals)

    findings = [retrieval_finding(retrieval)]
    if inputs.runs:
        findings[0] = f"Fold {primary['fold']}, seed {primary['seed']}. {findings[0]}"
        findings.insert(0, crossval.retrieval_over_folds(metrics["pretrain_folds"]))
        findings.append(crossval.variant_finding(metrics["segmentation"], metrics["design"]))
    findings += [c["finding"] for c in metrics["comparison"].values()]
    findings += [f"{v}: failed ({status[v].get('stage', 'finetune')}): "
                 f"{textwrap.shorten(str(status[v]['error']), 400)}"
                 for v in variants if v not in scored]
    attribution = None
    if inputs.attribution is not None and inputs.attribution_summary is not None:
        attribution = _attribution_section(inputs.attribution, inputs.attribution_summary)
        pngs["gene_attribution"] = plots.gene_attribution(attribution["top"])
        metrics["attribution"] = attribution["metrics"]
        findings.append(attribution["finding"])

    metrics["empty_masks"] = _empty_slices({v: files[v].slices for v in scored})
    # wall times are facts of the run, not metrics: kept out of metrics.json (a rerun elsewhere
    # gives the same metrics, and `dvc metrics diff` shows what changed in the results)
    wall = {
        "pretrain": _seconds(pre_history),
        "finetune": {v: _seconds(histories[v]) for v in variants},
        "attribution": attribution["summary"]["seconds"] if attribution else None,
        # with folds and seeds: every run's fine-tuning, summed
        "runs": (sum(_seconds(_history(run.history)) or 0.0 for run in inputs.runs)
                 if inputs.runs else None),
    }
    with atomic_path(metrics_path) as tmp:
        tmp.write_text(json.dumps(_finite(metrics), indent=2, sort_keys=True))
    if patients_path is not None:
        with atomic_path(patients_path) as tmp:
            pooled.to_csv(tmp, sep="\t", index=False, na_rep="")
    if figures_dir is not None:
        figures_dir.mkdir(parents=True, exist_ok=True)
        for name, png in pngs.items():
            (figures_dir / f"{name}.png").write_bytes(png)

    overlay_variant = next((v for v in ["mgi", *scored] if v in with_patients), None)
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("mgi.evaluate", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
    )
    environment.filters["num"] = _number
    html = environment.get_template("report.html").render(
        cohort=cohort, metrics=metrics, retrieval=retrieval, variants=variants, status=status,
        figures={name: _b64(png) for name, png in pngs.items()}, findings=findings,
        overlays=(_overlays(inputs, qc, scored, patients[overlay_variant])
                  if overlay_variant else []),
        overlay_variant=overlay_variant, empty_masks_text=EMPTY_MASKS,
        anchors=PUBLISHED_ANCHORS, qc_counts=qc["status"].value_counts().to_dict(),
        n_images=len(qc), facts=_run_facts(retrieval.get("device", "unknown")), settings=settings,
        attribution=attribution, wall=wall, image_sources=image_sources(inputs, qc),
        kept_by=KEPT_BY[metrics["pretrain"]["kept_by"]], primary=primary,
    )
    with atomic_path(html_path, suffix=".html") as tmp:
        tmp.write_text(html, encoding="utf-8")
    log.info("report written to %s", html_path)
    return metrics


def _pooled_single(patients: dict[str, pd.DataFrame], *, seed: int) -> pd.DataFrame:
    """The single split's test patients in the pooled table's form (fold 0, the one seed)."""
    tables = [table.assign(variant=v, fold=0, seed=seed) for v, table in patients.items()]
    if not tables:
        return pd.DataFrame(columns=crossval.POOLED_COLUMNS)
    return pd.concat(tables, ignore_index=True)[crossval.POOLED_COLUMNS]


def _attribution_section(table_path: Path, summary_path: Path) -> dict:
    """The attribution table's top genes, its summary and what it found (against the truth)."""
    from mgi.evaluate.attribution import planted_enrichment

    table = read_tsv(table_path, required=["rank", "gene_id", "gene_name", "mean_abs",
                                           "mean_signed", "planted"])
    for key in ("mean_abs", "mean_signed", "share"):
        if key in table:
            table[key] = pd.to_numeric(table[key])
    summary = json.loads(Path(summary_path).read_text())
    enrichment = (planted_enrichment(table, top_k=TOP_GENES) if summary.get("planted_truth")
                  else None)
    found = {"n_patients": summary["n_patients"], "max_abs_delta": summary["max_abs_delta"],
             "top_genes": list(table["gene_name"].astype(str).head(5))}
    if enrichment is not None:
        found.update(enrichment)
    return {"top": table.head(TOP_GENES), "summary": summary, "enrichment": enrichment,
            "metrics": found, "finding": attribution_finding(summary, table, enrichment)}
