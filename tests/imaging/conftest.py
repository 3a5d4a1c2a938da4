"""Fixtures of the imaging tests: small DICOM MR cases, LGG-style masks, synthetic Aperio slides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from mgi.options import MriOptions, build

REPO_ROOT = Path(__file__).resolve().parents[2]

# Stored values v become physical values 2 * v - 100: background is stored as 50 (physical 0).
SLOPE, INTERCEPT = 2.0, -100.0
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _sample_file(relative: str) -> Path:
    """A real sample file from MGI_TEST_DATA; skip the test where it is absent."""
    root = Path(os.environ.get("MGI_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = root / relative
    if not path.exists():
        pytest.skip(f"real sample {relative} not found under {root} "
                    "(set MGI_TEST_DATA to the test data folder)")
    return path


def _base_dataset(sop_class: str, modality: str, *, patient_id: str, series_uid: str,
                  description: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def write_mr_slice(
    path: Path, pixels: np.ndarray, *, position: tuple[float, float, float], instance: int,
    series_uid: str, description: str, patient_id: str = "CASE-1",
    orientation: tuple[float, ...] = AXIAL, spacing: tuple[float, float] = (1.0, 1.0),
    modality: str = "MR", sop_class: str = MRImageStorage, thickness: float = 2.0,
    **tags: object,
) -> Path:
    """One single-frame MR (or other) DICOM file with stored uint16 `pixels`.

    `tags` are further attributes by keyword (StudyDate="20010101", InversionTime=2500.0, ...),
    set last, so they may replace the defaults (StudyInstanceUID); None deletes one.
    """
    ds = _base_dataset(sop_class, modality, patient_id=patient_id, series_uid=series_uid,
                       description=description)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = thickness
    ds.RescaleSlope = SLOPE
    ds.RescaleIntercept = INTERCEPT
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_enhanced_mr(path: Path, stored: np.ndarray, *, z: list[float],
                      description: str = "FLAIR") -> Path:
    """One Enhanced MR (multi-frame) file, one frame per z position (in the order given)."""
    ds = _base_dataset(EnhancedMRImageStorage, "MR", patient_id="CASE-1",
                       series_uid=generate_uid(), description=description)
    ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[1:]
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = list(AXIAL)
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = 3.0
    transform.RescaleSlope = SLOPE
    transform.RescaleIntercept = INTERCEPT
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for value in z:
        frame, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, float(value)]
        frame.PlanePositionSequence = Sequence([plane])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_slice(path: Path) -> Path:
    """A CT image: a non-MR object the MR reader must refuse."""
    return write_mr_slice(path, np.full((4, 4), 60), position=(0, 0, 0), instance=1,
                          series_uid=generate_uid(), description="CT", modality="CT",
                          sop_class=CTImageStorage)


@dataclass
class MRCase:
    """A synthetic MR case on disk and the truth it was built from."""

    root: Path  # radiology/{case_id}: one folder per series
    mask_dir: Path
    case_id: str
    instance_numbers: np.ndarray  # (Z,) in acquisition order: 1..Z, z going down
    z: dict[int, float]  # InstanceNumber -> position along the normal (mm)
    physical: dict[str, np.ndarray]  # sequence -> (Z, H, W) physical values, instance order
    brain: np.ndarray  # (H, W) bool: the disc of non-zero voxels
    tumour_instance: int
    empty_instances: tuple[int, ...] = ()
    folders: dict[str, Path] = field(default_factory=dict)


def make_mr_case(
    tmp_path: Path, *, sequences: tuple[str, ...] = ("T1 pre", "FLAIR", "T1 post"),
    n_slices: int = 6, size: int = 16, tumour_instance: int = 2,
    empty_instances: tuple[int, ...] = (), spacing: dict[str, tuple[float, float]] | None = None,
    descriptions: dict[str, str] | None = None, noisy_background: bool = False, seed: int = 0,
) -> MRCase:
    """A 3-series MR case: slice z goes *down* as InstanceNumber goes up, file names random.

    Inside a centred disc, the stored value of slice n of sequence k is 100 + 40 n + 200 k plus
    noise, so a test can tell slices and sequences apart; outside it is background (physical 0,
    or 0..28 with `noisy_background`, like the Rician noise of a magnitude image).
    """
    rng = np.random.default_rng(seed)
    case_id = "CASE-1"
    root = tmp_path / "radiology" / case_id
    mask_dir = tmp_path / "masks" / case_id
    mask_dir.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    brain = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size * 0.4) ** 2
    instances = np.arange(1, n_slices + 1)
    z = {int(n): 50.0 - 2.5 * (n - 1) for n in instances}  # descending with InstanceNumber
    physical: dict[str, np.ndarray] = {}
    folders: dict[str, Path] = {}
    for k, name in enumerate(sequences):
        series_uid = generate_uid()
        folder = root / series_uid
        folders[name] = folder
        volume = np.zeros((n_slices, size, size))
        for i, n in enumerate(instances):
            stored = np.full((size, size), 50.0)
            if noisy_background:
                stored += rng.integers(0, 15, stored.shape)
            if n not in empty_instances:
                stored[brain] = 100 + 40 * n + 200 * k + rng.integers(0, 20, brain.sum())
            volume[i] = stored * SLOPE + INTERCEPT
            write_mr_slice(
                folder / f"{generate_uid()}.dcm", stored, position=(-8.0, -8.0, z[int(n)]),
                instance=int(n), series_uid=series_uid,
                description=(descriptions or {}).get(name, name),
                spacing=(spacing or {}).get(name, (1.0, 1.0)),
            )
        physical[name] = volume
    for n in instances:
        mask = np.zeros((size, size), dtype=np.uint8)
        if n == tumour_instance:
            mask[5:9, 6:10] = 255
        tifffile.imwrite(mask_dir / f"{case_id}_{n}_mask.tif", mask)
    return MRCase(root=root, mask_dir=mask_dir, case_id=case_id, instance_numbers=instances,
                  z=z, physical=physical, brain=brain, tumour_instance=tumour_instance,
                  empty_instances=empty_instances, folders=folders)


@pytest.fixture
def mr_case(tmp_path: Path) -> MRCase:
    """A 3-series, 6-slice, 16x16 MR case with a tumour mask on InstanceNumber 2."""
    return make_mr_case(tmp_path)


def write_aperio_slide(
    path: Path, image: np.ndarray, *, mpp: float | None = 0.5, app_mag: int | None = 20,
    downsamples: tuple[int, ...] = (4,), tile: int = 128,
) -> Path:
    """A tiled, JPEG-compressed Aperio-style TIFF pyramid that OpenSlide reads as vendor aperio."""
    height, width = image.shape[:2]
    fields = [f"{width}x{height} ({tile}x{tile}) JPEG/RGB Q=90"]
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag}")
    if mpp is not None:
        fields.append(f"MPP = {mpp}")
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, tile=(tile, tile), compression="jpeg", photometric="rgb",
                     description="Aperio Image Library v12.0.0 \r\n" + "|".join(fields),
                     metadata=None)
        for factor in downsamples:
            level = image[::factor, ::factor]
            writer.write(level, tile=(tile, tile), compression="jpeg", photometric="rgb",
                         description=f"Aperio Image Library v12.0.0 \r\n{width}x{height} -> "
                                     f"{level.shape[1]}x{level.shape[0]}",
                         metadata=None)
    return path


@dataclass
class SyntheticSlide:
    path: Path
    annotation: Path
    tissue: np.ndarray  # (H, W) bool at level 0
    tumour: np.ndarray  # (H, W) bool at level 0
    annotation_downsample: int


def make_slide(tmp_path: Path, **slide_options: object) -> SyntheticSlide:
    """A 768x1024 white slide with a pink tissue ellipse; tumour = a square inside it."""
    height, width = 768, 1024
    yy, xx = np.mgrid[:height, :width]
    tissue = ((yy - 384) / 300) ** 2 + ((xx - 400) / 330) ** 2 < 1
    image = np.full((height, width, 3), 242, dtype=np.uint8)
    image[tissue] = (205, 110, 170)
    tumour = np.zeros((height, width), dtype=bool)
    tumour[256:512, 256:512] = True
    downsample = 16
    annotation = tmp_path / "annotation.tif"
    tifffile.imwrite(annotation, (tumour[::downsample, ::downsample] * 255).astype(np.uint8))
    path = write_aperio_slide(tmp_path / "slide.svs", image, **slide_options)
    return SyntheticSlide(path=path, annotation=annotation, tissue=tissue, tumour=tumour,
                          annotation_downsample=downsample)


# Factories as fixtures, so the test modules need no import from this conftest.


@pytest.fixture
def sample_file():
    """Function: path of a real sample under MGI_TEST_DATA, or skip the test."""
    return _sample_file


@pytest.fixture
def dicom_writers():
    """Namespace of DICOM writers: slice, enhanced, ct, and the SLOPE / INTERCEPT they use."""
    return SimpleNamespace(slice=write_mr_slice, enhanced=write_enhanced_mr, ct=write_ct_slice,
                           SLOPE=SLOPE, INTERCEPT=INTERCEPT)


@pytest.fixture
def mr_case_factory(tmp_path: Path):
    """Function: build an MR case under a fresh folder of tmp_path (see make_mr_case)."""
    counter = iter(range(1000))

    def factory(**options: object) -> MRCase:
        return make_mr_case(tmp_path / f"case{next(counter)}", **options)

    return factory


@pytest.fixture
def slide_factory(tmp_path: Path):
    """Function: build a synthetic Aperio slide with annotation (see make_slide)."""
    counter = iter(range(1000))

    def factory(**options: object) -> SyntheticSlide:
        folder = tmp_path / f"slide{next(counter)}"
        folder.mkdir()
        return make_slide(folder, **options)

    return factory


@pytest.fixture
def aperio_writer():
    """Function: write an Aperio-style TIFF pyramid of an RGB image (see write_aperio_slide)."""
    return write_aperio_slide


def mri_options(**values: object) -> MriOptions:
    """imaging.mri options: the schema's defaults, `values` over them (checked like a config)."""
    return build(MriOptions, {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()},
                 where="imaging.mri")
