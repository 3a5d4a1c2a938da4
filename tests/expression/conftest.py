"""Expression test fixtures: STAR gene-count files in the GDC layout, and cohorts of them."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADER = [
    "gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
    "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded",
]
QC_NAMES = ["N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"]
MANIFEST_COLUMNS = [
    "id", "filename", "md5", "size", "state", "case_id", "data_type", "sample_type", "path",
    "sample_barcode",
]


def make_genes(n: int, *, types: Sequence[str] = ("protein_coding", "lncRNA")) -> pd.DataFrame:
    """Return n genes with versioned GENCODE-like ids (ascending), names and cycling types."""
    return pd.DataFrame(
        {
            "gene_id": [f"ENSG{i + 1:011d}.{i % 7 + 1}" for i in range(n)],
            "gene_name": [f"GENE{i + 1}" for i in range(n)],
            "gene_type": [types[i % len(types)] for i in range(n)],
        }
    )


def star_text(
    genes: pd.DataFrame,
    counts: Sequence[int] | np.ndarray,
    *,
    tpm: Sequence[float] | np.ndarray | None = None,
    gene_model: str | None = "GENCODE v36",
    qc: Sequence[int] = (1000, 2000, 3000, 400),
) -> str:
    """Return a STAR gene-count file in the exact GDC layout (TPM from counts if not given)."""
    counts = np.asarray(counts)
    if tpm is None:
        total = counts.sum()
        tpm = counts / total * 1e6 if total else np.zeros(len(counts))
    lines = [] if gene_model is None else [f"# gene-model: {gene_model}"]
    lines.append("\t".join(HEADER))
    for name, value in zip(QC_NAMES, qc, strict=True):
        lines.append(f"{name}\t\t\t{value}\t{value}\t{value}\t\t\t")
    for (gid, gname, gtype), c, t in zip(
        genes[["gene_id", "gene_name", "gene_type"]].itertuples(index=False), counts, tpm,
        strict=True,
    ):
        fpkm = f"{t / 6:.6f}\t{t / 3:.6f}"
        lines.append(f"{gid}\t{gname}\t{gtype}\t{c}\t0\t{c}\t{float(t)!r}\t{fpkm}")
    return "\n".join(lines) + "\n"


def write_star_file(path: Path, genes: pd.DataFrame, counts, **kwargs) -> Path:
    """Write a STAR gene-count file (gzip if the name ends in .gz); return the path."""
    text = star_text(genes, counts, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)
    return path


@pytest.fixture
def write_star() -> Callable[..., Path]:
    """write_star(path, genes, counts, *, tpm=None, gene_model=..., qc=...) -> path."""
    return write_star_file


@pytest.fixture
def genes() -> pd.DataFrame:
    """Twelve genes, alternately protein_coding and lncRNA."""
    return make_genes(12)


def synthetic_counts(n_cases: int, n_genes: int, *, seed: int = 0) -> np.ndarray:
    """Return (n_cases, n_genes) integer counts: per-gene means times per-case depth, Poisson."""
    rng = np.random.default_rng(seed)
    means = rng.gamma(0.6, 60.0, size=n_genes)
    depth = rng.uniform(0.5, 2.0, size=(n_cases, 1))
    return rng.poisson(means * depth).astype(np.int64)


def write_cohort(
    raw_dir: Path,
    genes: pd.DataFrame,
    counts: np.ndarray,
    *,
    case_ids: Sequence[str] | None = None,
    sample_types: Sequence[str] | None = None,
    sample_barcodes: Sequence[str] | None = None,
    extra_rows: Sequence[dict] = (),
) -> Path:
    """Write one STAR file per row of `counts` and the manifest listing them; return it."""
    n = len(counts)
    case_ids = list(case_ids or [f"case-{i:03d}" for i in range(n)])
    sample_types = list(sample_types or ["Primary Tumor"] * n)
    sample_barcodes = list(sample_barcodes or [f"{c}-01A" for c in case_ids])
    rows = []
    for i in range(n):
        file_id = f"file-{i:03d}"
        filename = f"{file_id}.rna_seq.augmented_star_gene_counts.tsv"
        rel = f"expression/{file_id}/{filename}"
        write_star_file(raw_dir / rel, genes, counts[i])
        rows.append(
            {
                "id": file_id, "filename": filename, "md5": "0" * 32, "size": "1",
                "state": "released", "case_id": case_ids[i],
                "data_type": "Gene Expression Quantification",
                "sample_type": sample_types[i], "path": rel,
                "sample_barcode": sample_barcodes[i],
            }
        )
    rows.extend(extra_rows)
    manifest = raw_dir / "manifest.tsv"
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(manifest, sep="\t", index=False)
    return manifest


@pytest.fixture
def gdc_sample() -> Path:
    """The real GDC STAR-counts sample (96 genes) from MGI_TEST_DATA; skip if absent."""
    root = Path(os.environ.get("MGI_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = root / "gdc" / "gdc-rnaseq-tool_test_set_1.final.tsv.gz"
    if not path.is_file():
        pytest.skip(f"real GDC sample not found at {path} (set MGI_TEST_DATA to the test data)")
    return path


@pytest.fixture
def gene_table() -> Callable[..., pd.DataFrame]:
    """gene_table(n, *, types=...) -> genes (see make_genes)."""
    return make_genes


@pytest.fixture
def counts_matrix() -> Callable[..., np.ndarray]:
    """counts_matrix(n_cases, n_genes, *, seed=0) -> integer counts (see synthetic_counts)."""
    return synthetic_counts


@pytest.fixture
def cohort_writer() -> Callable[..., Path]:
    """cohort_writer(raw_dir, genes, counts, *, case_ids, sample_types, sample_barcodes,
    extra_rows) -> manifest."""
    return write_cohort
