"""Intervals and paired tests over patients (NumPy/SciPy only, so the report needs no MONAI)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats


def bootstrap_ci(values: np.ndarray, *, n_boot: int, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over patients (NaNs dropped)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def paired_comparison(a: np.ndarray, b: np.ndarray, *, n_boot: int, seed: int = 0) -> dict:
    """Mean of a - b over the same patients, its bootstrap interval and a Wilcoxon signed-rank p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    if len(diff) == 0:
        return {"mean_diff": float("nan"), "ci": [float("nan")] * 2, "p_wilcoxon": float("nan"),
                "n": 0}
    p = 1.0 if np.all(diff == 0) else float(stats.wilcoxon(diff).pvalue)
    interval = list(bootstrap_ci(diff, n_boot=n_boot, seed=seed))
    return {"mean_diff": float(diff.mean()), "ci": interval,
            "p_wilcoxon": p, "n": len(diff)}


def signed(x: float) -> str:
    """A difference as the report writes it: +0.027, −0.012 (a true minus sign)."""
    return f"{x:+.3f}".replace("-", "−")


def p_words(p: float) -> str:
    """A p value as the report writes it."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def interval_verdict(lo: float, hi: float) -> str:
    """What a 95% interval of mgi − baseline says."""
    if lo > 0:
        return "mgi better (interval above zero)"
    if hi < 0:
        return "mgi worse (interval below zero)"
    return "no difference shown"


def mgi_comparisons(segmentation: dict[str, dict], *,
                    paired: Callable[[str], dict],
                    finding: Callable[[str, dict], str]) -> dict[str, dict]:
    """mgi against every other variant of `segmentation` (metrics.json's `comparison`): the
    numbers `paired(baseline)` gives, or `available: false` where either failed; each entry with
    its `finding(baseline, entry)` sentence. Empty without mgi."""
    comparison = {}
    if "mgi" not in segmentation:
        return comparison
    for baseline in [v for v in segmentation if v != "mgi"]:
        failed = [v for v in ("mgi", baseline) if segmentation[v]["status"] != "ok"]
        if failed:
            entry = {"available": False, "reason": " and ".join(f"{v} failed" for v in failed)}
        else:
            entry = {"available": True, **paired(baseline)}
        entry["finding"] = finding(baseline, entry)
        comparison[f"mgi_vs_{baseline}"] = entry
    return comparison
