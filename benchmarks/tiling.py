"""How fast a slide's tissue becomes normalised tiles, against one read_region per tile + Macenko.

Ours: what the `tile_slide` rule does after planning (the same grid, tissue cells only):
`mgi.imaging.slides.read_tiles` (regions of many tiles per OpenSlide call) and the batched
`MacenkoNormaliser`, one thread. Baseline: the common approach: one `read_region` call per grid
tile at level 0 (then resized to the tile size if the level-0 resolution differs), and a
per-tile Macenko (torchstain, numpy backend, when installed; else our normaliser called per
tile, which is faster than torchstain, so the ratio is then an underestimate). limit_s:
decoding the tissue area once at the chosen level with no processing (one `read_region` per
block of tiles that holds tissue).

Slides: a large synthetic Aperio pyramid written by the script (`--px` square, JPEG tiles
240 px, 0.5 um/px), and the real CMU-1-Small-Region sample where found (MGI_TEST_DATA). Peak
resident memory of a whole `tile_slide` run (streamed to the bank) is measured in a fresh
process. `--quick`: a 4096-px slide, one repeat. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memory import peak_rss_mb

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import numpy as np  # noqa: E402
import openslide  # noqa: E402
import torch  # noqa: E402

from mgi.imaging.slides import READ_BLOCK_PX, plan_tiles, read_tiles  # noqa: E402
from mgi.imaging.stain import MacenkoNormaliser  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TILE_PX, MPP, TISSUE_MIN, BATCH = 224, 0.5, 0.5, 64


# Median optical density (R, G, B) of tissue pixels in the real CMU-1-Small-Region sample.
REAL_TISSUE_OD = np.array([0.357, 0.896, 0.525])


def write_slide(folder: Path, px: int) -> Path:
    """A synthetic H&E Aperio pyramid of px x px at 0.5 um/px (mgi's demo slide renderer).

    The demo renderer stains pale (median tissue OD about a tenth of a real slide's in red), so
    each channel's optical density is scaled (a lookup table) until the tissue's median matches
    the real sample's: Macenko then has as much stained tissue to work on as in a real slide.
    """
    from mgi.acquire.synthetic import render_slide, write_svs
    from mgi.imaging.tissue import tissue_mask

    rgb, _ = render_slide(np.random.default_rng(0), px)
    step = max(1, px // 2048)
    small = rgb[::step, ::step]
    pixels = small[tissue_mask(small)].astype(np.float64)
    median_od = np.median(-np.log((pixels + 1) / 240), axis=0)
    values = np.arange(256, dtype=np.float64)
    for c in range(3):
        od = -np.log((values + 1) / 240) * REAL_TISSUE_OD[c] / max(median_od[c], 1e-3)
        lut = np.clip(240 * np.exp(-od) - 1, 0, 255).round().astype(np.uint8)
        rgb[..., c] = lut[rgb[..., c]]
    path = folder / "synthetic.svs"
    write_svs(path, rgb, "synthetic")
    return path


def real_slide() -> Path | None:
    root = Path(os.environ.get("MGI_TEST_DATA", REPO.parent / "shared" / "data"))
    path = root / "wsi" / "CMU-1-Small-Region.svs"
    return path if path.is_file() else None


def tissue_cells(slide: openslide.OpenSlide, path: Path):
    plan = plan_tiles(slide, slide_path=path, tile_px=TILE_PX, mpp=MPP, mpp_fallback=None)
    return plan, np.flatnonzero(plan.fractions.ravel() >= TISSUE_MIN)


def ours(slide, plan, cells, norm: MacenkoNormaliser) -> None:
    for start in range(0, len(cells), BATCH):
        tiles = read_tiles(slide, plan, cells[start:start + BATCH], tile_px=TILE_PX)
        norm.transform(tiles)


def baseline(slide, plan, cells, per_tile) -> None:
    size0 = round(plan.size0)
    for cell in cells:
        x, y = plan.origin(cell)
        tile = slide.read_region((x, y), 0, (size0, size0)).convert("RGB")
        if size0 != TILE_PX:
            tile = tile.resize((TILE_PX, TILE_PX))
        per_tile(np.asarray(tile))


def limit(slide, plan, cells) -> None:
    per_block = max(1, READ_BLOCK_PX // plan.read_px)
    rows, cols = np.divmod(cells, plan.n_cols)
    for br, bc in sorted({(r // per_block, c // per_block) for r, c in zip(rows, cols,
                                                                               strict=True)}):
        x, y = plan.origin(br * per_block * plan.n_cols + bc * per_block)
        side = per_block * plan.read_px
        slide.read_region((x, y), plan.level, (side, side))


def per_tile_normaliser(reference: np.ndarray):
    """(name, fn(tile HWC uint8)): torchstain's Macenko if installed, else ours per tile."""
    try:
        import torchstain
    except ImportError:
        norm = MacenkoNormaliser().fit(reference)
        return "mgi MacenkoNormaliser per tile (torchstain not installed)", (
            lambda tile: norm.transform(tile.transpose(2, 0, 1)))
    from importlib.metadata import version

    theirs = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    theirs.fit(reference.transpose(1, 2, 0))

    def call(tile: np.ndarray) -> None:
        # torchstain raises on tiles without enough tissue; the loop goes on, as a pipeline would
        with contextlib.suppress(Exception):
            theirs.normalize(tile, stains=False)

    return f"torchstain {version('torchstain')} MacenkoNormalizer (numpy) per tile", call


def measure(path: Path, repeats: int) -> dict:
    torch.set_num_threads(1)
    with openslide.OpenSlide(path) as slide:
        plan, cells = tissue_cells(slide, path)
        reference = read_tiles(slide, plan, cells[len(cells) // 2:len(cells) // 2 + 1],
                               tile_px=TILE_PX)[0]
        norm = MacenkoNormaliser().fit(reference)
        name, per_tile = per_tile_normaliser(reference)
        ours(slide, plan, cells[:8], norm)  # warm-up
        times: dict[str, list[float]] = {"ours": [], "baseline": [], "limit": []}
        for r in range(repeats):
            runs = [("ours", lambda: ours(slide, plan, cells, norm)),
                    ("baseline", lambda: baseline(slide, plan, cells, per_tile))]
            for key, fn in runs if r % 2 == 0 else runs[::-1]:
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
            start = time.perf_counter()
            limit(slide, plan, cells)
            times["limit"].append(time.perf_counter() - start)
            print(f"{path.name} repeat {r + 1}: ours {times['ours'][-1]:.2f} s, baseline "
                  f"{times['baseline'][-1]:.2f} s, limit {times['limit'][-1]:.2f} s",
                  file=sys.stderr)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"ours_s": med["ours"], "baseline_s": med["baseline"], "limit_s": med["limit"],
                "n": len(cells), "baseline": name,
                "slide_px": list(slide.dimensions)}


def peak_memory(path: Path) -> dict:
    """Peak RSS (MB) of a fresh process fitting and running a whole tile_slide, and its RSS
    after the imports alone."""
    out = subprocess.run([sys.executable, __file__, "--memory-worker", str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_worker(path: Path) -> None:
    from mgi.imaging.slides import tile_slide

    torch.set_num_threads(1)
    before = peak_rss_mb()
    with openslide.OpenSlide(path) as slide:
        plan, cells = tissue_cells(slide, path)
        middle = len(cells) // 2
        reference = read_tiles(slide, plan, cells[middle:middle + 1], tile_px=TILE_PX)
    norm = MacenkoNormaliser().fit(reference)
    with tempfile.TemporaryDirectory() as tmp:
        tile_slide(image_id="s", case_id="c", slide_path=path, mask_path=None,
                   out_path=Path(tmp) / "s.h5", qc_png_path=Path(tmp) / "s.png",
                   tile_px=TILE_PX, mpp=MPP, tissue_min=TISSUE_MIN, max_tiles=None,
                   normaliser=norm)
    peak = peak_rss_mb()
    print(json.dumps({"peak_mb": peak, "imports_mb": before}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--px", type=int, default=16384, help="synthetic slide side, pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4096-px slide, one repeat")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(Path(args.memory_worker))
        return {}
    px, repeats = (4096, 1) if args.quick else (args.px, args.repeats)
    with tempfile.TemporaryDirectory(prefix="mgi_tiling_bench_") as tmp:
        start = time.perf_counter()
        path = write_slide(Path(tmp), px)
        print(f"wrote a {px} x {px} slide ({path.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        big = measure(path, repeats)
        big_peak = peak_memory(path)
    result = {
        "name": "tiling",
        "ours_s": round(big["ours_s"], 3),
        "baseline": f"read_region per tile at level 0 + {big['baseline']}",
        "baseline_s": round(big["baseline_s"], 3),
        "ratio": round(big["baseline_s"] / big["ours_s"], 2),
        "limit_s": round(big["limit_s"], 3),
        "n": big["n"],
        "unit": "tiles",
        "tile_px": TILE_PX,
        "mpp": MPP,
        "slide_px": big["slide_px"],
        "threads": 1,
        "ours_over_limit": round(big["ours_s"] / big["limit_s"], 2),
        "ours_peak_mb": round(big_peak["peak_mb"]),
        "imports_mb": round(big_peak["imports_mb"]),
        "repeats": repeats,
    }
    real = real_slide()
    if real is not None:
        small = measure(real, repeats)
        result.update(real_n=small["n"], real_ours_s=round(small["ours_s"], 3),
                      real_baseline_s=round(small["baseline_s"], 3),
                      real_ratio=round(small["baseline_s"] / small["ours_s"], 2),
                      real_limit_s=round(small["limit_s"], 3))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
