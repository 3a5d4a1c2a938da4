"""MRI: DICOM MR series (plus LGG-style slice masks) into a normalised, multi-sequence slice bank.

A case folder ``radiology/{case_id}/`` holds one subfolder per series
(``{SeriesInstanceUID}/{SOPInstanceUID}.dcm``, file names in no particular order); series are told
apart by SeriesDescription. Masks are LGG-style slice TIFFs ``{prefix}_{InstanceNumber}_mask.tif``
(uint8 0/255) aligned with the DICOM slices by InstanceNumber.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import tifffile
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale
from pydicom.uid import UID, EnhancedMRImageStorage, MRImageStorage
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
            for source in (frame, shared):
                if keyword in source and len(source[keyword].value):
                    return source[keyword].value[0]
            raise SeriesError(f"{path}: missing {keyword}{where}")

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
    if mask_dir is not None:
        masks = load_slice_masks(mask_dir, reference.instance_numbers, (height, width))

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
