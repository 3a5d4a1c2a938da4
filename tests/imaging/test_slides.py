"""Slide tiling: resolution, tissue-only tiles, annotation masks, failures as QC rows."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.color import rgb2lab

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
    assert bank.attrs["source"] == str(slide)
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


# --- block reads, stain normalisation, the cohort reference --------------------------------------


def test_block_reads_equal_one_read_region_per_tile(sample_file):
    import openslide

    from mgi.imaging.slides import plan_tiles, read_tiles

    path = sample_file("wsi/CMU-1-Small-Region.svs")
    with openslide.OpenSlide(path) as slide:
        plan = plan_tiles(slide, slide_path=path, tile_px=96, mpp=0.5, mpp_fallback=None)
        cells = np.flatnonzero(plan.fractions.ravel() >= 0.5)
        cells = np.r_[cells[:40], cells[-3:]]  # dense runs and a few strays
        tiles = read_tiles(slide, plan, cells, tile_px=96, threads=2)
        for cell, tile in zip(cells, tiles, strict=True):
            x, y = plan.origin(cell)
            one = np.asarray(slide.read_region((x, y), plan.level, (96, 96)).convert("RGB"))
            np.testing.assert_array_equal(tile, one.transpose(2, 0, 1))
    # the physical size of a tile is tile_px at the target mpp
    assert plan.read_px * plan.level_downsample * plan.mpp_slide == pytest.approx(96 * 0.5,
                                                                                  rel=0.01)


def test_real_slide_tile_count_is_the_tissue_cells(sample_file, tmp_path):
    slide = sample_file("wsi/CMU-1-Small-Region.svs")
    row, bank, _ = _tile(slide, tmp_path, tile_px=224, max_tiles=None, tissue_min=0.5)
    # CMU-1-Small-Region is 2220 x 2967 at 0.499 um/px: a 9 x 13 grid of 224-px tiles
    assert bank.attrs["n_tissue_tiles"] == row["n_items"] == len(bank)
    assert 20 < len(bank) < 9 * 13
    assert bank.attrs["tile_size_level0"] * bank.attrs["mpp_slide"] == pytest.approx(
        224 * 0.5, rel=0.01)


def test_dicom_wsi_opens_with_its_resolution_and_fails_clearly_without_tissue(
    sample_file, tmp_path
):
    slide = sample_file("wsi/highdicom_sm_image.dcm")
    row, bank, png = _tile(slide, tmp_path, tile_px=16, tissue_min=0.0)
    # a 50 x 50 px format fixture at 0.499 um/px, nearly white: read, resolved, refused
    assert row["mpp"] == pytest.approx(0.499)
    assert row["status"] == "failed" and "no tissue" in row["reason"]
    assert not bank.ok and png.is_file()


def test_tiles_are_stain_normalised_and_the_bank_says_how(slide_factory, tmp_path):
    from mgi.imaging.stain import MacenkoNormaliser

    slide = slide_factory()
    _, plain, _ = _tile(slide.path, tmp_path / "plain", mpp=1.0, tile_px=32)
    reference = plain.images[:4].copy()
    reference[:, 0] = (reference[:, 0] * 0.8).astype(np.uint8)  # a bluer reference
    norm = MacenkoNormaliser().fit(reference)
    row, bank, _ = _tile(slide.path, tmp_path / "norm", mpp=1.0, tile_px=32, normaliser=norm)
    assert row["status"] == "ok" and len(bank) == len(plain)
    np.testing.assert_array_equal(bank.coords, plain.coords)
    assert json.loads(bank.attrs["stain_normalisation"])["method"] == "macenko"
    assert plain.attrs["stain_normalisation"] == "none"
    changed = ~np.all(bank.images == plain.images, axis=(1, 2, 3))
    skipped = bank.attrs["stain_skipped_tiles"]
    assert changed.sum() == len(bank) - skipped and changed.sum() > 0
    assert bank.images[changed][:, 0].mean() < plain.images[changed][:, 0].mean()


def test_cohort_reference_samples_tissue_tiles_or_uses_the_given_tile(slide_factory, tmp_path):
    from mgi.imaging.reference import fit_reference
    from mgi.imaging.stain import load_normaliser

    slides = [slide_factory().path]
    out = tmp_path / "ref.json"
    fit_reference(method="macenko", out_path=out, slide_paths=[*slides, tmp_path / "gone.svs"],
                  tiles_per_slide=8, tile_px=32, mpp=1.0, tissue_min=0.5)
    saved = json.loads(out.read_text())
    assert saved["reference_tiles"] == 8 and saved["reference_slides"] == [str(slides[0])]
    assert load_normaliser(out).stain_matrix_.shape == (3, 2)
    tile = tmp_path / "tile.png"
    Image.fromarray(np.full((32, 32, 3), (180, 90, 160), dtype=np.uint8)).save(tile)
    fit_reference(method="reinhard", out_path=out, reference_tile=tile)
    saved = json.loads(out.read_text())
    assert saved["reference_tile"] == str(tile)
    assert saved["mean"] == pytest.approx(rgb2lab(np.array([[[180, 90, 160]]]) / 255)[0, 0],
                                          abs=0.05)
