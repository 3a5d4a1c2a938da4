"""Tissue detection on slide thumbnails."""

from __future__ import annotations

import numpy as np

from mgi.imaging.tissue import tissue_mask


def _blob_on_white(noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :300]
    blob = ((yy - 100) / 60) ** 2 + ((xx - 140) / 90) ** 2 < 1
    image = np.full((200, 300, 3), 240.0)
    image[blob] = (210, 120, 180)  # eosin pink
    if noise:
        image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), blob


def test_pink_blob_on_white_is_found():
    image, blob = _blob_on_white()
    mask = tissue_mask(image)
    assert mask.dtype == bool and mask.shape == blob.shape
    agreement = (mask == blob).mean()
    assert agreement > 0.99
    assert mask[100, 140] and not mask[5, 5]


def test_dust_specks_and_small_holes_are_cleaned():
    image, _ = _blob_on_white(noise=False)
    image[10:12, 250:252] = (120, 40, 90)  # a 4-px speck far from the blob
    image[98:101, 138:141] = 240  # a 9-px hole inside the blob
    mask = tissue_mask(image)
    assert not mask[10:12, 250:252].any()
    assert mask[98:101, 138:141].all()


def test_blank_image_gives_no_tissue():
    assert not tissue_mask(np.full((64, 64, 3), 255, dtype=np.uint8)).any()
    assert not tissue_mask(np.zeros((64, 64, 3), dtype=np.uint8)).any()


def test_noisy_grey_background_gives_no_tissue():
    rng = np.random.default_rng(1)
    grey = np.clip(235 + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(grey).any()


def test_transparent_pixels_are_background():
    image, blob = _blob_on_white(noise=False)
    rgba = np.dstack([image, np.full(blob.shape, 255, dtype=np.uint8)])
    rgba[:, :150, 3] = 0  # left half outside the scanned area
    mask = tissue_mask(rgba)
    assert not mask[:, :150].any() and mask[100, 200]
