"""How fast a cohort of GDC STAR gene-count files becomes the expression AnnData, and its memory.

Ours: `mgi.expression.anndata_build.build_expression` (the `expression_matrix` rule: manifest,
pyarrow reader, one file per thread, every check, counts + TPM layers). Baseline:
`pandas.read_csv` per file and `pandas.concat` of the columns, then the same AnnData: the idiom
most TCGA expression scripts use, and the fair one to beat. limit_s: reading the files' bytes
alone, the floor for any parser.

The script writes N full-size files first (GDC layout, 60,660 gene rows and 4 QC rows, nine
columns, floats as the GDC prints them). Each timed run is a fresh Python process (imports done
before the clock starts), so that its peak resident memory (VmHWM, reported above the
process's size after imports) belongs to that run alone. Runs alternate and repeat; medians are
kept. Both must give the same matrices (checksums compared). `--quick`: 40 files. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _memory import peak_rss_mb

HEADER = [
    "gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
    "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded",
]
QC_NAMES = ["N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"]
GDC_GENES = 60_660  # gene rows of a GENCODE v36 augmented STAR file


def write_cohort(folder: Path, n_files: int, n_genes: int, *, seed: int = 0) -> Path:
    """Write n_files STAR files in the GDC layout and their manifest; return the manifest."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    ids = pa.array([f"ENSG{i:011d}.{i % 20 + 1}" for i in range(n_genes)])
    names = pa.array([f"GENE{i}" for i in range(n_genes)])
    types = pa.array(np.where(np.arange(n_genes) % 3 == 0, "lncRNA", "protein_coding"))
    means = rng.gamma(0.5, 200.0, size=n_genes)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    rows = ["id\tfilename\tmd5\tsize\tstate\tcase_id\tdata_type\tsample_type\tpath"]
    for k in range(n_files):
        counts = rng.poisson(means * rng.uniform(0.5, 2.0))
        tpm = np.round(counts / max(counts.sum(), 1) * 1e6, 4)  # the GDC prints '%.4f'
        body = pa.table(
            [ids, names, types, counts, counts // 2, counts - counts // 2, tpm,
             np.round(tpm / 7, 4), np.round(tpm / 3, 4)],
            names=HEADER,
        )
        head = "".join(f"{name}\t\t\t{1000 + k}\t1000\t1000\t\t\t\n" for name in QC_NAMES)
        file_id = f"file-{k:04d}"
        rel = f"expression/{file_id}/{file_id}.rna_seq.augmented_star_gene_counts.tsv"
        path = folder / rel
        path.parent.mkdir(parents=True)
        with open(path, "wb") as fh:
            fh.write(f"# gene-model: GENCODE v36\n{chr(9).join(HEADER)}\n{head}".encode())
            pacsv.write_csv(body, fh, write_options=options)
        rows.append(f"{file_id}\t{path.name}\t{'0' * 32}\t0\treleased\tTCGA-XX-{k:04d}\t"
                    f"Gene Expression Quantification\tPrimary Tumor\t{rel}")
    manifest = folder / "manifest.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


# --- the two contenders (run in a worker process) ---------------------------------------------


def ours(manifest: Path):
    """The pipeline's own path: manifest -> AnnData (counts X and layer, TPM layer)."""
    from mgi.expression.anndata_build import build_expression

    return build_expression(manifest, raw_dir=manifest.parent, layers=("tpm",))


def baseline(manifest: Path):
    """pandas.read_csv per file, QC rows dropped, columns concatenated, then the AnnData."""
    import anndata as ad
    import pandas as pd

    table = pd.read_csv(manifest, sep="\t", dtype=str)
    counts, tpm, genes = [], [], None
    for case_id, rel in zip(table["case_id"], table["path"], strict=True):
        frame = pd.read_csv(manifest.parent / rel, sep="\t", skiprows=1, index_col="gene_id",
                            usecols=["gene_id", "gene_name", "gene_type", "unstranded",
                                     "tpm_unstranded"])
        frame = frame.drop(index=QC_NAMES)
        genes = frame[["gene_name", "gene_type"]] if genes is None else genes
        counts.append(frame["unstranded"].rename(case_id))
        tpm.append(frame["tpm_unstranded"].rename(case_id))
    counts_frame = pd.concat(counts, axis=1).T  # aligned on gene id, as the idiom does
    tpm_frame = pd.concat(tpm, axis=1).T
    var = genes.set_axis(genes.index.str.replace(r"\.\d+$", "", regex=True))
    x = counts_frame.to_numpy(dtype=np.float32)
    return ad.AnnData(
        X=x,
        obs=pd.DataFrame(index=counts_frame.index),
        var=var,
        layers={"counts": x.copy(), "tpm": tpm_frame.to_numpy(dtype=np.float32)},
    )


def read_bytes(manifest: Path) -> int:
    """Every file's bytes, nothing parsed: the floor."""
    import pandas as pd

    paths = pd.read_csv(manifest, sep="\t", dtype=str)["path"]
    return sum(len((manifest.parent / p).read_bytes()) for p in paths)


def checksum(adata) -> str:
    """Digest of the matrices and gene ids (equal answers give equal digests)."""
    digest = hashlib.sha256()
    for matrix in (adata.X, adata.layers["tpm"]):
        digest.update(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
    digest.update("\n".join(adata.var_names).encode())
    digest.update("\n".join(adata.obs_names).encode())
    return digest.hexdigest()[:16]


def worker(which: str, manifest: Path) -> None:
    """Run one contender once; print seconds, peak memory above the imports, and a checksum."""
    import anndata  # noqa: F401  (imports before the clock and the memory baseline)
    import pandas  # noqa: F401

    import mgi.expression.anndata_build  # noqa: F401

    before = peak_rss_mb()
    start = time.perf_counter()
    if which == "limit":
        read_bytes(manifest)
        digest = ""
    else:
        result = (ours if which == "ours" else baseline)(manifest)
        digest = checksum(result)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "peak_mb": peak - before,
                      "checksum": digest}))


def run_worker(which: str, manifest: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", which, str(manifest)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 files instead of 200")
    parser.add_argument("--files", type=int, default=None, help="number of files")
    parser.add_argument("--genes", type=int, default=GDC_GENES, help="gene rows per file")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    parser.add_argument("--worker", nargs=2, metavar=("WHICH", "MANIFEST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return {}
    n_files = args.files or (40 if args.quick else 200)

    with tempfile.TemporaryDirectory(prefix="mgi_expression_bench_") as tmp:
        start = time.perf_counter()
        manifest = write_cohort(Path(tmp), n_files, args.genes)
        print(f"wrote {n_files} files of {args.genes} genes in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        runs: dict[str, list[dict]] = {"ours": [], "baseline": [], "limit": []}
        for r in range(args.repeats):
            order = ["ours", "baseline"] if r % 2 == 0 else ["baseline", "ours"]
            for which in [*order, "limit"]:
                runs[which].append(run_worker(which, manifest))
            print(f"repeat {r + 1}: ours {runs['ours'][-1]['seconds']:.2f} s "
                  f"({runs['ours'][-1]['peak_mb']:.0f} MB), baseline "
                  f"{runs['baseline'][-1]['seconds']:.2f} s "
                  f"({runs['baseline'][-1]['peak_mb']:.0f} MB)", file=sys.stderr)

    digests = {run["checksum"] for which in ("ours", "baseline") for run in runs[which]}
    if len(digests) != 1:
        raise SystemExit(f"ours and the baseline disagree (checksums {sorted(digests)})")

    def median(which: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[which])

    ours_s, baseline_s = median("ours", "seconds"), median("baseline", "seconds")
    result = {
        "name": "expression",
        "ours_s": round(ours_s, 3),
        "baseline": "pandas.read_csv per file + pandas.concat -> AnnData",
        "baseline_s": round(baseline_s, 3),
        "ratio": round(baseline_s / ours_s, 2),
        "limit_s": round(median("limit", "seconds"), 3),
        "n": n_files,
        "unit": "files",
        "genes_per_file": args.genes,
        "ours_peak_mb": round(median("ours", "peak_mb")),
        "baseline_peak_mb": round(median("baseline", "peak_mb")),
        "repeats": args.repeats,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
