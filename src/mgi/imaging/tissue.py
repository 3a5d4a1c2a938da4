"""Tissue detection on a low-resolution slide thumbnail (HSV saturation, Otsu, morphology)."""

from __future__ import annotations

import logging

import numpy as np
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, opening, remove_small_holes, remove_small_objects

log = logging.getLogger(__name__)


def tissue_mask(
    rgb_thumbnail: np.ndarray,
    *,
    min_saturation: float = 0.05,
    radius_frac: float = 0.004,
    min_object_frac: float = 0.0005,
    max_hole_frac: float = 0.001,
) -> np.ndarray:
    """Return a boolean (H, W) mask, True on tissue, of an RGB(A) uint8 thumbnail.

    Tissue is stained and so saturated; glass and background are white or grey. The Otsu threshold
    on HSV saturation is floored at `min_saturation`, so a blank slide (whose saturation is only
    noise) gives an all-False mask instead of splitting noise in two. Closing then opening use a
    disk of `radius_frac` of the thumbnail's short side; objects smaller than `min_object_frac`
    and holes smaller than `max_hole_frac` of the thumbnail area are removed.
    """
    image = np.asarray(rgb_thumbnail)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"tissue_mask expects an (H, W, 3|4) RGB image, got shape {image.shape}")
    rgb = image[..., :3]
    saturation = rgb2hsv(rgb)[..., 1]
    if image.shape[2] == 4:
        # transparent pixels (outside the scanned area of sparse slides) are background
        saturation = np.where(image[..., 3] > 0, saturation, 0.0)
    if float(saturation.max()) - float(saturation.min()) < 1e-6:
        # a flat image: Otsu is undefined; all tissue only if uniformly saturated
        return np.full(saturation.shape, bool(saturation.max() > min_saturation))
    threshold = max(float(threshold_otsu(saturation)), min_saturation)
    mask = saturation > threshold
    if not mask.any():
        return mask
    height, width = mask.shape
    footprint = disk(max(1, round(radius_frac * min(height, width))))
    mask = closing(mask, footprint)
    mask = opening(mask, footprint)
    area = height * width
    mask = remove_small_objects(mask, max_size=max(1, int(min_object_frac * area)))
    mask = remove_small_holes(mask, max_size=max(1, int(max_hole_frac * area)))
    log.debug("tissue threshold %.3f, tissue fraction %.3f", threshold, mask.mean())
    return mask
