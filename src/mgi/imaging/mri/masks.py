"""Tumour masks of an MR series: LGG-style slice TIFFs, NIfTI label maps, DICOM-SEG.

Slice TIFFs ``{prefix}_{InstanceNumber}_mask.tif`` (uint8 0/255) align with the DICOM slices by
InstanceNumber; a NIfTI label map (BraTS style) or a DICOM-SEG object aligns with the slices by
patient coordinates.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import tifffile
from pydicom.misc import is_dicom
from pydicom.uid import UID, SegmentationStorage

from mgi.errors import SeriesError
from mgi.imaging.mri.dicom import (
    ORIENTATION_ATOL,
    POSITION_ATOL_MM,
    SPACING_ATOL,
    MRSeries,
    functional_group,
    pixels,
    read_dicom,
    require,
    vector,
)

log = logging.getLogger(__name__)

MASK_NAME = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)_mask\.tiff?$", re.IGNORECASE)
MASK_KINDS = ("tiff", "nifti", "dicom-seg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SEG_SLICE_TOLERANCE = 0.25  # a SEG frame matches a slice within this fraction of the slice gap
NIFTI_MAX_OUTSIDE = 0.5  # fraction of slices a label map may miss (zero masks + warning)
NIFTI_OFF_GRID = 0.1  # voxels: sampling further than this from voxel centres is resampling


def numbered_files(folder: Path, pattern: re.Pattern[str], *, what: str,
                   skip: re.Pattern[str] | None = None) -> dict[int, Path]:
    """Map number -> file of a folder's files named `pattern` (its `number` group), `skip`
    left out; SeriesError for a missing folder or two files of one number."""
    if not folder.is_dir():
        raise SeriesError(f"{folder}: {what} folder not found")
    files: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if not match or (skip is not None and skip.match(path.name)):
            continue
        number = int(match["number"])
        if number in files:
            raise SeriesError(f"{folder}: two {what} files numbered {number}: "
                              f"{files[number].name}, {path.name}")
        files[number] = path
    return files


def mask_files(mask_dir: Path) -> dict[int, Path]:
    """Map InstanceNumber -> mask file of an LGG-style mask folder."""
    return numbered_files(mask_dir, MASK_NAME, what="mask")


def read_mask_tiff(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        mask = tifffile.imread(path)
    except (OSError, ValueError) as err:  # tifffile.TiffFileError is a ValueError
        raise SeriesError(f"{path}: unreadable mask TIFF ({err})") from err
    if mask.shape != shape:
        raise SeriesError(f"{path}: mask shape {mask.shape}, expected {shape} "
                          "(the slice's Rows x Columns)")
    return (mask > 0).astype(np.uint8)


def load_slice_masks(
    mask_dir: str | os.PathLike[str], instance_numbers: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Return (Z, H, W) uint8 0/1 masks for the given InstanceNumbers (zeros where none)."""
    mask_dir = Path(mask_dir)
    files = mask_files(mask_dir)
    numbers = [int(n) for n in instance_numbers]
    if files and not set(files) & set(numbers):
        raise SeriesError(
            f"{mask_dir}: no mask matches an InstanceNumber of the series "
            f"(masks {min(files)}..{max(files)}, slices {min(numbers)}..{max(numbers)})"
        )
    missing = [n for n in numbers if n not in files]
    if missing:
        log.warning("%s: no mask for %d slice(s) (InstanceNumber %s); using empty masks",
                    mask_dir, len(missing), missing[:10])
    extra = sorted(set(files) - set(numbers))
    if extra:
        log.warning("%s: %d mask(s) match no slice (numbers %s)", mask_dir, len(extra), extra[:10])
    masks = np.zeros((len(numbers), *shape), dtype=np.uint8)
    for i, number in enumerate(numbers):
        if number in files:
            masks[i] = read_mask_tiff(files[number], shape)
    return masks


def _normal(series: MRSeries) -> np.ndarray:
    """Unit slice normal (row direction x column direction), the axis of `series.z`."""
    return np.cross(series.orientation[:3], series.orientation[3:])


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _looks_dicom(path: Path) -> bool:
    """A DICOM file by its ``DICM`` preamble, or a ``.dcm`` file without one."""
    return path.suffix.lower() == ".dcm" or is_dicom(path)


def _dicom_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
            and _looks_dicom(p)]


def mask_kind(mask_path: str | os.PathLike[str]) -> str:
    """Return which mask source `mask_path` is: one of `MASK_KINDS`.

    ``nifti``: a ``.nii``/``.nii.gz`` file; ``dicom-seg``: a DICOM file, or a folder of DICOM
    files and no LGG-style mask TIFF; ``tiff``: any other folder (also an empty or missing one,
    as before: the TIFF reader reports it).
    """
    path = Path(mask_path)
    if _is_nifti(path):
        return "nifti"
    if path.is_dir():
        return "dicom-seg" if not mask_files(path) and _dicom_files(path) else "tiff"
    if path.is_file():
        if _looks_dicom(path):
            return "dicom-seg"
        raise SeriesError(f"{path}: mask file is neither a NIfTI label map (.nii, .nii.gz) nor "
                          "a DICOM-SEG file; expected one of those, or a folder of LGG-style "
                          "'<case>_<n>_mask.tif' slice masks")
    return "tiff"


def load_masks(mask_path: str | os.PathLike[str], series: MRSeries) -> np.ndarray:
    """Return (Z, H, W) uint8 0/1 tumour masks of `series`' slices, in its (z) order.

    The reader is chosen by `mask_kind`: LGG TIFFs match slices by InstanceNumber (see
    `load_slice_masks`); a NIfTI label map (`read_nifti_masks`) and a DICOM-SEG
    (`read_seg_masks`) are placed by patient coordinates.
    """
    path = Path(mask_path)
    kind = mask_kind(path)
    if kind == "nifti":
        return read_nifti_masks(path, series)
    if kind == "dicom-seg":
        return read_seg_masks(path, series)
    return load_slice_masks(path, series.instance_numbers, series.volume.shape[1:])


# --- NIfTI label maps -----------------------------------------------------------------------


def _read_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (3-D bool array: label > 0, voxel-to-RAS affine) of a NIfTI label map."""
    # imported here: nibabel takes about 0.4 s to import, paid by every MR bank job otherwise
    import nibabel
    from nibabel.filebasedimages import ImageFileError

    if not path.is_file():
        raise SeriesError(f"{path}: NIfTI label map not found")
    try:
        image = nibabel.load(path)
        labels = np.asanyarray(image.dataobj)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as err:
        raise SeriesError(f"{path}: unreadable NIfTI label map "
                          f"({type(err).__name__}: {err})") from err
    if labels.ndim == 4 and labels.shape[3] == 1:
        labels = labels[..., 0]
    if labels.ndim != 3:
        raise SeriesError(f"{path}: label map of shape {labels.shape}, expected one 3-D volume")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise SeriesError(f"{path}: NIfTI affine (sform/qform) {affine.tolist()} is not an "
                          "invertible voxel-to-world transform")
    return labels > 0, affine


def _voxel_indices(series: MRSeries, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuous NIfTI voxel indices of the slices' pixel centres, as (origins, offsets).

    Pixel (r, c) of slice k lies at ``P_k + c * col_mm * X + r * row_mm * Y`` in DICOM patient
    coordinates (LPS; X, Y the row and column direction cosines); NIfTI world coordinates are
    RAS, so x and y change sign before the inverse affine. The map is affine, so the index of
    pixel (r, c) of slice k is ``origins[k] + offsets[r * W + c]``.
    """
    to_voxel = np.linalg.inv(affine)
    linear = to_voxel[:3, :3] @ np.diag([-1.0, -1.0, 1.0])  # LPS -> RAS, then RAS -> voxel
    origins = series.positions @ linear.T + to_voxel[:3, 3]
    rows, cols = np.mgrid[: series.volume.shape[1], : series.volume.shape[2]]
    row_mm, col_mm = series.pixel_spacing
    offsets = (cols.reshape(-1, 1) * col_mm * series.orientation[:3]
               + rows.reshape(-1, 1) * row_mm * series.orientation[3:])
    return origins, offsets @ linear.T


def _grid_text(labels: np.ndarray, affine: np.ndarray) -> str:
    voxel = np.round(np.linalg.norm(affine[:3, :3], axis=0), 3).tolist()
    return f"label map grid {labels.shape} of {voxel} mm voxels"


def _series_text(series: MRSeries) -> str:
    z, height, width = series.volume.shape
    return (f"a label map on the series' grid ({z} slices of {height} x {width} pixels, "
            f"z {series.z[0]:.2f}..{series.z[-1]:.2f} mm)")


def read_nifti_masks(path: str | os.PathLike[str], series: MRSeries) -> np.ndarray:
    """Return (Z, H, W) uint8 0/1 masks of `series` from a NIfTI label map (any label > 0).

    Each slice's pixel centres are mapped through the affine and take the nearest voxel's
    label. Written with numpy: nibabel's `resample_from_to` (and MONAI's resampling) need the
    target as one regular grid and fill what lies outside with zeros, while the series is a
    list of slice positions and a label map that misses it must be told apart from "no
    tumour". A slice partly outside the grid is an error, as is more than `NIFTI_MAX_OUTSIDE`
    of the slices wholly outside it; fewer are left empty with a warning.
    """
    path = Path(path)
    labels, affine = _read_label_map(path)
    origins, offsets = _voxel_indices(series, affine)
    bounds = np.array(labels.shape)
    masks = np.zeros(series.volume.shape, dtype=np.uint8)
    outside: list[int] = []
    off_grid = 0.0
    for k, origin in enumerate(origins):
        index = origin + offsets
        nearest = np.rint(index).astype(np.int64)
        inside = ((nearest >= 0) & (nearest < bounds)).all(axis=1)
        if not inside.any():
            outside.append(k)
            continue
        if not inside.all():
            raise SeriesError(
                f"{path}: {_grid_text(labels, affine)} covers only part of the slice at "
                f"z={series.z[k]:.2f} mm (InstanceNumber {series.instance_numbers[k]}): "
                f"{int((~inside).sum())} of {inside.size} pixels fall outside; expected "
                f"{_series_text(series)}"
            )
        off_grid = max(off_grid, float(np.abs(index - nearest).max()))
        masks[k] = labels[tuple(nearest.T)].reshape(masks.shape[1:])
    _check_slices_outside(path, outside, series, _grid_text(labels, affine))
    if off_grid > NIFTI_OFF_GRID:
        log.warning("%s: label map voxels do not coincide with the series' pixels (up to %.2f "
                    "voxel off); resampled by nearest neighbour", path, off_grid)
    return masks


def _check_slices_outside(path: Path, outside: list[int], series: MRSeries, grid: str) -> None:
    if not outside:
        return
    z = series.z[outside]
    text = (f"{len(outside)} of {len(series.z)} slices (z {z.min():.2f}..{z.max():.2f} mm) lie "
            f"outside the {grid}")
    if len(outside) > NIFTI_MAX_OUTSIDE * len(series.z):
        raise SeriesError(f"{path}: {grid} does not cover the series: {text}; expected "
                          f"{_series_text(series)}")
    log.warning("%s: %s; using empty masks there", path, text)


# --- DICOM-SEG ------------------------------------------------------------------------------


def _check_seg(path: Path, ds: pydicom.Dataset, series: MRSeries) -> None:
    """Refuse anything but a DICOM-SEG of the series' Rows x Columns, naming what was found."""
    modality = str(ds.get("Modality", ""))
    sop = str(ds.get("SOPClassUID", ""))
    if modality != "SEG" or sop != SegmentationStorage:
        found = UID(sop).name if sop else "no SOPClassUID"
        raise SeriesError(f"{path}: not a DICOM-SEG mask: Modality {modality!r}, SOP class "
                          f"{sop} ({found}); expected Modality 'SEG' with Segmentation Storage "
                          f"({SegmentationStorage})")
    shape = (int(require(path, ds, "Rows")), int(require(path, ds, "Columns")))
    if shape != series.volume.shape[1:]:
        raise SeriesError(f"{path}: Rows x Columns {shape[0]} x {shape[1]}, expected "
                          f"{series.volume.shape[1]} x {series.volume.shape[2]} (the series')")
    if not len(require(path, ds, "SegmentSequence")):
        raise SeriesError(f"{path}: empty SegmentSequence, expected at least one segment")


def _seg_pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """(F, H, W) bool frames: BINARY as stored, FRACTIONAL at half MaximumFractionalValue."""
    kind = str(ds.get("SegmentationType", ""))
    if kind not in ("BINARY", "FRACTIONAL"):
        raise SeriesError(f"{path}: SegmentationType {kind!r}, expected 'BINARY' or "
                          "'FRACTIONAL'")
    raw = pixels(path, ds)
    raw = raw[np.newaxis] if raw.ndim == 2 else raw
    if kind == "BINARY":
        return raw > 0
    top = float(require(path, ds, "MaximumFractionalValue"))
    return raw >= 0.5 * top


def _seg_positions(path: Path, ds: pydicom.Dataset, series: MRSeries) -> np.ndarray:
    """(F, 3) ImagePositionPatient of each frame, checking orientation, spacing and segment."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else {}
    segments = {int(s.get("SegmentNumber", 0)) for s in ds.SegmentSequence}
    positions = []
    for index, frame in enumerate(require(path, ds, "PerFrameFunctionalGroupsSequence")):
        where = f" (frame {index + 1}, per-frame or shared functional groups)"
        sources = (frame, shared)
        plane = functional_group(path, "PlanePositionSequence", sources, where)
        positions.append(vector(path, plane, "ImagePositionPatient", 3, where))
        identity = functional_group(path, "SegmentIdentificationSequence", sources, where)
        number = int(require(path, identity, "ReferencedSegmentNumber", where))
        if number not in segments:
            raise SeriesError(f"{path}: ReferencedSegmentNumber {number}{where} is not in "
                              f"SegmentSequence (segments {sorted(segments)})")
        _check_seg_plane(path, sources, series, where)
    return np.array(positions).reshape(-1, 3)


def _check_seg_plane(path: Path, sources: tuple[Any, ...], series: MRSeries, where: str) -> None:
    """Where the SEG records orientation or pixel spacing, they must be the series'."""
    for keyword, attribute, expected, atol in (
        ("PlaneOrientationSequence", "ImageOrientationPatient", series.orientation,
         ORIENTATION_ATOL),
        ("PixelMeasuresSequence", "PixelSpacing", np.array(series.pixel_spacing), SPACING_ATOL),
    ):
        try:
            item = functional_group(path, keyword, sources, where)
        except SeriesError:
            continue  # not recorded: taken to be the series'
        if attribute not in item:
            continue
        value = vector(path, item, attribute, len(expected), where)
        if not np.allclose(value, expected, atol=atol):
            raise SeriesError(f"{path}: {attribute} {value.tolist()}{where}, expected the "
                              f"series' {expected.tolist()}")


def _place_frames(
    path: Path, frames: np.ndarray, positions: np.ndarray, series: MRSeries
) -> np.ndarray:
    """Union the frames into (Z, H, W) uint8 masks on the slices at their positions."""
    normal = _normal(series)
    tolerance = max(POSITION_ATOL_MM, SEG_SLICE_TOLERANCE * series.slice_gap)
    z = positions @ normal
    nearest = np.abs(z[:, np.newaxis] - series.z[np.newaxis]).argmin(axis=1)
    matched = np.abs(z - series.z[nearest]) <= tolerance
    if not matched.any():
        raise SeriesError(f"{path}: no frame lies on a slice of the series (frames at z "
                          f"{z.min():.2f}..{z.max():.2f} mm, slices at {series.z[0]:.2f}.."
                          f"{series.z[-1]:.2f} mm, tolerance {tolerance:.2f} mm)")
    if not matched.all():
        log.warning("%s: %d frame(s) lie on no slice of the series (z %s mm); ignored",
                    path, int((~matched).sum()), np.round(z[~matched], 2).tolist()[:10])
    shift = positions[matched] - series.positions[nearest[matched]]
    shift -= (shift @ normal)[:, np.newaxis] * normal
    worst = float(np.linalg.norm(shift, axis=1).max())
    if worst > 0.5 * min(series.pixel_spacing):
        raise SeriesError(f"{path}: frame ImagePositionPatient lies {worst:.2f} mm in-plane "
                          "from its slice's; expected the series' pixel grid (under half a "
                          "pixel)")
    masks = np.zeros(series.volume.shape, dtype=np.uint8)
    for frame, k in zip(np.flatnonzero(matched), nearest[matched], strict=True):
        masks[k] |= frames[frame]
    return masks


def _read_seg_file(path: Path, series: MRSeries) -> np.ndarray:
    ds = read_dicom(path)
    _check_seg(path, ds, series)
    positions = _seg_positions(path, ds, series)
    frames = _seg_pixels(path, ds)
    if len(frames) != len(positions):
        raise SeriesError(f"{path}: {len(frames)} frames of pixels but {len(positions)} "
                          "PerFrameFunctionalGroupsSequence items, expected one per frame")
    return _place_frames(path, frames, positions, series)


def read_seg_masks(path: str | os.PathLike[str], series: MRSeries) -> np.ndarray:
    """Return (Z, H, W) uint8 0/1 masks of `series` from a DICOM-SEG file or folder of them.

    Frames go to the slice at their ImagePositionPatient along the slice normal (within
    `SEG_SLICE_TOLERANCE` of the slice gap); all segments, and all SEG files of a folder, are
    united (any segment is tumour). Read with plain pydicom, without highdicom.
    """
    path = Path(path)
    files = _dicom_files(path) if path.is_dir() else [path]
    if not files:
        raise SeriesError(f"{path}: no DICOM-SEG file in the mask folder")
    masks = np.zeros(series.volume.shape, dtype=np.uint8)
    for file in files:
        masks |= _read_seg_file(file, series)
    return masks

