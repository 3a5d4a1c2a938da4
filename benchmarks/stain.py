"""How fast a batch of tissue tiles is Macenko-normalised, against torchstain one tile at a time.

Ours: `mgi.imaging.stain.MacenkoNormaliser.transform` on the whole batch (PyTorch, a few tiles
per tensor pass). Baseline: torchstain's `MacenkoNormalizer` (numpy backend, `stains=False`) in a
loop over the tiles: the per-tile call most pipelines make, and the implementation ours follows.
limit_s: the per-pixel work alone (optical density, one 3x3 product, exponential, back to
uint8) with every tile's matrix already known: the floor for any Macenko that maps every pixel.
Reinhard (ours batched vs torchstain's per tile) is timed too, for the record.

Tiles: 224 x 224 tissue tiles cut from the real CMU-1-Small-Region sample where it is found
(MGI_TEST_DATA, default ../shared/data), topped up with synthetic H&E tiles to `--tiles`. Both
fit the same reference tile; outputs must agree (mean absolute difference per tile, reported).
One thread (torch and BLAS), runs alternated and repeated, medians kept. torchstain is needed
for the benchmark only: `pip install -r envs/requirements-bench.txt`. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mgi.imaging.stain import (  # noqa: E402
    MacenkoNormaliser,
    ReinhardNormaliser,
    optical_density,
)

TILE = 224
REPO = Path(__file__).resolve().parents[1]


def real_tiles() -> np.ndarray:
    """Tissue tiles of the real Aperio sample, or none if it is absent."""
    import openslide

    from mgi.imaging.tissue import tissue_mask

    root = Path(os.environ.get("MGI_TEST_DATA", REPO.parent / "shared" / "data"))
    path = root / "wsi" / "CMU-1-Small-Region.svs"
    if not path.is_file():
        print(f"{path} not found: synthetic tiles only", file=sys.stderr)
        return np.empty((0, 3, TILE, TILE), dtype=np.uint8)
    with openslide.OpenSlide(path) as slide:
        width, height = slide.dimensions
        region = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    tiles = [region[y:y + TILE, x:x + TILE] for y in range(0, height - TILE + 1, TILE)
             for x in range(0, width - TILE + 1, TILE)]
    kept = [t for t in tiles if tissue_mask(t).mean() > 0.5]
    return np.stack(kept).transpose(0, 3, 1, 2)


def synthetic_tiles(n: int, *, seed: int = 0) -> np.ndarray:
    """H&E-like tiles through the Beer-Lambert law, stain vectors varying a little per tile."""
    rng = np.random.default_rng(seed)
    base = np.array([[0.65, 0.27], [0.70, 0.86], [0.29, 0.43]])
    out = np.empty((n, 3, TILE, TILE), dtype=np.uint8)
    for i in range(n):
        stains = base + rng.normal(0, 0.04, base.shape)
        stains /= np.linalg.norm(stains, axis=0)
        conc = np.stack([rng.gamma(2.0, 0.35, TILE * TILE), rng.gamma(2.0, 0.25, TILE * TILE)])
        out[i] = (240 * np.exp(-(stains @ conc))).clip(0, 255).round().reshape(3, TILE, TILE)
    return out


def per_pixel_floor(norm: MacenkoNormaliser, tiles: np.ndarray, mappings: torch.Tensor) -> None:
    """The per-pixel part of ours with every mapping precomputed."""
    for start in range(0, len(tiles), 8):
        batch = torch.from_numpy(tiles[start:start + 8]).to(torch.float32)
        od = optical_density(batch.flatten(2), norm.io)
        out = torch.bmm(mappings[start:start + 8], od).neg_().exp_().mul_(norm.io)
        out.clamp_(0, 255).round_().to(torch.uint8)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=256, help="tiles in the batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 tiles, 1 repeat")
    args = parser.parse_args(argv)
    try:
        import torchstain
    except ImportError as err:
        raise SystemExit("torchstain is not installed: pip install -r "
                         "envs/requirements-bench.txt") from err
    torch.set_num_threads(1)
    n_tiles, repeats = (64, 1) if args.quick else (args.tiles, args.repeats)

    real = real_tiles()[:n_tiles]
    tiles = np.concatenate([real, synthetic_tiles(n_tiles - len(real))])
    reference = tiles[len(tiles) // 2]
    ours_m = MacenkoNormaliser().fit(reference)
    theirs_m = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    theirs_m.fit(reference.transpose(1, 2, 0))
    ours_r = ReinhardNormaliser().fit(reference)
    theirs_r = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    theirs_r.fit(reference.transpose(1, 2, 0))

    def baseline_macenko() -> list[np.ndarray]:
        return [theirs_m.normalize(t.transpose(1, 2, 0), stains=False)[0] for t in tiles]

    def baseline_reinhard() -> list[np.ndarray]:
        return [theirs_r.normalize(t.transpose(1, 2, 0)) for t in tiles]

    # Agreement first (and warm-up).
    ours_out, skipped = ours_m.transform(tiles, return_skipped=True)
    theirs_out = baseline_macenko()
    diffs = [np.abs(ours_out[i].transpose(1, 2, 0).astype(int) - theirs_out[i]).mean()
             for i in range(len(tiles)) if not skipped[i]]
    # the floor's mappings, from ours
    with torch.no_grad():
        od = ours_m._optical_density(torch.from_numpy(tiles).to(torch.float32))
        he, max_c, _ = ours_m._stains(ours_m._sample(od))
        mappings = ours_m.stain_matrix_ @ ((ours_m.max_concentrations_ / max_c).unsqueeze(2)
                                           * torch.linalg.pinv(he))
    del od

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {k: [] for k in ("ours", "baseline", "limit", "ours_reinhard",
                                                     "baseline_reinhard")}
    for r in range(repeats):
        pairs = [("ours", lambda: ours_m.transform(tiles)), ("baseline", baseline_macenko)]
        for name, fn in pairs if r % 2 == 0 else pairs[::-1]:
            times[name].append(timed(fn))
        times["limit"].append(timed(lambda: per_pixel_floor(ours_m, tiles, mappings)))
        times["ours_reinhard"].append(timed(lambda: ours_r.transform(tiles)))
        times["baseline_reinhard"].append(timed(baseline_reinhard))
        print(f"repeat {r + 1}: ours {times['ours'][-1]:.3f} s, torchstain "
              f"{times['baseline'][-1]:.3f} s, floor {times['limit'][-1]:.3f} s", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "name": "stain",
        "ours_s": round(med["ours"], 4),
        "baseline": f"torchstain {version('torchstain')} MacenkoNormalizer (numpy) per tile",
        "baseline_s": round(med["baseline"], 4),
        "ratio": round(med["baseline"] / med["ours"], 2),
        "limit_s": round(med["limit"], 4),
        "n": len(tiles),
        "unit": "tiles",
        "tile_px": TILE,
        "real_tiles": len(real),
        "threads": 1,
        "mean_abs_diff_max": round(float(max(diffs)), 3),
        "mean_abs_diff_median": round(float(np.median(diffs)), 3),
        "ours_reinhard_s": round(med["ours_reinhard"], 4),
        "baseline_reinhard_s": round(med["baseline_reinhard"], 4),
        "ratio_reinhard": round(med["baseline_reinhard"] / med["ours_reinhard"], 2),
        "repeats": repeats,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
