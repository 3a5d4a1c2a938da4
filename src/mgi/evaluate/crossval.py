"""Results over folds and seeds: the pooled per-patient table, its intervals and verdicts.

With `splits.folds: k` every paired patient is tested once per training seed, by the run of the
fold that holds it out. The report's numbers then come from one pooled table (a row per variant,
patient and seed) rather than from one split:

- a variant's score is the mean over its (patient, seed) rows;
- its 95% interval comes from a bootstrap that resamples patients and training runs (seeds)
  together: each replicate draws the patients with replacement and, independently, the seeds with
  replacement, and averages the drawn block. It so covers both where the test patients happened
  to fall and how training happened to go, which a bootstrap over patients alone does not;
- a comparison (mgi − baseline) pairs the two variants' rows of the same patient and seed, and
  takes its interval from the same two-level bootstrap of the differences. Its p value is a
  Wilcoxon signed-rank test of each patient's difference averaged over seeds: patients are the
  independent units (each is tested once per seed, and a patient's seeds share its images and
  genes), so the seeds are averaged within a patient rather than counted as more patients,
  which would shrink p without new evidence.

With one fold and one seed all of this reduces to the single-split report's numbers (the same
bootstrap draws, the same test), which tests/evaluate/test_crossval.py checks.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from mgi.errors import MgiError
from mgi.evaluate.stats import interval_verdict, mgi_comparisons, p_words, signed
from mgi.io import read_tsv

METRICS = ("dice", "iou", "hd95")
POOLED_COLUMNS = ["variant", "fold", "seed", "case_id", "dice", "iou", "hd95"]
P_VALUE_TEST = ("Wilcoxon signed-rank test of the per-patient Dice differences, each averaged "
                "over the seeds (patients are the independent units)")


@dataclass(frozen=True)
class RunFiles:
    """One training run's evaluation files: cv/fold{fold}/finetune/{variant}/seed{seed}/."""

    variant: str
    fold: int
    seed: int
    patients: Path  # test_patients.tsv
    status: Path  # status.json
    history: Path  # history.tsv


def parse_run_key(key: str) -> tuple[str, int, int]:
    """'variant:fold:seed' as (variant, fold, seed)."""
    try:
        variant, fold, seed = key.split(":")
        return variant, int(fold), int(seed)
    except ValueError as err:
        raise MgiError(f"--runs: {key!r}; expected variant:fold:seed, e.g. mgi:0:1") from err


def runs_table(status: dict[tuple[str, int, int], Path]) -> pd.DataFrame:
    """variant, fold, seed, status, error, folder: one row per run (cv/runs.tsv), from each
    (variant, fold, seed)'s status.json."""
    rows = []
    for (variant, fold, seed), path in status.items():
        entry = read_status(path)
        rows.append({"variant": variant, "fold": fold, "seed": seed, "status": entry["status"],
                     "error": str(entry.get("error", "")), "folder": str(path.parent)})
    return pd.DataFrame(rows, columns=["variant", "fold", "seed", "status", "error", "folder"])


def read_status(path: Path, *, missing_ok: bool = False) -> dict:
    """A variant's or run's status.json: {"status": "ok", ...} or {"status": "failed", "error",
    ...}. Unreadable is failed; missing is failed too, or ok with `missing_ok` (results from
    before status files existed)."""
    if missing_ok and not path.exists():
        return {"status": "ok"}
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return {"status": "failed", "stage": "report", "error": f"{path}: unreadable ({err})"}
    if entry.get("status") != "ok":
        entry = {**entry, "status": "failed"}
        entry.setdefault("error", "no error message recorded")
    return entry


def run_status(run: RunFiles) -> dict:
    """The run's status.json (a missing one counts as failed)."""
    return read_status(run.status)


def pooled_patients(runs: list[RunFiles], status: dict[tuple, dict]) -> pd.DataFrame:
    """POOLED_COLUMNS: every test patient of every run that finished, one row per patient and
    seed per variant (an empty HD95 is NaN)."""
    tables = []
    for run in runs:
        if status[(run.variant, run.fold, run.seed)]["status"] != "ok":
            continue
        table = read_tsv(run.patients, required=["case_id", *METRICS])
        for key in METRICS:
            table[key] = pd.to_numeric(table[key].mask(table[key] == ""))
        tables.append(table.assign(variant=run.variant, fold=run.fold, seed=run.seed))
    if not tables:
        return pd.DataFrame(columns=POOLED_COLUMNS)
    pooled = pd.concat(tables, ignore_index=True)[POOLED_COLUMNS]
    repeated = pooled.duplicated(["variant", "case_id", "seed"])
    if repeated.any():
        row = pooled[repeated].iloc[0]
        raise MgiError(f"patient {row['case_id']} is tested more than once by {row['variant']} "
                       f"seed {row['seed']}; expected each patient in exactly one fold's test set")
    return pooled


def patient_by_seed(pooled: pd.DataFrame, variant: str, metric: str,
                    seeds: list[int]) -> pd.DataFrame:
    """One variant's `metric` as a patients x seeds table (NaN where a run is missing)."""
    rows = pooled[pooled["variant"] == variant]
    table = rows.pivot(index="case_id", columns="seed", values=metric)
    return table.reindex(columns=seeds).astype(float)


def two_level_bootstrap(matrix: np.ndarray, *, n_boot: int, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of a patients x seeds matrix, resampling patients and
    seeds together (NaN = missing; patients with no value are dropped first).

    The patient draws come first and exactly as in mgi.evaluate.stats.bootstrap_ci, so that a
    single seed gives that function's interval.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    matrix = matrix[np.isfinite(matrix).any(axis=1)]
    if matrix.size == 0:
        return (float("nan"), float("nan"))
    n, s = matrix.shape
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, n, size=(n_boot, n))
    seeds = rng.integers(0, s, size=(n_boot, s))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw of missing runs only: NaN
        means = np.array([np.nanmean(matrix[np.ix_(p, q)]) for p, q in zip(patients, seeds,
                                                                          strict=True)])
    alpha = (1 - level) / 2
    return (float(np.nanquantile(means, alpha)), float(np.nanquantile(means, 1 - alpha)))


def _mean(matrix: np.ndarray) -> float:
    finite = matrix[np.isfinite(matrix)]
    return float(finite.mean()) if finite.size else float("nan")


def variant_summary(pooled: pd.DataFrame, variant: str, seeds: list[int], *,
                    n_boot: int) -> dict:
    """Mean and two-level bootstrap interval of each metric over a variant's pooled rows."""
    summary: dict = {}
    for metric in METRICS:
        matrix = patient_by_seed(pooled, variant, metric, seeds).to_numpy()
        if metric == "dice":
            summary["n_patients"] = int(np.isfinite(matrix).any(axis=1).sum())
        lo, hi = two_level_bootstrap(matrix, n_boot=n_boot)
        summary[metric] = _mean(matrix)
        summary[f"{metric}_ci_low"], summary[f"{metric}_ci_high"] = lo, hi
    return summary


def run_means(pooled: pd.DataFrame, runs: list[RunFiles], status: dict[tuple, dict],
              variant: str) -> list[dict]:
    """Per run of `variant` (fold, seed): its status, test patients and mean Dice."""
    entries = []
    for run in runs:
        if run.variant != variant:
            continue
        entry = status[(run.variant, run.fold, run.seed)]
        rows = pooled[(pooled["variant"] == variant) & (pooled["fold"] == run.fold)
                      & (pooled["seed"] == run.seed)]
        item = {"fold": run.fold, "seed": run.seed, "status": entry["status"],
                "n_patients": len(rows),
                "dice": float(rows["dice"].mean()) if len(rows) else float("nan")}
        if entry["status"] != "ok":
            item["error"] = str(entry.get("error", ""))
        entries.append(item)
    return entries


def paired_pooled(pooled: pd.DataFrame, a: str, b: str, seeds: list[int], *,
                  n_boot: int) -> dict:
    """mgi − baseline over the same patients and seeds: mean difference, its two-level
    bootstrap interval, and the Wilcoxon p of the per-patient seed-averaged differences."""
    diff = (patient_by_seed(pooled, a, "dice", seeds)
            - patient_by_seed(pooled, b, "dice", seeds)).to_numpy()
    per_patient = np.array([row[np.isfinite(row)].mean() for row in diff
                            if np.isfinite(row).any()])
    if per_patient.size == 0:
        return {"mean_diff": float("nan"), "ci": [float("nan")] * 2,
                "p_wilcoxon": float("nan"), "n": 0, "n_pairs": 0}
    p = 1.0 if np.all(per_patient == 0) else float(stats.wilcoxon(per_patient).pvalue)
    return {"mean_diff": _mean(diff), "ci": list(two_level_bootstrap(diff, n_boot=n_boot)),
            "p_wilcoxon": p, "n": int(per_patient.size),
            "n_pairs": int(np.isfinite(diff).sum())}


def spread(values: list[float]) -> float:
    """Sample standard deviation of the runs' means (NaN with fewer than two)."""
    finite = np.array([v for v in values if np.isfinite(v)])
    return float(finite.std(ddof=1)) if finite.size > 1 else float("nan")


def fold_retrieval(paths: dict[tuple[int, int], Path]) -> list[dict]:
    """Per pre-training (fold, seed): its test patients and recall@1 and @5 both ways."""
    entries = []
    for (fold, seed), path in sorted(paths.items()):
        test = json.loads(Path(path).read_text())["test"]
        entry = {"fold": fold, "seed": seed, "test_patients": test["n_patients"]}
        for direction in ("gene_to_image", "image_to_gene"):
            for k in (1, 5):
                entry[f"{direction}_recall_at_{k}"] = test[direction][f"recall@{k}"]
                entry[f"{direction}_p_recall_at_{k}"] = test[direction].get(f"p_recall@{k}")
        entry["chance_at_1"] = test["gene_to_image"]["chance@1"]
        entries.append(entry)
    return entries


def summarise(*, runs: list[RunFiles], variants: list[str], seeds: list[int], n_boot: int,
              design: dict) -> tuple[dict, pd.DataFrame]:
    """metrics.json's segmentation and comparison sections over folds and seeds, the design,
    and the pooled per-patient table.

    A variant counts as ok when at least one of its runs finished; its failed runs are listed
    (and its pooled numbers lack their patients). mgi is compared with every other variant.
    """
    status = {(r.variant, r.fold, r.seed): run_status(r) for r in runs}
    pooled = pooled_patients(runs, status)
    segmentation = {}
    for v in variants:
        entries = run_means(pooled, runs, status, v)
        failed = [e for e in entries if e["status"] != "ok"]
        if len(failed) == len(entries):
            segmentation[v] = {"status": "failed", "stage": "finetune",
                               "error": failed[0].get("error", "no run finished") if failed
                               else "no runs", "runs": entries}
            continue
        run_dice = [e["dice"] for e in entries if e["status"] == "ok"]
        segmentation[v] = {"status": "ok", **variant_summary(pooled, v, seeds, n_boot=n_boot),
                           "n_runs": len(run_dice), "n_runs_failed": len(failed),
                           "run_dice_mean": float(np.nanmean(run_dice)),
                           "run_dice_sd": spread(run_dice),
                           "run_dice_min": float(np.nanmin(run_dice)),
                           "run_dice_max": float(np.nanmax(run_dice)), "runs": entries}

    def paired(baseline: str) -> dict:
        found = paired_pooled(pooled, "mgi", baseline, seeds, n_boot=n_boot)
        return {"dice_mean_diff": found["mean_diff"], "dice_diff_ci_low": found["ci"][0],
                "dice_diff_ci_high": found["ci"][1], "p_wilcoxon": found["p_wilcoxon"],
                "n_patients": found["n"], "n_pairs": found["n_pairs"], "n_seeds": len(seeds)}

    comparison = mgi_comparisons(
        segmentation, paired=paired,
        finding=lambda baseline, entry: comparison_finding(baseline, entry, design))
    return {"design": design, "segmentation": segmentation, "comparison": comparison}, pooled


def design_words(design: dict) -> str:
    """'5 folds × 3 seeds' and the like."""
    folds, seeds = design["folds"], len(design["seeds"])
    fold_words = f"{folds} folds" if folds > 1 else "the fixed split"
    return f"{fold_words} × {seeds} seed{'s' if seeds > 1 else ''}"


def comparison_finding(baseline: str, c: dict, design: dict) -> str:
    """One sentence: what the pooled comparison of mgi with `baseline` shows."""
    name = f"mgi − {baseline}"
    if not c.get("available", True):
        return f"{name}: not available ({c['reason']})."
    if c["n_patients"] == 0:
        return f"{name}: no test patient scored by both, not compared."
    lo, hi = c["dice_diff_ci_low"], c["dice_diff_ci_high"]
    verdict = interval_verdict(lo, hi)
    return (f"{name} over {design_words(design)}: Dice {signed(c['dice_mean_diff'])} "
            f"[{signed(lo)}, {signed(hi)}] (bootstrap over patients and training runs), "
            f"Wilcoxon {p_words(c['p_wilcoxon'])} on the seed-averaged differences of "
            f"n = {c['n_patients']} patients: {verdict}.")


def variant_finding(segmentation: dict, design: dict) -> str:
    """One sentence: each variant's pooled Dice and the spread of its runs' means."""
    parts = []
    for v, m in segmentation.items():
        if m["status"] != "ok":
            parts.append(f"{v} failed")
            continue
        sd = m["run_dice_sd"]
        spread_words = (f", runs {m['run_dice_min']:.3f}–{m['run_dice_max']:.3f}"
                        f"{f' (SD {sd:.3f})' if np.isfinite(sd) else ''}")
        failed = f", {m['n_runs_failed']} run(s) failed" if m["n_runs_failed"] else ""
        parts.append(f"{v} {m['dice']:.3f} [{m['dice_ci_low']:.3f}, {m['dice_ci_high']:.3f}]"
                     f"{spread_words}{failed}")
    return (f"Segmentation over {design_words(design)}, every patient tested once per seed: "
            f"Dice {'; '.join(parts)}.")


def retrieval_over_folds(entries: list[dict]) -> str:
    """One sentence: each fold's held-out recall@1 and @5 both ways, and in how many
    pre-trainings each is above chance (permutation p < 0.05)."""
    if not entries:
        return "Pre-training over folds: no retrieval recorded."
    clauses = []
    for direction, arrow in (("gene_to_image", "gene → image"), ("image_to_gene", "image → gene")):
        for k in (1, 5):
            values = ", ".join(f"{e[f'{direction}_recall_at_{k}']:.2f}" for e in entries)
            above = sum((e.get(f"{direction}_p_recall_at_{k}") or 1.0) < 0.05 for e in entries)
            clauses.append(f"{arrow} recall@{k} {values} (above chance in {above} of "
                           f"{len(entries)})")
    chance = ", ".join(f"{e['chance_at_1']:.2f}" for e in entries)
    return (f"Pre-training, each fold's test patients ({len(entries)} pre-trainings, "
            f"chance@1 {chance}): {'; '.join(clauses)}.")
