"""The cohort's stain reference: a normaliser fitted once, applied by every slide job.

Fitted either on a configured reference tile (an RGB image file) or on the cohort's own tissue:
a seeded sample of tissue tiles from up to `max_slides` slides, read exactly as tiling reads
them. It sees pixels only, never labels or splits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mgi.errors import SlideError
from mgi.imaging.slides import open_slide, plan_tiles, read_tiles
from mgi.imaging.stain import Normaliser, make_normaliser, save_normaliser

log = logging.getLogger(__name__)


def _reference_tile(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise SlideError(f"{path}: stain reference tile is not a readable image ({err})") from err
    return rgb.transpose(2, 0, 1)[None]


def sample_cohort_tiles(
    slide_paths: list[Path], *, tiles_per_slide: int, max_slides: int, tile_px: int,
    mpp: float, mpp_fallback: float | None, tissue_min: float, seed: int,
) -> tuple[np.ndarray, list[str]]:
    """(tiles (N, 3, tile_px, tile_px), slides used): seeded tissue tiles from the slides.

    A slide that cannot be read or has no tissue is skipped with a warning.
    """
    rng = np.random.default_rng(seed)
    paths = sorted(slide_paths)
    if len(paths) > max_slides:
        paths = sorted(rng.choice(np.array(paths, dtype=object), size=max_slides, replace=False))
    batches, used = [], []
    for path in paths:
        try:
            with open_slide(Path(path)) as slide:
                plan = plan_tiles(slide, slide_path=Path(path), tile_px=tile_px, mpp=mpp,
                                  mpp_fallback=mpp_fallback)
                cells = np.flatnonzero(plan.fractions.ravel() >= tissue_min)
                if cells.size == 0:
                    log.warning("%s: no tissue tile; not used for the stain reference", path)
                    continue
                pick = np.sort(rng.choice(cells, size=min(tiles_per_slide, cells.size),
                                          replace=False))
                batches.append(read_tiles(slide, plan, pick, tile_px=tile_px))
                used.append(str(path))
        except SlideError as err:
            log.warning("%s: skipped for the stain reference: %s", path, err)
    if not batches:
        raise SlideError(f"stain reference: no tissue tile in any of {len(paths)} slide(s)")
    return np.concatenate(batches), used


def fit_reference(
    *, method: str, out_path: str | os.PathLike[str], reference_tile: Path | None = None,
    slide_paths: list[Path] | None = None, tiles_per_slide: int = 16, max_slides: int = 16,
    tile_px: int = 224, mpp: float = 0.5, mpp_fallback: float | None = None,
    tissue_min: float = 0.5, seed: int = 0,
) -> Normaliser:
    """Fit the `method` normaliser on the reference tile, or else on the cohort; save it."""
    normaliser = make_normaliser(method)
    if reference_tile is not None:
        tiles, source = _reference_tile(reference_tile), {"reference_tile": str(reference_tile)}
    else:
        tiles, used = sample_cohort_tiles(
            list(slide_paths or []), tiles_per_slide=tiles_per_slide, max_slides=max_slides,
            tile_px=tile_px, mpp=mpp, mpp_fallback=mpp_fallback, tissue_min=tissue_min,
            seed=seed)
        source = {"reference_slides": used, "reference_tiles": len(tiles)}
    normaliser.fit(tiles)
    save_normaliser(normaliser, out_path, **source)
    log.info("stain reference (%s) fitted on %d tile(s) -> %s", method, len(tiles), out_path)
    return normaliser
