"""Realistic TCIA-style MR studies of one analytic head: the mess the MRI stage must survive.

The demo cohort (`synthetic.py`) writes three co-registered series named after the configured
roles. Real TCGA glioma studies downloaded from TCIA look nothing like that, and every
difference below has broken a real pipeline, so each is reproduced here on purpose:

* Site naming: the same sequence is "AX T2 FLAIR" (GE), "t2_tirm_tra_dark-fluid" (Siemens),
  "T2W_FLAIR_AX" (Philips) or "FLAIR AXIAL"; post-contrast is "+C", "post", "GD" or "POST GAD".
* Distractors in every study: a 3-plane localizer (one series, three orientations, ImageType
  LOCALIZER), DWI (b0 and b1000 volumes at the same positions), its derived ADC map, a sagittal
  FLAIR or T1, a coronal post-contrast T1, an axial T2.
* No two sequences share a grid: other slice thickness, gap, slab offset, matrix, field of view,
  an oblique tilt; InstanceNumber runs head-to-foot at some sites; file names follow the
  InstanceNumber (NBIA Data Retriever: 1-01.dcm ...) or the SOPInstanceUID, never the position.
* Traps per study `kind`: a 3-D sagittal SPGR/MPRAGE as the only post-contrast series; a T1
  FLAIR (InversionTime ~800 ms) named like the T2 FLAIR (TI ~2500 ms); no post-contrast series;
  a dual-echo T2 (two volumes at the same positions); a second, later study; patient motion
  between series (in the pixels, not in the geometry); a series in another FrameOfReferenceUID.
* Stored uint16 values with a non-trivial RescaleSlope/Intercept at some sites, Enhanced MR
  (multi-frame) objects at one.

Every series samples one analytic phantom at its own voxel centres in patient coordinates (mm,
DICOM LPS), so the truth (which series plays which role, where the lesion is on any grid) is
known exactly: `StudyTruth`. Layout as the NBIA Data Retriever writes it:
`{root}/{PatientID}/{MM-DD-YYYY}-NA-{StudyDescription}-{uid[-5:]}/`
`{SeriesNumber}.000000-{SeriesDescription}-{uid[-5:]}/1-01.dcm`, characters unsafe in paths
replaced by '_'.

Determinism: the same arguments write the same bytes. Random draws come from numpy Generators
seeded by (seed, a hash of the case id and stream); DICOM UIDs from `pydicom.uid.generate_uid`
with those as entropy; no timestamps are embedded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from mgi.errors import AcquireError, SeriesError

log = logging.getLogger(__name__)

SITES = ("ge", "siemens", "philips", "terse")
KINDS = ("standard", "sagittal_3d_post", "t1_flair", "t1_flair_sagittal", "no_post",
         "multi_echo", "two_studies", "motion", "other_frame")
ROLES = ("FLAIR", "T1 pre", "T1 post", "T2")
PLANES = {  # ImageOrientationPatient (row direction, column direction), LPS
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
}
TISSUES = ("scalp", "skull", "csf", "gm", "wm", "lesion", "rim")
# tissue signal per contrast (arbitrary scanner units; adc in 1e-6 mm^2/s), background 0
CONTRASTS: dict[str, dict[str, float]] = {
    name: dict(zip(TISSUES, levels, strict=True)) for name, levels in {
        "flair": (380, 25, 70, 560, 430, 980, 980),
        "t1": (950, 40, 160, 480, 720, 300, 320),
        "t1post": (950, 40, 170, 500, 730, 290, 1250),
        "t1flair": (820, 30, 60, 430, 760, 270, 280),
        "t2": (520, 25, 1500, 760, 520, 1150, 1150),
        "pd": (700, 30, 980, 900, 740, 1050, 1050),
        "b0": (200, 10, 1100, 650, 450, 950, 950),
        "dwi": (40, 10, 60, 380, 320, 520, 520),
        "adc": (0, 0, 3000, 820, 720, 1500, 1500),
        "localizer": (600, 40, 250, 480, 520, 430, 430),
    }.items()
}
NOISE_SD = {"flair": 10.0, "t1": 12.0, "t1post": 12.0, "t1flair": 12.0, "t2": 14.0, "pd": 14.0,
            "b0": 18.0, "dwi": 10.0, "adc": 40.0, "localizer": 15.0}
_NBIA_DATE = "%m-%d-%Y"
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_FULL_PX = 256  # the matrix the plans' slice counts are written for


# --- the phantom ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """An ellipsoid head in patient coordinates (mm, LPS): scalp, skull, CSF, cortex, white
    matter, two lateral ventricles; a smooth multiplicative bias field (coil sensitivity)."""

    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    semi_axes_mm: tuple[float, float, float] = (72.0, 92.0, 86.0)  # x (R->L), y (A->P), z (F->H)
    scalp_mm: float = 4.0
    skull_mm: float = 6.0
    csf_mm: float = 2.5
    cortex_mm: float = 4.0
    ventricle_offset_mm: tuple[float, float, float] = (9.0, -4.0, 12.0)  # x mirrored
    ventricle_semi_axes_mm: tuple[float, float, float] = (5.0, 20.0, 9.0)
    bias: tuple[float, float, float, float] = (0.05, -0.04, 0.06, -0.05)  # x, y, z, radial^2
    edge_mm: float = 1.0  # width of the partial-volume ramp at every tissue boundary

    @property
    def brain_semi_axes_mm(self) -> np.ndarray:
        """Semi-axes of the brain surface (inside scalp, skull and CSF)."""
        return np.asarray(self.semi_axes_mm) - (self.scalp_mm + self.skull_mm + self.csf_mm)


@dataclass(frozen=True)
class Lesion:
    """An axis-aligned ellipsoid tumour; its outer `rim_fraction` of the radius enhances."""

    centre_mm: tuple[float, float, float]
    radius_mm: tuple[float, float, float]
    rim_fraction: float = 0.25


@dataclass(frozen=True)
class Motion:
    """A rigid displacement of the head about its centre, seen by one series and not recorded
    in its geometry (patient motion, or repositioning in another frame of reference)."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # about x, then y, then z
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def matrix(self) -> np.ndarray:
        """The 3x3 rotation."""
        ax, ay, az = np.deg2rad(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def to_anatomy(self, points_mm: np.ndarray, centre_mm: Sequence[float]) -> np.ndarray:
        """Where in the unmoved head the scanner points `points_mm` (..., 3) fall."""
        c = np.asarray(centre_mm, dtype=np.float64)
        return (np.asarray(points_mm, dtype=np.float64) - c - self.shift_mm) @ self.matrix() + c

    def to_scanner(self, points_mm: np.ndarray, centre_mm: Sequence[float]) -> np.ndarray:
        """Where anatomical points `points_mm` (..., 3) appear after the motion."""
        c = np.asarray(centre_mm, dtype=np.float64)
        return (np.asarray(points_mm, dtype=np.float64) - c) @ self.matrix().T + c + self.shift_mm


def _flat(points_mm: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    points = np.asarray(points_mm, dtype=np.float64)
    if points.shape[-1] != 3:
        raise ValueError(f"points must have shape (..., 3), got {points.shape}")
    return points.reshape(-1, 3), points.shape[:-1]


def lesion_membership(points_mm: np.ndarray, lesion: Lesion) -> np.ndarray:
    """1 - normalised ellipsoid radius: 1 at the lesion centre, 0 on its surface, < 0 outside."""
    flat, shape = _flat(points_mm)
    rel = (flat - lesion.centre_mm) / np.asarray(lesion.radius_mm)
    return (1.0 - np.sqrt((rel**2).sum(axis=1))).reshape(shape)


def lesion_mask(points_mm: np.ndarray, lesion: Lesion) -> np.ndarray:
    """Whether each point (..., 3) in mm lies inside the lesion."""
    return lesion_membership(points_mm, lesion) >= 0.0


def _inside(rel: np.ndarray, semi_axes: Sequence[float], edge_mm: float) -> np.ndarray:
    """Soft inside-ness of an ellipsoid at offsets `rel` (3, N) from its centre: 0..1 over
    `edge_mm` across the surface, along the ray from the centre (|rel| (1/rho - 1) inside)."""
    x, y, z = rel
    ax, ay, az = (float(a) for a in semi_axes)
    rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2)
    norm = np.sqrt(x * x + y * y + z * z)
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = np.where(rho > 1e-6, norm * (1.0 / rho - 1.0), np.inf)
    return np.clip(0.5 + distance / edge_mm, 0.0, 1.0).astype(np.float32, copy=False)


def _levels(contrast: str) -> dict[str, float]:
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast {contrast!r}; expected one of {sorted(CONTRASTS)}")
    return CONTRASTS[contrast]


def phantom_values(points_mm: np.ndarray, *, contrast: str, lesion: Lesion | None,
                   head: Head) -> np.ndarray:
    """Noise-free signal (float32, shape of points without the last axis) of the head phantom
    in `contrast` at patient points (..., 3) in mm, bias field included (not for adc)."""
    levels = _levels(contrast)
    flat, shape = _flat(points_mm)
    out = np.empty(len(flat), dtype=np.float32)
    step = 1 << 20
    for start in range(0, len(flat), step):
        out[start:start + step] = _values(flat[start:start + step], levels, contrast, lesion,
                                          head)
    return out.reshape(shape)


def _values(points: np.ndarray, levels: dict[str, float], contrast: str, lesion: Lesion | None,
            head: Head) -> np.ndarray:
    rel = np.ascontiguousarray((points - head.centre_mm).T, dtype=np.float32)  # (3, N)
    axes = np.asarray(head.semi_axes_mm, dtype=np.float64)
    value = np.zeros(len(points), dtype=np.float32)
    depth = 0.0
    brain = value
    for tissue, thickness in (("scalp", head.scalp_mm), ("skull", head.skull_mm),
                              ("csf", head.csf_mm), ("gm", head.cortex_mm), ("wm", 0.0)):
        inside = _inside(rel, axes - depth, head.edge_mm)
        value += (levels[tissue] - value) * inside
        if tissue == "gm":
            brain = inside
        depth += thickness
    offset = np.asarray(head.ventricle_offset_mm, dtype=np.float32)[:, None]
    mirror = offset * np.array([[-1], [1], [1]], dtype=np.float32)
    semi = head.ventricle_semi_axes_mm
    ventricles = np.maximum(_inside(rel - offset, semi, head.edge_mm),
                            _inside(rel - mirror, semi, head.edge_mm))
    value += (levels["csf"] - value) * ventricles * brain
    if lesion is not None:
        lrel = np.ascontiguousarray((points - lesion.centre_mm).T, dtype=np.float32)
        radius = np.asarray(lesion.radius_mm, dtype=np.float64)
        value += (levels["rim"] - value) * _inside(lrel, radius, head.edge_mm)
        core = _inside(lrel, radius * (1.0 - lesion.rim_fraction), head.edge_mm)
        value += (levels["lesion"] - value) * core
    if contrast != "adc":
        bx, by, bz, bq = head.bias
        x, y, z = (rel[i] / np.float32(axes[i]) for i in range(3))
        value *= 1.0 + bx * x + by * y + bz * z + bq * (x * x + y * y + z * z - 0.33)
    return value


def rician(values: np.ndarray, *, rng: np.random.Generator, sd: float) -> np.ndarray:
    """Magnitude of `values` plus complex Gaussian noise of SD `sd` (float32)."""
    real = values + rng.normal(0.0, sd, values.shape).astype(np.float32)
    imag = rng.normal(0.0, sd, values.shape).astype(np.float32)
    return np.hypot(real, imag)


# --- grids ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a stack of parallel slices: ImagePositionPatient per slice (ascending
    along the slice normal), one ImageOrientationPatient, PixelSpacing (row, column), shape."""

    positions: np.ndarray  # (Z, 3) mm
    orientation: np.ndarray  # (6,)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    shape: tuple[int, int]  # (rows, columns)

    @property
    def normal(self) -> np.ndarray:
        """Slice normal (row direction x column direction)."""
        return np.cross(self.orientation[:3], self.orientation[3:])

    def points(self) -> np.ndarray:
        """(Z, H, W, 3) voxel centres in mm: IPP + col*dc*IOP[:3] + row*dr*IOP[3:]."""
        return _plane_points(self.positions, self.orientation, self.pixel_spacing, self.shape)

    @classmethod
    def from_series(cls, series: Any) -> Grid:
        """The grid of an object with positions, orientation, pixel_spacing, volume (MRSeries)."""
        return cls(np.asarray(series.positions, dtype=np.float64),
                   np.asarray(series.orientation, dtype=np.float64),
                   tuple(float(v) for v in series.pixel_spacing),
                   tuple(int(v) for v in np.shape(series.volume)[-2:]))

    @classmethod
    def from_folder(cls, folder: Path) -> Grid:
        """The grid of the DICOM MR series in `folder`, from headers only (classic or enhanced;
        repeated positions of multi-volume series once)."""
        positions, orientations, spacing, shape = [], set(), None, None
        files = sorted(p for p in Path(folder).iterdir() if p.is_file())
        if not files:
            raise SeriesError(f"{folder}: no DICOM file")
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            shape = (int(ds.Rows), int(ds.Columns))
            if "PerFrameFunctionalGroupsSequence" in ds:
                shared = ds.SharedFunctionalGroupsSequence[0]
                iop = tuple(shared.PlaneOrientationSequence[0].ImageOrientationPatient)
                spacing = tuple(shared.PixelMeasuresSequence[0].PixelSpacing)
                orientations.add(tuple(round(float(v), 5) for v in iop))
                positions += [frame.PlanePositionSequence[0].ImagePositionPatient
                              for frame in ds.PerFrameFunctionalGroupsSequence]
            else:
                spacing = tuple(ds.PixelSpacing)
                orientations.add(tuple(round(float(v), 5) for v in ds.ImageOrientationPatient))
                positions.append(ds.ImagePositionPatient)
        if len(orientations) != 1:
            raise SeriesError(f"{folder}: {len(orientations)} slice orientations; a grid needs one")
        orientation = np.asarray(next(iter(orientations)), dtype=np.float64)
        unique = np.unique(np.round(np.asarray(positions, dtype=np.float64), 3), axis=0)
        normal = np.cross(orientation[:3], orientation[3:])
        unique = unique[np.argsort(unique @ normal, kind="stable")]
        return cls(unique, orientation, tuple(float(v) for v in spacing), shape)


def _plane_points(positions: np.ndarray, orientation: np.ndarray, spacing: Sequence[float],
                  shape: Sequence[int]) -> np.ndarray:
    """(Z, H, W, 3) voxel centres of slices at `positions` (Z, 3) with one or Z orientations."""
    positions = np.asarray(positions, dtype=np.float64)
    iop = np.broadcast_to(np.asarray(orientation, dtype=np.float64), (len(positions), 6))
    rows = np.arange(shape[0], dtype=np.float64) * float(spacing[0])
    cols = np.arange(shape[1], dtype=np.float64) * float(spacing[1])
    return (positions[:, None, None, :]
            + cols[None, None, :, None] * iop[:, None, None, :3]
            + rows[None, :, None, None] * iop[:, None, None, 3:])


# --- series --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """One of the volumes of a series at the same positions (an echo, or a b-value)."""

    contrast: str
    echo_time: float
    echo_number: int = 1
    b_value: float | None = None


@dataclass(frozen=True)
class SeriesSpec:
    """What one MR series is: sequence, tags, and the grid its slices sample the phantom on."""

    description: str
    contrast: str
    series_number: int
    plane: str = "axial"  # axial | coronal | sagittal | 3plane (one slab per plane, localizer)
    orientation: tuple[float, ...] | None = None  # explicit IOP (oblique); overrides plane
    matrix: tuple[int, int] = (32, 32)  # (rows, columns)
    pixel_spacing: tuple[float, float] = (7.2, 7.2)  # (between rows, between columns) mm
    slice_thickness: float = 5.0
    slice_gap: float = 1.0  # between slices; centres are thickness + gap apart
    n_slices: int = 12  # per plane for 3plane
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # centre of the slab
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    repetition_time: float = 500.0
    echo_time: float = 12.0
    inversion_time: float | None = None
    flip_angle: float = 90.0
    scanning_sequence: str = "SE"
    sequence_variant: str = "SP"
    contrast_agent: str | None = None  # ContrastBolusAgent
    acquisition: str = "2D"  # MRAcquisitionType
    volumes: tuple[Volume, ...] = ()  # several: multi-echo or multi-b (same positions)
    enhanced: bool = False  # one Enhanced MR (multi-frame) object instead of one file a slice
    frame_of_reference_uid: str | None = None  # None: the study's
    motion: Motion | None = None  # seen in the pixels, not recorded in the geometry
    rescale: tuple[float, float] = (1.0, 0.0)  # (RescaleSlope, RescaleIntercept)
    protocol_name: str | None = None  # None: the description; "" leaves it out
    descending: bool = False  # InstanceNumber 1 at the far end of the slice normal
    noise_sd: float | None = None  # None: NOISE_SD of the contrast

    @property
    def echoes(self) -> tuple[Volume, ...]:
        """The volumes written (one unless multi-echo / multi-b)."""
        return self.volumes or (Volume(self.contrast, self.echo_time),)

    @property
    def slice_step(self) -> float:
        """Distance between slice centres (mm)."""
        return self.slice_thickness + self.slice_gap

    def grid(self) -> Grid:
        """The spec's slice grid (not for 3plane), slices ascending along the normal."""
        if self.plane == "3plane":
            raise ValueError(f"{self.description}: a 3-plane series has no single grid")
        frames = [f for f in _layout(self) if f.volume == 0]
        frames.sort(key=lambda f: f.index)
        return Grid(np.array([f.position for f in frames]), np.asarray(frames[0].orientation),
                    self.pixel_spacing, self.matrix)


@dataclass(frozen=True)
class StudyInfo:
    """The study-level tags every series of one study shares."""

    case_id: str
    study_uid: str
    study_date: str  # YYYYMMDD
    study_description: str
    frame_of_reference_uid: str
    manufacturer: str = "GE MEDICAL SYSTEMS"
    model: str = "Signa HDxt"
    field_strength: float = 1.5
    study_time: str = "101500"
    patient_sex: str = "M"
    patient_age: str = "045Y"
    body_part: str = "BRAIN"
    file_names: str = "nbia"  # nbia: 1-01.dcm in InstanceNumber order; uid: {SOPInstanceUID}.dcm


@dataclass(frozen=True)
class _Frame:
    instance: int
    index: int  # position index, ascending along the normal
    volume: int
    position: tuple[float, float, float]
    orientation: tuple[float, ...]


def _round(values: Iterable[float], digits: int) -> tuple[float, ...]:
    return tuple(float(round(float(v), digits)) + 0.0 for v in values)


def _layout(spec: SeriesSpec) -> list[_Frame]:
    """Every frame of the series in InstanceNumber order (volumes interleaved per position)."""
    if spec.plane == "3plane":
        stacks = [PLANES[p] for p in ("axial", "sagittal", "coronal")]
    elif spec.orientation is not None:
        stacks = [tuple(spec.orientation)]
    elif spec.plane in PLANES:
        stacks = [PLANES[spec.plane]]
    else:
        raise ValueError(f"{spec.description}: plane {spec.plane!r}; expected one of "
                         f"{[*PLANES, '3plane']} or an explicit orientation")
    rows, cols = spec.matrix
    dr, dc = spec.pixel_spacing
    places = []
    for iop in stacks:
        iop = _round(iop, 6)
        x, y = np.asarray(iop[:3]), np.asarray(iop[3:])
        normal = np.cross(x, y)
        for k in range(spec.n_slices):
            centre = (np.asarray(spec.centre_mm)
                      + (k - (spec.n_slices - 1) / 2) * spec.slice_step * normal)
            corner = centre - (cols - 1) / 2 * dc * x - (rows - 1) / 2 * dr * y
            places.append((k, _round(corner, 4), iop))
    if spec.descending:
        places = places[::-1]
    frames, n_volumes = [], len(spec.echoes)
    for number, (index, position, iop) in enumerate(places):
        for volume in range(n_volumes):
            frames.append(_Frame(number * n_volumes + volume + 1, index, volume, position, iop))
    return frames


def safe_name(text: str) -> str:
    """`text` with characters unsafe in file names replaced by '_' ('NA' when empty)."""
    cleaned = _UNSAFE.sub("_", text).strip().rstrip(".")
    return cleaned or "NA"


def study_folder_name(study: StudyInfo) -> str:
    """NBIA Data Retriever study folder: MM-DD-YYYY-NA-{StudyDescription}-{last 5 of uid}."""
    date = dt.datetime.strptime(study.study_date, "%Y%m%d").strftime(_NBIA_DATE)
    return f"{date}-NA-{safe_name(study.study_description)}-{study.study_uid[-5:]}"


def series_folder_name(spec: SeriesSpec, uid: str) -> str:
    """NBIA Data Retriever series folder: {SeriesNumber}.000000-{description}-{last 5 of uid}."""
    return f"{spec.series_number}.000000-{safe_name(spec.description)}-{uid[-5:]}"


def _uid(*parts: object) -> str:
    return str(pydicom.uid.generate_uid(entropy_srcs=["mgi-studies", *map(str, parts)]))


def series_uid(spec: SeriesSpec, study: StudyInfo) -> str:
    """The SeriesInstanceUID `write_series` gives `spec` in `study` (deterministic)."""
    return _uid(study.study_uid, spec.series_number, spec.description)


def _words(*parts: object) -> list[int]:
    """Seed words for numpy from arbitrary parts (stable across runs and platforms)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


def _sample(spec: SeriesSpec, frames: list[_Frame], *, head: Head, lesion: Lesion | None,
            rng: np.random.Generator) -> np.ndarray:
    """Physical values (F, rows, cols) of every frame: the phantom at its voxel centres."""
    out = np.empty((len(frames), *spec.matrix), dtype=np.float32)
    chunk = max(1, (1 << 21) // (spec.matrix[0] * spec.matrix[1]))
    for start in range(0, len(frames), chunk):
        part = frames[start:start + chunk]
        points = _plane_points(np.array([f.position for f in part]),
                               np.array([f.orientation for f in part]), spec.pixel_spacing,
                               spec.matrix)
        if spec.motion is not None:
            points = spec.motion.to_anatomy(points, head.centre_mm)
        for volume, echo in enumerate(spec.echoes):
            pick = [i for i, f in enumerate(part) if f.volume == volume]
            if not pick:
                continue
            clean = phantom_values(points[pick], contrast=echo.contrast, lesion=lesion, head=head)
            sd = spec.noise_sd if spec.noise_sd is not None else NOISE_SD[echo.contrast]
            out[[start + i for i in pick]] = rician(clean, rng=rng, sd=sd)
    return out


def _stored(values: np.ndarray, spec: SeriesSpec) -> tuple[np.ndarray, int]:
    """uint16 stored values for (slope, intercept) and the BitsStored they need (12 or 16)."""
    slope, intercept = spec.rescale
    stored = np.clip(np.rint((values - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, 12 if int(stored.max(initial=0)) < 4096 else 16


def _base_dataset(spec: SeriesSpec, study: StudyInfo, uid: str, *, sop_class: str,
                  bits: int, pixels: np.ndarray, stored: np.ndarray) -> Dataset:
    """The series' dataset with `pixels` (a slice, or every frame); window from `stored`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(spec.image_type)
    ds.SOPClassUID = sop_class
    time = _series_time(study.study_time, spec.series_number)
    for prefix in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", study.study_date)
        setattr(ds, f"{prefix}Time", study.study_time if prefix == "Study" else time)
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = study.manufacturer
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = spec.description
    ds.ManufacturerModelName = study.model
    ds.PatientName = study.case_id
    ds.PatientID = study.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = study.patient_sex
    ds.PatientAge = study.patient_age
    if spec.contrast_agent:
        ds.ContrastBolusAgent = spec.contrast_agent
    ds.BodyPartExamined = study.body_part
    ds.ScanningSequence = spec.scanning_sequence.split("\\")
    ds.SequenceVariant = spec.sequence_variant.split("\\")
    ds.MRAcquisitionType = spec.acquisition
    ds.SliceThickness = spec.slice_thickness
    ds.RepetitionTime = spec.repetition_time
    ds.EchoTime = spec.echoes[0].echo_time
    if spec.inversion_time is not None:
        ds.InversionTime = spec.inversion_time
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = round(42.577478 * study.field_strength, 6)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.MagneticFieldStrength = study.field_strength
    ds.SpacingBetweenSlices = round(spec.slice_step, 6)
    protocol = spec.description if spec.protocol_name is None else spec.protocol_name
    if protocol:
        ds.ProtocolName = protocol
    ds.AcquisitionMatrix = [0, spec.matrix[0], spec.matrix[1], 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = spec.flip_angle
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = uid
    ds.StudyID = ""
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid or study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.set_pixel_data(pixels, "MONOCHROME2", bits, generate_instance_uid=False)
    slope, intercept = spec.rescale
    physical = stored.astype(np.float64) * slope + intercept
    low, high = np.percentile(physical, [1.0, 99.5]) if physical.size else (0.0, 1.0)
    ds.WindowCenter = round(float(low + high) / 2, 2)
    ds.WindowWidth = round(max(float(high - low), 1.0), 2)
    return ds


def _series_time(study_time: str, series_number: int) -> str:
    start = dt.datetime.strptime(study_time, "%H%M%S")
    return (start + dt.timedelta(minutes=3 * series_number)).strftime("%H%M%S")


def _file_name(study: StudyInfo, instance: int, count: int, sop: str) -> str:
    if study.file_names == "uid":
        return f"{sop}.dcm"
    return f"1-{instance:0{max(2, len(str(count)))}d}.dcm"


def _write_classic(folder: Path, spec: SeriesSpec, study: StudyInfo, uid: str,
                   frames: list[_Frame], stored: np.ndarray, bits: int,
                   rng: np.random.Generator) -> None:
    ds = _base_dataset(spec, study, uid, sop_class=MRImageStorage, bits=bits,
                       pixels=stored[0], stored=stored)
    ds.RescaleIntercept = spec.rescale[1]
    ds.RescaleSlope = spec.rescale[0]
    ds.RescaleType = "US"
    echoes = spec.echoes
    for i in rng.permutation(len(frames)):  # files land in the folder in no particular order
        frame = frames[i]
        echo = echoes[frame.volume]
        sop = _uid(uid, frame.instance)
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = frame.instance
        ds.ImagePositionPatient = list(frame.position)
        ds.ImageOrientationPatient = list(frame.orientation)
        ds.PixelSpacing = list(_round(spec.pixel_spacing, 6))
        normal = np.cross(frame.orientation[:3], frame.orientation[3:])
        ds.SliceLocation = round(float(np.dot(frame.position, normal)), 4)
        ds.EchoTime = echo.echo_time
        if echo.b_value is not None:
            ds.DiffusionBValue = echo.b_value
        else:
            ds.EchoNumbers = echo.echo_number
        ds.PixelData = np.ascontiguousarray(stored[i], dtype="<u2").tobytes()
        ds.save_as(folder / _file_name(study, frame.instance, len(frames), sop),
                   enforce_file_format=True)


def _item(**values: object) -> DicomSequence:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return DicomSequence([item])


def _write_enhanced(folder: Path, spec: SeriesSpec, study: StudyInfo, uid: str,
                    frames: list[_Frame], stored: np.ndarray, bits: int) -> None:
    if spec.plane == "3plane":
        raise ValueError(f"{spec.description}: an enhanced 3-plane series is not supported")
    ds = _base_dataset(spec, study, uid, sop_class=EnhancedMRImageStorage, bits=bits,
                       pixels=stored, stored=stored)
    for keyword in ("SliceThickness", "RepetitionTime", "EchoTime", "InversionTime",
                    "SpacingBetweenSlices", "FlipAngle", "EchoNumbers", "NumberOfAverages",
                    "ScanningSequence", "SequenceVariant", "ImagingFrequency"):
        if keyword in ds:
            delattr(ds, keyword)
    sop = _uid(uid, 1)
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPInstanceUID = sop
    ds.InstanceNumber = 1
    ds.ImageType = [*spec.image_type[:2], "VOLUME", "NONE"]
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "UNKNOWN"
    ds.PulseSequenceName = spec.description[:16]
    dimension = _uid(uid, "dimensions")
    ds.DimensionOrganizationSequence = _item(DimensionOrganizationUID=dimension)
    ds.DimensionIndexSequence = DicomSequence([
        _item(DimensionOrganizationUID=dimension, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=0x00209111)[0],
        _item(DimensionOrganizationUID=dimension, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111)[0],
    ])
    shared = Dataset()
    shared.PixelMeasuresSequence = _item(
        PixelSpacing=list(_round(spec.pixel_spacing, 6)), SliceThickness=spec.slice_thickness,
        SpacingBetweenSlices=round(spec.slice_step, 6))
    shared.PlaneOrientationSequence = _item(ImageOrientationPatient=list(frames[0].orientation))
    shared.PixelValueTransformationSequence = _item(
        RescaleIntercept=spec.rescale[1], RescaleSlope=spec.rescale[0], RescaleType="US")
    shared.MRTimingAndRelatedParametersSequence = _item(
        RepetitionTime=spec.repetition_time, FlipAngle=spec.flip_angle, EchoTrainLength=1)
    shared.MRModifierSequence = _item(
        InversionRecovery="YES" if spec.inversion_time is not None else "NO",
        **({"InversionTimes": [spec.inversion_time]} if spec.inversion_time else {}))
    shared.MRImageFrameTypeSequence = _item(
        FrameType=list(ds.ImageType), PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
        ComplexImageComponent="MAGNITUDE", AcquisitionContrast="UNKNOWN")
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for frame in frames:
        item = Dataset()
        item.FrameContentSequence = _item(
            StackID="1", InStackPositionNumber=frame.index + 1,
            DimensionIndexValues=[1, frame.index + 1])
        item.PlanePositionSequence = _item(ImagePositionPatient=list(frame.position))
        item.MREchoSequence = _item(EffectiveEchoTime=spec.echoes[frame.volume].echo_time)
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.save_as(folder / _file_name(study, 1, 1, sop), enforce_file_format=True)


def write_series(study_dir: Path, spec: SeriesSpec, *, study: StudyInfo, head: Head,
                 lesion: Lesion | None, seed: int = 0) -> Path:
    """Write one series into its NBIA-named folder under `study_dir`; return that folder.

    Every slice samples the phantom (moved by `spec.motion`, if any) at its voxel centres,
    adds Rician noise, stores uint16 with the spec's rescale; files are written shuffled.
    """
    uid = series_uid(spec, study)
    folder = Path(study_dir) / series_folder_name(spec, uid)
    folder.mkdir(parents=True, exist_ok=False)
    frames = _layout(spec)
    rng = np.random.default_rng(_words(seed, study.case_id, uid))
    stored, bits = _stored(_sample(spec, frames, head=head, lesion=lesion, rng=rng), spec)
    if spec.enhanced:
        _write_enhanced(folder, spec, study, uid, frames, stored, bits)
    else:
        _write_classic(folder, spec, study, uid, frames, stored, bits, rng)
    return folder


# --- studies -------------------------------------------------------------------------------------

_NAMES = {  # site -> series key -> SeriesDescription
    "ge": {
        "loc": "3 PLANE LOC", "flair": "AX T2 FLAIR", "flair_sag": "SAG T2 FLAIR",
        "t1": "AX T1", "t1_sag": "SAG T1", "t1_post": "AX T1 +C", "t1_post_cor": "COR T1 +C",
        "t1_post_3d": "3D SPGR POST GAD", "t2": "AX T2 FSE", "t2_dual": "AX PD/T2 FSE",
        "dwi": "AX DWI 1000b", "adc": "Apparent Diffusion Coefficient (mm2/s)",
        "t1_flair": "AX T1 FLAIR",
    },
    "siemens": {
        "loc": "localizer", "flair": "t2_tirm_tra_dark-fluid",
        "flair_sag": "t2_tirm_sag_dark-fluid", "t1": "t1_se_tra", "t1_sag": "t1_se_sag",
        "t1_post": "t1_se_tra_post", "t1_post_cor": "t1_se_cor_post",
        "t1_post_3d": "t1_mprage_sag_post", "t2": "t2_tse_tra", "t2_dual": "pd+t2_tse_tra",
        "dwi": "ep2d_diff_3scan_trace_p2", "adc": "ep2d_diff_3scan_trace_p2_ADC",
        "t1_flair": "t1_flair_tra",
    },
    "philips": {
        "loc": "Survey", "flair": "T2W_FLAIR_AX", "flair_sag": "T2W_FLAIR_SAG",
        "t1": "T1W_SE_AX", "t1_sag": "T1W_SE_SAG", "t1_post": "T1W_SE_AX_GD",
        "t1_post_cor": "T1W_SE_COR_GD", "t1_post_3d": "T1W_3D_TFE_SAG_GD", "t2": "T2W_TSE_AX",
        "t2_dual": "DUAL_TSE_AX", "dwi": "DWI_AX", "adc": "dADC_AX", "t1_flair": "T1W_FLAIR_AX",
    },
    "terse": {
        "loc": "SCOUT", "flair": "FLAIR AXIAL", "flair_sag": "FLAIR SAGITTAL",
        "t1": "T1 AXIAL SE", "t1_sag": "T1 SAGITTAL", "t1_post": "AX T1 POST GD",
        "t1_post_cor": "COR T1 POST GD", "t1_post_3d": "SAG 3D T1 POST GD", "t2": "T2 AXIAL",
        "t2_dual": "PD T2 AXIAL", "dwi": "DIFFUSION AXIAL", "adc": "ADC AXIAL",
        "t1_flair": "T1 FLAIR AXIAL",
    },
}
_SITE = {
    "ge": {"manufacturer": "GE MEDICAL SYSTEMS", "model": "Signa HDxt", "fields": (1.5, 3.0),
           "study": "MRI BRAIN W/WO CONTRAST", "image_type": ("ORIGINAL", "PRIMARY", "OTHER"),
           "protocol": "TUMOR BRAIN", "files": "nbia", "descending": True, "agent": "MAGNEVIST",
           "body": "BRAIN", "enhanced": False},
    "siemens": {"manufacturer": "SIEMENS", "model": "Avanto", "fields": (1.5,),
                "study": "MR HEAD W/WO CONTRAST",
                "image_type": ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), "protocol": None,
                "files": "nbia", "descending": False, "agent": None, "body": "HEAD",
                "enhanced": False},
    "philips": {"manufacturer": "Philips Medical Systems", "model": "Achieva", "fields": (3.0,),
                "study": "MRI BRAIN W/O & W CONTRAST",
                "image_type": ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), "protocol": None,
                "files": "nbia", "descending": False, "agent": "GADOVIST", "body": "BRAIN",
                "enhanced": True},
    "terse": {"manufacturer": "GE MEDICAL SYSTEMS", "model": "GENESIS_SIGNA", "fields": (1.5,),
              "study": "BRAIN", "image_type": ("ORIGINAL", "PRIMARY", "OTHER"), "protocol": "",
              "files": "uid", "descending": True, "agent": "GAD", "body": "BRAIN",
              "enhanced": False},
}
_ADC_TYPE = ("DERIVED", "PRIMARY", "ADC")
_LOCALIZER_TYPE = ("ORIGINAL", "PRIMARY", "LOCALIZER")


@dataclass(frozen=True)
class SeriesTruth:
    """One written series: what it is, where, and where the lesion shows in its coordinates."""

    description: str
    folder: Path
    spec: SeriesSpec
    study_uid: str
    lesion_centre_mm: tuple[float, float, float]  # as seen (after the series' motion)


@dataclass
class StudyTruth:
    """What `write_study` wrote for one patient and what a correct reader should conclude."""

    case_id: str
    kind: str
    site: str
    patient_dir: Path  # {root}/{PatientID}: the folder holding the study folders
    roles: dict[str, str]  # role -> SeriesInstanceUID of the series that should fill it
    series: dict[str, SeriesTruth]  # SeriesInstanceUID -> the series
    studies: tuple[StudyInfo, ...]  # the roles come from studies[0]
    head: Head
    lesion: Lesion
    study_dirs: dict[str, Path] = field(default_factory=dict)  # StudyInstanceUID -> folder

    @property
    def lesion_centre_mm(self) -> tuple[float, float, float]:
        """Lesion centre in the first study's patient coordinates (mm)."""
        return self.lesion.centre_mm

    @property
    def lesion_radius_mm(self) -> tuple[float, float, float]:
        """Lesion semi-axes (mm)."""
        return self.lesion.radius_mm

    def folder(self, role: str) -> Path:
        """The series folder expected for `role` (KeyError when the study has none)."""
        return self.series[self.roles[role]].folder

    def _find(self, target: str | Path) -> SeriesTruth | None:
        if isinstance(target, str) and target in self.roles:
            return self.series[self.roles[target]]
        if isinstance(target, str) and target in self.series:
            return self.series[target]
        path = Path(target)
        return next((s for s in self.series.values() if s.folder == path), None)

    def lesion_mask_on(self, target: str | Path | Grid | Any = "FLAIR", *,
                       as_seen: bool = False) -> np.ndarray:
        """(Z, H, W) bool lesion mask on a grid, slices ascending along the normal.

        `target`: a role, a SeriesInstanceUID or series folder of this study (its written
        grid), any other series folder (its DICOM headers), a `Grid`, or an object with
        positions, orientation, pixel_spacing and volume (`MRSeries`). The mask is where the
        lesion is in the patient frame; `as_seen` moves it with the series' motion, to match
        that series' pixels.
        """
        motion = None
        if isinstance(target, Grid):
            grid = target
        elif isinstance(target, (str, Path)):
            found = self._find(target)
            if found is None and isinstance(target, str) and not Path(target).is_dir():
                raise KeyError(f"{self.case_id}: {target!r} is no role ({sorted(self.roles)}), "
                               "series of this study or series folder")
            grid = found.spec.grid() if found is not None else Grid.from_folder(Path(target))
            motion = found.spec.motion if found is not None and as_seen else None
        else:
            grid = Grid.from_series(target)
        points = grid.points()
        if motion is not None:
            points = motion.to_anatomy(points, self.head.centre_mm)
        return lesion_mask(points, self.lesion)

    def write_lgg_masks(self, out_dir: Path, *, role: str = "FLAIR") -> Path:
        """LGG-style slice masks of the `role` series: `{case}_{InstanceNumber}_mask.tif`,
        uint8 0/255, one per slice (per frame of an enhanced object); return `out_dir`."""
        truth = self.series[self.roles[role]]
        spec = truth.spec
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for frame in _layout(spec):
            points = _plane_points(np.array([frame.position]), np.array(frame.orientation),
                                   spec.pixel_spacing, spec.matrix)[0]
            if spec.motion is not None:
                points = spec.motion.to_anatomy(points, self.head.centre_mm)
            mask = lesion_mask(points, self.lesion).astype(np.uint8) * 255
            tifffile.imwrite(out_dir / f"{self.case_id}_{frame.instance}_mask.tif", mask,
                             photometric="minisblack", metadata=None)
        return out_dir


@dataclass(frozen=True)
class _Planned:
    key: str
    role: str | None
    spec: SeriesSpec


def _n_slices(size: int, n_full: int) -> int:
    """Slices at matrix `size`: n_full at 256 px, fewer (thicker, same coverage) below, >= 10."""
    scaled = round(n_full * min(1.0, size / _FULL_PX) ** 0.4)
    return int(min(n_full, max(10, scaled)))


def _px(size: int, fraction: float = 1.0) -> int:
    return max(8, 2 * round(size * fraction / 2))


class _Planner:
    """Series specs of one site at one matrix size, placed relative to the head."""

    def __init__(self, site: str, size: int, head: Head, rng: np.random.Generator):
        self.site, self.size, self.head, self.rng = site, size, head, rng
        self.style = _SITE[site]
        self.names = _NAMES[site]
        slope = 1.0
        if site == "philips":
            slope = float(np.round(rng.uniform(1.2, 2.6), 6))
        self.rescale = (slope, -50.0 if site == "terse" else 0.0)

    def spec(self, key: str, contrast: str, number: int, *, plane: str = "axial",
             fov: tuple[float, float] = (240.0, 240.0), matrix: tuple[float, float] = (1, 1),
             thickness: float = 5.0, gap: float = 1.0, n_full: int = 24,
             offset: tuple[float, float, float] = (0.0, 0.0, 0.0), **tags: Any) -> SeriesSpec:
        """A series `key` of the site with full-size slab geometry scaled to the matrix size."""
        rows, cols = _px(self.size, matrix[0]), _px(self.size, matrix[1])
        n = n_full if plane == "3plane" else _n_slices(self.size, n_full)
        scale = n_full / n
        spacing = _round((fov[0] / rows, fov[1] / cols), 6)
        defaults = {
            "image_type": self.style["image_type"], "rescale": self.rescale,
            "protocol_name": self.style["protocol"], "descending": self.style["descending"],
        }
        return SeriesSpec(
            description=self.names[key], contrast=contrast, series_number=number, plane=plane,
            matrix=(rows, cols), pixel_spacing=spacing,
            slice_thickness=round(thickness * scale, 4), slice_gap=round(gap * scale, 4),
            n_slices=n, centre_mm=_round(np.add(self.head.centre_mm, offset), 3),
            **{**defaults, **tags})

    def post_agent(self) -> dict[str, Any]:
        agent = self.style["agent"]
        return {"contrast_agent": agent} if agent else {}

    def localizer(self, number: int) -> SeriesSpec:
        return self.spec("loc", "localizer", number, plane="3plane", fov=(280, 280),
                         thickness=8.0, gap=0.0, n_full=1, image_type=_LOCALIZER_TYPE,
                         repetition_time=7.5, echo_time=1.8, flip_angle=30.0,
                         scanning_sequence="GR", sequence_variant="SS", descending=False)

    def flair(self, number: int, *, plane: str = "axial") -> SeriesSpec:
        if plane == "sagittal":
            return self.spec("flair_sag", "flair", number, plane="sagittal", fov=(240, 240),
                             thickness=5.0, gap=1.5, n_full=20, **_FLAIR_TAGS)
        return self.spec("flair", "flair", number, fov=(230, 230), thickness=5.0, gap=1.0,
                         n_full=24, offset=(0, 0, 8), **_FLAIR_TAGS)

    def t1(self, number: int, *, plane: str = "axial") -> SeriesSpec:
        if plane == "sagittal":
            return self.spec("t1_sag", "t1", number, plane="sagittal", fov=(240, 240),
                             thickness=5.0, gap=1.5, n_full=20, offset=(1.5, 0, 0), **_T1_TAGS)
        return self.spec("t1", "t1", number, fov=(240, 240), matrix=(0.875, 0.875),
                         thickness=6.0, gap=1.0, n_full=21, offset=(0, 0, 10), **_T1_TAGS)

    def t1_flair(self, number: int) -> SeriesSpec:
        return self.spec("t1_flair", "t1flair", number, fov=(240, 240), matrix=(0.875, 0.875),
                         thickness=5.0, gap=1.5, n_full=22, offset=(0, 0, 6),
                         repetition_time=2200.0, echo_time=10.0,
                         inversion_time=float(np.round(self.rng.uniform(750, 860))),
                         scanning_sequence="SE\\IR", sequence_variant="SK\\SP\\MP")

    def t2(self, number: int, *, dual: bool = False) -> SeriesSpec:
        tags: dict[str, Any] = {"repetition_time": 4000.0, "echo_time": 102.0,
                                "scanning_sequence": "SE", "sequence_variant": "SK\\SP"}
        if dual:
            tags["volumes"] = (Volume("pd", 15.0, 1), Volume("t2", 102.0, 2))
            tags["repetition_time"] = 3000.0
        return self.spec("t2_dual" if dual else "t2", "t2", number, fov=(240, 180),
                         matrix=(1, 0.75), thickness=5.0, gap=1.5, n_full=22, offset=(0, 0, 6),
                         **tags)

    def dwi(self, number: int) -> tuple[SeriesSpec, SeriesSpec]:
        geometry = {"fov": (240, 240), "matrix": (0.5, 0.5), "thickness": 5.0, "gap": 1.0,
                    "n_full": 24, "offset": (0, 0, 8), "repetition_time": 8000.0,
                    "echo_time": 90.0, "scanning_sequence": "EP", "sequence_variant": "SK\\SP"}
        dwi = self.spec("dwi", "dwi", number, volumes=(Volume("b0", 90.0, 1, 0.0),
                                                       Volume("dwi", 90.0, 1, 1000.0)),
                        **geometry)
        adc = self.spec("adc", "adc", number + 1, image_type=_ADC_TYPE, rescale=(1.0, 0.0),
                        **geometry)
        return dwi, adc

    def t1_post(self, number: int, **tags: Any) -> SeriesSpec:
        tilt = np.deg2rad(7.0)  # AC-PC aligned: an oblique axial, recorded in the geometry
        iop = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt)))
        return self.spec("t1_post", "t1post", number, orientation=_round(iop, 6),
                         fov=(220, 220), thickness=5.0, gap=2.0, n_full=20, offset=(0, 0, 4),
                         **_T1_TAGS, **self.post_agent(), **tags)

    def t1_post_cor(self, number: int) -> SeriesSpec:
        return self.spec("t1_post_cor", "t1post", number, plane="coronal", fov=(240, 240),
                         thickness=4.0, gap=1.0, n_full=26, offset=(0, -5, 5),
                         enhanced=self.style["enhanced"], **_T1_TAGS, **self.post_agent())

    def t1_post_3d(self, number: int) -> SeriesSpec:
        if self.site == "siemens":  # MPRAGE: inversion-prepared, TI ~900 ms
            tags = {"repetition_time": 1900.0, "echo_time": 2.9, "inversion_time": 900.0,
                    "flip_angle": 9.0, "scanning_sequence": "GR\\IR",
                    "sequence_variant": "SK\\SP\\MP"}
        else:
            tags = {"repetition_time": 7.5, "echo_time": 2.9, "flip_angle": 15.0,
                    "scanning_sequence": "GR", "sequence_variant": "SS\\SP"}
        return self.spec("t1_post_3d", "t1post", number, plane="sagittal", fov=(256, 256),
                         thickness=1.2, gap=0.0, n_full=150, acquisition="3D",
                         enhanced=self.style["enhanced"], **tags, **self.post_agent())


_FLAIR_TAGS = {"repetition_time": 9000.0, "echo_time": 120.0, "inversion_time": 2500.0,
               "scanning_sequence": "SE\\IR", "sequence_variant": "SK\\SP\\MP"}
_T1_TAGS = {"repetition_time": 500.0, "echo_time": 12.0, "scanning_sequence": "SE",
            "sequence_variant": "SK\\SP"}


def _plan(kind: str, planner: _Planner, rng: np.random.Generator) -> list[_Planned]:
    """The series of the (first) study of `kind`, in SeriesNumber order."""
    p = planner
    sagittal_flair = bool(rng.integers(2))
    plan = [_Planned("loc", None, p.localizer(1))]
    if kind == "t1_flair_sagittal":
        plan.append(_Planned("flair_sag", "FLAIR", p.flair(2, plane="sagittal")))
    else:
        plan.append(_Planned("flair", "FLAIR", p.flair(2)))
    if kind in ("t1_flair", "t1_flair_sagittal"):
        plan.append(_Planned("t1_flair", "T1 pre", p.t1_flair(3)))
    else:
        t1 = p.t1(3)
        if kind == "other_frame":  # acquired after the patient was taken out and back in
            t1 = replace(t1, frame_of_reference_uid=_uid(p.head, p.site, "other frame"),
                         motion=Motion((0.0, 0.0, 4.0), (6.0, -5.0, 12.0)))
        plan.append(_Planned("t1", "T1 pre", t1))
    if kind != "two_studies":  # the pre-operative scan of a two-study patient has no T2
        plan.append(_Planned("t2_dual" if kind == "multi_echo" else "t2", "T2",
                             p.t2(4, dual=kind == "multi_echo")))
    dwi, adc = p.dwi(5)
    plan += [_Planned("dwi", None, dwi), _Planned("adc", None, adc)]
    if kind != "t1_flair_sagittal":
        plan.append(_Planned("flair_sag", None, p.flair(7, plane="sagittal")) if sagittal_flair
                    else _Planned("t1_sag", None, p.t1(7, plane="sagittal")))
    if kind == "sagittal_3d_post":
        plan.append(_Planned("t1_post_3d", "T1 post", p.t1_post_3d(8)))
    elif kind != "no_post":
        motion = Motion((2.5, -1.5, 3.0), (3.0, -2.5, 4.0)) if kind == "motion" else None
        plan.append(_Planned("t1_post", "T1 post", p.t1_post(8, motion=motion)))
        plan.append(_Planned("t1_post_cor", None, p.t1_post_cor(9)))
    return plan


def _follow_up_plan(planner: _Planner) -> list[_Planned]:
    """A later study: its own grids and the head repositioned (a new frame of reference)."""
    p = planner
    moved = Motion((3.0, -2.0, -4.0), (4.0, -7.0, 10.0))
    specs = [p.localizer(1), p.flair(2), p.t1(3), p.t2(4), p.t1_post(5)]
    keys = ["loc", "flair", "t1", "t2", "t1_post"]
    return [_Planned(key, None, replace(spec, motion=moved, centre_mm=_round(
        np.add(spec.centre_mm, (0.0, 3.0, -6.0)), 3)))
        for key, spec in zip(keys, specs, strict=True)]


def _draw_head(rng: np.random.Generator) -> Head:
    centre = _round((rng.uniform(-3, 3), rng.uniform(5, 20), rng.uniform(-20, 10)), 2)
    scale = rng.uniform(0.94, 1.06)
    axes = _round(np.array([72.0, 92.0, 86.0]) * scale, 2)
    bias = _round(rng.uniform(-0.07, 0.07, 4), 4)
    return Head(centre_mm=centre, semi_axes_mm=axes, bias=bias)


def _draw_lesion(rng: np.random.Generator, head: Head,
                 centre_mm: tuple[float, float, float] | None) -> Lesion:
    radius = _round(rng.uniform(14.0, 24.0, 3), 2)
    if centre_mm is None:
        side = rng.choice([-1.0, 1.0])
        offset = (side * rng.uniform(22, 32), rng.uniform(-25, 25), rng.uniform(-5, 28))
        centre_mm = _round(np.add(head.centre_mm, offset), 2)
    return Lesion(centre_mm=tuple(float(v) for v in centre_mm), radius_mm=radius)


def write_study(root: Path, *, case_id: str, kind: str = "standard", seed: int = 0,
                size: int = 32, lesion_mm: tuple[float, float, float] | None = None,
                site: str | None = None, study_date: str = "19960909") -> StudyTruth:
    """Write one patient's realistic MR study (two for kind two_studies) under
    `root/{case_id}/`; return the truth: which series fills each role, the lesion, the folders.
    """
    if kind not in KINDS:
        raise AcquireError(f"study kind {kind!r}; expected one of {list(KINDS)}")
    if site is not None and site not in SITES:
        raise AcquireError(f"site {site!r}; expected one of {list(SITES)}")
    if size < 16:
        raise AcquireError(f"size {size}; expected at least 16 px")
    try:
        date = dt.datetime.strptime(study_date, "%Y%m%d")
    except ValueError as err:
        raise AcquireError(f"study_date {study_date!r}; expected YYYYMMDD") from err
    rng = np.random.default_rng(_words(seed, case_id, "study"))
    site = site or SITES[int(rng.integers(len(SITES)))]
    head = _draw_head(rng)
    lesion = _draw_lesion(rng, head, lesion_mm)
    planner = _Planner(site, size, head, rng)
    style = _SITE[site]
    plans = [_plan(kind, planner, rng)]
    dates = [date]
    if kind == "two_studies":
        plans.append(_follow_up_plan(planner))
        # the next January: MM-DD-YYYY folder names then sort the follow-up first
        dates.append(dt.datetime(date.year + 1, 1, int(rng.integers(2, 29))))
    sex = str(rng.choice(["M", "F"]))
    age = int(rng.integers(22, 75))
    field_strength = float(rng.choice(style["fields"]))
    patient_dir = Path(root) / safe_name(case_id)
    if patient_dir.exists() and any(patient_dir.iterdir()):
        raise AcquireError(f"{patient_dir}: already holds studies; write a patient once")
    truth = StudyTruth(case_id=case_id, kind=kind, site=site, patient_dir=patient_dir, roles={},
                       series={}, studies=(), head=head, lesion=lesion)
    studies = []
    for index, (plan, day) in enumerate(zip(plans, dates, strict=True)):
        study_uid = _uid(seed, case_id, kind, site, size, index, "study")
        info = StudyInfo(
            case_id=case_id, study_uid=study_uid, study_date=day.strftime("%Y%m%d"),
            study_description=style["study"], frame_of_reference_uid=_uid(study_uid, "frame"),
            manufacturer=style["manufacturer"], model=style["model"],
            field_strength=field_strength, study_time=f"{9 + index:02d}{15 * index:02d}00",
            patient_sex=sex, patient_age=f"{age + (day.year - date.year):03d}Y",
            body_part=style["body"], file_names=style["files"])
        studies.append(info)
        study_dir = patient_dir / study_folder_name(info)
        truth.study_dirs[study_uid] = study_dir
        for planned in plan:
            spec = planned.spec
            folder = write_series(study_dir, spec, study=info, head=head, lesion=lesion,
                                  seed=seed)
            uid = series_uid(spec, info)
            centre = np.asarray(lesion.centre_mm)
            if spec.motion is not None:
                centre = spec.motion.to_scanner(centre, head.centre_mm)
            truth.series[uid] = SeriesTruth(spec.description, folder, spec, study_uid,
                                            _round(centre, 4))
            if planned.role is not None and index == 0:
                truth.roles[planned.role] = uid
    truth.studies = tuple(studies)
    log.info("wrote %s study (%s, %s) of %s: %d series", kind, site, size, case_id,
             len(truth.series))
    return truth


def write_cohort_studies(root: Path, *, case_ids: Sequence[str], seed: int = 0, size: int = 32,
                         kinds: Sequence[str] | None = None) -> dict[str, StudyTruth]:
    """Write a study per case, cycling through `kinds` (default: every kind) and the sites so a
    small cohort holds every trap; return case_id -> StudyTruth."""
    kinds = tuple(kinds or KINDS)
    truths = {}
    for i, case_id in enumerate(case_ids):
        site = SITES[(i + i // len(kinds)) % len(SITES)]
        truths[case_id] = write_study(root, case_id=case_id, kind=kinds[i % len(kinds)],
                                      seed=seed, size=size, site=site)
    return truths
