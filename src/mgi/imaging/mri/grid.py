"""Putting a case's sequences on one grid: the reference series' voxels, in physical space."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mgi.errors import SeriesError
from mgi.imaging.mri.dicom import ORIENTATION_ATOL, POSITION_ATOL_MM, SPACING_ATOL, MRSeries

log = logging.getLogger(__name__)


@dataclass
class Aligned:
    """One sequence on the reference grid."""

    volume: np.ndarray  # (Z, H, W) float32, the reference's shape
    coverage: float  # share of the reference volume inside this series' volume
    metric: float | None  # final registration metric (None: not registered)
    how: str  # "reference" | "same grid" | "resampled" | "registered"


def _same_grid(reference: MRSeries, other: MRSeries) -> bool:
    return (other.volume.shape == reference.volume.shape
            and np.allclose(other.orientation, reference.orientation, atol=ORIENTATION_ATOL)
            and np.allclose(other.pixel_spacing, reference.pixel_spacing, atol=SPACING_ATOL)
            and np.allclose(other.positions, reference.positions, atol=POSITION_ATOL_MM))


def align_to_reference(
    series: dict[str, MRSeries], *, reference: str, register: str = "none"
) -> dict[str, Aligned]:
    """Every series on the grid of `series[reference]` (role -> Aligned)."""
    ref = series[reference]
    out = {}
    for role, other in series.items():
        if role == reference:
            out[role] = Aligned(ref.volume, 1.0, None, "reference")
        elif _same_grid(ref, other):
            out[role] = Aligned(other.volume, 1.0, None, "same grid")
        else:
            raise SeriesError(f"{other.files[0].parent}: series {role!r} is not on the grid of "
                              f"{reference!r}; sequences must be co-registered")
    return out
