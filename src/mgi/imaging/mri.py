"""MRI: DICOM MR series (plus tumour masks) into a normalised, multi-sequence slice bank.

A case folder ``radiology/{case_id}/`` holds one subfolder per series
(``{SeriesInstanceUID}/{SOPInstanceUID}.dcm``, file names in no particular order); series are told
apart by SeriesDescription. Masks (`load_masks`) are one of: LGG-style slice TIFFs
``{prefix}_{InstanceNumber}_mask.tif`` (uint8 0/255) aligned with the DICOM slices by
InstanceNumber; a NIfTI label map (BraTS style, ``.nii``/``.nii.gz``) or a DICOM-SEG object, both
aligned with the slices by patient coordinates.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import tifffile
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.pixels import apply_rescale
from pydicom.uid import UID, EnhancedMRImageStorage, MRImageStorage, SegmentationStorage
from skimage.transform import resize

from mgi.errors import ConfigError, MgiError, SeriesError
from mgi.imaging.bank import write_bank, write_failed_bank
from mgi.io import read_tsv

log = logging.getLogger(__name__)

MR_SOP_CLASSES = (MRImageStorage, EnhancedMRImageStorage)
MISSING_SEQUENCE = ("flair", "zeros", "error")
NORMALISE = ("zscore", "minmax")
KEEP_SLICES = ("all", "tumour", "brain")
ORIENTATION_ATOL = 1e-4
SPACING_ATOL = 1e-4
POSITION_ATOL_MM = 0.01
_MASK_NAME = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)_mask\.tiff?$", re.IGNORECASE)
_LGG_IMAGE_NAME = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)\.tiff?$", re.IGNORECASE)
MASK_KINDS = ("tiff", "nifti", "dicom-seg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SEG_SLICE_TOLERANCE = 0.25  # a SEG frame matches a slice within this fraction of the slice gap
NIFTI_MAX_OUTSIDE = 0.5  # fraction of slices a label map may miss (zero masks + warning)
NIFTI_OFF_GRID = 0.1  # voxels: sampling further than this from voxel centres is resampling


@dataclass
class MRSeries:
    """One MR series as a volume in physical units, slices ordered along the slice normal."""

    volume: np.ndarray  # (Z, H, W) float32, after Rescale slope/intercept
    positions: np.ndarray  # (Z, 3) ImagePositionPatient, mm
    z: np.ndarray  # (Z,) position along the slice normal, mm, increasing
    instance_numbers: np.ndarray  # (Z,) int64
    pixel_spacing: tuple[float, float]  # (row, column) spacing, mm
    slice_thickness: float  # mm, as recorded (0.0 when absent)
    slice_gap: float  # distance between slice centres, mm (slice_thickness for one slice)
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    series_description: str
    series_uid: str
    patient_id: str
    files: list[Path] = field(default_factory=list)  # source file of each slice, in order

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (slice gap, row, column) in mm."""
        return (self.slice_gap, *self.pixel_spacing)


@dataclass
class _Slice:
    file: Path
    instance_number: int
    position: np.ndarray
    orientation: np.ndarray
    spacing: np.ndarray
    thickness: float
    pixels: np.ndarray
    series_uid: str
    description: str
    patient_id: str


def _read_dicom(path: Path, *, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """Read one DICOM file; SeriesError naming it when it cannot be read."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as err:
        raise SeriesError(f"{path}: not a DICOM file ({err})") from err
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise SeriesError(f"{path}: unreadable DICOM file ({type(err).__name__}: {err})") from err


def _check_mr(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse anything that is not an MR image object, naming what was found."""
    modality = str(ds.get("Modality", ""))
    sop = str(ds.get("SOPClassUID", ""))
    if modality != "MR" or sop not in MR_SOP_CLASSES:
        found = UID(sop).name if sop else "no SOPClassUID"
        raise SeriesError(
            f"{path}: not an MR image: Modality {modality!r}, SOP class {sop} ({found}); "
            "expected Modality 'MR' with MR Image Storage or Enhanced MR Image Storage"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesError(f"{path}: SamplesPerPixel {ds.SamplesPerPixel}, expected 1 (greyscale)")


def _require(path: Path, ds: Any, keyword: str, where: str = "") -> Any:
    value = ds.get(keyword) if hasattr(ds, "get") else None
    if value is None or value == "":
        raise SeriesError(f"{path}: missing {keyword}{where}")
    return value


def _vector(path: Path, ds: Any, keyword: str, length: int, where: str = "") -> np.ndarray:
    """A numeric multi-valued attribute of the expected length, as float64."""
    value = _require(path, ds, keyword, where)
    try:
        vector = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise SeriesError(f"{path}: {keyword}{where} is not numeric: {value!r}") from err
    if vector.size != length or not np.isfinite(vector).all():
        raise SeriesError(f"{path}: {keyword}{where} must hold {length} finite numbers, "
                          f"got {value!r}")
    return vector


def _pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """Decode the stored pixel values; SeriesError naming the file and transfer syntax."""
    _require(path, ds, "PixelData")
    try:
        return ds.pixel_array
    except Exception as err:  # pydicom's decoders raise many types (missing plugin, bad length)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise SeriesError(
            f"{path}: cannot decode pixel data (transfer syntax {syntax}): {err}"
        ) from err


def _classic_slice(path: Path, ds: pydicom.Dataset) -> _Slice:
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise SeriesError(f"{path}: MR Image Storage with {ds.NumberOfFrames} frames, expected 1")
    raw = _pixels(path, ds)
    try:
        instance_number = int(_require(path, ds, "InstanceNumber"))
    except (TypeError, ValueError) as err:
        raise SeriesError(f"{path}: InstanceNumber {ds.InstanceNumber!r} is not an integer") \
            from err
    return _Slice(
        file=path,
        instance_number=instance_number,
        position=_vector(path, ds, "ImagePositionPatient", 3),
        orientation=_vector(path, ds, "ImageOrientationPatient", 6),
        spacing=_vector(path, ds, "PixelSpacing", 2),
        thickness=float(ds.get("SliceThickness", 0.0) or 0.0),
        pixels=np.asarray(apply_rescale(raw, ds), dtype=np.float32),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "")),
        patient_id=str(ds.get("PatientID", "")),
    )


def _functional_group(path: Path, keyword: str, sources: tuple[Any, ...], where: str) -> Any:
    """First item of functional group sequence `keyword` in `sources` (per-frame, then shared)."""
    for source in sources:
        if keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    raise SeriesError(f"{path}: missing {keyword}{where}")


def _enhanced_frames(path: Path, ds: pydicom.Dataset) -> list[_Slice]:
    """Split an Enhanced MR (multi-frame) object into slices; InstanceNumber = frame number."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else {}
    per_frame = _require(path, ds, "PerFrameFunctionalGroupsSequence")
    raw = _pixels(path, ds)
    raw = raw[np.newaxis] if raw.ndim == 2 else raw
    if raw.shape[0] != len(per_frame):
        raise SeriesError(f"{path}: {raw.shape[0]} frames of pixels but "
                          f"{len(per_frame)} PerFrameFunctionalGroupsSequence items")
    slices = []
    for index, frame in enumerate(per_frame):
        where = f" (frame {index + 1}, per-frame or shared functional groups)"

        def group(keyword: str, *, frame: Any = frame, where: str = where) -> Any:
            return _functional_group(path, keyword, (frame, shared), where)

        measures = group("PixelMeasuresSequence")
        slope, intercept = 1.0, 0.0
        try:
            transform = group("PixelValueTransformationSequence")
            slope = float(transform.get("RescaleSlope", 1.0))
            intercept = float(transform.get("RescaleIntercept", 0.0))
        except SeriesError:
            pass  # no transformation: stored values are the physical values
        slices.append(_Slice(
            file=path,
            instance_number=index + 1,
            position=_vector(path, group("PlanePositionSequence"), "ImagePositionPatient", 3,
                             where),
            orientation=_vector(path, group("PlaneOrientationSequence"),
                                "ImageOrientationPatient", 6, where),
            spacing=_vector(path, measures, "PixelSpacing", 2, where),
            thickness=float(measures.get("SliceThickness", 0.0) or 0.0),
            pixels=raw[index].astype(np.float32) * np.float32(slope) + np.float32(intercept),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            description=str(ds.get("SeriesDescription", "")),
            patient_id=str(ds.get("PatientID", "")),
        ))
    return slices


def _series_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise SeriesError(f"{folder}: series folder not found")
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )
    if not files:
        raise SeriesError(f"{folder}: series folder holds no DICOM file")
    return files


def read_series(
    folder: str | os.PathLike[str], *, gap_tolerance: float = 0.05
) -> MRSeries:
    """Return the MR series in `folder` as a volume ordered by slice position along the normal.

    Every file must be an MR image of the same series with the same orientation, matrix size and
    pixel spacing; slice gaps must agree with their median within `gap_tolerance` (a fraction).
    """
    folder = Path(folder)
    slices: list[_Slice] = []
    for path in _series_files(folder):
        ds = _read_dicom(path)
        _check_mr(path, ds)
        if str(ds.SOPClassUID) == EnhancedMRImageStorage:
            slices.extend(_enhanced_frames(path, ds))
        else:
            slices.append(_classic_slice(path, ds))

    first = slices[0]
    uids = sorted({s.series_uid for s in slices})
    if len(uids) > 1:
        raise SeriesError(f"{folder}: files of {len(uids)} series (SeriesInstanceUID {uids}), "
                          "expected one series per folder")
    for s in slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_ATOL):
            raise SeriesError(f"{s.file}: ImageOrientationPatient {s.orientation.tolist()} "
                              f"differs from {first.orientation.tolist()} in {first.file.name}")
        if s.pixels.shape != first.pixels.shape:
            raise SeriesError(f"{s.file}: Rows x Columns {s.pixels.shape} differs from "
                              f"{first.pixels.shape} in {first.file.name}")
        if not np.allclose(s.spacing, first.spacing, atol=SPACING_ATOL):
            raise SeriesError(f"{s.file}: PixelSpacing {s.spacing.tolist()} differs from "
                              f"{first.spacing.tolist()} in {first.file.name}")

    # position along the slice normal (row direction x column direction), not file order
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    z_all = np.array([s.position @ normal for s in slices])
    order = np.argsort(z_all, kind="stable")
    slices = [slices[i] for i in order]
    z = z_all[order]
    if len(slices) > 1:
        gaps = np.diff(z)
        if gaps.min() < POSITION_ATOL_MM:
            i = int(np.argmin(gaps))
            raise SeriesError(f"{folder}: two slices at the same position z={z[i]:.3f} mm "
                              f"({slices[i].file.name}, {slices[i + 1].file.name})")
        gap = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - gap) > max(POSITION_ATOL_MM, gap_tolerance * gap))
        if bad.size:
            i = int(bad[0])
            raise SeriesError(
                f"{folder}: non-uniform slice gaps: {gaps[i]:.3f} mm between "
                f"{slices[i].file.name} and {slices[i + 1].file.name}, median {gap:.3f} mm "
                "(a missing or duplicated slice?)"
            )
    else:
        gap = first.thickness
    return MRSeries(
        volume=np.stack([s.pixels for s in slices]).astype(np.float32, copy=False),
        positions=np.stack([s.position for s in slices]),
        z=z,
        instance_numbers=np.array([s.instance_number for s in slices], dtype=np.int64),
        pixel_spacing=(float(first.spacing[0]), float(first.spacing[1])),
        slice_thickness=first.thickness,
        slice_gap=gap,
        orientation=first.orientation,
        series_description=first.description,
        series_uid=first.series_uid,
        patient_id=first.patient_id,
        files=[s.file for s in slices],
    )


def _description_key(text: str) -> str:
    return text.strip().casefold()


def find_series(series_root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Return the series folders under `series_root` keyed by case-folded sequence name.

    Where the acquire stage left a `series.tsv` (SeriesInstanceUID -> the configured sequence
    it was chosen for, since real descriptions such as "AX FLAIR" are not the configured
    names), that mapping names the folders; otherwise each folder's SeriesDescription does.
    """
    root = Path(series_root)
    if not root.is_dir():
        raise SeriesError(f"{root}: radiology folder not found")
    table = root / "series.tsv"
    if table.is_file():
        return _series_from_table(table)
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            ds = _read_dicom(_series_files(folder)[0], stop_before_pixels=True)
        except SeriesError as err:
            log.warning("skipping series folder %s: %s", folder, err)
            continue
        found.setdefault(_description_key(str(ds.get("SeriesDescription", ""))), []).append(folder)
    return found


def _series_from_table(table: Path) -> dict[str, list[Path]]:
    """Series folders named by the acquire stage's series.tsv (SeriesInstanceUID, sequence)."""
    try:
        rows = read_tsv(table, required=["SeriesInstanceUID", "sequence"])
    except MgiError as err:
        raise SeriesError(str(err)) from err
    found: dict[str, list[Path]] = {}
    for uid, sequence in zip(rows["SeriesInstanceUID"], rows["sequence"], strict=True):
        folder = table.parent / uid
        if not folder.is_dir():
            raise SeriesError(f"{table}: series {uid} ({sequence}) has no folder {folder}")
        found.setdefault(_description_key(sequence), []).append(folder)
    return found


def _flair_name(sequences: tuple[str, ...]) -> str | None:
    return next((name for name in sequences if "flair" in name.casefold()), None)


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


def _mask_files(mask_dir: Path) -> dict[int, Path]:
    """Map InstanceNumber -> mask file of an LGG-style mask folder."""
    if not mask_dir.is_dir():
        raise SeriesError(f"{mask_dir}: mask folder not found")
    files: dict[int, Path] = {}
    for path in sorted(mask_dir.iterdir()):
        match = _MASK_NAME.match(path.name)
        if not match:
            continue
        number = int(match["number"])
        if number in files:
            raise SeriesError(f"{mask_dir}: two masks for slice {number}: "
                              f"{files[number].name}, {path.name}")
        files[number] = path
    return files


def _read_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
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
    files = _mask_files(mask_dir)
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
            masks[i] = _read_mask(files[number], shape)
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
        return "dicom-seg" if not _mask_files(path) and _dicom_files(path) else "tiff"
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
    shape = (int(_require(path, ds, "Rows")), int(_require(path, ds, "Columns")))
    if shape != series.volume.shape[1:]:
        raise SeriesError(f"{path}: Rows x Columns {shape[0]} x {shape[1]}, expected "
                          f"{series.volume.shape[1]} x {series.volume.shape[2]} (the series')")
    if not len(_require(path, ds, "SegmentSequence")):
        raise SeriesError(f"{path}: empty SegmentSequence, expected at least one segment")


def _seg_pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """(F, H, W) bool frames: BINARY as stored, FRACTIONAL at half MaximumFractionalValue."""
    kind = str(ds.get("SegmentationType", ""))
    if kind not in ("BINARY", "FRACTIONAL"):
        raise SeriesError(f"{path}: SegmentationType {kind!r}, expected 'BINARY' or "
                          "'FRACTIONAL'")
    raw = _pixels(path, ds)
    raw = raw[np.newaxis] if raw.ndim == 2 else raw
    if kind == "BINARY":
        return raw > 0
    top = float(_require(path, ds, "MaximumFractionalValue"))
    return raw >= 0.5 * top


def _seg_positions(path: Path, ds: pydicom.Dataset, series: MRSeries) -> np.ndarray:
    """(F, 3) ImagePositionPatient of each frame, checking orientation, spacing and segment."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else {}
    segments = {int(s.get("SegmentNumber", 0)) for s in ds.SegmentSequence}
    positions = []
    for index, frame in enumerate(_require(path, ds, "PerFrameFunctionalGroupsSequence")):
        where = f" (frame {index + 1}, per-frame or shared functional groups)"
        sources = (frame, shared)
        plane = _functional_group(path, "PlanePositionSequence", sources, where)
        positions.append(_vector(path, plane, "ImagePositionPatient", 3, where))
        identity = _functional_group(path, "SegmentIdentificationSequence", sources, where)
        number = int(_require(path, identity, "ReferencedSegmentNumber", where))
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
            item = _functional_group(path, keyword, sources, where)
        except SeriesError:
            continue  # not recorded: taken to be the series'
        if attribute not in item:
            continue
        value = _vector(path, item, attribute, len(expected), where)
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
    ds = _read_dicom(path)
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


def _check_options(
    sequences: tuple[str, ...], missing_sequence: str, image_px: int,
    clip_percentiles: tuple[float, float], normalise: str, keep_slices: str,
) -> None:
    if not sequences:
        raise ConfigError("sequences must name at least one SeriesDescription")
    if missing_sequence not in MISSING_SEQUENCE:
        raise ConfigError(f"missing_sequence must be one of {MISSING_SEQUENCE}, "
                          f"got {missing_sequence!r}")
    if missing_sequence == "flair" and _flair_name(sequences) is None:
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
        matches = found.get(_description_key(name), [])
        if len(matches) > 1:
            raise SeriesError(f"{series_root}: {len(matches)} series described {name!r}: "
                              f"{[m.name for m in matches]}")
        if matches:
            folders[name] = matches[0]
    missing = [name for name in sequences if name not in folders]
    if not folders:
        raise SeriesError(f"{series_root}: none of the sequences {list(sequences)} found; "
                          f"SeriesDescriptions found: {sorted(found)}")
    flair = _flair_name(sequences)
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


def read_lgg_tif_slices(
    folder: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (images (N, 3, H, W) uint8, masks (N, H, W) uint8 0/1, slice numbers) of an LGG case.

    Reads the LGG segmentation set layout (``{case}_{n}.tif`` RGB = pre-contrast, FLAIR,
    post-contrast; ``{case}_{n}_mask.tif`` 0/255), ordered by slice number, not file name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesError(f"{folder}: LGG slice folder not found")
    images: dict[int, Path] = {}
    for path in folder.iterdir():
        match = _LGG_IMAGE_NAME.match(path.name)
        if match and not _MASK_NAME.match(path.name):
            images[int(match["number"])] = path
    if not images:
        raise SeriesError(f"{folder}: no LGG slice '<case>_<n>.tif' found")
    masks = _mask_files(folder)
    numbers = np.array(sorted(images), dtype=np.int64)
    pixels, labels = [], []
    for number in numbers:
        path = images[int(number)]
        try:
            image = tifffile.imread(path)
        except (OSError, ValueError) as err:
            raise SeriesError(f"{path}: unreadable TIFF ({err})") from err
        if image.ndim != 3 or image.shape[2] != 3:
            raise SeriesError(f"{path}: shape {image.shape}, expected (H, W, 3)")
        pixels.append(image)
        if int(number) in masks:
            labels.append(_read_mask(masks[int(number)], image.shape[:2]))
        else:
            log.warning("%s: no mask for slice %d; using an empty mask", folder, number)
            labels.append(np.zeros(image.shape[:2], dtype=np.uint8))
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise SeriesError(f"{folder}: slices of different shapes {sorted(shapes)}")
    stacked = np.stack(pixels).transpose(0, 3, 1, 2).astype(np.uint8, copy=False)
    return stacked, np.stack(labels), numbers
