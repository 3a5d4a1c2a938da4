"""Stain normalisation: Macenko recovers planted stain vectors, Reinhard matches statistics,
batches equal single tiles, near-empty tiles are left alone, fitted state round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from mgi.errors import ConfigError, SlideError
from mgi.imaging.stain import (
    MacenkoNormaliser,
    ReinhardNormaliser,
    lab_to_rgb,
    load_normaliser,
    make_normaliser,
    rgb_to_lab,
    save_normaliser,
)

IO = 240.0
# columns: haematoxylin (purple), eosin (pink), as optical density per R, G, B
STAINS_A = np.array([[0.65, 0.27], [0.70, 0.86], [0.29, 0.43]])
STAINS_B = np.array([[0.56, 0.22], [0.72, 0.80], [0.41, 0.56]])


def stained_tiles(stains: np.ndarray, n: int = 4, px: int = 64, *, seed: int = 0) -> np.ndarray:
    """uint8 (n, 3, px, px) tiles: random H and E concentrations through the Beer-Lambert law."""
    rng = np.random.default_rng(seed)
    stains = stains / np.linalg.norm(stains, axis=0)
    conc = np.stack([rng.gamma(2.0, 0.35, (n, px * px)), rng.gamma(2.0, 0.25, (n, px * px))], 1)
    conc[:, :, : px * px // 10] = 0  # a little glass
    conc[:, 0, px * px // 10 : px * px // 5] = 0  # some pure eosin,
    conc[:, 1, px * px // 5 : 3 * px * px // 10] = 0  # some pure haematoxylin
    od = np.einsum("ck,nkp->ncp", stains, conc)
    rgb = IO * np.exp(-od)
    return rgb.clip(0, 255).round().astype(np.uint8).reshape(n, 3, px, px)


def angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    cos = abs(float(u @ v)) / (np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.degrees(np.arccos(min(1.0, cos))))


def test_macenko_fit_recovers_the_planted_stain_vectors():
    norm = MacenkoNormaliser().fit(stained_tiles(STAINS_A))
    fitted = norm.stain_matrix_.numpy()
    for k in (0, 1):  # haematoxylin first, then eosin
        assert angle_deg(fitted[:, k], STAINS_A[:, k]) < 3


def test_macenko_moves_a_tile_onto_the_reference_stains():
    norm = MacenkoNormaliser().fit(stained_tiles(STAINS_B, seed=1))
    source = stained_tiles(STAINS_A, seed=2)
    before = norm.stain_vectors(source)
    after = norm.stain_vectors(norm.transform(source))
    reference = norm.stain_matrix_.numpy()
    for i in range(len(source)):
        for k in (0, 1):
            assert angle_deg(after[i, :, k], reference[:, k]) < 3
            assert angle_deg(before[i, :, k], reference[:, k]) > 8


def test_a_batch_is_normalised_as_its_tiles_one_by_one():
    norm = MacenkoNormaliser().fit(stained_tiles(STAINS_B))
    tiles = stained_tiles(STAINS_A, n=11, seed=3)  # more than one chunk of 8
    batch = norm.transform(tiles)
    single = np.stack([norm.transform(tile) [0] for tile in tiles])
    np.testing.assert_array_equal(batch, single)
    assert batch.dtype == np.uint8 and batch.shape == tiles.shape


@pytest.mark.parametrize("normaliser", [MacenkoNormaliser, ReinhardNormaliser])
def test_near_empty_and_saturated_tiles_are_returned_unchanged(normaliser):
    norm = normaliser().fit(stained_tiles(STAINS_B))
    tiles = stained_tiles(STAINS_A, n=3)
    tiles[1] = 245  # glass
    tiles[2] = 0  # saturated black: no usable optical density either way
    tiles[2, :, :2, :2] = 200
    out, skipped = norm.transform(tiles, return_skipped=True)
    assert skipped.tolist() == [False, True, True]
    np.testing.assert_array_equal(out[1], tiles[1])
    assert not np.array_equal(out[0], tiles[0])
    assert np.isfinite(out.astype(float)).all()


def test_reinhard_output_has_the_reference_lab_statistics_on_tissue():
    reference = stained_tiles(STAINS_B, seed=4)
    norm = ReinhardNormaliser().fit(reference)
    out = norm.transform(stained_tiles(STAINS_A, seed=5))
    lab = rgb2lab(out.transpose(0, 2, 3, 1)).reshape(-1, 3)
    pixels = out.transpose(0, 2, 3, 1).reshape(-1, 3).astype(float)
    tissue = (-np.log((pixels + 1) / IO) > norm.beta).any(axis=1)
    np.testing.assert_allclose(lab[tissue].mean(0), norm.mean_.numpy(), atol=1.5)
    np.testing.assert_allclose(lab[tissue].std(0), norm.std_.numpy(), rtol=0.1, atol=0.5)


def test_lab_conversion_matches_skimage_and_round_trips():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 500)).astype(np.float32)
    lab = rgb_to_lab(torch.from_numpy(rgb))
    expected = rgb2lab(rgb.transpose(0, 2, 1)[:, :, None, :] / 255.0)[:, :, 0].transpose(0, 2, 1)
    np.testing.assert_allclose(lab.numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(lab_to_rgb(lab).numpy(), rgb, atol=1e-2)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_fitted_state_round_trips_through_json(method, tmp_path):
    norm = make_normaliser(method).fit(stained_tiles(STAINS_B))
    path = save_normaliser(norm, tmp_path / "ref.json", reference_tiles=4)
    assert json.loads(path.read_text())["reference_tiles"] == 4
    loaded = load_normaliser(path)
    tiles = stained_tiles(STAINS_A, seed=6)
    np.testing.assert_array_equal(loaded.transform(tiles), norm.transform(tiles))


def test_bad_methods_and_references_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"imaging\.wsi\.stain\.method: 'vahadane'"):
        make_normaliser("vahadane")
    with pytest.raises(SlideError, match=r"missing\.json: stain reference not found"):
        load_normaliser(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SlideError, match=r"bad\.json: stain reference is not JSON"):
        load_normaliser(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text('{"method": "macenko"}')
    with pytest.raises(SlideError, match=r"short\.json: stain reference lacks field"):
        load_normaliser(tmp_path / "short.json")
    with pytest.raises(SlideError, match="too few tissue pixels"):
        MacenkoNormaliser().fit(np.full((1, 3, 16, 16), 250, dtype=np.uint8))


def test_real_slide_tiles_move_towards_the_reference(sample_file):
    import openslide

    with openslide.OpenSlide(sample_file("wsi/CMU-1-Small-Region.svs")) as slide:
        region = np.asarray(slide.read_region((600, 1200), 0, (896, 896)).convert("RGB"))
    tiles = region.reshape(4, 224, 4, 224, 3).transpose(0, 2, 4, 1, 3).reshape(16, 3, 224, 224)
    norm = MacenkoNormaliser().fit(stained_tiles(STAINS_B, px=128))
    out, skipped = norm.transform(tiles, return_skipped=True)
    reference = norm.stain_matrix_.numpy()
    before, after = norm.stain_vectors(tiles), norm.stain_vectors(out)
    kept = np.flatnonzero(~skipped)
    assert kept.size >= 8
    gap_before = [angle_deg(before[i, :, k], reference[:, k]) for i in kept for k in (0, 1)]
    gap_after = [angle_deg(after[i, :, k], reference[:, k]) for i in kept for k in (0, 1)]
    assert max(gap_after) < 8 and np.mean(gap_after) < 4
    assert np.mean(gap_after) < np.mean(gap_before) / 2
