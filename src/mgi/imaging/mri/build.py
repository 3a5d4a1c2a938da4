"""One MR case (its series and masks) into a normalised, multi-sequence slice bank."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.errors import InvalidDicomError
from skimage.transform import resize

from mgi.errors import ConfigError, SeriesError
from mgi.imaging.bank import write_bank, write_failed_bank
from mgi.imaging.mri.choice import description_key, find_series, flair_name
from mgi.imaging.mri.dicom import (
    ORIENTATION_ATOL,
    POSITION_ATOL_MM,
    SPACING_ATOL,
    MRSeries,
    read_series,
)
from mgi.imaging.mri.masks import load_masks, mask_kind
from mgi.imaging.mri.normalise import NORMALISE, brain_mask, normalise_volume

log = logging.getLogger(__name__)

MISSING_SEQUENCE = ("flair", "zeros", "error")
KEEP_SLICES = ("all", "tumour", "brain")


def _check_options(
    sequences: tuple[str, ...], missing_sequence: str, image_px: int,
    clip_percentiles: tuple[float, float], normalise: str, keep_slices: str,
) -> None:
    if not sequences:
        raise ConfigError("sequences must name at least one SeriesDescription")
    if missing_sequence not in MISSING_SEQUENCE:
        raise ConfigError(f"missing_sequence must be one of {MISSING_SEQUENCE}, "
                          f"got {missing_sequence!r}")
    if missing_sequence == "flair" and flair_name(sequences) is None:
        raise ConfigError(f"missing_sequence 'flair' needs a FLAIR sequence in {sequences}")
    if normalise not in NORMALISE:
        raise ConfigError(f"normalise must be one of {NORMALISE}, got {normalise!r}")
    if keep_slices not in KEEP_SLICES:
        raise ConfigError(f"keep_slices must be one of {KEEP_SLICES}, got {keep_slices!r}")
    if image_px < 1:
        raise ConfigError(f"image_px must be a positive number of pixels, got {image_px}")
    low, high = clip_percentiles
    if not 0 <= low < high <= 100:
        raise ConfigError(f"clip_percentiles must satisfy 0 <= low < high <= 100, "
                          f"got {clip_percentiles}")


def _check_same_geometry(reference: MRSeries, name: str, other: MRSeries, ref_name: str) -> None:
    if other.volume.shape != reference.volume.shape:
        raise SeriesError(f"{other.files[0].parent}: series {name!r} has shape "
                          f"{other.volume.shape}, {ref_name!r} has {reference.volume.shape}; "
                          "sequences must be co-registered")
    same = (
        np.allclose(other.orientation, reference.orientation, atol=ORIENTATION_ATOL)
        and np.allclose(other.pixel_spacing, reference.pixel_spacing, atol=SPACING_ATOL)
        and np.allclose(other.positions, reference.positions, atol=POSITION_ATOL_MM)
    )
    if not same:
        raise SeriesError(f"{other.files[0].parent}: series {name!r} differs from {ref_name!r} "
                          "in orientation, pixel spacing or slice positions; "
                          "sequences must be co-registered")


def _build(
    *, case_id: str, series_root: Path, mask_dir: Path | None, sequences: tuple[str, ...],
    missing_sequence: str, image_px: int, clip_percentiles: tuple[float, float],
    normalise: str, keep_slices: str, brain_threshold: float, brain_min_fraction: float,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, Any]]:
    found = find_series(series_root)
    folders: dict[str, Path] = {}
    for name in sequences:
        matches = found.get(description_key(name), [])
        if len(matches) > 1:
            raise SeriesError(f"{series_root}: {len(matches)} series described {name!r}: "
                              f"{[m.name for m in matches]}")
        if matches:
            folders[name] = matches[0]
    missing = [name for name in sequences if name not in folders]
    if not folders:
        raise SeriesError(f"{series_root}: none of the sequences {list(sequences)} found; "
                          f"SeriesDescriptions found: {sorted(found)}")
    flair = flair_name(sequences)
    if missing and missing_sequence == "error":
        raise SeriesError(f"{series_root}: sequence(s) {missing} not found; "
                          f"SeriesDescriptions found: {sorted(found)}")
    if missing and missing_sequence == "flair" and flair not in folders:
        raise SeriesError(f"{series_root}: sequence(s) {missing} not found and FLAIR "
                          f"({flair!r}), which replaces them, is missing too")

    series = {name: read_series(folder) for name, folder in folders.items()}
    reference_name = flair if flair in series else next(iter(series))
    reference = series[reference_name]
    for name, other in series.items():
        _check_same_geometry(reference, name, other, reference_name)
    if reference.patient_id and reference.patient_id != case_id:
        log.warning("%s: PatientID %r differs from case_id %r",
                    series_root, reference.patient_id, case_id)

    brains = {name: brain_mask(s.volume, threshold=brain_threshold)
              for name, s in series.items()}
    normalised = {
        name: normalise_volume(s.volume, clip_percentiles=clip_percentiles, method=normalise,
                               brain=brains[name])
        for name, s in series.items()
    }
    filled: dict[str, str] = {}
    channels = []
    for name in sequences:
        if name in normalised:
            channels.append(normalised[name])
            filled[name] = "series"
        elif missing_sequence == "flair":
            channels.append(normalised[flair])
            filled[name] = f"replaced by {flair}"
        else:
            channels.append(np.zeros_like(reference.volume))
            filled[name] = "zeros"
    if missing:
        log.warning("%s: missing sequence(s) %s: %s", series_root, missing,
                    {m: filled[m] for m in missing})
    volume = np.stack(channels, axis=1)  # (Z, C, H, W)
    height, width = reference.volume.shape[1:]

    masks = None
    mask_source = "none"
    if mask_dir is not None:
        mask_source = mask_kind(mask_dir)
        masks = load_masks(mask_dir, reference)

    if keep_slices == "all":
        keep = np.ones(len(volume), dtype=bool)
    elif keep_slices == "tumour":
        if masks is None:
            raise SeriesError(f"{series_root}: keep_slices 'tumour' needs masks, "
                              "but no mask folder was given")
        keep = masks.reshape(len(masks), -1).any(axis=1)
    else:
        brain = np.any(list(brains.values()), axis=0)  # (Z, H, W)
        keep = brain.reshape(len(brain), -1).mean(axis=1) >= brain_min_fraction
    if not keep.any():
        raise SeriesError(f"{series_root}: no slice kept with keep_slices {keep_slices!r} "
                          f"(of {len(keep)} slices)")

    volume = volume[keep]
    target = (len(volume), len(sequences), image_px, image_px)
    images = resize(volume, target, order=1, preserve_range=True,
                    anti_aliasing=image_px < min(height, width)).astype(np.float16)
    if masks is not None:
        masks = resize(masks[keep], (len(images), image_px, image_px), order=0,
                       preserve_range=True, anti_aliasing=False).astype(np.uint8)
    coords = np.column_stack([reference.z[keep], reference.instance_numbers[keep]])
    row_mm, col_mm = reference.pixel_spacing
    attrs = {
        "sequences": json.dumps(list(sequences)),
        "sequences_filled": json.dumps(filled),
        "series_uids": json.dumps({name: s.series_uid for name, s in series.items()}),
        "reference_sequence": reference_name,
        "patient_id": reference.patient_id,
        "spacing": [reference.slice_gap, row_mm, col_mm],
        "pixel_spacing": [row_mm * height / image_px, col_mm * width / image_px],
        "orientation": reference.orientation.tolist(),
        "image_px": image_px,
        "normalise": normalise,
        "clip_percentiles": list(clip_percentiles),
        "keep_slices": keep_slices,
        "brain_threshold": brain_threshold,
        "brain_min_fraction": brain_min_fraction,
        "n_slices_total": len(keep),
        "mask_source": mask_source,
        "coords_columns": json.dumps(["z_mm", "instance_number"]),
    }
    return images, masks, coords, attrs


def _reason(err: BaseException) -> str:
    """One-line failure reason for the QC table."""
    text = str(err) if isinstance(err, SeriesError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def build_mri_bank(
    *,
    image_id: str,
    case_id: str,
    series_root: str | os.PathLike[str],
    mask_dir: str | os.PathLike[str] | None,
    out_path: str | os.PathLike[str],
    sequences: tuple[str, ...] = ("T1 pre", "FLAIR", "T1 post"),
    missing_sequence: str = "flair",
    image_px: int = 64,
    clip_percentiles: tuple[float, float] = (0.5, 99.5),
    normalise: str = "zscore",
    keep_slices: str = "all",
    brain_threshold: float = 0.1,
    brain_min_fraction: float = 0.05,
) -> dict[str, Any]:
    """Write the slice bank of one MR case and return its QC row (a failed bank on bad data).

    Brain voxels (those normalised, and counted by keep_slices "brain") are found per volume by
    `brain_mask` with `brain_threshold`; a "brain" slice has at least `brain_min_fraction` of
    its pixels brain in some sequence. Bad data (SeriesError, unreadable files) never raises:
    the bank is written with status "failed" and the row says why. Invalid options raise
    ConfigError.
    """
    sequences = tuple(sequences)
    _check_options(sequences, missing_sequence, image_px, tuple(clip_percentiles), normalise,
                   keep_slices)
    for name, value in (("brain_threshold", brain_threshold),
                        ("brain_min_fraction", brain_min_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be a fraction in [0, 1), got {value}")
    start = time.perf_counter()
    row: dict[str, Any] = {
        "image_id": image_id, "case_id": case_id, "modality": "mri", "status": "ok",
        "reason": "", "n_items": 0, "spacing_mm": None, "level": None, "seconds": 0.0,
    }
    try:
        images, masks, coords, attrs = _build(
            case_id=case_id, series_root=Path(series_root),
            mask_dir=Path(mask_dir) if mask_dir not in (None, "") else None,
            sequences=sequences, missing_sequence=missing_sequence, image_px=image_px,
            clip_percentiles=tuple(clip_percentiles), normalise=normalise,
            keep_slices=keep_slices, brain_threshold=brain_threshold,
            brain_min_fraction=brain_min_fraction,
        )
    except (SeriesError, OSError, InvalidDicomError) as err:
        reason = _reason(err)
        log.error("%s: MRI bank failed: %s", image_id, reason)
        write_failed_bank(out_path, image_id=image_id, case_id=case_id, modality="mri",
                          reason=reason)
        row.update(status="failed", reason=reason)
    else:
        write_bank(out_path, images=images, masks=masks, coords=coords,
                   attrs={"image_id": image_id, "case_id": case_id, "modality": "mri",
                          "status": "ok", "reason": "", **attrs})
        row.update(n_items=len(images), spacing_mm=round(attrs["spacing"][1], 4))
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row

