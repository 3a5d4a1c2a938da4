"""A genes x samples count matrix (sources.local.matrix): TSV/CSV or .h5ad, read by sample.

TSV/CSV (gzip allowed; CSV by a `.csv` or `.csv.gz` name): gene ids in the first column, one
column per sample; optional `gene_name` and `gene_type` columns annotate the genes. `.h5ad`:
samples as obs, genes as var (var columns gene_name, gene_type if it has them); the counts are
layers["counts"] when present, else X.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from mgi.errors import ExpressionFileError

ANNOTATION_COLUMNS = ("gene_name", "gene_type")


def _is_h5ad(path: Path) -> bool:
    return path.name.lower().endswith(".h5ad")


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    sep = "," if name.endswith((".csv", ".csv.gz")) else "\t"
    try:
        table = pd.read_csv(path, sep=sep, index_col=0, comment="#")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ExpressionFileError(f"{path}: not a genes x samples table ({err})") from err
    table.index = table.index.astype(str)
    table.columns = [str(c) for c in table.columns]
    return table


def matrix_samples(path: str | os.PathLike[str]) -> list[str]:
    """The sample names of the matrix (its columns, or the h5ad's obs names)."""
    path = Path(path)
    if _is_h5ad(path):
        try:
            return [str(n) for n in ad.read_h5ad(path, backed="r").obs_names]
        except (OSError, KeyError, ValueError) as err:
            raise ExpressionFileError(f"{path}: not a readable .h5ad file ({err})") from err
    header = _read_table(path).columns
    return [c for c in header if c not in ANNOTATION_COLUMNS]


def read_matrix(
    path: str | os.PathLike[str], *, samples: list[str]
) -> tuple[pd.DataFrame, np.ndarray, str]:
    """(genes: gene_id, gene_name, gene_type; counts: (len(samples), n_genes) float32; the
    gene model, '' if unknown) of the given samples, in their order."""
    path = Path(path)
    if _is_h5ad(path):
        adata = ad.read_h5ad(path)
        absent = [s for s in samples if s not in adata.obs_names]
        if absent:
            raise ExpressionFileError(f"{path}: no sample(s) {absent[:5]} among its obs")
        sub = adata[samples]
        values = sub.layers.get("counts", sub.X)
        counts = values.toarray() if sp.issparse(values) else np.asarray(values)
        var = adata.var
        genes = pd.DataFrame({"gene_id": adata.var_names.astype(str)})
        model = str(adata.uns.get("gene_model", ""))
    else:
        table = _read_table(path)
        absent = [s for s in samples if s not in table.columns]
        if absent:
            raise ExpressionFileError(f"{path}: no column(s) {absent[:5]}; expected a column "
                                      "per sample")
        var = table
        frame = table[samples]
        bad = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if bad:
            raise ExpressionFileError(f"{path}: column {bad[0]!r} is not numeric; expected "
                                      "counts (numbers) in every sample column")
        counts = frame.to_numpy(dtype=np.float64).T
        genes = pd.DataFrame({"gene_id": table.index.to_numpy()})
        model = ""
    for column in ANNOTATION_COLUMNS:
        genes[column] = (var[column].astype(str).to_numpy() if column in var.columns else "")
    counts = np.asarray(counts, dtype=np.float64)
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ExpressionFileError(f"{path}: missing, infinite or negative values among the "
                                  f"counts of samples {samples[:5]}; expected counts >= 0")
    return genes, counts.astype(np.float32), model
