"""How fast a cohort of GDC STAR gene-count files becomes count and TPM matrices.

Ours: `mgi.expression.star.read_star_cohort` (pyarrow.csv, one file per thread, with the
reader's validation). Baseline: `pandas.read_csv` per file in a loop, keeping the same two
columns, dropping the four QC rows and stacking the matrices: the idiom most expression
pipelines use, and the reader this one replaces, so it is the fair one to beat. limit_s: reading
the files' bytes alone, the floor for any parser.

Both run on the same synthetic files (GDC layout, ~20k genes each), alternating, repeated; the
median is kept. `--quick` uses 40 files instead of 200. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from mgi.expression.star import read_star_cohort

HEADER = [
    "gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
    "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded",
]
QC_NAMES = ["N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"]
COLUMNS = ("unstranded", "tpm_unstranded")


def write_files(folder: Path, n_files: int, n_genes: int, *, seed: int = 0) -> list[Path]:
    """Write n_files STAR gene-count files in the GDC layout; return their paths."""
    rng = np.random.default_rng(seed)
    ids = pa.array([f"ENSG{i:011d}.{i % 20 + 1}" for i in range(n_genes)])
    names = pa.array([f"GENE{i}" for i in range(n_genes)])
    types = pa.array(np.where(np.arange(n_genes) % 3 == 0, "lncRNA", "protein_coding"))
    means = rng.gamma(0.5, 200.0, size=n_genes)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    paths = []
    for k in range(n_files):
        counts = rng.poisson(means * rng.uniform(0.5, 2.0))
        tpm = counts / max(counts.sum(), 1) * 1e6
        body = pa.table(
            [ids, names, types, counts, counts // 2, counts - counts // 2, tpm, tpm / 7, tpm / 3],
            names=HEADER,
        )
        head = "".join(f"{name}\t\t\t{1000 + k}\t1000\t1000\t\t\t\n" for name in QC_NAMES)
        path = folder / f"{k:04d}.rna_seq.augmented_star_gene_counts.tsv"
        with open(path, "wb") as fh:
            fh.write(f"# gene-model: GENCODE v36\n{chr(9).join(HEADER)}\n{head}".encode())
            pacsv.write_csv(body, fh, write_options=options)
        paths.append(path)
    return paths


def ours(paths: list[Path]) -> dict[str, np.ndarray]:
    return read_star_cohort(paths, columns=COLUMNS)[1]


def baseline(paths: list[Path]) -> dict[str, np.ndarray]:
    """pandas.read_csv per file: same columns, QC rows dropped, same gene order checked."""
    stacks: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    first_ids = None
    for path in paths:
        frame = pd.read_csv(path, sep="\t", skiprows=1, usecols=["gene_id", *COLUMNS])
        frame = frame[~frame["gene_id"].isin(QC_NAMES)]
        ids = frame["gene_id"].to_numpy()
        if first_ids is None:
            first_ids = ids
        elif not np.array_equal(ids, first_ids):
            raise ValueError(f"{path}: gene ids differ")
        for c in COLUMNS:
            stacks[c].append(frame[c].to_numpy())
    return {c: np.stack(v) for c, v in stacks.items()}


def read_bytes(paths: list[Path]) -> int:
    return sum(len(p.read_bytes()) for p in paths)


def timed(fn, paths) -> float:
    start = time.perf_counter()
    fn(paths)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 files instead of 200")
    parser.add_argument("--files", type=int, default=None, help="number of files")
    parser.add_argument("--genes", type=int, default=20_000, help="genes per file")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each")
    args = parser.parse_args(argv)
    n_files = args.files or (40 if args.quick else 200)
    repeats = args.repeats or 3

    with tempfile.TemporaryDirectory(prefix="star_reader_") as tmp:
        start = time.perf_counter()
        paths = write_files(Path(tmp), n_files, args.genes)
        print(f"wrote {n_files} files of {args.genes} genes in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

        # Same answer first (this also warms the page cache for both).
        a, b = ours(paths), baseline(paths)
        for c in COLUMNS:
            np.testing.assert_allclose(a[c], b[c])

        times: dict[str, list[float]] = {"ours": [], "baseline": [], "limit": []}
        for r in range(repeats):
            # Alternate which goes first so neither always runs on a warmer machine.
            order = [("ours", ours), ("baseline", baseline)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                times[name].append(timed(fn, paths))
            times["limit"].append(timed(read_bytes, paths))
            print(f"repeat {r + 1}: ours {times['ours'][-1]:.3f} s, "
                  f"baseline {times['baseline'][-1]:.3f} s", file=sys.stderr)

    ours_s = statistics.median(times["ours"])
    baseline_s = statistics.median(times["baseline"])
    result = {
        "name": "star_reader",
        "ours_s": round(ours_s, 4),
        "baseline": "pandas.read_csv per file",
        "baseline_s": round(baseline_s, 4),
        "ratio": round(baseline_s / ours_s, 2),
        "limit_s": round(statistics.median(times["limit"]), 4),
        "n": n_files,
        "unit": "files",
        "genes_per_file": args.genes,
        "repeats": repeats,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
