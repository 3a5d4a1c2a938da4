"""The LGG segmentation set's slice TIFFs as an MR case: channels as stored, masks, bank."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mgi.errors import SeriesError
from mgi.imaging.bank import read_bank
from mgi.imaging.mri import build_mri_bank
from mgi.imaging.mri.lgg import lgg_channels, load_lgg_case
from tests.imaging.conftest import mri_options

SLICE = re.compile(r"^(?P<case>.+)_(?P<n>\d+)\.tif$")


@pytest.fixture
def lgg_cases(test_data: Path) -> list[Path]:
    """The real LGG patient folders under MGI_TEST_DATA (skip where they are absent)."""
    folders = sorted(p for p in (test_data / "lgg_mri").glob("TCGA_*") if p.is_dir())
    if not folders:
        pytest.skip(f"no LGG case folder under {test_data / 'lgg_mri'}")
    return folders


def _tiffs(folder: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Slice number -> (image (H, W, 3), mask (H, W)) read straight from the files."""
    out = {}
    for path in folder.iterdir():
        if match := SLICE.match(path.name):
            mask = folder / f"{match['case']}_{match['n']}_mask.tif"
            out[int(match["n"])] = (tifffile.imread(path), tifffile.imread(mask))
    return out


def _write_case(root: Path, name: str = "TCGA_XX_0001_20000101", *, n: int = 4,
                size: int = 32, masks: bool = True) -> Path:
    """A synthetic LGG case folder: channel k of slice i is 40 + 50 k + 10 i in a disc."""
    folder = root / name
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    for i in range(1, n + 1):
        image = np.zeros((size, size, 3), dtype=np.uint8)
        for k in range(3):
            image[disc, k] = 40 + 50 * k + 10 * i
        tifffile.imwrite(folder / f"{name}_{i}.tif", image, photometric="rgb")
        if masks:
            mask = np.zeros((size, size), dtype=np.uint8)
            if i == 2:
                mask[12:20, 10:18] = 255
            tifffile.imwrite(folder / f"{name}_{i}_mask.tif", mask)
    return folder


def test_real_lgg_cases_load_channel_for_channel_as_stored(lgg_cases):
    options = mri_options()
    for folder in lgg_cases:
        case = load_lgg_case(folder, mask_path=folder, options=options)
        tiffs = _tiffs(folder)
        assert case.instance_numbers.tolist() == sorted(tiffs)  # slice number order
        assert case.z.tolist() == [float(n) for n in sorted(tiffs)]
        assert set(case.channels) == {"T1 pre", "FLAIR", "T1 post"}
        for i, number in enumerate(case.instance_numbers):
            image, mask = tiffs[int(number)]
            for role, channel in (("T1 pre", 0), ("FLAIR", 1), ("T1 post", 2)):
                assert case.channels[role].dtype == np.float32
                np.testing.assert_array_equal(case.channels[role][i], image[..., channel])
            np.testing.assert_array_equal(case.masks[i], (mask > 0).astype(np.uint8))
        assert case.reference == "FLAIR" and case.mask_source == "tiff"
        assert case.attrs == {"source_layout": "lgg_tif", "source": str(folder),
                              "geometry": "none (LGG set TIFFs)"}
        assert case.pixel_spacing == (1.0, 1.0) and case.slice_gap == 1.0


def test_a_real_lgg_case_banks_ok_with_its_masks(lgg_cases, tmp_path):
    folder = next(p for p in lgg_cases if len(list(p.glob("*_mask.tif"))) >= 20)
    out = tmp_path / "bank.h5"
    row = build_mri_bank(image_id="lgg", case_id="TCGA-CS-4942", series_root=folder,
                         mask_dir=folder, out_path=out, options=mri_options(image_px=64))
    assert row["status"] == "ok", row["reason"]
    bank = read_bank(out)
    tiffs = _tiffs(folder)
    assert bank.images.shape == (len(tiffs), 3, 64, 64)
    tumour = [bool((tiffs[n][1] > 0).any()) for n in sorted(tiffs)]
    assert bank.masks.reshape(len(bank), -1).any(axis=1).tolist() == tumour
    assert bank.attrs["source_layout"] == "lgg_tif"
    assert bank.attrs["mask_source"] == "tiff"
    assert json.loads(bank.attrs["sequences_filled"]) == dict.fromkeys(
        ["T1 pre", "FLAIR", "T1 post"], "series")


def test_a_role_without_lgg_channel_is_left_to_the_missing_policy(tmp_path):
    folder = _write_case(tmp_path)
    options = mri_options(sequences=("T1 pre", "FLAIR", "T2"), image_px=16)
    images = np.stack([tifffile.imread(p) for p in sorted(folder.glob("*_[0-9].tif"))])
    channels = lgg_channels(images.transpose(0, 3, 1, 2), options=options)
    assert set(channels) == {"T1 pre", "FLAIR"}  # T2 has lgg_channel null
    row = build_mri_bank(image_id="a", case_id="c", series_root=folder, mask_dir=folder,
                         out_path=tmp_path / "a.h5", options=options)
    assert row["status"] == "ok"
    filled = json.loads(read_bank(tmp_path / "a.h5").attrs["sequences_filled"])
    assert filled["T2"] == "replaced by FLAIR"
    refused = build_mri_bank(image_id="b", case_id="c", series_root=folder, mask_dir=folder,
                             out_path=tmp_path / "b.h5",
                             options=mri_options(sequences=("FLAIR", "T2"),
                                                 missing_sequence="error"))
    assert refused["status"] == "failed" and "['T2'] not found" in refused["reason"]


def test_masks_come_from_another_folder_by_slice_number_or_not_at_all(tmp_path):
    folder = _write_case(tmp_path / "images", masks=False)
    masks = tmp_path / "masks" / "TCGA-XX-0001"
    masks.mkdir(parents=True)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[3:6, 4:9] = 255
    tifffile.imwrite(masks / "TCGA-XX-0001_3_mask.tif", mask)  # named as copy_masks names them
    case = load_lgg_case(folder, mask_path=masks, options=mri_options())
    assert case.masks.reshape(4, -1).sum(axis=1).tolist() == [0, 0, 15, 0]
    bare = load_lgg_case(folder, mask_path=None, options=mri_options())
    assert bare.masks is None and bare.mask_source == "none"
    label_map = tmp_path / "labels.nii.gz"
    label_map.write_bytes(b"")
    with pytest.raises(SeriesError, match=r"labels\.nii\.gz: nifti masks, expected a folder"):
        load_lgg_case(folder, mask_path=label_map, options=mri_options())


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_tiff_fails_the_bank_naming_the_file(tmp_path, damage):
    folder = _write_case(tmp_path)
    bad = folder / "TCGA_XX_0001_20000101_3.tif"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated"
                    else b"II*\x00 this is not a TIFF")
    row = build_mri_bank(image_id="x", case_id="c", series_root=folder, mask_dir=folder,
                         out_path=tmp_path / "x.h5", options=mri_options(image_px=16))
    assert row["status"] == "failed"
    assert f"{bad}: unreadable TIFF" in row["reason"]
    bank = read_bank(tmp_path / "x.h5")
    assert not bank.ok and str(bad) in bank.attrs["reason"]


def test_a_tiff_of_another_channel_count_fails_the_bank_naming_the_file(tmp_path):
    folder = _write_case(tmp_path)
    grey = folder / "TCGA_XX_0001_20000101_2.tif"
    tifffile.imwrite(grey, np.zeros((32, 32), dtype=np.uint8))
    row = build_mri_bank(image_id="x", case_id="c", series_root=folder, mask_dir=folder,
                         out_path=tmp_path / "x.h5", options=mri_options(image_px=16))
    assert row["status"] == "failed"
    assert f"{grey}: shape (32, 32), expected (H, W, 3)" in row["reason"]


def test_slices_of_a_copied_case_keep_their_numbers(tmp_path, lgg_cases):
    # a two-slice real case (1 and 12): z follows the slice numbers, not the file count
    folder = next(p for p in lgg_cases if len(list(p.glob("*_mask.tif"))) == 2)
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    case = load_lgg_case(copy, mask_path=copy, options=mri_options())
    assert case.instance_numbers.tolist() == [1, 12]
    assert case.z.tolist() == [1.0, 12.0]
    assert case.masks[1].sum() == 2646 and case.masks[0].sum() == 0
