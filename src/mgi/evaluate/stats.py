"""Intervals and paired tests over patients (NumPy/SciPy only, so the report needs no MONAI)."""

from __future__ import annotations

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
