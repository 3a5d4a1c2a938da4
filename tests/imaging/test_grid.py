"""Sequences onto the reference grid: DICOM geometry, resampling, coverage, rigid registration,
and the multi-volume series they are read from.

One analytic phantom (a smooth head with a bright lesion at a known patient coordinate) is
sampled on grids of different spacing, slice positions and orientation, through the DICOM
formula position_k + i * column spacing * IOP[:3] + j * row spacing * IOP[3:].
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from mgi.errors import SeriesError
from mgi.imaging.mri import MRSeries, read_series
from mgi.imaging.mri.grid import align_to_reference, sitk_threads, to_sitk

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal -x
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # normal +y
LESION = np.array([3.5, 5.5, 4.5])  # mm: the centre of reference voxel (k 8, row 25, column 23)
LESION_VOXEL = (8, 25, 23)
REFERENCE = dict(shape=(14, 40, 40), spacing=(1.0, 1.0), gap=3.0, first=(-19.5, -19.5, -19.5))


def _gauss(points: np.ndarray, centre: list[float], sigma: float) -> np.ndarray:
    return np.exp(-((points - centre) ** 2).sum(-1) / (2 * sigma**2))


def phantom(points: np.ndarray) -> np.ndarray:
    """Head (ellipsoid, smooth edge, 200) with a bright and a dark blob, and the lesion (+600)."""
    r = np.sqrt((((points - [0.5, -1.0, 0.0]) / [14.0, 16.0, 15.0]) ** 2).sum(-1))
    head = 200 / (1 + np.exp((r - 1) / 0.12))
    return (head + 150 * _gauss(points, [-6, 5, -4], 3.5) - 100 * _gauss(points, [5, -4, -5], 4)
            + 600 * _gauss(points, LESION, 2.0))


def dicom_points(*, shape, spacing, gap, first, orientation=AXIAL):
    """(positions (Z, 3), voxel centres (Z, H, W, 3)) by the DICOM formula."""
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    positions = np.asarray(first) + np.arange(shape[0])[:, None] * gap * np.cross(row, col)
    j, i = np.mgrid[: shape[1], : shape[2]]
    points = (positions[:, None, None] + i[..., None] * spacing[1] * row
              + j[..., None] * spacing[0] * col)
    return positions, points


def sampled(name: str, *, motion=None, frame: str = "1.2.3", **grid) -> MRSeries:
    """The phantom on a grid; `motion` (R, t): the patient moved, q -> R q + t, before the scan."""
    positions, points = dicom_points(**grid)
    if motion is not None:
        rotation, shift = motion
        points = (points - shift) @ rotation  # R^T (p - t), rows as points
    normal = np.cross(grid.get("orientation", AXIAL)[:3], grid.get("orientation", AXIAL)[3:])
    return MRSeries(
        volume=phantom(points).astype(np.float32), positions=positions, z=positions @ normal,
        instance_numbers=np.arange(1, grid["shape"][0] + 1), pixel_spacing=grid["spacing"],
        slice_thickness=grid["gap"], slice_gap=grid["gap"],
        orientation=np.asarray(grid.get("orientation", AXIAL), dtype=np.float64),
        series_description=name, series_uid=f"uid-{name}", patient_id="P",
        frame_of_reference=frame)


def rotation(*, about_z: float, about_x: float) -> np.ndarray:
    a, b = np.radians(about_z), np.radians(about_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


# Grids covering the whole reference (with other spacing, thickness, slice positions and
# orientation), and one covering its upper half (z >= 1 mm of -19.5..19.5 mm)
OTHER_GRIDS = {
    "axial": dict(shape=(18, 34, 36), spacing=(1.25, 1.2), gap=2.5, first=(-21.1, -20.3, -22.0)),
    "sagittal": dict(shape=(22, 30, 40), spacing=(1.5, 1.1), gap=2.0, first=(21.0, -21.0, 22.0),
                     orientation=SAGITTAL),
    "coronal": dict(shape=(20, 28, 36), spacing=(1.6, 1.2), gap=2.2, first=(-21.0, -21.0, 22.0),
                    orientation=CORONAL),
}
HALF_SLAB = dict(shape=(7, 40, 40), spacing=(1.1, 1.1), gap=3.0, first=(-21.0, -21.0, 1.0))
MOTION = (rotation(about_z=5.0, about_x=3.0), np.array([4.0, -2.0, 3.0]))


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return phantom(dicom_points(**REFERENCE)[1])


def lesion_centre(volume: np.ndarray) -> np.ndarray:
    """Centre (mm) of the voxels brighter than anything but the lesion, weighted by excess."""
    weights = np.clip(volume - 500, 0, None)
    points = dicom_points(**REFERENCE)[1]
    return (weights[..., None] * points).sum((0, 1, 2)) / weights.sum()


# --- to_sitk ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["axial", "sagittal", "coronal"])
def test_to_sitk_puts_every_voxel_where_the_dicom_formula_does(name):
    grid = OTHER_GRIDS[name]
    series = sampled(name, **grid)
    image = to_sitk(series)
    assert image.GetSize() == grid["shape"][::-1]
    _, points = dicom_points(**grid)
    for k, j, i in [(0, 0, 0), (3, 5, 7), (grid["shape"][0] - 1, grid["shape"][1] - 1, 2)]:
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((i, j, k)),
                                   points[k, j, i], atol=1e-9)
        assert image[i, j, k] == series.volume[k, j, i]


def test_to_sitk_refuses_a_sheared_stack():
    series = sampled("axial", **OTHER_GRIDS["axial"])
    series.positions[:, 0] += 0.5 * np.arange(len(series.positions))  # 0.5 mm per slice in x
    with pytest.raises(SeriesError, match=r"drifts .* across the slice plane"):
        to_sitk(series)


# --- align_to_reference: resampling through the geometry ----------------------------------------


def test_every_grid_resampled_matches_the_phantom_on_the_reference_grid(truth):
    series = {"ref": sampled("ref", **REFERENCE)}
    series.update({name: sampled(name, **grid) for name, grid in OTHER_GRIDS.items()})
    aligned = align_to_reference(series, reference="ref")
    assert aligned["ref"].how == "reference" and aligned["ref"].volume is series["ref"].volume
    for name in OTHER_GRIDS:
        result = aligned[name]
        assert result.how == "resampled" and result.metric is None
        assert result.coverage == 1.0
        assert result.volume.shape == truth.shape and result.volume.dtype == np.float32
        # linear interpolation error: small on average, largest at the lesion's narrow peak
        assert np.abs(result.volume - truth).mean() < 2.0, name
        assert np.corrcoef(result.volume.ravel(), truth.ravel())[0, 1] > 0.998, name
        # the lesion lands on the reference's lesion voxel
        assert np.unravel_index(np.argmax(result.volume), truth.shape) == LESION_VOXEL, name
        np.testing.assert_allclose(lesion_centre(result.volume), LESION, atol=0.2)


def test_half_slab_has_half_coverage_and_zeros_outside(truth):
    series = {"ref": sampled("ref", **REFERENCE), "half": sampled("half", **HALF_SLAB)}
    result = align_to_reference(series, reference="ref")["half"]
    # reference slices at z = 1.5 .. 19.5 mm (7 of 14) lie inside -0.5 .. 20.5 mm
    assert result.coverage == pytest.approx(0.5)
    assert np.all(result.volume[:7] == 0)
    assert np.abs(result.volume[7:] - truth[7:]).mean() < 2.0


def test_a_series_on_the_same_grid_passes_through_bit_identical():
    reference = sampled("ref", **REFERENCE)
    twin = sampled("twin", **REFERENCE)
    twin.volume = twin.volume * 1.7 + np.float32(0.1)  # another contrast, same voxels
    aligned = align_to_reference({"ref": reference, "twin": twin}, reference="ref")
    assert aligned["twin"].how == "same grid" and aligned["twin"].coverage == 1.0
    assert aligned["twin"].volume is twin.volume


def test_another_frame_of_reference_needs_rigid_registration(tmp_path, dicom_writers):
    folders = {}
    for name, frame in (("T1", "1.2.826.0.1.3680043.8.498.10"),
                        ("T2", "1.2.826.0.1.3680043.8.498.20")):
        folders[name], uid = tmp_path / name, generate_uid()
        for k in range(3):
            path = dicom_writers.slice(folders[name] / f"{k}.dcm", np.full((8, 8), 60),
                                       position=(0.0, 0.0, 2.0 * k), instance=k + 1,
                                       series_uid=uid, description=name)
            ds = pydicom.dcmread(path)
            ds.FrameOfReferenceUID = frame
            ds.save_as(path)
    series = {name: read_series(folder) for name, folder in folders.items()}
    assert series["T2"].frame_of_reference == "1.2.826.0.1.3680043.8.498.20"
    with pytest.raises(SeriesError) as caught:
        align_to_reference(series, reference="T1")
    message = str(caught.value)
    assert str(folders["T2"]) in message and "set imaging.mri.register: rigid" in message
    assert "1.2.826.0.1.3680043.8.498.10" in message and "1.2.826.0.1.3680043.8.498.20" in message


# --- align_to_reference: rigid registration -----------------------------------------------------


@pytest.mark.parametrize("frame", ["1.2.3", "4.5.6"], ids=["same frame", "other frame"])
def test_rigid_registration_recovers_a_known_motion_deterministically(truth, frame):
    series = {"ref": sampled("ref", **REFERENCE),
              "moved": sampled("moved", motion=MOTION, frame=frame, **OTHER_GRIDS["axial"])}
    if frame == "1.2.3":  # through the geometry alone, the lesion is ~5 mm off
        unregistered = align_to_reference(series, reference="ref")["moved"]
        assert np.linalg.norm(lesion_centre(unregistered.volume) - LESION) > 4.0
    first = align_to_reference(series, reference="ref", register="rigid")["moved"]
    assert first.how == "registered" and first.metric is not None and first.metric < -0.5
    np.testing.assert_allclose(lesion_centre(first.volume), LESION, atol=0.5)
    assert np.unravel_index(np.argmax(first.volume), truth.shape) == LESION_VOXEL
    inside = first.volume != 0  # the moved head leaves part of the reference uncovered
    assert 0.7 < first.coverage < 1.0 and inside.mean() > 0.7
    assert np.abs(first.volume - truth)[inside].mean() < 2.0
    again = align_to_reference(series, reference="ref", register="rigid")["moved"]
    np.testing.assert_array_equal(again.volume, first.volume)
    assert again.metric == first.metric and again.coverage == first.coverage


def test_sitk_threads_follows_the_process_budget(monkeypatch):
    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert sitk_threads() == 3
    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "5")
    assert sitk_threads() == 5
    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert sitk_threads() == len(os.sched_getaffinity(0))


# --- read_series: several volumes at the same positions -----------------------------------------


def _write_echoes(folder, writers, *, skip=(), echo_numbers=(1, 2)):
    """Two echoes at 5 positions, files interleaved; echo e, slice k stored as 100 e + k."""
    uid = generate_uid()
    for k in range(5):
        for echo, number in zip((1, 2), echo_numbers, strict=True):
            if (echo, k) in skip:
                continue
            path = writers.slice(folder / f"{k}_{echo}.dcm", np.full((8, 8), 100 * echo + k),
                                 position=(0.0, 0.0, 2.0 * k), instance=10 * echo + k,
                                 series_uid=uid, description="T2")
            ds = pydicom.dcmread(path)
            ds.EchoNumbers = number
            ds.AcquisitionNumber = 10 * echo + k  # one per slice: tells no volume apart
            ds.save_as(path)


@pytest.mark.parametrize("skip, echo", [((), 1), (((1, 2),), 2)],
                         ids=["first echo", "first echo incomplete"])
def test_interleaved_echoes_give_the_first_complete_echo(tmp_path, dicom_writers, caplog, skip,
                                                          echo):
    _write_echoes(tmp_path, dicom_writers, skip=skip)
    with caplog.at_level(logging.WARNING, logger="mgi.imaging.mri.dicom"):
        series = read_series(tmp_path)
    stored = 100 * echo + np.arange(5)
    np.testing.assert_allclose(series.volume[:, 0, 0], stored * dicom_writers.SLOPE
                               + dicom_writers.INTERCEPT)
    assert series.z.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0] and series.slice_gap == 2.0
    assert {f.name for f in series.files} == {f"{k}_{echo}.dcm" for k in range(5)}
    warning = caplog.records[-1].getMessage()
    assert str(tmp_path) in warning and "2 volumes" in warning
    assert f"EchoNumbers {echo}" in warning


def test_volumes_no_tag_tells_apart_are_still_refused(tmp_path, dicom_writers):
    _write_echoes(tmp_path, dicom_writers, echo_numbers=(1, 1))
    with pytest.raises(SeriesError, match=r"two slices at the same position .*AcquisitionNumber, "
                                          r"EchoNumbers"):
        read_series(tmp_path)


def test_enhanced_mr_time_points_give_the_first(tmp_path, dicom_writers):
    # frames: time points 2 and 1 at z = 0, 2, 4 (time point 2 first in the file)
    stored = np.stack([np.full((4, 4), 60 + 10 * t + k) for t in (2, 1) for k in range(3)])
    path = dicom_writers.enhanced(tmp_path / "dynamic.dcm", stored, z=[0.0, 2.0, 4.0] * 2)
    ds = pydicom.dcmread(path)
    for frame, t in zip(ds.PerFrameFunctionalGroupsSequence, [2] * 3 + [1] * 3, strict=True):
        content = Dataset()
        content.TemporalPositionIndex = t
        frame.FrameContentSequence = Sequence([content])
    ds.save_as(path)
    series = read_series(tmp_path)
    np.testing.assert_allclose(series.volume[:, 0, 0], (70 + np.arange(3)) * 2.0 - 100)
    assert series.instance_numbers.tolist() == [4, 5, 6]  # frame numbers
