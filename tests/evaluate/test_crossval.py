"""Results over folds and seeds: the pooled table, the two-level bootstrap checked against a
hand-computed case, the paired verdicts, and one fold with one seed giving the single-split
report's numbers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mgi.errors import MgiError
from mgi.evaluate.crossval import (
    RunFiles,
    paired_pooled,
    patient_by_seed,
    pooled_patients,
    run_status,
    summarise,
    two_level_bootstrap,
)
from mgi.evaluate.report import ReportInputs
from mgi.evaluate.stats import bootstrap_ci, paired_comparison

from .test_report import make_results, render

FOLDS = {0: ["P0", "P1", "P2"], 1: ["P3", "P4", "P5"], 2: ["P6", "P7"]}
SEEDS = [0, 1]


def test_two_level_bootstrap_matches_the_hand_computed_distribution():
    # 2 patients x 2 seeds. A replicate draws (patient, patient) and (seed, seed), each of the
    # 4 x 4 = 16 combinations with probability 1/16, and averages the drawn 2 x 2 block.
    matrix = np.array([[0.0, 1.0], [2.0, 3.0]])
    exact = np.array([matrix[np.ix_(p, q)].mean()
                      for p in itertools.product(range(2), repeat=2)
                      for q in itertools.product(range(2), repeat=2)])
    # the all-lowest block (patient 0 twice, seed 0 twice) has probability 1/16 > 2.5%, and so
    # has the all-highest: the 95% interval is [0, 3]
    assert sorted(exact)[0] == 0.0 and sorted(exact)[-1] == 3.0
    assert two_level_bootstrap(matrix, n_boot=4000) == (0.0, 3.0)
    # the 16 block means, by hand: 0, .5, .5, 1 (patient 0 twice), 2, 2.5, 2.5, 3 (patient 1
    # twice), 1, 1.5, 1.5, 2 (both patients, either order); their quartiles are 1 and 2
    lo, hi = two_level_bootstrap(matrix, n_boot=20000, level=0.5)
    assert (lo, hi) == (float(np.quantile(exact, 0.25)), float(np.quantile(exact, 0.75)))
    assert (lo, hi) == (1.0, 2.0)
    # resampling patients alone (seeds averaged first) misses the training runs' spread
    assert bootstrap_ci(matrix.mean(axis=1), n_boot=4000) == (0.5, 2.5)


def test_one_seed_gives_the_patient_bootstrap_and_the_paired_test_exactly():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.4, 0.9, 25), rng.uniform(0.3, 0.9, 25)
    a[4] = np.nan
    assert two_level_bootstrap(a[:, None], n_boot=500) == bootstrap_ci(a, n_boot=500)
    pooled = pd.DataFrame({"variant": ["mgi"] * 25 + ["vit_scratch"] * 25, "fold": 0, "seed": 7,
                           "case_id": [f"P{i:02d}" for i in range(25)] * 2,
                           "dice": np.concatenate([a, b]), "iou": 0.0, "hd95": 0.0})
    ours = paired_pooled(pooled, "mgi", "vit_scratch", [7], n_boot=500)
    single = paired_comparison(a, b, n_boot=500)
    assert ours["mean_diff"] == pytest.approx(single["mean_diff"], abs=1e-12)
    assert ours["ci"] == single["ci"] and ours["p_wilcoxon"] == single["p_wilcoxon"]
    assert ours["n"] == single["n"] == 24


def write_runs(root: Path, quality: dict[str, float], *, failed: tuple = ()) -> list[RunFiles]:
    """Run folders of len(FOLDS) folds x 2 seeds per variant; a run's Dice: the variant's level
    plus a patient effect (0.02 per patient number, 0.021 for mgi) minus 0.05 per seed.
    `failed`: (variant, fold, seed) that failed."""
    runs = []
    for variant, level in quality.items():
        for fold, cases in FOLDS.items():
            for seed in SEEDS:
                folder = root / f"cv/fold{fold}/finetune/{variant}/seed{seed}"
                folder.mkdir(parents=True)
                run = RunFiles(variant, fold, seed, folder / "test_patients.tsv",
                               folder / "status.json", folder / "history.tsv")
                runs.append(run)
                if (variant, fold, seed) in failed:
                    run.status.write_text(json.dumps({"status": "failed", "stage": "finetune",
                                                      "error": "CUDA out of memory"}))
                    continue
                slope = 0.021 if variant == "mgi" else 0.02
                dice = [level + slope * int(c[1:]) - 0.05 * seed for c in cases]
                pd.DataFrame({"case_id": cases, "variant": variant, "dice": dice,
                              "iou": [d / (2 - d) for d in dice],
                              "hd95": ["" if c == "P0" else 2.0 for c in cases]}
                             ).to_csv(run.patients, sep="\t", index=False)
                run.status.write_text(json.dumps({"variant": variant, "status": "ok"}))
                pd.DataFrame({"epoch": [1], "val_dice": [level], "seconds": [3.0]}).to_csv(
                    run.history, sep="\t", index=False)
    return runs


DESIGN = {"folds": 3, "seeds": SEEDS}


def test_the_pooled_table_has_one_row_per_patient_and_seed(tmp_path: Path):
    runs = write_runs(tmp_path, {"mgi": 0.6, "vit_scratch": 0.5})
    status = {(r.variant, r.fold, r.seed): run_status(r) for r in runs}
    pooled = pooled_patients(runs, status)
    assert len(pooled) == 2 * 8 * 2
    assert not pooled.duplicated(["variant", "case_id", "seed"]).any()
    table = patient_by_seed(pooled, "mgi", "dice", SEEDS)
    assert table.shape == (8, 2)
    assert table.loc["P3", 1] == pytest.approx(0.6 + 0.063 - 0.05)
    assert np.isnan(patient_by_seed(pooled, "mgi", "hd95", SEEDS).loc["P0"]).all()


def test_pooled_summary_and_verdicts_by_hand(tmp_path: Path):
    runs = write_runs(tmp_path, {"mgi": 0.6, "vit_scratch": 0.5})
    metrics, _pooled = summarise(runs=runs, variants=["mgi", "vit_scratch"], seeds=SEEDS,
                                n_boot=1000, design=DESIGN)
    mgi = metrics["segmentation"]["mgi"]
    patient_effect = np.mean([0.021 * i for i in range(8)])
    assert mgi["dice"] == pytest.approx(0.6 + patient_effect - 0.025)
    assert mgi["n_patients"] == 8 and mgi["n_runs"] == 6 and mgi["n_runs_failed"] == 0
    fold2_seed1 = next(r for r in mgi["runs"] if (r["fold"], r["seed"]) == (2, 1))
    assert fold2_seed1["dice"] == pytest.approx(0.6 + 0.021 * 6.5 - 0.05)
    assert fold2_seed1["n_patients"] == 2
    assert mgi["dice_ci_low"] < mgi["dice"] < mgi["dice_ci_high"]
    comparison = metrics["comparison"]["mgi_vs_vit_scratch"]
    # patient i's pairs differ by 0.1 + 0.001 i at either seed: mean 0.1035, and no bootstrap
    # replicate can leave [0.100, 0.107]
    assert comparison["dice_mean_diff"] == pytest.approx(0.1035)
    assert 0.1 - 1e-9 <= comparison["dice_diff_ci_low"] < 0.1035 < comparison["dice_diff_ci_high"]
    assert comparison["dice_diff_ci_high"] <= 0.107 + 1e-9
    assert comparison["n_patients"] == 8 and comparison["n_pairs"] == 16
    # Wilcoxon over 8 positive seed-averaged differences: exact two-sided p = 2 / 2**8
    assert comparison["p_wilcoxon"] == pytest.approx(2 / 256)
    assert "mgi better" in comparison["finding"] and "3 folds × 2 seeds" in comparison["finding"]


def test_a_failed_run_is_listed_and_its_patients_missing_not_the_variant(tmp_path: Path):
    runs = write_runs(tmp_path, {"mgi": 0.6, "vit_scratch": 0.5},
                      failed=(("vit_scratch", 1, 0),))
    metrics, _pooled = summarise(runs=runs, variants=["mgi", "vit_scratch"], seeds=SEEDS,
                                n_boot=200, design=DESIGN)
    vit = metrics["segmentation"]["vit_scratch"]
    assert vit["status"] == "ok" and vit["n_runs"] == 5 and vit["n_runs_failed"] == 1
    failed = [r for r in vit["runs"] if r["status"] != "ok"]
    assert failed == [{"fold": 1, "seed": 0, "status": "failed", "n_patients": 0,
                       "dice": failed[0]["dice"], "error": "CUDA out of memory"}]
    # the comparison pairs what both have: fold 1's patients only at seed 1
    assert metrics["comparison"]["mgi_vs_vit_scratch"]["n_pairs"] == 16 - 3
    assert metrics["comparison"]["mgi_vs_vit_scratch"]["n_patients"] == 8


def test_a_patient_tested_by_two_folds_is_refused(tmp_path: Path):
    runs = write_runs(tmp_path, {"mgi": 0.6})
    leak = pd.read_csv(runs[0].patients, sep="\t")
    leak.to_csv(runs[2].patients, sep="\t", index=False)  # fold 1 seed 0 tests fold 0's patients
    status = {(r.variant, r.fold, r.seed): run_status(r) for r in runs}
    with pytest.raises(MgiError, match="tested more than once by mgi seed 0"):
        pooled_patients(runs, status)


def test_one_fold_and_one_seed_give_the_single_split_reports_numbers(tmp_path: Path):
    variants = {"mgi": 0.7, "vit_scratch": 0.5, "mgi_image_only": 0.66}
    root = make_results(tmp_path / "results", variants)
    single, single_html = render(root, list(variants))
    inputs = ReportInputs.from_results(root, list(variants))
    runs = tuple(RunFiles(v, 0, 0, f.patients, f.status, f.history)
                 for v, f in inputs.variants.items())
    repeated, html = render(root, list(variants), inputs=ReportInputs(
        **{**inputs.__dict__, "runs": runs,
           "fold_retrievals": {(0, 0): root / "pretrain" / "retrieval.json"}}))
    for v in variants:
        for key, value in single["segmentation"][v].items():
            assert repeated["segmentation"][v][key] == pytest.approx(value, nan_ok=True), (v, key)
    for name, entry in single["comparison"].items():
        for key in ("dice_mean_diff", "dice_diff_ci_low", "dice_diff_ci_high", "p_wilcoxon",
                    "n_patients"):
            assert repeated["comparison"][name][key] == pytest.approx(entry[key]), (name, key)
    assert repeated["design"]["folds"] == 1 and repeated["design"]["seeds"] == [0]
    assert 'id="runs"' in html and 'id="runs"' not in single_html
    assert "1 fold(s) × 1 seed(s): 1 runs per variant" in html
    seconds = sum(float(pd.read_csv(f.history, sep="\t")["seconds"].iloc[-1])
                  for f in inputs.variants.values())
    assert f"<td>{seconds:.1f} s in all</td>" in html
    assert ("Pre-training, each fold&#39;s test patients (1 pre-trainings, chance@1 0.25): "
            "gene → image recall@1 0.50 (above chance in 1 of 1)") in html
    assert set(single) <= set(repeated)
