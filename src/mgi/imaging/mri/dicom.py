"""Reading DICOM MR series: classic and enhanced (multi-frame) objects into one volume.

Slices are ordered by position along the slice normal (never by file name or InstanceNumber);
every file must be an MR image with the geometry tags, else SeriesError names the file and tag.
A folder holding several volumes at the same positions (echoes, time points, repeats) gives its
first complete volume, split by the tags of `VOLUME_TAGS`.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale
from pydicom.uid import UID, EnhancedMRImageStorage, MRImageStorage

from mgi.errors import SeriesError

log = logging.getLogger(__name__)

MR_SOP_CLASSES = (MRImageStorage, EnhancedMRImageStorage)
ORIENTATION_ATOL = 1e-4
SPACING_ATOL = 1e-4
POSITION_ATOL_MM = 0.01
# Tags that tell apart volumes acquired at the same slice positions, in order of preference:
# classic MR attributes, and the Enhanced MR per-frame ones (FrameContentSequence, MREchoSequence)
CLASSIC_VOLUME_TAGS = ("TemporalPositionIdentifier", "AcquisitionNumber", "EchoNumbers")
ENHANCED_VOLUME_TAGS = ("TemporalPositionIndex", "EffectiveEchoTime")
VOLUME_TAGS = CLASSIC_VOLUME_TAGS + ENHANCED_VOLUME_TAGS


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
    frame_of_reference: str = ""  # FrameOfReferenceUID ("" when absent)
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
    frame_of_reference: str
    volume_tags: dict[str, str]  # those of VOLUME_TAGS present on the slice (or its frame)


def read_dicom(path: Path, *, stop_before_pixels: bool = False) -> pydicom.Dataset:
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


def require(path: Path, ds: Any, keyword: str, where: str = "") -> Any:
    value = ds.get(keyword) if hasattr(ds, "get") else None
    if value is None or value == "":
        raise SeriesError(f"{path}: missing {keyword}{where}")
    return value


def vector(path: Path, ds: Any, keyword: str, length: int, where: str = "") -> np.ndarray:
    """A numeric multi-valued attribute of the expected length, as float64."""
    value = require(path, ds, keyword, where)
    try:
        vector = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise SeriesError(f"{path}: {keyword}{where} is not numeric: {value!r}") from err
    if vector.size != length or not np.isfinite(vector).all():
        raise SeriesError(f"{path}: {keyword}{where} must hold {length} finite numbers, "
                          f"got {value!r}")
    return vector


def pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """Decode the stored pixel values; SeriesError naming the file and transfer syntax."""
    require(path, ds, "PixelData")
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
    raw = pixels(path, ds)
    try:
        instance_number = int(require(path, ds, "InstanceNumber"))
    except (TypeError, ValueError) as err:
        raise SeriesError(f"{path}: InstanceNumber {ds.InstanceNumber!r} is not an integer") \
            from err
    return _Slice(
        file=path,
        instance_number=instance_number,
        position=vector(path, ds, "ImagePositionPatient", 3),
        orientation=vector(path, ds, "ImageOrientationPatient", 6),
        spacing=vector(path, ds, "PixelSpacing", 2),
        thickness=float(ds.get("SliceThickness", 0.0) or 0.0),
        pixels=np.asarray(apply_rescale(raw, ds), dtype=np.float32),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "")),
        patient_id=str(ds.get("PatientID", "")),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
        volume_tags=_present(ds, CLASSIC_VOLUME_TAGS),
    )


def _present(ds: Any, keywords: tuple[str, ...]) -> dict[str, str]:
    """The non-empty attributes `keywords` of `ds`, as text."""
    return {k: str(ds.get(k)) for k in keywords if ds.get(k) not in (None, "")}


def _frame_volume_tags(frame: Any) -> dict[str, str]:
    """TemporalPositionIndex and EffectiveEchoTime of one Enhanced MR frame, where present."""
    tags = {}
    for sequence, keyword in (("FrameContentSequence", "TemporalPositionIndex"),
                              ("MREchoSequence", "EffectiveEchoTime")):
        if sequence in frame and len(frame[sequence].value):
            tags.update(_present(frame[sequence].value[0], (keyword,)))
    return tags


def functional_group(path: Path, keyword: str, sources: tuple[Any, ...], where: str) -> Any:
    """First item of functional group sequence `keyword` in `sources` (per-frame, then shared)."""
    for source in sources:
        if keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    raise SeriesError(f"{path}: missing {keyword}{where}")


def _enhanced_frames(path: Path, ds: pydicom.Dataset) -> list[_Slice]:
    """Split an Enhanced MR (multi-frame) object into slices; InstanceNumber = frame number."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else {}
    per_frame = require(path, ds, "PerFrameFunctionalGroupsSequence")
    raw = pixels(path, ds)
    raw = raw[np.newaxis] if raw.ndim == 2 else raw
    if raw.shape[0] != len(per_frame):
        raise SeriesError(f"{path}: {raw.shape[0]} frames of pixels but "
                          f"{len(per_frame)} PerFrameFunctionalGroupsSequence items")
    slices = []
    for index, frame in enumerate(per_frame):
        where = f" (frame {index + 1}, per-frame or shared functional groups)"

        def group(keyword: str, *, frame: Any = frame, where: str = where) -> Any:
            return functional_group(path, keyword, (frame, shared), where)

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
            position=vector(path, group("PlanePositionSequence"), "ImagePositionPatient", 3,
                             where),
            orientation=vector(path, group("PlaneOrientationSequence"),
                                "ImageOrientationPatient", 6, where),
            spacing=vector(path, measures, "PixelSpacing", 2, where),
            thickness=float(measures.get("SliceThickness", 0.0) or 0.0),
            pixels=raw[index].astype(np.float32) * np.float32(slope) + np.float32(intercept),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            description=str(ds.get("SeriesDescription", "")),
            patient_id=str(ds.get("PatientID", "")),
            frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
            volume_tags=_frame_volume_tags(frame),
        ))
    return slices


def series_files(folder: Path) -> list[Path]:
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
    for path in series_files(folder):
        ds = read_dicom(path)
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
    if len(slices) > 1 and np.diff(z).min() < POSITION_ATOL_MM:
        slices, z = _first_complete_volume(folder, slices, z)
    if len(slices) > 1:
        gaps = np.diff(z)
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
        frame_of_reference=first.frame_of_reference,
        files=[s.file for s in slices],
    )


def _sort_key(value: str | None) -> tuple[int, float, str]:
    """Numbers in numeric order, then text, then absent values."""
    if value is None:
        return (2, 0.0, "")
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _first_complete_volume(
    folder: Path, slices: list[_Slice], z: np.ndarray
) -> tuple[list[_Slice], np.ndarray]:
    """Of several volumes at the same positions (slices sorted by z), the first complete one.

    The volumes are told apart by the fewest tags of VOLUME_TAGS that leave no two slices of a
    volume at one position and give at least one volume with a slice at every position.
    """
    place = np.concatenate([[0], np.cumsum(np.diff(z) >= POSITION_ATOL_MM)])  # distinct positions
    n_places = int(place[-1]) + 1
    present = [t for t in VOLUME_TAGS if any(t in s.volume_tags for s in slices)]
    for size in range(1, len(present) + 1):
        for tags in itertools.combinations(present, size):
            volumes: dict[tuple[str | None, ...], list[int]] = {}
            for i, s in enumerate(slices):
                volumes.setdefault(tuple(s.volume_tags.get(t) for t in tags), []).append(i)
            if any(len(set(place[v])) < len(v) for v in volumes.values()):
                continue  # these tags leave two slices of one volume at one position
            complete = sorted((key for key, v in volumes.items() if len(v) == n_places),
                              key=lambda key: [_sort_key(value) for value in key])
            if not complete:
                continue
            chosen = volumes[complete[0]]
            log.warning("%s: %d volumes at the same %d slice positions, told apart by %s; "
                        "using the first complete one (%s)", folder, len(volumes), n_places,
                        "/".join(tags), ", ".join(f"{t} {v}" for t, v in zip(tags, complete[0],
                                                                              strict=True)))
            return [slices[i] for i in chosen], z[chosen]
    i = int(np.argmin(np.diff(z)))
    tried = ", ".join(present) if present else f"none of {', '.join(VOLUME_TAGS)} present"
    raise SeriesError(f"{folder}: two slices at the same position z={z[i]:.3f} mm "
                      f"({slices[i].file.name}, {slices[i + 1].file.name}), and no complete "
                      f"volume told apart by the tags that split volumes ({tried})")
