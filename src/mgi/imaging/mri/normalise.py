"""Brain masks and per-volume intensity normalisation of MR volumes."""

from __future__ import annotations

import logging

import numpy as np

from mgi.errors import ConfigError

log = logging.getLogger(__name__)

NORMALISE = ("zscore", "minmax")


def brain_mask(volume: np.ndarray, *, threshold: float = 0.1) -> np.ndarray:
    """Return the boolean brain (foreground) mask of a volume in physical units.

    A voxel is brain when it is above ``max(0, p2 + threshold * (p98 - p2))`` (p2, p98: the
    volume's 2nd and 98th percentiles), the robust background threshold of FSL's BET; with
    `threshold` 0 it is simply ``> 0``. Plain ``> 0`` suits skull-stripped volumes only: a
    magnitude image's background is Rician noise, almost never exactly 0.
    """
    if threshold <= 0:
        return volume > 0
    low, high = np.percentile(volume, (2, 98))
    return volume > max(0.0, float(low + threshold * (high - low)))


def normalise_volume(
    volume: np.ndarray,
    *,
    clip_percentiles: tuple[float, float] = (0.5, 99.5),
    method: str = "zscore",
    brain: np.ndarray | None = None,
) -> np.ndarray:
    """Return `volume` normalised over its brain voxels; voxels outside the brain become 0.

    `brain` defaults to ``volume > 0``. Brain intensities are clipped at `clip_percentiles`
    (computed over brain voxels only), then z-scored (mean 0, std 1 over the brain) or scaled
    to 0-1. Written with numpy because neither MONAI's nor scikit-image's intensity transforms
    take percentiles over a mask.
    """
    if method not in NORMALISE:
        raise ConfigError(f"normalise must be one of {NORMALISE}, got {method!r}")
    out = np.zeros(volume.shape, dtype=np.float32)
    brain = volume > 0 if brain is None else brain
    if not brain.any():
        log.warning("volume has no brain voxel; left as zeros")
        return out
    values = volume[brain].astype(np.float64)
    low, high = np.percentile(values, clip_percentiles)
    values = np.clip(values, low, high)
    if method == "zscore":
        std = values.std()
        out[brain] = (values - values.mean()) / (std if std > 0 else 1.0)
    else:
        out[brain] = (values - low) / (high - low) if high > low else 0.0
    return out

