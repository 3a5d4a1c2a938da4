"""The image bank: HDF5 round trip, failed banks, malformed input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mgi.errors import BankError
from mgi.imaging.bank import bank_attrs, read_bank, write_bank, write_failed_bank

ATTRS = {"image_id": "img-1", "case_id": "TCGA-XX-0001", "modality": "mri"}


def _items(n: int = 3):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 3, 8, 8)).astype(np.float16)
    masks = (rng.random((n, 8, 8)) > 0.5).astype(np.uint8)
    coords = np.column_stack([np.arange(n) * 2.5, np.arange(n) + 1]).astype(np.float64)
    return images, masks, coords


def test_round_trip_keeps_pixels_masks_coords_and_attrs(tmp_path):
    images, masks, coords = _items()
    path = write_bank(tmp_path / "b.h5", images=images, masks=masks, coords=coords,
                      attrs={**ATTRS, "spacing": [2.5, 1.0, 1.0], "sequences": ["T1", "FLAIR"],
                             "filled": {"T1": "series"}, "image_px": 8, "level": None})
    bank = read_bank(path)
    np.testing.assert_array_equal(bank.images, images)
    assert bank.images.dtype == np.float16
    np.testing.assert_array_equal(bank.masks, masks)
    np.testing.assert_array_equal(bank.coords, coords)
    assert bank.attrs["status"] == "ok" and bank.attrs["reason"] == ""
    assert bank.attrs["image_id"] == "img-1" and bank.attrs["n_items"] == 3
    assert bank.attrs["spacing"] == [2.5, 1.0, 1.0]
    assert bank.attrs["sequences"] == '["T1", "FLAIR"]'  # string lists stored as JSON
    assert bank.attrs["filled"] == '{"T1": "series"}'
    assert bank.attrs["level"] == ""
    assert len(bank) == 3 and bank.ok


def test_datasets_are_chunked_one_item_per_chunk_with_lzf(tmp_path):
    images, masks, coords = _items()
    write_bank(tmp_path / "b.h5", images=images, masks=masks, coords=coords, attrs=ATTRS)
    with h5py.File(tmp_path / "b.h5") as handle:
        assert handle["images"].chunks == (1, 3, 8, 8)
        assert handle["masks"].chunks == (1, 8, 8)
        assert handle["images"].compression == "lzf"
        np.testing.assert_array_equal(handle["images"][2], images[2])  # random item read


def test_bank_without_masks_reads_masks_as_none(tmp_path):
    images = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    write_bank(tmp_path / "b.h5", images=images, coords=np.zeros((2, 2)),
               attrs={**ATTRS, "modality": "wsi"})
    bank = read_bank(tmp_path / "b.h5")
    assert bank.masks is None and bank.images.dtype == np.uint8


def test_failed_bank_is_empty_and_says_why(tmp_path):
    path = write_failed_bank(tmp_path / "f.h5", image_id="img-2", case_id="c", modality="wsi",
                             reason="slide.svs: not a slide format OpenSlide can read")
    bank = read_bank(path)
    assert not bank.ok and len(bank) == 0
    assert bank.attrs["status"] == "failed"
    assert bank.attrs["reason"].startswith("slide.svs")
    assert bank.images.dtype == np.uint8 and bank.coords.shape == (0, 2)
    assert bank_attrs(path)["status"] == "failed"


def test_write_is_atomic_and_leaves_no_partial_file(tmp_path):
    images, masks, coords = _items()
    with pytest.raises(BankError, match="masks must have shape"):
        write_bank(tmp_path / "b.h5", images=images, masks=masks[:, :4], coords=coords,
                   attrs=ATTRS)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_inconsistent_inputs(tmp_path):
    images, masks, coords = _items()
    with pytest.raises(BankError, match="coords must be"):
        write_bank(tmp_path / "b.h5", images=images, coords=coords[:2], attrs=ATTRS)
    with pytest.raises(BankError, match="0/1"):
        write_bank(tmp_path / "b.h5", images=images, masks=masks * 255, coords=coords,
                   attrs=ATTRS)
    with pytest.raises(BankError, match="attrs missing"):
        write_bank(tmp_path / "b.h5", images=images, coords=coords, attrs={"image_id": "x"})
    with pytest.raises(BankError, match="modality"):
        write_bank(tmp_path / "b.h5", images=images, coords=coords,
                   attrs={**ATTRS, "modality": "ct"})


def test_read_names_file_and_missing_dataset(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("images", data=np.zeros((1, 1, 2, 2)))
        for key in ("image_id", "case_id", "modality", "status", "reason"):
            handle.attrs[key] = "x"
    with pytest.raises(BankError, match=r"bad\.h5: image bank missing dataset\(s\) \['coords'\]"):
        read_bank(path)


def test_read_names_file_and_missing_attr(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("images", data=np.zeros((1, 1, 2, 2)))
        handle.create_dataset("coords", data=np.zeros((1, 2)))
        handle.attrs["image_id"] = "x"
    with pytest.raises(BankError, match=r"bad\.h5: image bank attrs missing \['case_id'"):
        bank_attrs(path)


def test_read_refuses_a_missing_or_non_hdf5_file(tmp_path):
    with pytest.raises(BankError, match="not found"):
        read_bank(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(BankError, match=r"text\.h5: not a readable HDF5"):
        read_bank(tmp_path / "text.h5")
