"""The report from a small synthetic results folder: failed variants shown as failed, sentences
computed from the numbers, wall times, attribution against the planted truth, strict JSON."""

from __future__ import annotations

import json
from html import unescape
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from mgi.evaluate.attribution import TABLE_COLUMNS
from mgi.evaluate.report import (
    ReportInputs,
    comparison_finding,
    retrieval_finding,
    write_report,
)
from mgi.imaging.bank import write_bank
from mgi.options import ReportSettings, stage_settings
from mgi.variants import BASELINE_ORDER, ordered_variants

CASES = [f"CASE-{i:02d}" for i in range(1, 11)]
SPLIT = dict.fromkeys(CASES[:4], "train") | dict.fromkeys(CASES[4:6], "val") | dict.fromkeys(
    CASES[6:], "test")
TEST = CASES[6:]
SLICES, PX = 4, 16
ERROR = "CUDA out of memory while fine-tuning (tried to allocate 2.00 GiB)"


def _tsv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False)


def _truth() -> dict[str, np.ndarray]:
    """Each test patient's masks: a square on the two middle slices, outer slices empty."""
    masks = {}
    for i, case in enumerate(CASES):
        m = np.zeros((SLICES, PX, PX), np.uint8)
        m[1:3, 4:10 + i % 3, 5:11] = 1
        masks[case] = m
    return masks


def _variant(root: Path, variant: str, *, quality: float, failed: bool, seconds: float) -> None:
    folder = root / "finetune" / variant
    folder.mkdir(parents=True)
    columns = ["case_id", "variant", "n_slices", "truth_pixels", "pred_pixels", "dice", "iou",
               "hd95"]
    if failed:
        (folder / "status.json").write_text(json.dumps(
            {"variant": variant, "status": "failed", "stage": "finetune", "error": ERROR}))
        _tsv(pd.DataFrame(columns=columns), folder / "test_patients.tsv")
        _tsv(pd.DataFrame({"epoch": [1], "train_loss": [1.2], "val_dice": [0.1], "lr": [1e-3],
                           "seconds": [seconds]}), folder / "history.tsv")
        with h5py.File(folder / "test_predictions.h5", "w"):
            pass  # no items
        return
    (folder / "status.json").write_text(json.dumps(
        {"variant": variant, "status": "ok", "best_epoch": 2, "val_dice": quality}))
    rng = np.random.default_rng(int(quality * 100))
    truth = _truth()
    patients, slices, probs, image_ids, indices = [], [], [], [], []
    for j, case in enumerate(TEST):
        dice = float(np.clip(quality + 0.05 * (j - 1.5) + rng.normal(0, 0.02), 0, 1))
        patients.append({"case_id": case, "variant": variant, "n_slices": SLICES,
                         "truth_pixels": int(truth[case].sum()), "pred_pixels": 50,
                         "dice": dice, "iou": dice / (2 - dice), "hd95": "" if j == 0 else 3.5})
        for k in range(SLICES):
            pred = np.roll(truth[case][k], j, axis=1)
            if k == 0 and j % 2:
                pred[0, 0] = 1  # tumour predicted on an empty slice
            slices.append({"case_id": case, "coord": float(k), "truth_pixels":
                           int(truth[case][k].sum()), "pred_pixels": int(pred.sum()),
                           "dice": dice, "iou": dice, "hd95": "", "variant": variant})
            probs.append(pred * 230)
            image_ids.append(f"IMG-{case}")
            indices.append(k)
    _tsv(pd.DataFrame(patients), folder / "test_patients.tsv")
    _tsv(pd.DataFrame(slices), folder / "test_slices.tsv")
    _tsv(pd.DataFrame({"epoch": [1, 2], "train_loss": [1.2, 0.9], "val_dice": [0.3, quality],
                       "lr": [1e-3, 5e-4], "seconds": [seconds / 2, seconds]}),
         folder / "history.tsv")
    with h5py.File(folder / "test_predictions.h5", "w") as h5:
        h5["probabilities"] = np.array(probs, np.uint8)
        h5["image_id"] = np.array(image_ids, dtype="S")
        h5["index"] = np.array(indices)
        h5["case_id"] = np.repeat(np.array(TEST, dtype="S"), SLICES)
        h5["coord"] = np.tile(np.arange(SLICES, dtype=float), len(TEST))
        h5.attrs["threshold"] = 0.5
        h5.attrs["variant"] = variant


def make_results(root: Path, variants: dict[str, float | None], *,
                 planted: bool = True) -> Path:
    """results/{cohort}/ of a finished run: variant -> its test Dice level, None = failed."""
    root.mkdir(parents=True, exist_ok=True)
    _tsv(pd.DataFrame({"case_id": CASES, "split": [SPLIT[c] for c in CASES]}),
         root / "splits.tsv")
    rng = np.random.default_rng(0)
    truth = _truth()
    rows = []
    for case in CASES:
        image = rng.normal(size=(SLICES, 3, PX, PX)).astype(np.float16)
        write_bank(root / "images" / f"IMG-{case}.h5", images=image, masks=truth[case],
                   coords=np.column_stack([np.arange(SLICES) * 2.5, np.arange(SLICES) + 1]),
                   attrs={"image_id": f"IMG-{case}", "case_id": case, "modality": "mri",
                          "sequences": ["T1 pre", "FLAIR", "T1 post"],
                          "series_descriptions": json.dumps(
                              {"T1 pre": "AX T1", "FLAIR": "AX T2 FLAIR"}),
                          "series_choice": json.dumps({"FLAIR": "axial, TI 2500 ms"}),
                          "alignment": json.dumps({"T1 pre": "registered", "FLAIR": "reference"}),
                          "sequences_filled": json.dumps({"T1 pre": "series", "FLAIR": "series",
                                                          "T1 post": "replaced by FLAIR"})})
        rows.append({"image_id": f"IMG-{case}", "case_id": case, "modality": "mri",
                     "status": "ok", "reason": "", "coverage": json.dumps({"T1 pre": 0.97}),
                     "registration": json.dumps({"T1 pre": -0.41})})
    rows.append({"image_id": "IMG-NOFLAIR", "case_id": "TCGA-ZZ-0000", "modality": "mri",
                 "status": "failed", "reason": "no series for FLAIR: 'AX T1 FLAIR' rejected",
                 "coverage": "", "registration": ""})
    _tsv(pd.DataFrame(rows), root / "images" / "qc.tsv")
    scores = {"recall@1": 0.5, "chance@1": 0.25, "p_recall@1": 0.21, "recall@5": 1.0,
              "chance@5": 1.0, "p_recall@5": 1.0, "mean_rank": 1.75}
    retrieval = {split: {"n_patients": sum(s == split for s in SPLIT.values()),
                         "gene_to_image": scores, "image_to_gene": scores}
                 for split in ("train", "val", "test")}
    retrieval["test"] |= {"cases": TEST, "similarity": np.eye(4).round(3).tolist(),
                          "gene_to_image": {**scores, "p_recall@1": 0.03}}
    retrieval |= {"best_epoch": 3, "kept_by": "val_mean_rank", "device": "CPU, 2 threads"}
    (root / "pretrain").mkdir()
    (root / "pretrain" / "retrieval.json").write_text(json.dumps(retrieval))
    _tsv(pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.3, 2.0, 1.7],
                       "val_loss": [1.4, 1.3, 1.35], "val_recall_at_1": [0.0, 0.5, 0.5],
                       "val_image_to_gene_recall_at_1": [0.0, 0.0, 0.5],
                       "temperature": [0.07] * 3, "lr": [1e-3] * 3,
                       "seconds": [10.0, 20.0, 31.5]}), root / "pretrain" / "history.tsv")
    for variant, quality in variants.items():
        _variant(root, variant, quality=quality or 0.0, failed=quality is None,
                 seconds=40.0 + 10 * len(variant))
    genes = pd.DataFrame({
        "rank": range(1, 31), "gene_id": [f"ENSG{i:011d}" for i in range(30)],
        "gene_name": [f"SUBTYPE_G{i:02d}" if i in (0, 2, 5) else f"PCG{i:04d}" for i in range(30)],
        "token_id": range(3, 33), "mean_abs": np.linspace(0.05, 0.001, 30),
        "mean_signed": np.linspace(0.05, -0.001, 30), "share": np.linspace(0.1, 0.01, 30),
        "n_patients": 6, "planted": ["subtype" if i in (0, 2, 5) and planted else ""
                                     for i in range(30)]})
    _tsv(genes[TABLE_COLUMNS], root / "report" / "gene_attribution.tsv")
    (root / "report" / "gene_attribution.json").write_text(json.dumps({
        "method": "Integrated Gradients", "baseline": "all-zero embedding",
        "target": "cosine similarity", "encoder": "mamba", "splits": ["val", "test"],
        "n_patients": 6, "cases": CASES[4:], "n_steps": 64, "mean_similarity": 0.1,
        "max_abs_delta": 1e-4, "special_token_share": 0.01, "planted_truth": planted,
        "seconds": 4.2}))
    return root


def render(root: Path, variants: list[str], *, inputs: ReportInputs | None = None,
           **kwargs) -> tuple[dict, str]:
    """write_report over `root` (or `inputs`); (metrics.json as read back, report.html's text)."""
    report = root / "report"
    settings = stage_settings(ReportSettings, {"evaluate": {"bootstrap": 200, "threshold": 0.5},
                                               "finetune": {"variants": variants},
                                               "splits": {}, "seed": 0})
    write_report(cohort="unit", inputs=inputs or ReportInputs.from_results(root, variants),
                 settings=settings, metrics_path=report / "metrics.json",
                 html_path=report / "report.html", figures_dir=report / "figures", **kwargs)

    def strict(constant):
        raise AssertionError(f"metrics.json holds {constant}: not strict JSON")

    metrics = json.loads((report / "metrics.json").read_text(), parse_constant=strict)
    return metrics, (report / "report.html").read_text()


VARIANTS = {"vit_scratch": 0.5, "mgi": 0.7, "unet_scratch": None, "mgi_image_only": 0.68}


@pytest.fixture(scope="module")
def one_failed(tmp_path_factory) -> tuple[Path, dict, str]:
    """A run of four variants, unet_scratch failed; its results folder, metrics and HTML."""
    root = make_results(tmp_path_factory.mktemp("report") / "results", VARIANTS)
    return (root, *render(root, list(VARIANTS)))


def test_a_failed_variant_is_a_row_that_says_failed_not_dropped(one_failed):
    _, metrics, html = one_failed
    seg = metrics["segmentation"]
    assert set(seg) == set(VARIANTS)
    assert seg["unet_scratch"] == {"status": "failed", "stage": "finetune", "error": ERROR}
    assert all(seg[v]["status"] == "ok" and 0 < seg[v]["dice"] < 1
               for v in ("mgi", "vit_scratch", "mgi_image_only"))
    assert f"failed: {ERROR}" in html
    assert 'data-variant="unet_scratch"' in html


def test_comparisons_with_a_failed_variant_are_not_available(one_failed):
    _, metrics, html = one_failed
    comparison = metrics["comparison"]
    assert set(comparison) == {"mgi_vs_mgi_image_only", "mgi_vs_vit_scratch",
                               "mgi_vs_unet_scratch"}
    rows = html.split('id="comparisons"')[1].split("</table>")[0]
    order = [rows.index(f"mgi vs {v}<") for v in ("mgi_image_only", "vit_scratch", "unet_scratch")]
    assert order == sorted(order)  # BASELINE_ORDER, not the config's order
    failed = comparison["mgi_vs_unet_scratch"]
    assert failed["available"] is False and failed["reason"] == "unet_scratch failed"
    assert failed["finding"] == "mgi − unet_scratch: not available (unet_scratch failed)."
    assert "not available: unet_scratch failed" in html
    shown = comparison["mgi_vs_vit_scratch"]
    assert shown["available"] is True and shown["n_patients"] == 4
    assert shown["dice_diff_ci_low"] > 0  # 0.7 against 0.5 on every patient
    assert shown["finding"] in unescape(html)


def test_the_report_says_what_it_found_in_sentences_from_the_numbers(one_failed):
    _, metrics, html = one_failed
    found = metrics["comparison"]["mgi_vs_vit_scratch"]["finding"]
    diff = metrics["comparison"]["mgi_vs_vit_scratch"]["dice_mean_diff"]
    assert found.startswith(f"mgi − vit_scratch: Dice +{diff:.3f} [+")
    assert "mgi better (interval above zero) on n = 4 patients" in found
    assert "cannot reach p < 0.05" in found  # 4 patients: say why the p-value stays high
    assert ("Pre-training, 4 test patients: recall@1 gene → image 0.50 (permutation p = 0.03) "
            "and image → gene 0.50 (permutation p = 0.21) against chance 0.25; recall@5 gene → "
            "image 1.00 (permutation p = 1) and image → gene 1.00 (permutation p = 1) against "
            "chance 1.00: the nearest match is above chance gene → image only.") in unescape(html)
    assert metrics["pretrain"]["kept_by"] == "val_mean_rank"
    assert ("kept is epoch 3: the best validation mean rank of each patient's true partner, "
            "both ways") in unescape(html)
    assert "published, not measured here" in html
    assert "empty truth mask" in html and "ignore_empty=False" in html


@pytest.mark.parametrize(("p_at_1", "p_at_5", "verdict"), [
    ((0.01, 0.02), (0.01, 0.01), "the nearest match is above chance both ways"),
    ((0.3, 0.02), (0.01, 0.01), "the nearest match is above chance image → gene only"),
    ((0.3, 0.6), (0.01, 0.2), "not above chance either way; the top five are gene → image only"),
    ((0.3, 0.6), (0.01, 0.01), "not above chance either way; the top five are both ways"),
    ((0.3, 0.6), (0.2, 0.2), "alignment on held-out patients not shown"),
])
def test_retrieval_sentence_follows_both_directions(p_at_1, p_at_5, verdict):
    def scores(p1: float, p5: float) -> dict:
        return {"recall@1": 0.2, "chance@1": 0.04, "p_recall@1": p1, "recall@5": 0.5,
                "chance@5": 0.21, "p_recall@5": p5}

    test = {"n_patients": 24, "gene_to_image": scores(p_at_1[0], p_at_5[0]),
            "image_to_gene": scores(p_at_1[1], p_at_5[1])}
    sentence = retrieval_finding({"test": test})
    assert sentence.startswith("Pre-training, 24 test patients: recall@1 gene → image 0.20")
    assert sentence.endswith(verdict + ".")


@pytest.mark.parametrize(("interval", "verdict"), [
    ((-0.02, 0.08), "no difference shown on n = 8 patients"),
    ((-0.2, -0.01), "mgi worse (interval below zero) on n = 8 patients"),
    ((0.01, 0.2), "mgi better (interval above zero) on n = 8 patients"),
])
def test_comparison_sentence_follows_the_interval(interval, verdict):
    entry = {"available": True, "dice_mean_diff": 0.03, "dice_diff_ci_low": interval[0],
             "dice_diff_ci_high": interval[1], "p_wilcoxon": 0.4, "n_patients": 8}
    found = comparison_finding("vit_scratch", entry)
    assert found.endswith(f"Wilcoxon p = 0.4: {verdict}.")
    lo, hi = (f"{x:+.3f}".replace("-", "−") for x in interval)
    assert found.startswith(f"mgi − vit_scratch: Dice +0.030 [{lo}, {hi}]")


def test_wall_time_per_stage_comes_from_the_histories(one_failed):
    _, metrics, html = one_failed
    run = html.split('id="run"')[1].split("</table>")[0]
    assert "<th>pre-training wall time</th><td>31.5 s</td>" in run
    assert "<th>fine-tuning mgi</th><td>70.0 s</td>" in run
    assert "<th>fine-tuning vit_scratch</th><td>150.0 s</td>" in run
    assert "<th>fine-tuning unet_scratch</th><td>failed after 160.0 s</td>" in run  # partial
    assert "<th>gene attribution</th><td>4.2 s</td>" in run
    assert "wall_time_s" not in metrics  # a rerun elsewhere gives the same metrics.json


def test_empty_slices_and_their_false_positives_are_counted(one_failed):
    _, metrics, _ = one_failed
    empty = metrics["empty_masks"]
    assert empty["slices"] == 16 and empty["empty_truth"] == 8
    assert empty["false_positive"]["mgi"] == 2  # two patients got a pixel on an empty slice


def test_attribution_marks_planted_genes_against_chance(one_failed):
    _, metrics, html = one_failed
    found = metrics["attribution"]
    assert found["planted_in_top_k"] == 3 and found["top_k"] == 20
    assert found["expected_by_chance"] == pytest.approx(20 * 3 / 30)
    assert "3 of the top 20 genes are planted, against 2.0 expected by chance" in html
    assert html.count('<tr class="planted">') == 3


def test_figures_are_written_for_snakemake_report_and_skip_failed_variants(one_failed):
    root, _, _ = one_failed
    figures = {p.name for p in (root / "report" / "figures").iterdir()}
    assert figures == {"pretrain_curves.png", "similarity.png", "finetune_curves.png",
                       "dice.png", "gene_attribution.png"}


def test_missing_status_counts_as_ok_for_older_results(tmp_path):
    root = make_results(tmp_path / "results", {"mgi": 0.6, "mgi_image_only": 0.6})
    for variant in ("mgi", "mgi_image_only"):
        (root / "finetune" / variant / "status.json").unlink()
    metrics, html = render(root, ["mgi", "mgi_image_only"])
    assert {v["status"] for v in metrics["segmentation"].values()} == {"ok"}
    assert metrics["comparison"]["mgi_vs_mgi_image_only"]["available"] is True
    assert "failed" not in html.split("<h2>Segmentation")[1].split("<h2>Examples")[0]


def test_a_failed_mgi_leaves_every_comparison_unavailable_and_overlays_another(tmp_path):
    root = make_results(tmp_path / "results", {"mgi": None, "vit_scratch": 0.5}, planted=False)
    metrics, html = render(root, ["mgi", "vit_scratch"])
    assert metrics["comparison"]["mgi_vs_vit_scratch"]["available"] is False
    assert metrics["comparison"]["mgi_vs_vit_scratch"]["reason"] == "mgi failed"
    assert "test patient of <code>vit_scratch</code>" in html
    assert html.count("<figure data-label=") == 3
    assert "no known truth" in html and "planted" not in metrics["attribution"]


def test_every_variant_failed_still_writes_the_report(tmp_path):
    root = make_results(tmp_path / "results", {"mgi": None, "mgi_image_only": None})
    metrics, html = render(root, ["mgi", "mgi_image_only"])
    assert {v["status"] for v in metrics["segmentation"].values()} == {"failed"}
    assert "nothing to show" in html
    assert not (root / "report" / "figures" / "dice.png").exists()


def test_variant_order_puts_mgi_first_then_the_known_baselines():
    assert BASELINE_ORDER[:3] == ["mgi_image_only", "vit_scratch", "unet_scratch"]
    assert ordered_variants(["custom", "mgi_mlp", "unet_scratch", "mgi"]) == [
        "mgi", "unet_scratch", "mgi_mlp", "custom"]


def test_the_report_shows_which_series_fed_each_channel_and_why_images_failed(one_failed):
    _, _, html = one_failed
    table = html[html.index('<table id="series">'):]
    table = table[:table.index("</table>")]
    first = CASES[0]
    row = table[table.index(f"<td>{first}</td>"):]
    row = row[:row.index("</tr>")]
    assert "AX T1 <small>(registered, covers 97%, MI -0.410)</small>" in row
    assert "AX T2 FLAIR <small>(reference grid)</small>" in row
    assert 'title="axial, TI 2500 ms"' in row
    assert "replaced by FLAIR" in row
    assert "TCGA-ZZ-0000" in table and "failed: no series for FLAIR" in table
