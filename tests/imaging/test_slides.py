"""Slide tiling: resolution, tissue-only tiles, annotation masks, failures as QC rows."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from mgi.errors import ConfigError
from mgi.imaging.bank import read_bank
from mgi.imaging.slides import tile_slide
from mgi.imaging.tissue import tissue_mask

QC_KEYS = {"image_id", "case_id", "modality", "status", "reason", "n_items", "mpp", "level",
           "seconds"}


def _tile(slide_path, tmp_path, *, mask_path=None, **options):
    """Tile a slide into tmp_path; return (qc row, Bank, QC png path)."""
    out, png = tmp_path / "out" / "s.h5", tmp_path / "out" / "qc" / "s.png"
    settings = {"tile_px": 64, "mpp": 0.5, "tissue_min": 0.5, "max_tiles": 256, **options}
    row = tile_slide(image_id="s", case_id="c", slide_path=slide_path, mask_path=mask_path,
                     out_path=out, qc_png_path=png, **settings)
    return row, read_bank(out), png


def test_real_aperio_slide_gives_tissue_tiles(sample_file, tmp_path):
    slide = sample_file("wsi/CMU-1-Small-Region.svs")
    row, bank, png = _tile(slide, tmp_path, tile_px=128, max_tiles=16)
    assert set(row) == QC_KEYS
    assert row["status"] == "ok" and row["mpp"] == pytest.approx(0.499)
    assert row["level"] == 0 and row["n_items"] == 16
    assert bank.images.shape == (16, 3, 128, 128) and bank.images.dtype == np.uint8
    assert bank.masks is None
    assert bank.attrs["n_tissue_tiles"] > 16 and bank.attrs["vendor"] == "aperio"
    # every kept tile is mostly tissue by the same detector, on its own pixels
    for tile in bank.images:
        assert tissue_mask(tile.transpose(1, 2, 0)).mean() > 0.3
    assert bank.coords.min() >= 0
    assert (bank.coords[:, 0] + 128 <= 2220).all() and (bank.coords[:, 1] + 128 <= 2967).all()
    assert Image.open(png).size[1] == 1024


def test_synthetic_slide_tiles_only_tissue_at_target_resolution(slide_factory, tmp_path):
    slide = slide_factory()
    row, bank, png = _tile(slide.path, tmp_path, mpp=1.0, tile_px=32)
    assert row["status"] == "ok" and row["mpp"] == 0.5
    assert bank.attrs["read_px"] == 64 and bank.attrs["tile_size_level0"] == 64
    assert row["level"] == 0  # 4x level is too coarse for 1.0 um/px from 0.5 um/px
    for x, y in bank.coords.astype(int):
        assert slide.tissue[y:y + 64, x:x + 64].mean() >= 0.4
    # all full grid tiles well inside the ellipse were kept
    grid = [(x, y) for y in range(0, 768 - 63, 64) for x in range(0, 1024 - 63, 64)
            if slide.tissue[y:y + 64, x:x + 64].all()]
    kept = {tuple(c) for c in bank.coords.astype(int).tolist()}
    assert set(grid) <= kept
    assert png.is_file()


def test_coarser_target_reads_a_coarser_level(slide_factory, tmp_path):
    slide = slide_factory()
    row, bank, _ = _tile(slide.path, tmp_path, mpp=2.0, tile_px=32)
    assert row["level"] == 1 and bank.attrs["level_downsample"] == 4.0
    assert bank.attrs["read_px"] == 32 and bank.attrs["tile_size_level0"] == 128
    # a tile read from level 1 at (x, y) shows the same pixels as level 0 there (pink tissue)
    centre = bank.images[:, :, 16, 16].astype(int)
    inside = [slide.tissue[y + 64, x + 64] for x, y in bank.coords.astype(int)]
    assert np.all(np.abs(centre[inside] - [205, 110, 170]).max(axis=1) < 25)


def test_annotation_gives_tile_masks_aligned_with_tiles(slide_factory, tmp_path):
    slide = slide_factory()
    row, bank, _ = _tile(slide.path, tmp_path, mask_path=slide.annotation, mpp=0.5,
                         tile_px=64, max_tiles=None)
    assert row["status"] == "ok"
    assert bank.masks is not None and bank.masks.shape == (len(bank), 64, 64)
    for (x, y), mask in zip(bank.coords.astype(int), bank.masks, strict=True):
        expected = slide.tumour[y:y + 64, x:x + 64]
        assert (mask == expected).mean() > 0.9
    assert bank.masks.any()


def test_tile_cap_is_a_seeded_subset(slide_factory, tmp_path):
    slide = slide_factory()
    _, first, _ = _tile(slide.path, tmp_path / "a", max_tiles=5, seed=3)
    _, again, _ = _tile(slide.path, tmp_path / "b", max_tiles=5, seed=3)
    _, other, _ = _tile(slide.path, tmp_path / "c", max_tiles=5, seed=4)
    assert len(first) == 5 and first.attrs["n_tissue_tiles"] > 5
    np.testing.assert_array_equal(first.coords, again.coords)
    assert not np.array_equal(first.coords, other.coords)


def test_missing_mpp_falls_back_to_objective_power(slide_factory, tmp_path, caplog):
    slide = slide_factory(mpp=None, app_mag=20)
    with caplog.at_level(logging.WARNING, logger="mgi.imaging.slides"):
        row, bank, _ = _tile(slide.path, tmp_path)
    assert row["status"] == "ok" and row["mpp"] == 0.5
    assert bank.attrs["mpp_source"] == "objective-power"
    assert "objective power" in caplog.text


def test_no_resolution_fails_unless_a_fallback_is_given(slide_factory, tmp_path):
    slide = slide_factory(mpp=None, app_mag=None)
    row, bank, png = _tile(slide.path, tmp_path / "a")
    assert row["status"] == "failed" and "no resolution" in row["reason"]
    assert bank.attrs["status"] == "failed" and png.is_file()
    row, bank, _ = _tile(slide.path, tmp_path / "b", mpp_fallback=0.25)
    assert row["status"] == "ok" and bank.attrs["mpp_source"] == "mpp_fallback"
    assert bank.attrs["read_px"] == 128  # 0.5 / 0.25 = 2x: 64-px tiles read as 128 px


def test_blank_slide_fails_with_no_tissue(tmp_path, aperio_writer):
    blank = aperio_writer(tmp_path / "blank.svs", np.full((512, 512, 3), 243, dtype=np.uint8),
                          downsamples=())
    row, bank, png = _tile(blank, tmp_path)
    assert row["status"] == "failed" and "no tissue" in row["reason"]
    assert len(bank) == 0 and png.is_file()


def test_unreadable_slide_gives_failed_row_not_exception(tmp_path):
    fake = tmp_path / "fake.svs"
    fake.write_text("this is not a slide\n")
    row, bank, png = _tile(fake, tmp_path)
    assert set(row) == QC_KEYS
    assert row["status"] == "failed" and "fake.svs" in row["reason"]
    assert "OpenSlide" in row["reason"]
    assert bank.attrs["status"] == "failed" and bank.attrs["reason"] == row["reason"]
    assert png.is_file()


def test_missing_slide_gives_failed_row(tmp_path):
    row, _, _ = _tile(tmp_path / "absent.svs", tmp_path)
    assert row["status"] == "failed" and "not found" in row["reason"]


def test_mismatched_annotation_fails_the_slide(slide_factory, tmp_path):
    slide = slide_factory()
    tifffile.imwrite(slide.annotation, np.zeros((10, 60), dtype=np.uint8))
    row, _, _ = _tile(slide.path, tmp_path, mask_path=slide.annotation)
    assert row["status"] == "failed" and "does not cover the slide" in row["reason"]


def test_invalid_options_raise_config_error(slide_factory, tmp_path):
    slide = slide_factory()
    with pytest.raises(ConfigError, match="tissue_min"):
        _tile(slide.path, tmp_path, tissue_min=1.5)
