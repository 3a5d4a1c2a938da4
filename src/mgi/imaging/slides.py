"""Whole-slide images: tissue tiles at a target resolution into an image bank, plus a QC thumbnail.

OpenSlide reads the slide (SVS and the other formats it knows). Tissue is found on a low-resolution
thumbnail, so background is never read at full resolution; tiles are read from the pyramid level
nearest the target resolution (at or finer than it) and resized to `tile_px`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries
from tqdm import tqdm

from mgi.errors import ConfigError, SlideError
from mgi.imaging.bank import write_bank, write_failed_bank
from mgi.imaging.tissue import tissue_mask
from mgi.io import atomic_path

log = logging.getLogger(__name__)

# long side of the thumbnail used for tissue detection: at least THUMBNAIL_MIN_PX, more (up to
# THUMBNAIL_MAX_PX) where needed for one tile to span THUMBNAIL_TILE_PX thumbnail pixels
THUMBNAIL_MIN_PX = 1024
THUMBNAIL_MAX_PX = 4096
THUMBNAIL_TILE_PX = 8
QC_MAX_PX = 1024  # long side of the QC PNG
LEVEL_TOLERANCE = 1e-2  # a level this close (relatively) to the target downsample counts as it


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


def _open_slide(path: Path) -> openslide.OpenSlide:
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


def _rgb(region: Image.Image) -> Image.Image:
    """Composite an OpenSlide RGBA region on white (transparent = outside the scanned area)."""
    background = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, region).convert("RGB")


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


def _tile(
    slide: openslide.OpenSlide, *, image_id: str, slide_path: Path, mask_path: Path | None,
    tile_px: int, mpp: float, mpp_fallback: float | None, tissue_min: float,
    max_tiles: int | None, seed: int, qc: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, Any]]:
    """Tile one open slide; fills `qc` (thumbnail, tissue, tile boxes) as it goes."""
    slide_mpp_value, mpp_source = slide_mpp(slide, slide_path=slide_path,
                                            mpp_fallback=mpp_fallback)
    qc["mpp_slide"] = slide_mpp_value
    target_downsample = mpp / slide_mpp_value
    level = slide.get_best_level_for_downsample(target_downsample * (1 + LEVEL_TOLERANCE))
    level_downsample = float(slide.level_downsamples[level])
    if target_downsample < 1 - LEVEL_TOLERANCE:
        log.warning("%s: target %.3f um/px is finer than level 0 (%.3f um/px); upsampling",
                    slide_path, mpp, slide_mpp_value)
    read_px = max(1, round(tile_px * target_downsample / level_downsample))
    size0 = read_px * level_downsample  # level-0 pixels covered by one tile
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
    scale = (width / thumbnail.width, height / thumbnail.height)  # level-0 px per thumbnail px
    qc.update(thumbnail=thumbnail, scale=scale)
    tissue = tissue_mask(np.asarray(thumbnail.convert("RGB")))
    qc["tissue"] = tissue
    if not tissue.any():
        raise SlideError(f"{slide_path}: no tissue found on the thumbnail")
    fractions = _tissue_fractions(tissue, scale, size0, n_rows, n_cols)
    candidates = np.flatnonzero(fractions.ravel() >= tissue_min)
    if candidates.size == 0:
        raise SlideError(f"{slide_path}: no tile with tissue fraction >= {tissue_min} "
                         f"(best {fractions.max():.2f})")
    chosen = candidates
    if max_tiles is not None and candidates.size > max_tiles:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(candidates, size=max_tiles, replace=False))
    rows, cols = np.divmod(chosen, n_cols)
    origins = [(round(c * size0), round(r * size0)) for r, c in zip(rows, cols, strict=True)]
    qc["boxes"] = [(x, y, size0) for x, y in origins]

    annotation = None
    if mask_path is not None:
        annotation, factor_x, factor_y = _read_annotation(mask_path, (width, height))
        qc["annotation"] = annotation

    images = np.empty((len(origins), 3, tile_px, tile_px), dtype=np.uint8)
    masks = np.zeros((len(origins), tile_px, tile_px), dtype=np.uint8) if annotation is not None \
        else None
    for i, (x0, y0) in enumerate(tqdm(origins, desc=f"tiles {image_id}", unit="tile",
                                      disable=None)):
        tile = _rgb(slide.read_region((x0, y0), level, (read_px, read_px)))
        if read_px != tile_px:
            tile = tile.resize((tile_px, tile_px), Image.Resampling.LANCZOS)
        images[i] = np.asarray(tile).transpose(2, 0, 1)
        if masks is not None:
            masks[i] = _tile_mask(annotation, (factor_x, factor_y), x0, y0, size0, tile_px)

    attrs = {
        "mpp": mpp,
        "mpp_slide": slide_mpp_value,
        "mpp_source": mpp_source,
        "level": level,
        "level_downsample": level_downsample,
        "read_px": read_px,
        "tile_px": tile_px,
        "tile_size_level0": size0,
        "tissue_min": tissue_min,
        "n_tissue_tiles": int(candidates.size),
        "max_tiles": max_tiles,
        "seed": seed,
        "dimensions": [width, height],
        "vendor": slide.properties.get(openslide.PROPERTY_NAME_VENDOR, ""),
        "annotation": str(mask_path) if mask_path is not None else "",
        "coords_columns": '["x_level0", "y_level0"]',
    }
    coords = np.asarray(origins, dtype=np.float64).reshape(-1, 2)
    return images, masks, coords, attrs


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
) -> dict[str, Any]:
    """Write the tissue-tile bank and QC thumbnail of one slide; return its QC row.

    A slide that cannot be read or tiled (SlideError, OpenSlide or I/O errors) never raises: a
    failed bank and a QC card with the reason are written and the row says why. Invalid options
    raise ConfigError.
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
    try:
        with _open_slide(slide_path) as slide:
            images, masks, coords, attrs = _tile(
                slide, image_id=image_id, slide_path=slide_path, mask_path=mask,
                tile_px=tile_px, mpp=mpp, mpp_fallback=mpp_fallback, tissue_min=tissue_min,
                max_tiles=max_tiles, seed=seed, qc=qc,
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
        write_bank(out_path, images=images, masks=masks, coords=coords,
                   attrs={"image_id": image_id, "case_id": case_id, "modality": "wsi",
                          "status": "ok", "reason": "", **attrs})
        _save_png(_qc_image(qc["thumbnail"], qc["tissue"], qc["scale"], qc["boxes"],
                            qc.get("annotation")), Path(qc_png_path))
        row.update(n_items=len(images), mpp=round(attrs["mpp_slide"], 4), level=attrs["level"])
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row
