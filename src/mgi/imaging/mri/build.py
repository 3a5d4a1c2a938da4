"""One MR case (a DICOM study, an LGG-set slice folder or NIfTI volumes) into its slice bank.

Each layout has a loader that returns the case's sequences on one grid (`CaseVolumes`, before
normalisation); `finish` then normalises every channel, fills missing roles, keeps slices and
resizes, the same for all layouts. `build_mri_bank` never raises on bad data: it writes a
failed bank naming the reason, and the cohort goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.errors import InvalidDicomError

from mgi.errors import ConfigError, SeriesError
from mgi.imaging.bank import write_bank, write_failed_bank
from mgi.imaging.mri.choice import choose_case_series
from mgi.imaging.mri.dicom import read_series
from mgi.imaging.mri.grid import align_to_reference
from mgi.imaging.mri.masks import load_masks, mask_kind
from mgi.imaging.mri.normalise import brain_mask, normalise_volume
from mgi.options import MriOptions

log = logging.getLogger(__name__)

LAYOUTS = ("dicom", "lgg_tif", "nifti")


@dataclass
class CaseVolumes:
    """A case's sequences on the reference grid, in physical units, before normalisation."""

    channels: dict[str, np.ndarray]  # role -> (Z, H, W) float32; roles not found are absent
    reference: str  # the role whose grid the others were resampled onto
    z: np.ndarray  # (Z,) slice position along the normal, mm
    instance_numbers: np.ndarray  # (Z,) slice numbers of the reference
    pixel_spacing: tuple[float, float]  # (row, column) mm of the reference
    slice_gap: float  # mm
    orientation: np.ndarray  # (6,) direction cosines of the reference rows and columns
    masks: np.ndarray | None = None  # (Z, H, W) uint8 0/1 on the reference grid
    mask_source: str = "none"
    patient_id: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)  # layout's extras for the bank
    qc: dict[str, Any] = field(default_factory=dict)  # layout's extra QC columns


def layout_of(path: Path) -> str:
    """The layout of a case folder: nifti (NIfTI volumes), lgg_tif (slice TIFFs) or dicom."""
    if not path.is_dir():
        raise SeriesError(f"{path}: case folder not found")
    names = [p.name.lower() for p in path.iterdir() if p.is_file()]
    if any(n.endswith((".nii", ".nii.gz")) for n in names):
        return "nifti"
    if any(n.endswith((".tif", ".tiff")) for n in names):
        return "lgg_tif"
    return "dicom"


def load_dicom_case(
    *, case_id: str, series_root: Path, mask_dir: Path | None, options: MriOptions
) -> CaseVolumes:
    """Choose a study's series per role, read them and resample them onto the reference grid."""
    choice = choose_case_series(series_root, case_id=case_id, options=options)
    if not choice.folders:
        raise SeriesError(f"{series_root}: no series for any of the sequences "
                          f"{list(options.sequences)}; {choice.summary()}")
    series = {role: read_series(folder) for role, folder in choice.folders.items()}
    reference = options.reference if options.reference in series else next(iter(series))
    aligned = align_to_reference(series, reference=reference, register=options.register)
    channels, coverage, metrics = {}, {}, {}
    for role, result in aligned.items():
        coverage[role] = round(result.coverage, 4)
        if result.metric is not None:
            metrics[role] = round(result.metric, 4)
        if result.coverage < options.min_coverage:
            log.warning("%s: %s covers %.0f%% of the %s volume (< imaging.mri.min_coverage "
                        "%.0f%%); counted as missing", series_root, role, 100 * result.coverage,
                        reference, 100 * options.min_coverage)
            continue
        channels[role] = result.volume
    ref = series[reference]
    if ref.patient_id and ref.patient_id != case_id:
        log.warning("%s: PatientID %r differs from case_id %r", series_root, ref.patient_id,
                    case_id)
    masks, mask_source = None, "none"
    if mask_dir is not None:
        mask_source = mask_kind(mask_dir)
        if mask_source == "tiff" and reference != options.reference:
            # slice TIFFs are numbered by the InstanceNumber of the series they were drawn on
            raise SeriesError(f"{mask_dir}: slice masks are numbered by the slices of the "
                              f"{options.reference!r} series, but the study has none "
                              f"({choice.reasons.get(options.reference, 'not found')})")
        masks = load_masks(mask_dir, ref)
    return CaseVolumes(
        channels=channels, reference=reference, z=ref.z, instance_numbers=ref.instance_numbers,
        pixel_spacing=ref.pixel_spacing, slice_gap=ref.slice_gap, orientation=ref.orientation,
        masks=masks, mask_source=mask_source, patient_id=ref.patient_id,
        attrs={"series_uids": json.dumps({r: s.series_uid for r, s in series.items()}),
               "series_descriptions": json.dumps(
                   {r: s.series_description for r, s in series.items()}),
               "series_choice": json.dumps(choice.reasons),
               "alignment": json.dumps({r: a.how for r, a in aligned.items()})},
        qc={"coverage": json.dumps(coverage), "registration": json.dumps(metrics)},
    )


def load_case(
    *, case_id: str, path: Path, mask_path: Path | None, options: MriOptions
) -> CaseVolumes:
    """The case's volumes, read by the loader of the folder's layout."""
    layout = layout_of(path)
    if layout == "lgg_tif":
        from mgi.imaging.mri.lgg import load_lgg_case

        return load_lgg_case(path, mask_path=mask_path, options=options)
    if layout == "nifti":
        from mgi.imaging.mri.nifti import load_nifti_case

        return load_nifti_case(path, mask_path=mask_path, options=options)
    return load_dicom_case(case_id=case_id, series_root=path, mask_dir=mask_path,
                           options=options)


def _resized(array: np.ndarray, shape: tuple[int, ...], *, order: int,
             anti_aliasing: bool) -> np.ndarray:
    """`array` resampled to `shape` by skimage (values kept), or as it is when already that
    shape: slices at the bank's size are not resampled, and a bank job that resamples nothing
    does not import skimage.transform (0.6 s of a job that otherwise takes about one)."""
    if array.shape == tuple(shape):
        return array
    from skimage.transform import resize

    return resize(array, shape, order=order, preserve_range=True, anti_aliasing=anti_aliasing)


def finish(
    case: CaseVolumes, *, options: MriOptions, where: Path, brain_threshold: float,
    brain_min_fraction: float,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, Any]]:
    """Normalise, fill missing roles, keep slices and resize: (images, masks, coords, attrs)."""
    sequences = options.sequences
    missing = [name for name in sequences if name not in case.channels]
    if missing and options.missing_sequence == "error":
        raise SeriesError(f"{where}: sequence(s) {missing} not found")
    if missing and options.missing_sequence == "flair" and options.reference not in case.channels:
        raise SeriesError(f"{where}: sequence(s) {missing} not found and {options.reference!r}, "
                          "which replaces them, is missing too")
    brains = {name: brain_mask(v, threshold=brain_threshold) for name, v in case.channels.items()}
    normalised = {
        name: normalise_volume(v, clip_percentiles=tuple(options.clip_percentiles),
                               method=options.normalise, brain=brains[name])
        for name, v in case.channels.items()
    }
    shape = next(iter(case.channels.values())).shape
    filled: dict[str, str] = {}
    channels = []
    for name in sequences:
        if name in normalised:
            channels.append(normalised[name])
            filled[name] = "series"
        elif options.missing_sequence == "flair":
            channels.append(normalised[options.reference])
            filled[name] = f"replaced by {options.reference}"
        else:
            channels.append(np.zeros(shape, dtype=np.float32))
            filled[name] = "zeros"
    if missing:
        log.warning("%s: missing sequence(s) %s: %s", where, missing,
                    {m: filled[m] for m in missing})
    volume = np.stack(channels, axis=1)  # (Z, C, H, W)
    height, width = shape[1:]
    masks = case.masks

    keep_slices = options.keep_slices
    if keep_slices == "all":
        keep = np.ones(len(volume), dtype=bool)
    elif keep_slices == "tumour":
        if masks is None:
            raise SeriesError(f"{where}: keep_slices 'tumour' needs masks, but none was given")
        keep = masks.reshape(len(masks), -1).any(axis=1)
    else:
        brain = np.any(list(brains.values()), axis=0)  # (Z, H, W)
        keep = brain.reshape(len(brain), -1).mean(axis=1) >= brain_min_fraction
    if not keep.any():
        raise SeriesError(f"{where}: no slice kept with keep_slices {keep_slices!r} "
                          f"(of {len(keep)} slices)")

    volume = volume[keep]
    image_px = options.image_px
    target = (len(volume), len(sequences), image_px, image_px)
    images = _resized(volume, target, order=1,
                      anti_aliasing=image_px < min(height, width)).astype(np.float16)
    if masks is not None:
        masks = _resized(masks[keep], (len(images), image_px, image_px), order=0,
                         anti_aliasing=False).astype(np.uint8)
    coords = np.column_stack([case.z[keep], case.instance_numbers[keep]])
    row_mm, col_mm = case.pixel_spacing
    attrs = {
        "sequences": json.dumps(list(sequences)),
        "sequences_filled": json.dumps(filled),
        "reference_sequence": case.reference,
        "patient_id": case.patient_id,
        "spacing": [case.slice_gap, row_mm, col_mm],
        "pixel_spacing": [row_mm * height / image_px, col_mm * width / image_px],
        "orientation": np.asarray(case.orientation, dtype=float).tolist(),
        "image_px": image_px,
        "normalise": options.normalise,
        "clip_percentiles": list(options.clip_percentiles),
        "keep_slices": keep_slices,
        "brain_threshold": brain_threshold,
        "brain_min_fraction": brain_min_fraction,
        "n_slices_total": len(keep),
        "mask_source": case.mask_source,
        "coords_columns": json.dumps(["z_mm", "instance_number"]),
        **case.attrs,
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
    options: MriOptions | None = None,
    brain_threshold: float = 0.1,
    brain_min_fraction: float = 0.05,
) -> dict[str, Any]:
    """Write the slice bank of one MR case and return its QC row (a failed bank on bad data).

    `series_root` is the case's folder in any layout (`layout_of`); `options` are
    imaging.mri (defaults when None). Brain voxels (those normalised, and counted by
    keep_slices "brain") are found per volume by `brain_mask` with `brain_threshold`; a "brain"
    slice has at least `brain_min_fraction` of its pixels brain in some sequence. Bad data
    (SeriesError, unreadable files) never raises: the bank is written with status "failed" and
    the row says why.
    """
    options = options or MriOptions()
    for name, value in (("brain_threshold", brain_threshold),
                        ("brain_min_fraction", brain_min_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be a fraction in [0, 1), got {value}")
    start = time.perf_counter()
    row: dict[str, Any] = {
        "image_id": image_id, "case_id": case_id, "modality": "mri", "status": "ok",
        "reason": "", "n_items": 0, "spacing_mm": None, "level": None, "seconds": 0.0,
        "coverage": "", "registration": "",
    }
    root = Path(series_root)
    try:
        case = load_case(case_id=case_id, path=root,
                         mask_path=Path(mask_dir) if mask_dir not in (None, "") else None,
                         options=options)
        images, masks, coords, attrs = finish(case, options=options, where=root,
                                              brain_threshold=brain_threshold,
                                              brain_min_fraction=brain_min_fraction)
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
        row.update(n_items=len(images), spacing_mm=round(attrs["spacing"][1], 4), **case.qc)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row
