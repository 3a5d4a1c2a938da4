"""Whole-slide images: tissue tiles at a target resolution into an image bank, plus a QC thumbnail.

OpenSlide reads the slide (SVS and the other formats it knows). Tissue is found on a low-resolution
thumbnail, so background is never read at full resolution; tiles are read from the pyramid level
nearest the target resolution (at or finer than it) in blocks of several tiles, resized to
`tile_px`, stain-normalised in batches (mgi.imaging.stain) and streamed into the bank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
import torch
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from mgi.errors import ConfigError, SlideError
from mgi.imaging.bank import bank_writer, write_failed_bank
from mgi.imaging.stain import Normaliser
from mgi.imaging.tissue import tissue_mask
from mgi.io import atomic_path
from mgi.progress import progress

log = logging.getLogger(__name__)

# long side of the thumbnail used for tissue detection: at least THUMBNAIL_MIN_PX, more (up to
# THUMBNAIL_MAX_PX) where needed for one tile to span THUMBNAIL_TILE_PX thumbnail pixels
THUMBNAIL_MIN_PX = 1024
THUMBNAIL_MAX_PX = 4096
THUMBNAIL_TILE_PX = 8
QC_MAX_PX = 1024  # long side of the QC PNG
LEVEL_TOLERANCE = 1e-2  # a level this close (relatively) to the target downsample counts as it
READ_BLOCK_PX = 2048  # side, in level pixels, of the regions tiles are read in
WRITE_BATCH_TILES = 64  # tiles read, normalised and written at a time (bounds the memory)


def slide_mpp(
    slide: openslide.AbstractSlide, *, slide_path: Path, mpp_fallback: float | None = None
) -> tuple[float, str]:
    """Return (level-0 microns per pixel, where it came from) of an open slide."""
    props = slide.properties
    value = props.get(openslide.PROPERTY_NAME_MPP_X)
    if value and float(value) > 0:
        mpp_y = props.get(openslide.PROPERTY_NAME_MPP_Y)
        if mpp_y and not math.isclose(float(value), float(mpp_y), rel_tol=0.01):
            log.warning("%s: mpp-x %s and mpp-y %s differ; using mpp-x", slide_path, value, mpp_y)
        return float(value), "openslide.mpp-x"
    power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if power and float(power) > 0:
        mpp = 10.0 / float(power)
        log.warning("%s: no openslide.mpp-x; approximating %.3f um/px from objective power %s",
                    slide_path, mpp, power)
        return mpp, "objective-power"
    if mpp_fallback:
        log.warning("%s: no openslide.mpp-x or objective power; using mpp_fallback %s",
                    slide_path, mpp_fallback)
        return float(mpp_fallback), "mpp_fallback"
    raise SlideError(f"{slide_path}: no resolution: no openslide.mpp-x, no objective power, "
                     "and no mpp_fallback configured")


def open_slide(path: Path) -> openslide.OpenSlide:
    """The slide at `path`, or a SlideError saying why OpenSlide cannot open it."""
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as err:
        raise SlideError(f"{path}: not a slide format OpenSlide can read ({err})") from err
    except openslide.OpenSlideError as err:
        raise SlideError(f"{path}: OpenSlide cannot open it ({err})") from err


def _read_annotation(path: Path, dimensions: tuple[int, int]) -> tuple[np.ndarray, float, float]:
    """Return (annotation bool mask, x factor, y factor from mask to level-0 pixels)."""
    try:
        mask = tifffile.imread(path)
    except (OSError, ValueError) as err:  # tifffile.TiffFileError is a ValueError
        raise SlideError(f"{path}: unreadable annotation TIFF ({err})") from err
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2 or min(mask.shape) == 0:
        raise SlideError(f"{path}: annotation shape {mask.shape}, expected a 2-D (H, W) mask")
    width, height = dimensions
    factor_x, factor_y = width / mask.shape[1], height / mask.shape[0]
    factor = (factor_x + factor_y) / 2
    # an annotation at downsample d has ceil or floor of (size / d) pixels: allow one pixel off
    if (abs(width / factor - mask.shape[1]) > 1 + 0.01 * mask.shape[1]
            or abs(height / factor - mask.shape[0]) > 1 + 0.01 * mask.shape[0]):
        raise SlideError(f"{path}: annotation {mask.shape[1]}x{mask.shape[0]} does not cover the "
                         f"slide {width}x{height} at one downsample")
    return mask > 0, factor_x, factor_y


def _tile_mask(
    annotation: np.ndarray, factors: tuple[float, float], x0: float, y0: float,
    size0: float, tile_px: int,
) -> np.ndarray:
    """Nearest-neighbour sample of the annotation at the tile's pixel centres, 0/1 uint8.

    Written by hand because sampling at exact level-0 pixel centres avoids rounding the crop
    edges of a coarse annotation (half a mask pixel can be many slide pixels).
    """
    centres = (np.arange(tile_px) + 0.5) * size0 / tile_px
    cols = np.floor((x0 + centres) / factors[0]).astype(np.int64).clip(0, annotation.shape[1] - 1)
    rows = np.floor((y0 + centres) / factors[1]).astype(np.int64).clip(0, annotation.shape[0] - 1)
    return annotation[np.ix_(rows, cols)].astype(np.uint8)


def _tissue_fractions(
    tissue: np.ndarray, scale: tuple[float, float], size0: float, n_rows: int, n_cols: int
) -> np.ndarray:
    """Fraction of tissue thumbnail pixels under each grid tile, (n_rows, n_cols).

    Summed-area table by hand: one pass gives the sum over every tile box at once.
    """
    table = np.pad(tissue.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def bounds(n: int, factor: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        start = np.round(np.arange(n) * size0 / factor).astype(np.int64).clip(0, limit - 1)
        stop = np.round((np.arange(n) + 1) * size0 / factor).astype(np.int64)
        return start, np.maximum(stop, start + 1).clip(1, limit)

    x0, x1 = bounds(n_cols, scale[0], tissue.shape[1])
    y0, y1 = bounds(n_rows, scale[1], tissue.shape[0])
    sums = (table[np.ix_(y1, x1)] - table[np.ix_(y0, x1)]
            - table[np.ix_(y1, x0)] + table[np.ix_(y0, x0)])
    return sums / ((y1 - y0)[:, None] * (x1 - x0)[None, :])


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def _qc_image(
    thumbnail: Image.Image, tissue: np.ndarray | None, scale: tuple[float, float],
    boxes: list[tuple[float, float, float]], annotation: np.ndarray | None = None,
) -> Image.Image:
    """Thumbnail with the tissue outline (green), annotation outline (blue), kept tiles (red)."""
    shrink = min(1.0, QC_MAX_PX / max(thumbnail.size))
    size = (max(1, round(thumbnail.width * shrink)), max(1, round(thumbnail.height * shrink)))
    image = thumbnail.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image).copy()
    for mask, colour in ((tissue, (0, 200, 0)), (annotation, (0, 0, 255))):
        if mask is None or not mask.any():
            continue
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            size, Image.Resampling.NEAREST)) > 0
        pixels[find_boundaries(small, mode="inner")] = colour
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for x0, y0, size0 in boxes:
        left, top = x0 / scale[0] * shrink, y0 / scale[1] * shrink
        right, bottom = (x0 + size0) / scale[0] * shrink, (y0 + size0) / scale[1] * shrink
        draw.rectangle((left, top, right, bottom), outline=(255, 0, 0))
    return image


def _failed_qc_image(reason: str, thumbnail: Image.Image | None) -> Image.Image:
    """The thumbnail (when there is one) or a grey card, with the failure reason written on it."""
    if thumbnail is not None:
        shrink = min(1.0, QC_MAX_PX / max(thumbnail.size))
        image = thumbnail.convert("RGB").resize(
            (max(1, round(thumbnail.width * shrink)), max(1, round(thumbnail.height * shrink))))
    else:
        image = Image.new("RGB", (512, 128), (220, 220, 220))
    draw = ImageDraw.Draw(image)
    words, lines = reason.split(), [""]
    for word in words:  # wrap at ~70 characters
        if len(lines[-1]) + len(word) > 70:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    draw.multiline_text((4, 4), "FAILED: " + "\n".join(lines), fill=(200, 0, 0))
    return image


def _check_options(tile_px: int, mpp: float, tissue_min: float, max_tiles: int | None) -> None:
    if tile_px < 1:
        raise ConfigError(f"tile_px must be a positive number of pixels, got {tile_px}")
    if not mpp > 0:
        raise ConfigError(f"mpp must be positive (microns per pixel), got {mpp}")
    if not 0 <= tissue_min <= 1:
        raise ConfigError(f"tissue_min must be a fraction in [0, 1], got {tissue_min}")
    if max_tiles is not None and max_tiles < 1:
        raise ConfigError(f"max_tiles must be at least 1 (or None for all), got {max_tiles}")


@dataclass
class TilePlan:
    """Where the tiles of one slide are: pyramid level, grid and tissue fraction per grid cell."""

    mpp_slide: float
    mpp_source: str
    level: int
    level_downsample: float
    read_px: int  # tile side in pixels of `level` (resized to tile_px)
    size0: float  # tile side in level-0 pixels
    n_rows: int
    n_cols: int
    fractions: np.ndarray  # (n_rows, n_cols) tissue fraction
    thumbnail: Image.Image
    scale: tuple[float, float]  # level-0 pixels per thumbnail pixel
    tissue: np.ndarray

    def origin(self, cell: int) -> tuple[int, int]:
        """Level-0 (x, y) of the top-left corner of grid cell `cell` (row-major index)."""
        row, col = divmod(int(cell), self.n_cols)
        return round(col * self.size0), round(row * self.size0)


def plan_tiles(
    slide: openslide.AbstractSlide, *, slide_path: Path, tile_px: int, mpp: float,
    mpp_fallback: float | None,
) -> TilePlan:
    """The tile grid of a slide at `mpp`, and the tissue fraction of each cell (thumbnail only)."""
    slide_mpp_value, mpp_source = slide_mpp(slide, slide_path=slide_path,
                                            mpp_fallback=mpp_fallback)
    target_downsample = mpp / slide_mpp_value
    level = slide.get_best_level_for_downsample(target_downsample * (1 + LEVEL_TOLERANCE))
    level_downsample = float(slide.level_downsamples[level])
    if target_downsample < 1 - LEVEL_TOLERANCE:
        log.warning("%s: target %.3f um/px is finer than level 0 (%.3f um/px); upsampling",
                    slide_path, mpp, slide_mpp_value)
    read_px = max(1, round(tile_px * target_downsample / level_downsample))
    size0 = read_px * level_downsample
    level_width, level_height = slide.level_dimensions[level]
    n_cols, n_rows = level_width // read_px, level_height // read_px
    if n_cols == 0 or n_rows == 0:
        raise SlideError(f"{slide_path}: level {level} ({level_width}x{level_height}) is smaller "
                         f"than one {read_px}-px tile")
    width, height = slide.dimensions
    longest = max(width, height)
    thumb_downsample = max(1.0, min(max(size0 / THUMBNAIL_TILE_PX, longest / THUMBNAIL_MAX_PX),
                                    longest / THUMBNAIL_MIN_PX))
    thumbnail = slide.get_thumbnail((max(1, math.ceil(width / thumb_downsample)),
                                     max(1, math.ceil(height / thumb_downsample))))
    scale = (width / thumbnail.width, height / thumbnail.height)
    tissue = tissue_mask(np.asarray(thumbnail.convert("RGB")))
    fractions = (_tissue_fractions(tissue, scale, size0, n_rows, n_cols) if tissue.any()
                 else np.zeros((n_rows, n_cols)))
    return TilePlan(slide_mpp_value, mpp_source, level, level_downsample, read_px, size0,
                    n_rows, n_cols, fractions, thumbnail, scale, tissue)


def _region_rgb(region: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of an OpenSlide RGBA region, transparent pixels (unscanned) white."""
    rgba = np.asarray(region)
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return rgba[..., :3]
    a = alpha.astype(np.float32) / 255.0
    return (rgba[..., :3] * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def _read_jobs(plan: TilePlan, cells: np.ndarray) -> list[tuple[int, int, int, int, list[int]]]:
    """Group grid cells into region reads: (row0, col0, rows, cols, positions in `cells`).

    Cells are gathered in blocks of about READ_BLOCK_PX level pixels a side; a block is read in
    one call over the bounding box of its cells when they fill at least half of it (one decode
    of each JPEG tile instead of up to four), else cell by cell.
    """
    per_block = max(1, READ_BLOCK_PX // plan.read_px)
    rows, cols = np.divmod(cells, plan.n_cols)
    blocks: dict[tuple[int, int], list[int]] = {}
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        blocks.setdefault((int(r) // per_block, int(c) // per_block), []).append(i)
    jobs = []
    for members in blocks.values():
        r, c = rows[members], cols[members]
        box_rows, box_cols = int(r.max() - r.min() + 1), int(c.max() - c.min() + 1)
        if len(members) * 2 >= box_rows * box_cols:
            jobs.append((int(r.min()), int(c.min()), box_rows, box_cols, members))
        else:
            jobs.extend((int(rr), int(cc), 1, 1, [m]) for rr, cc, m in zip(r, c, members,
                                                                           strict=True))
    return jobs


def read_tiles(
    slide: openslide.AbstractSlide, plan: TilePlan, cells: np.ndarray, *, tile_px: int,
    threads: int = 1,
) -> np.ndarray:
    """uint8 (N, 3, tile_px, tile_px) tiles of the grid `cells`, read block-wise in threads.

    OpenSlide's reads run in C without the GIL, so `threads` reads overlap.
    """
    cells = np.asarray(cells, dtype=np.int64)
    out = np.empty((len(cells), 3, plan.read_px, plan.read_px), dtype=np.uint8)
    side = plan.read_px

    def read(job: tuple[int, int, int, int, list[int]]) -> None:
        row0, col0, n_rows, n_cols, members = job
        x0, y0 = round(col0 * plan.size0), round(row0 * plan.size0)
        region = _region_rgb(slide.read_region((x0, y0), plan.level,
                                               (n_cols * side, n_rows * side)))
        for m in members:
            r, c = divmod(int(cells[m]), plan.n_cols)
            y, x = (r - row0) * side, (c - col0) * side
            out[m] = region[y:y + side, x:x + side].transpose(2, 0, 1)

    jobs = _read_jobs(plan, cells)
    if threads > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(read, jobs))
    else:
        for job in jobs:
            read(job)
    return _resize(out, tile_px)


def _resize(tiles: np.ndarray, tile_px: int) -> np.ndarray:
    """Tiles resized to tile_px (antialiased bilinear, batched in torch); unchanged if equal."""
    if tiles.shape[-1] == tile_px or len(tiles) == 0:
        return tiles
    batch = torch.from_numpy(tiles).to(torch.float32)
    resized = torch.nn.functional.interpolate(batch, size=(tile_px, tile_px), mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized.clamp_(0, 255).round_().to(torch.uint8).numpy()


def _choose_cells(plan: TilePlan, *, slide_path: Path, tissue_min: float, max_tiles: int | None,
                  seed: int) -> tuple[np.ndarray, int]:
    """(chosen grid cells, number of tissue cells): the cells kept, a seeded subset if capped."""
    if not plan.tissue.any():
        raise SlideError(f"{slide_path}: no tissue found on the thumbnail")
    candidates = np.flatnonzero(plan.fractions.ravel() >= tissue_min)
    if candidates.size == 0:
        raise SlideError(f"{slide_path}: no tile with tissue fraction >= {tissue_min} "
                         f"(best {plan.fractions.max():.2f})")
    chosen = candidates
    if max_tiles is not None and candidates.size > max_tiles:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(candidates, size=max_tiles, replace=False))
    return chosen, int(candidates.size)


def _tile(
    slide: openslide.OpenSlide, *, image_id: str, slide_path: Path, mask_path: Path | None,
    out_path: Path, tile_px: int, mpp: float, mpp_fallback: float | None, tissue_min: float,
    max_tiles: int | None, seed: int, normaliser: Normaliser | None, threads: int,
    qc: dict[str, Any], attrs: dict[str, Any],
) -> int:
    """Tile one open slide into the bank at `out_path`; return the tile count. Fills `qc`."""
    plan = plan_tiles(slide, slide_path=slide_path, tile_px=tile_px, mpp=mpp,
                      mpp_fallback=mpp_fallback)
    qc.update(mpp_slide=plan.mpp_slide, thumbnail=plan.thumbnail, scale=plan.scale,
              tissue=plan.tissue)
    chosen, n_tissue = _choose_cells(plan, slide_path=slide_path, tissue_min=tissue_min,
                                     max_tiles=max_tiles, seed=seed)
    origins = [plan.origin(cell) for cell in chosen]
    qc["boxes"] = [(x, y, plan.size0) for x, y in origins]
    width, height = slide.dimensions
    annotation = None
    if mask_path is not None:
        annotation, factor_x, factor_y = _read_annotation(mask_path, (width, height))
        qc["annotation"] = annotation

    n_skipped = 0
    coords = np.asarray(origins, dtype=np.float64).reshape(-1, 2)
    with bank_writer(out_path, n_items=len(chosen), item_shape=(3, tile_px, tile_px),
                     modality="wsi", coords=coords, with_masks=annotation is not None) as bank:
        batches = range(0, len(chosen), WRITE_BATCH_TILES)
        for start in progress(batches, desc=f"tiles {image_id}", unit="batch"):
            cells = chosen[start:start + WRITE_BATCH_TILES]
            tiles = read_tiles(slide, plan, cells, tile_px=tile_px, threads=threads)
            if normaliser is not None:
                tiles, skipped = normaliser.transform(tiles, return_skipped=True)
                n_skipped += int(skipped.sum())
            masks = None
            if annotation is not None:
                masks = np.stack([
                    _tile_mask(annotation, (factor_x, factor_y), *origins[start + i],
                               plan.size0, tile_px) for i in range(len(cells))])
            bank.write(start, images=tiles, masks=masks)
        attrs.update({
            "mpp": mpp, "mpp_slide": plan.mpp_slide, "mpp_source": plan.mpp_source,
            "level": plan.level, "level_downsample": plan.level_downsample,
            "read_px": plan.read_px, "tile_px": tile_px, "tile_size_level0": plan.size0,
            "tissue_min": tissue_min, "n_tissue_tiles": n_tissue, "max_tiles": max_tiles,
            "seed": seed, "dimensions": [width, height],
            "vendor": slide.properties.get(openslide.PROPERTY_NAME_VENDOR, ""),
            "source": str(slide_path),
            "annotation": str(mask_path) if mask_path is not None else "",
            "coords_columns": '["x_level0", "y_level0"]',
            "stain_normalisation": json.dumps(normaliser.to_dict()) if normaliser else "none",
            "stain_skipped_tiles": n_skipped,
        })
        bank.attrs = dict(attrs)
    if n_skipped:
        log.warning("%s: %d of %d tiles had too little tissue for stain normalisation; kept "
                    "as read", image_id, n_skipped, len(chosen))
    return len(chosen)


def tile_slide(
    *,
    image_id: str,
    case_id: str,
    slide_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str] | None,
    out_path: str | os.PathLike[str],
    qc_png_path: str | os.PathLike[str],
    tile_px: int = 224,
    mpp: float = 0.5,
    mpp_fallback: float | None = None,
    tissue_min: float = 0.5,
    max_tiles: int | None = 256,
    seed: int = 0,
    normaliser: Normaliser | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Write the tissue-tile bank and QC thumbnail of one slide; return its QC row.

    Tiles are read block-wise (`threads` reads at once), stain-normalised by `normaliser`
    (fitted; None leaves colours as scanned) and written a batch at a time, so memory stays
    bounded whatever the slide's size. A slide that cannot be read or tiled (SlideError,
    OpenSlide or I/O errors) never raises: a failed bank and a QC card with the reason are
    written and the row says why. Invalid options raise ConfigError.
    """
    _check_options(tile_px, mpp, tissue_min, max_tiles)
    start = time.perf_counter()
    slide_path = Path(slide_path)
    mask = Path(mask_path) if mask_path not in (None, "") else None
    row: dict[str, Any] = {
        "image_id": image_id, "case_id": case_id, "modality": "wsi", "status": "ok",
        "reason": "", "n_items": 0, "mpp": None, "level": None, "seconds": 0.0,
    }
    qc: dict[str, Any] = {}
    attrs: dict[str, Any] = {"image_id": image_id, "case_id": case_id, "modality": "wsi"}
    try:
        with open_slide(slide_path) as slide:
            n_tiles = _tile(
                slide, image_id=image_id, slide_path=slide_path, mask_path=mask,
                out_path=Path(out_path), tile_px=tile_px, mpp=mpp, mpp_fallback=mpp_fallback,
                tissue_min=tissue_min, max_tiles=max_tiles, seed=seed, normaliser=normaliser,
                threads=threads, qc=qc, attrs=attrs,
            )
    except (SlideError, openslide.OpenSlideError, OSError) as err:
        text = str(err) if isinstance(err, SlideError) else f"{type(err).__name__}: {err}"
        reason = " ".join(text.split())
        log.error("%s: slide bank failed: %s", image_id, reason)
        write_failed_bank(out_path, image_id=image_id, case_id=case_id, modality="wsi",
                          reason=reason)
        _save_png(_failed_qc_image(reason, qc.get("thumbnail")), Path(qc_png_path))
        row.update(status="failed", reason=reason, mpp=qc.get("mpp_slide"))
    else:
        _save_png(_qc_image(qc["thumbnail"], qc["tissue"], qc["scale"], qc["boxes"],
                            qc.get("annotation")), Path(qc_png_path))
        row.update(n_items=n_tiles, mpp=round(attrs["mpp_slide"], 4), level=attrs["level"])
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row
