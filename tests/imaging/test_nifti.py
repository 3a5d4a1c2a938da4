"""BraTS-style NIfTI cases: one volume per role, label map, orientation and resampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mgi.errors import SeriesError
from mgi.imaging.bank import read_bank
from mgi.imaging.mri import build_mri_bank
from mgi.imaging.mri.build import layout_of
from mgi.imaging.mri.nifti import load_nifti_case
from tests.imaging.conftest import mri_options

PREFIX = "TCGA-02-0006_1996.08.23"
SHAPE = (10, 20, 18)  # (Z, H, W)
SPACING = (0.8, 0.9, 2.0)  # x (column), y (row), z mm
ORIGIN = (-7.0, -9.0, 30.0)
LESION = (slice(3, 7), slice(8, 14), slice(6, 12))  # (z, y, x) voxels of the reference grid
SUFFIXES = {"FLAIR": "flair", "T1 pre": "t1", "T1 post": "t1Gd", "T2": "t2"}


def _volume(k: int) -> np.ndarray:
    """Role k's int16 voxels: a brain box 100 + 10 k + z, the lesion 500 + 10 k, 0 outside."""
    volume = np.zeros(SHAPE, dtype=np.int16)
    volume[1:9, 2:18, 2:16] = 100 + 10 * k + np.arange(1, 9)[:, None, None]
    volume[LESION] = 500 + 10 * k
    return volume


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[LESION] = 2  # oedema
    labels[4:6, 10:12, 8:10] = 4  # enhancing inside it
    return labels


def _write(path: Path, array: np.ndarray, *, spacing=SPACING, origin=ORIGIN,
           direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([float(v) for v in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _patient(root: Path, *, roles=tuple(SUFFIXES), labels: bool = True) -> Path:
    """A BraTS-named patient folder, every volume on the reference grid (LPS axes)."""
    folder = root / "TCGA-02-0006"
    for k, role in enumerate(roles):
        _write(folder / f"{PREFIX}_{SUFFIXES[role]}.nii.gz", _volume(k))
    if labels:
        _write(folder / f"{PREFIX}_GlistrBoost_ManuallyCorrected.nii.gz", _labels())
    return folder


def _label_path(folder: Path) -> Path:
    return folder / f"{PREFIX}_GlistrBoost_ManuallyCorrected.nii.gz"


def _options(**values):
    return mri_options(sequences=("T1 pre", "FLAIR", "T1 post", "T2"), **values)


def test_co_registered_volumes_load_as_stored_with_their_geometry(tmp_path):
    folder = _patient(tmp_path)
    case = load_nifti_case(folder, mask_path=_label_path(folder), options=_options())
    assert set(case.channels) == set(SUFFIXES) and case.reference == "FLAIR"
    for k, role in enumerate(SUFFIXES):
        assert case.channels[role].dtype == np.float32
        np.testing.assert_array_equal(case.channels[role], _volume(k))  # no resampling
    np.testing.assert_array_equal(case.masks, (_labels() > 0).astype(np.uint8))
    assert case.mask_source == "nifti"
    assert case.pixel_spacing == pytest.approx((0.9, 0.8))  # (row, column)
    assert case.slice_gap == pytest.approx(2.0)
    np.testing.assert_allclose(case.z, 30.0 + 2.0 * np.arange(SHAPE[0]))
    np.testing.assert_allclose(case.orientation, [1, 0, 0, 0, 1, 0])
    assert json.loads(case.attrs["nifti_files"]) == {
        role: f"{PREFIX}_{suffix}.nii.gz" for role, suffix in SUFFIXES.items()}
    assert case.attrs["source_layout"] == "nifti"
    assert set(json.loads(case.attrs["alignment"]).values()) == {"reference", "same grid"}


def test_volumes_stored_in_another_orientation_are_turned_to_lps(tmp_path):
    # the same voxels stored with x and y reversed (RAS-like axes, as NIfTI tools write them):
    # the loader's arrays must be those of the LPS copy, slice for slice
    folder = tmp_path / "TCGA-02-0006"
    height, width = SHAPE[1:]
    flipped_origin = (ORIGIN[0] + (width - 1) * SPACING[0], ORIGIN[1] + (height - 1) * SPACING[1],
                      ORIGIN[2])
    for k, role in enumerate(SUFFIXES):
        _write(folder / f"{PREFIX}_{SUFFIXES[role]}.nii.gz", _volume(k)[:, ::-1, ::-1].copy(),
               origin=flipped_origin, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    _write(_label_path(folder), _labels()[:, ::-1, ::-1].copy(), origin=flipped_origin,
           direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    case = load_nifti_case(folder, mask_path=_label_path(folder), options=_options())
    for k, role in enumerate(SUFFIXES):
        np.testing.assert_array_equal(case.channels[role], _volume(k))
    np.testing.assert_array_equal(case.masks, (_labels() > 0).astype(np.uint8))
    np.testing.assert_allclose(case.orientation, [1, 0, 0, 0, 1, 0])


def test_a_volume_on_another_grid_is_resampled_so_the_lesion_keeps_its_voxels(tmp_path):
    folder = _patient(tmp_path, roles=("FLAIR", "T1 pre", "T2"))
    # T1Gd at half the in-plane spacing, its grid starting 2 slices lower: voxel centres of
    # the reference fall halfway between two of its voxels in-plane, on its slices in z
    fine = np.zeros((SHAPE[0] + 2, 2 * SHAPE[1], 2 * SHAPE[2]), dtype=np.int16)
    fine[3:11, 4:36, 4:32] = 120
    fine[5:9, 16:28, 12:24] = 700  # the reference's LESION voxels, at twice the resolution
    _write(folder / f"{PREFIX}_t1Gd.nii.gz", fine,
           spacing=(SPACING[0] / 2, SPACING[1] / 2, SPACING[2]),
           origin=(ORIGIN[0] - SPACING[0] / 4, ORIGIN[1] - SPACING[1] / 4,
                   ORIGIN[2] - 2 * SPACING[2]))
    case = load_nifti_case(folder, mask_path=_label_path(folder), options=_options())
    post = case.channels["T1 post"]
    assert post.shape == SHAPE
    np.testing.assert_array_equal(post > 400, _labels() > 0)
    np.testing.assert_allclose(post[LESION], 700)
    assert json.loads(case.attrs["alignment"])["T1 post"] == "resampled"
    assert json.loads(case.qc["coverage"])["T1 post"] == 1.0


def test_a_label_map_on_another_grid_is_resampled_by_nearest_neighbour(tmp_path):
    folder = _patient(tmp_path, labels=False)
    coarse = np.zeros((SHAPE[0], SHAPE[1] // 2, SHAPE[2] // 2), dtype=np.uint8)
    coarse[3:7, 4:7, 3:6] = 1  # LESION at half the in-plane resolution
    label_map = _write(folder / f"{PREFIX}_seg.nii.gz", coarse,
                       spacing=(2 * SPACING[0], 2 * SPACING[1], SPACING[2]),
                       origin=(ORIGIN[0] + SPACING[0] / 2, ORIGIN[1] + SPACING[1] / 2, ORIGIN[2]))
    case = load_nifti_case(folder, mask_path=label_map, options=_options())
    np.testing.assert_array_equal(case.masks, (_labels() > 0).astype(np.uint8))


def test_a_label_map_that_misses_the_volume_is_refused_naming_it(tmp_path):
    folder = _patient(tmp_path, labels=False)
    far = _write(folder / f"{PREFIX}_seg.nii.gz", _labels(),
                 origin=(ORIGIN[0] + 500.0, ORIGIN[1], ORIGIN[2]))
    with pytest.raises(SeriesError, match=rf"{far.name}: label map .* covers 0% of the FLAIR"):
        load_nifti_case(folder, mask_path=far, options=_options())


def test_a_missing_role_is_left_to_the_missing_policy_in_the_bank(tmp_path):
    folder = _patient(tmp_path, roles=("T1 pre", "FLAIR", "T1 post"))
    assert layout_of(folder) == "nifti"
    out = tmp_path / "bank.h5"
    row = build_mri_bank(image_id="b", case_id="TCGA-02-0006", series_root=folder,
                         mask_dir=_label_path(folder), out_path=out,
                         options=_options(image_px=16))
    assert row["status"] == "ok", row["reason"]
    bank = read_bank(out)
    assert bank.images.shape == (SHAPE[0], 4, 16, 16)
    assert json.loads(bank.attrs["sequences_filled"])["T2"] == "replaced by FLAIR"
    assert bank.attrs["mask_source"] == "nifti"
    assert bank.masks.reshape(SHAPE[0], -1).any(axis=1).tolist() == [
        3 <= z < 7 for z in range(SHAPE[0])]


@pytest.mark.parametrize("problem, expected", [
    ("garbage", "unreadable NIfTI volume"),
    ("2-D", "2-D NIfTI volume of size [18, 20], expected one 3-D volume"),
    ("4-D", "4-D NIfTI volume of size [18, 20, 10, 2], expected one 3-D volume"),
])
def test_an_unusable_volume_fails_the_bank_naming_the_file(tmp_path, problem, expected):
    folder = _patient(tmp_path)
    bad = folder / f"{PREFIX}_t1.nii.gz"
    if problem == "garbage":
        bad.write_bytes(b"\x1f\x8b not really gzip")
    elif problem == "2-D":
        _write(bad, _volume(0)[4], spacing=SPACING[:2], origin=ORIGIN[:2], direction=(1, 0, 0, 1))
    else:
        image = sitk.JoinSeries([sitk.GetImageFromArray(_volume(0))] * 2)
        sitk.WriteImage(image, str(bad))
    row = build_mri_bank(image_id="x", case_id="c", series_root=folder,
                         mask_dir=_label_path(folder), out_path=tmp_path / "x.h5",
                         options=_options(image_px=16))
    assert row["status"] == "failed"
    assert f"{bad}: {expected}" in row["reason"]


def test_a_role_matching_two_files_is_refused_naming_both(tmp_path):
    folder = _patient(tmp_path)
    _write(folder / f"{PREFIX}_FLAIR.nii", _volume(0))
    with pytest.raises(SeriesError, match=r"2 NIfTI files match the 'FLAIR' pattern .*"
                                          r"_FLAIR\.nii', '.*_flair\.nii\.gz'"):
        load_nifti_case(folder, mask_path=None, options=_options())


def test_a_folder_without_any_role_volume_is_refused(tmp_path):
    folder = tmp_path / "TCGA-02-0006"
    _write(folder / f"{PREFIX}_adc.nii.gz", _volume(0))
    with pytest.raises(SeriesError, match=r"no NIfTI volume of the sequences .* found "
                                          r"\['TCGA-02-0006_1996.08.23_adc.nii.gz'\]"):
        load_nifti_case(folder, mask_path=None, options=_options())
