"""DICOM MR series reading and the MRI slice bank."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.uid import CTImageStorage

from mgi.errors import ConfigError, SeriesError
from mgi.imaging.bank import read_bank
from mgi.imaging.mri import (
    brain_mask,
    build_mri_bank,
    normalise_volume,
    read_lgg_tif_slices,
    read_series,
)
from tests.imaging.conftest import mri_options


def _bank(case, tmp_path, **options):
    """Build the bank of `case` with small defaults; return (qc row, Bank)."""
    settings = {"sequences": ("T1 pre", "FLAIR", "T1 post"), "missing_sequence": "flair",
                "image_px": 16, "clip_percentiles": (0.0, 100.0), "normalise": "zscore",
                "keep_slices": "all", **options}
    brain = {k: settings.pop(k) for k in ("brain_threshold", "brain_min_fraction")
             if k in settings}
    out = tmp_path / "bank" / "img.h5"
    row = build_mri_bank(image_id="img", case_id=case.case_id, series_root=case.root,
                         mask_dir=case.mask_dir, out_path=out, options=mri_options(**settings),
                         **brain)
    return row, read_bank(out)


# --- read_series ----------------------------------------------------------------------------


def test_read_series_orders_slices_by_position_not_file_name(mr_case):
    series = read_series(mr_case.folders["FLAIR"])
    # z falls as InstanceNumber rises, so ascending z means descending InstanceNumber
    assert series.instance_numbers.tolist() == [6, 5, 4, 3, 2, 1]
    assert np.all(np.diff(series.z) > 0)
    assert series.z.tolist() == [mr_case.z[n] for n in series.instance_numbers]
    expected = mr_case.physical["FLAIR"][series.instance_numbers - 1]
    np.testing.assert_allclose(series.volume, expected)  # slope/intercept applied
    assert series.volume.dtype == np.float32
    assert series.slice_gap == pytest.approx(2.5)
    assert series.pixel_spacing == (1.0, 1.0)
    assert series.series_description == "FLAIR"
    assert series.patient_id == "CASE-1"


def test_read_series_orders_along_the_normal_of_a_sagittal_series(tmp_path, dicom_writers):
    # sagittal: rows along y, columns along -z, normal along -x; x positions ascending with
    # InstanceNumber means positions along the normal descending
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    for n in (1, 2, 3):
        dicom_writers.slice(tmp_path / f"{4 - n}.dcm", np.full((4, 4), 60 + n),
                            position=(float(n), 0.0, 0.0), instance=n, series_uid="1.2.3",
                            description="T1", orientation=sagittal)
    series = read_series(tmp_path)
    assert series.instance_numbers.tolist() == [3, 2, 1]
    assert series.z.tolist() == [-3.0, -2.0, -1.0]


def test_read_series_refuses_inconsistent_orientation(mr_case, dicom_writers):
    folder = mr_case.folders["FLAIR"]
    odd = folder / "odd.dcm"
    dicom_writers.slice(odd, np.full((16, 16), 60), position=(-8, -8, 60.0), instance=99,
                        series_uid=read_series(folder).series_uid, description="FLAIR",
                        orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    with pytest.raises(SeriesError, match=r"odd\.dcm.*ImageOrientationPatient"):
        read_series(folder)


def test_read_series_refuses_different_pixel_spacing(mr_case, dicom_writers):
    folder = mr_case.folders["FLAIR"]
    dicom_writers.slice(folder / "odd.dcm", np.full((16, 16), 60), position=(-8, -8, 52.5),
                        instance=0, series_uid=read_series(folder).series_uid,
                        description="FLAIR", spacing=(0.9, 0.9))
    with pytest.raises(SeriesError, match=r"odd\.dcm.*PixelSpacing"):
        read_series(folder)


def test_read_series_refuses_a_missing_slice(mr_case):
    folder = mr_case.folders["FLAIR"]
    read_series(folder).files[2].unlink()  # a slice in the middle
    with pytest.raises(SeriesError, match="non-uniform slice gaps"):
        read_series(folder)


def test_read_series_refuses_two_slices_at_one_position(mr_case, dicom_writers):
    folder = mr_case.folders["FLAIR"]
    dicom_writers.slice(folder / "dup.dcm", np.full((16, 16), 60), position=(-8, -8, 50.0),
                        instance=7, series_uid=read_series(folder).series_uid,
                        description="FLAIR")
    with pytest.raises(SeriesError, match="same position"):
        read_series(folder)


def test_read_series_refuses_a_non_mr_object(tmp_path, dicom_writers):
    dicom_writers.ct(tmp_path / "ct.dcm")
    with pytest.raises(SeriesError, match=r"ct\.dcm: not an MR image: Modality 'CT'.*CT Image"):
        read_series(tmp_path)


def test_read_series_refuses_the_real_spect_file_clearly(tmp_path, sample_file):
    spect = sample_file("dicom/libvips_dicom_test_image.dcm")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / spect.name).symlink_to(spect)
    with pytest.raises(SeriesError) as caught:
        read_series(tmp_path / "series")
    message = str(caught.value)
    assert spect.name in message
    assert "Modality 'NM'" in message and "Nuclear Medicine Image Storage" in message


def test_read_series_names_an_unreadable_file(tmp_path):
    (tmp_path / "broken.dcm").write_text("not dicom at all")
    with pytest.raises(SeriesError, match=r"broken\.dcm: not a DICOM file"):
        read_series(tmp_path)


def test_read_series_names_a_missing_geometry_attribute(mr_case):
    folder = mr_case.folders["FLAIR"]
    victim = read_series(folder).files[0]
    ds = pydicom.dcmread(victim)
    del ds.ImagePositionPatient
    ds.save_as(victim)
    with pytest.raises(SeriesError, match=rf"{victim.name}: missing ImagePositionPatient"):
        read_series(folder)


def test_read_series_reads_an_enhanced_mr_file(tmp_path, dicom_writers):
    stored = np.stack([np.full((4, 4), 60 + 10 * i) for i in range(3)])
    dicom_writers.enhanced(tmp_path / "enhanced.dcm", stored, z=[20.0, 10.0, 15.0])
    series = read_series(tmp_path)
    assert series.z.tolist() == [10.0, 15.0, 20.0]
    assert series.instance_numbers.tolist() == [2, 3, 1]  # frame numbers
    np.testing.assert_allclose(series.volume[:, 0, 0], np.array([70, 80, 60]) * 2.0 - 100)
    assert series.pixel_spacing == (0.5, 0.5)


# --- build_mri_bank -------------------------------------------------------------------------


def test_bank_stacks_sequences_as_channels_in_position_order(mr_case, tmp_path):
    row, bank = _bank(mr_case, tmp_path)
    assert row["status"] == "ok" and row["reason"] == ""
    assert set(row) == {"image_id", "case_id", "modality", "status", "reason", "n_items",
                        "spacing_mm", "level", "seconds", "coverage", "registration"}
    assert row["n_items"] == 6 and row["spacing_mm"] == 1.0
    assert bank.images.shape == (6, 3, 16, 16) and bank.images.dtype == np.float16
    # coords: ascending z, InstanceNumber alongside
    assert bank.coords[:, 1].tolist() == [6, 5, 4, 3, 2, 1]
    assert bank.coords[:, 0].tolist() == [mr_case.z[n] for n in range(6, 0, -1)]
    # sequences are 200 apart in raw intensity: after per-volume z-scoring each channel is
    # centred, but slice order within a channel is preserved (slice n is brighter with n)
    brain_means = bank.images[:, 1][:, mr_case.brain].astype(float).mean(axis=1)
    assert np.all(np.diff(brain_means) < 0)
    assert json.loads(bank.attrs["sequences"]) == ["T1 pre", "FLAIR", "T1 post"]
    assert bank.attrs["spacing"] == [2.5, 1.0, 1.0]


def test_masks_follow_their_instance_number_after_reordering(mr_case, tmp_path):
    _, bank = _bank(mr_case, tmp_path)
    assert bank.masks is not None and bank.masks.dtype == np.uint8
    has_tumour = bank.masks.reshape(len(bank.masks), -1).any(axis=1)
    assert bank.coords[has_tumour, 1].tolist() == [mr_case.tumour_instance]
    tumour = bank.masks[has_tumour][0]
    assert set(np.unique(tumour)) == {0, 1}
    assert tumour[5:9, 6:10].all() and tumour.sum() == 16


def test_zscore_gives_mean_zero_std_one_over_brain(mr_case, tmp_path):
    _, bank = _bank(mr_case, tmp_path, normalise="zscore")
    for channel in range(3):
        values = bank.images[:, channel][:, mr_case.brain].astype(np.float64)
        assert values.mean() == pytest.approx(0.0, abs=1e-3)
        assert values.std() == pytest.approx(1.0, abs=1e-3)
        background = bank.images[:, channel][:, ~mr_case.brain]
        assert np.all(background == 0)


def test_zscore_excludes_a_noisy_background_from_the_brain(mr_case_factory, tmp_path):
    case = mr_case_factory(noisy_background=True)
    _, bank = _bank(case, tmp_path, normalise="zscore")
    values = bank.images[:, 1][:, case.brain].astype(np.float64)
    assert values.mean() == pytest.approx(0.0, abs=1e-3)
    assert values.std() == pytest.approx(1.0, abs=1e-3)
    assert np.all(bank.images[:, :, ~case.brain] == 0)
    # the literal "> 0" rule would count the noise as brain
    _, plain = _bank(case, tmp_path, normalise="zscore", brain_threshold=0.0)
    assert np.any(plain.images[:, :, ~case.brain] != 0)


def test_brain_mask_is_nonzero_for_skull_stripped_and_robust_for_noise():
    rng = np.random.default_rng(0)
    volume = np.zeros((2, 20, 20))
    volume[:, 5:15, 5:15] = 500 + rng.normal(0, 20, (2, 10, 10))
    truth = volume > 0
    np.testing.assert_array_equal(brain_mask(volume), truth)
    noisy = volume + np.abs(rng.normal(0, 12, volume.shape))  # Rayleigh-like background
    np.testing.assert_array_equal(brain_mask(noisy), truth)
    assert brain_mask(noisy, threshold=0).all()


def test_minmax_scales_brain_to_unit_range(mr_case, tmp_path):
    _, bank = _bank(mr_case, tmp_path, normalise="minmax")
    brain = bank.images[:, :, mr_case.brain]
    assert brain.min() == 0.0 and brain.max() == pytest.approx(1.0, abs=1e-3)


def test_normalise_volume_clips_at_brain_percentiles():
    volume = np.zeros((1, 10, 10), dtype=np.float32)
    volume[0, :, :5] = np.arange(1, 51).reshape(10, 5)
    volume[0, 0, 0] = 10_000.0  # an outlier
    out = normalise_volume(volume, clip_percentiles=(0, 90), method="minmax")
    assert out[0, 0, 0] == pytest.approx(1.0)  # clipped to the 90th brain percentile
    assert np.all(out[0, :, 5:] == 0)  # background untouched
    assert (out[0, :, :5] >= 0).all() and (out[0, :, :5] <= 1).all()


def test_resize_to_image_px_keeps_masks_binary(mr_case_factory, tmp_path):
    _, bank = _bank(mr_case_factory(size=32), tmp_path, image_px=16)
    assert bank.images.shape == (6, 3, 16, 16)
    assert bank.masks.shape == (6, 16, 16)
    assert set(np.unique(bank.masks)) == {0, 1}
    assert bank.attrs["pixel_spacing"] == [2.0, 2.0]


def test_missing_sequence_replaced_by_flair(mr_case_factory, tmp_path):
    case = mr_case_factory(sequences=("T1 pre", "FLAIR"))
    row, bank = _bank(case, tmp_path, missing_sequence="flair")
    assert row["status"] == "ok"
    np.testing.assert_array_equal(bank.images[:, 2], bank.images[:, 1])
    assert json.loads(bank.attrs["sequences_filled"])["T1 post"] == "replaced by FLAIR"


def test_missing_sequence_as_zeros(mr_case_factory, tmp_path):
    case = mr_case_factory(sequences=("FLAIR", "T1 post"))
    row, bank = _bank(case, tmp_path, missing_sequence="zeros")
    assert row["status"] == "ok"
    assert np.all(bank.images[:, 0] == 0)
    assert np.any(bank.images[:, 1] != 0)


def test_missing_sequence_error_gives_failed_bank(mr_case_factory, tmp_path):
    case = mr_case_factory(sequences=("T1 pre", "FLAIR"))
    row, bank = _bank(case, tmp_path, missing_sequence="error")
    assert row["status"] == "failed"
    assert "T1 post" in row["reason"]
    assert bank.attrs["status"] == "failed" and len(bank) == 0


def test_a_study_without_its_flair_fails_naming_why(mr_case_factory, tmp_path):
    case = mr_case_factory(sequences=("T1 pre", "T1 post"))
    # slice masks are numbered by the FLAIR's slices: they cannot go on another series
    row, _ = _bank(case, tmp_path, missing_sequence="zeros")
    assert row["status"] == "failed"
    assert "numbered by the slices of the 'FLAIR' series, but the study has none" in row["reason"]
    # and FLAIR cannot stand in for the others when it is the one missing
    case.mask_dir = None
    row, _ = _bank(case, tmp_path, missing_sequence="flair")
    assert row["status"] == "failed" and "'FLAIR', which replaces them, is missing" in row["reason"]


def test_sequences_match_description_case_insensitively(mr_case_factory, tmp_path):
    case = mr_case_factory(descriptions={"FLAIR": "flair ", "T1 post": "t1 POST"})
    row, _ = _bank(case, tmp_path, missing_sequence="error")
    assert row["status"] == "ok"


def test_a_sequence_on_another_grid_is_resampled_and_its_coverage_reported(mr_case_factory,
                                                                           tmp_path):
    case = mr_case_factory(spacing={"T1 post": (0.8, 0.8)})
    row, bank = _bank(case, tmp_path)
    assert row["status"] == "ok"
    assert json.loads(bank.attrs["alignment"]) == {"T1 pre": "same grid", "FLAIR": "reference",
                                                   "T1 post": "resampled"}
    # 16 pixels of 0.8 mm from -8 mm reach 4.4 mm: 13 of the reference's 16 columns and rows
    assert json.loads(row["coverage"])["T1 post"] == pytest.approx((13 / 16) ** 2, abs=1e-4)
    assert bank.images.shape == (6, 3, 16, 16)
    # below imaging.mri.min_coverage it counts as missing (and FLAIR replaces it)
    _, partial = _bank(case, tmp_path, min_coverage=0.7)
    np.testing.assert_array_equal(partial.images[:, 2], partial.images[:, 1])


def test_non_mr_series_fails_the_bank_without_raising(mr_case, tmp_path, dicom_writers):
    # a CT object filed under the T1 series' UID: the choice reads one file, read_series all
    folder = mr_case.folders["T1 pre"]
    dicom_writers.slice(folder / "zz_ct.dcm", np.full((16, 16), 60), position=(-8, -8, 0),
                        instance=99, series_uid=folder.name, description="CT", modality="CT",
                        sop_class=CTImageStorage)
    row, bank = _bank(mr_case, tmp_path)
    assert row["status"] == "failed" and "not an MR image" in row["reason"]
    assert bank.attrs["reason"] == row["reason"]


def test_keep_tumour_slices_only(mr_case, tmp_path):
    row, bank = _bank(mr_case, tmp_path, keep_slices="tumour")
    assert row["n_items"] == 1
    assert bank.coords[:, 1].tolist() == [mr_case.tumour_instance]
    assert bank.masks[0].any()


def test_keep_brain_slices_drops_empty_slices(mr_case_factory, tmp_path):
    case = mr_case_factory(empty_instances=(1, 6))
    _, bank = _bank(case, tmp_path, keep_slices="brain")
    assert bank.coords[:, 1].tolist() == [5, 4, 3, 2]
    _, all_slices = _bank(case, tmp_path, keep_slices="all")
    assert len(all_slices) == 6


def test_no_tumour_slice_gives_failed_bank(mr_case_factory, tmp_path):
    case = mr_case_factory(tumour_instance=99)
    row, _ = _bank(case, tmp_path, keep_slices="tumour")
    assert row["status"] == "failed" and "no slice kept" in row["reason"]


def test_missing_mask_file_gives_empty_mask_with_warning(mr_case, tmp_path, caplog):
    (mr_case.mask_dir / f"{mr_case.case_id}_4_mask.tif").unlink()
    with caplog.at_level(logging.WARNING, logger="mgi.imaging.mri"):
        row, bank = _bank(mr_case, tmp_path)
    assert row["status"] == "ok"
    assert not bank.masks[bank.coords[:, 1] == 4].any()
    assert "no mask for 1 slice" in caplog.text


def test_mask_shape_mismatch_fails_the_bank(mr_case, tmp_path):
    tifffile.imwrite(mr_case.mask_dir / f"{mr_case.case_id}_3_mask.tif",
                     np.zeros((8, 8), dtype=np.uint8))
    row, _ = _bank(mr_case, tmp_path)
    assert row["status"] == "failed"
    assert "_3_mask.tif: mask shape (8, 8), expected (16, 16)" in row["reason"]


def test_masks_matching_no_slice_fail_the_bank(mr_case, tmp_path):
    for path in mr_case.mask_dir.iterdir():
        path.rename(path.with_name(path.name.replace("_mask", "0_mask")))  # 1 -> 10, ...
    row, _ = _bank(mr_case, tmp_path)
    assert row["status"] == "failed" and "no mask matches an InstanceNumber" in row["reason"]


def test_no_mask_folder_gives_a_bank_without_masks(mr_case, tmp_path):
    out = tmp_path / "nomask.h5"
    row = build_mri_bank(image_id="img", case_id="CASE-1", series_root=mr_case.root,
                         mask_dir=None, out_path=out, options=mri_options(image_px=16))
    assert row["status"] == "ok"
    assert read_bank(out).masks is None


def test_missing_radiology_folder_fails_without_raising(tmp_path):
    row = build_mri_bank(image_id="img", case_id="c", series_root=tmp_path / "absent",
                         mask_dir=None, out_path=tmp_path / "x.h5")
    assert row["status"] == "failed" and "case folder not found" in row["reason"]
    assert read_bank(tmp_path / "x.h5").attrs["status"] == "failed"


def test_invalid_options_raise_config_error(mr_case, tmp_path):
    common = {"image_id": "i", "case_id": "c", "series_root": mr_case.root, "mask_dir": None,
              "out_path": tmp_path / "x.h5"}
    with pytest.raises(ConfigError, match="normalise"):
        build_mri_bank(**common, options=mri_options(normalise="robust"))
    with pytest.raises(ConfigError, match="no rule"):
        build_mri_bank(**common, options=mri_options(sequences=("T1", "T2")))
    with pytest.raises(ConfigError, match="brain_threshold"):
        build_mri_bank(**common, brain_threshold=1.5)
    assert not (tmp_path / "x.h5").exists()


# --- LGG TIFF layout ------------------------------------------------------------------------


def test_read_lgg_tif_slices_on_the_real_case(sample_file):
    folder = sample_file("lgg_mri/TCGA_CS_4941_19960909")
    images, masks, numbers = read_lgg_tif_slices(folder)
    assert numbers.tolist() == [1, 12]  # numeric order, not "1" < "12" by accident only
    assert images.shape == (2, 3, 256, 256) and images.dtype == np.uint8
    assert masks.shape == (2, 256, 256)
    assert masks[0].sum() == 0
    assert masks[1].sum() == 2646 and masks.max() == 1


def test_read_lgg_tif_slices_orders_numerically(tmp_path):
    for n in (10, 2, 1):
        tifffile.imwrite(tmp_path / f"TCGA_XX_0001_20000101_{n}.tif",
                         np.full((4, 4, 3), n, dtype=np.uint8))
        tifffile.imwrite(tmp_path / f"TCGA_XX_0001_20000101_{n}_mask.tif",
                         np.full((4, 4), 255 if n == 2 else 0, dtype=np.uint8))
    images, masks, numbers = read_lgg_tif_slices(tmp_path)
    assert numbers.tolist() == [1, 2, 10]
    assert images[:, 0, 0, 0].tolist() == [1, 2, 10]
    assert masks.reshape(3, -1).any(axis=1).tolist() == [False, True, False]


def test_read_lgg_tif_slices_refuses_an_empty_folder(tmp_path):
    with pytest.raises(SeriesError, match="no LGG slice"):
        read_lgg_tif_slices(tmp_path)


def test_copy_of_case_keeps_working(mr_case, tmp_path):
    # series folders found by description, not by their (UID) folder names
    moved = tmp_path / "moved"
    shutil.copytree(mr_case.root, moved)
    for i, folder in enumerate(sorted(moved.iterdir())):
        folder.rename(moved / f"series_{i}")
    mr_case.root = moved
    row, _ = _bank(mr_case, tmp_path)
    assert row["status"] == "ok" and row["n_items"] == 6


def test_series_tsv_names_series_whose_descriptions_differ(mr_case_factory, tmp_path):
    # descriptions no rule reads: the acquire stage's series.tsv maps each SeriesInstanceUID
    # to the sequence it was chosen for
    case = mr_case_factory(descriptions={"T1 pre": "series 3", "FLAIR": "series 1",
                                         "T1 post": "series 2"})
    row, _ = _bank(case, tmp_path, missing_sequence="error")
    assert row["status"] == "failed"
    lines = ["SeriesInstanceUID\tsequence"]
    lines += [f"{folder.name}\t{name}" for name, folder in case.folders.items()]
    (case.root / "series.tsv").write_text("\n".join(lines) + "\n")
    row, bank = _bank(case, tmp_path, missing_sequence="error")
    assert row["status"] == "ok"
    assert len(bank) == 6
