"""The cohort's STAR gene-count files (listed in the download manifest) as one AnnData matrix."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from mgi.errors import ExpressionFileError, MgiError
from mgi.expression.star import QC_ROWS, read_star_cohort
from mgi.io import atomic_path, read_tsv

log = logging.getLogger(__name__)

EXPRESSION_DATA_TYPE = "Gene Expression Quantification"
PRIMARY_TUMOR = "Primary Tumor"
MANIFEST_COLUMNS = ["id", "filename", "case_id", "data_type", "sample_type", "path"]
CLINICAL_COLUMNS = ["case_id", "project_id"]
COUNTS_COLUMN = "unstranded"
TPM_COLUMN = "tpm_unstranded"
# GENCODE version suffix; PAR_Y copies (ENSG....N_PAR_Y) keep their suffix so ids stay unique.
_VERSION = re.compile(r"\.\d+(?=(_PAR_Y)?$)")


def _drop_failed_downloads(rows: pd.DataFrame, failures_path: Path) -> pd.DataFrame:
    """The manifest rows less the files the download stage reported as failed (with a warning).

    Only files listed in download_failures.tsv are dropped; any other missing file is an error.
    """
    if not failures_path.is_file() or failures_path.stat().st_size == 0:
        return rows
    failures = pd.read_csv(failures_path, sep="\t", dtype=str, keep_default_na=False)
    if "id" not in failures.columns or failures.empty:
        return rows
    failed = rows["id"].isin(set(failures["id"]))
    for row in rows[failed].itertuples():
        log.warning("case %s: expression file %s left out, its download failed (see %s)",
                    row.case_id, row.id, failures_path)
    return rows[~failed].reset_index(drop=True)


def build_expression(
    manifest_path: str | os.PathLike[str],
    *,
    raw_dir: str | os.PathLike[str],
    clinical_path: str | os.PathLike[str] | None = None,
) -> ad.AnnData:
    """Return one expression profile per case: obs = cases, var = genes, X = raw counts.

    Files are the manifest rows with data_type "Gene Expression Quantification"; their `path`
    is relative to `raw_dir`. Where a case has several profiles, one is chosen by this rule:

    1. keep the profiles whose sample_type is "Primary Tumor"; a case with several profiles and
       none of them a primary tumour cannot be resolved (error);
    2. among those, keep the one with the most reads assigned to genes (sum of the unstranded
       counts over genes); a tie cannot be resolved (error).

    A case with a single profile keeps it whatever its sample_type (the obs column says which).
    obs (index case_id, sorted): case_id, file_id, file_name, sample_type, project_id,
    n_profiles, total_counts and the STAR QC counts (n_unmapped, n_multimapping, n_no_feature,
    n_ambiguous). var (index: gene id without version): gene_id_version, gene_name, gene_type.
    X and layers["counts"]: unstranded counts (float32); layers["tpm"]: tpm_unstranded
    (float32); uns["gene_model"]: the files' gene model (e.g. "GENCODE v36").
    """
    manifest_path = Path(manifest_path)
    raw_dir = Path(raw_dir)
    rows = _expression_rows(manifest_path)
    rows = _drop_failed_downloads(rows, manifest_path.with_name("download_failures.tsv"))
    paths = [raw_dir / p for p in rows["path"]]
    for path, file_id in zip(paths, rows["id"], strict=True):
        if not path.is_file():
            raise ExpressionFileError(
                f"{path}: file not found (manifest {manifest_path}, file id {file_id}); "
                "expected every expression file of the manifest under the raw folder"
            )

    genes, values, qc = read_star_cohort(paths, columns=(COUNTS_COLUMN, TPM_COLUMN))
    counts, tpm = values[COUNTS_COLUMN], values[TPM_COLUMN]
    rows = rows.assign(
        total_counts=counts.sum(axis=1), row=np.arange(len(rows)), **{
            col: qc[col].to_numpy() for col in QC_ROWS.values()
        }
    )
    chosen = _one_profile_per_case(rows, manifest_path)
    keep = chosen["row"].to_numpy()

    obs = pd.DataFrame(
        {
            "case_id": chosen["case_id"].to_numpy(),
            "file_id": chosen["id"].to_numpy(),
            "file_name": chosen["filename"].to_numpy(),
            "sample_type": chosen["sample_type"].to_numpy(),
            "project_id": _project_ids(chosen, rows, clinical_path),
            "n_profiles": chosen["n_profiles"].to_numpy(),
            "total_counts": chosen["total_counts"].to_numpy(),
            **{col: chosen[col].to_numpy() for col in QC_ROWS.values()},
        },
        index=pd.Index(chosen["case_id"].to_numpy(), name=None),
    )
    var = _var_table(genes, paths[0])
    x_counts = counts[keep].astype(np.float32)
    adata = ad.AnnData(
        X=x_counts,
        obs=obs,
        var=var,
        layers={"counts": x_counts.copy(), "tpm": tpm[keep].astype(np.float32)},
    )
    adata.uns["gene_model"] = genes.attrs["gene_model"]
    log.info(
        "%d cases x %d genes from %d files (%s)",
        adata.n_obs, adata.n_vars, len(rows), adata.uns["gene_model"],
    )
    return adata


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike[str]) -> Path:
    """Write `adata` to `path` atomically; return the path."""
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def _expression_rows(manifest_path: Path) -> pd.DataFrame:
    try:
        manifest = read_tsv(manifest_path, required=MANIFEST_COLUMNS)
    except ExpressionFileError:
        raise
    except MgiError as err:
        raise ExpressionFileError(str(err)) from err
    rows = manifest[manifest["data_type"] == EXPRESSION_DATA_TYPE].reset_index(drop=True)
    if rows.empty:
        raise ExpressionFileError(
            f"{manifest_path}: no rows with data_type {EXPRESSION_DATA_TYPE!r}; expected at "
            "least one expression file"
        )
    for column in ("id", "case_id", "path"):
        empty = rows[rows[column].str.strip() == ""]
        if not empty.empty:
            raise ExpressionFileError(
                f"{manifest_path}: column {column!r} is empty for file(s) "
                f"{empty['filename'].tolist()}; expected a value on every expression row"
            )
    repeated = rows["id"][rows["id"].duplicated()]
    if not repeated.empty:
        raise ExpressionFileError(
            f"{manifest_path}: file id(s) {sorted(set(repeated))} listed more than once; "
            "expected each file once"
        )
    return rows


def _one_profile_per_case(rows: pd.DataFrame, manifest_path: Path) -> pd.DataFrame:
    """One row per case (sorted by case_id), chosen by the rule in build_expression's docstring."""
    chosen = []
    for case_id, group in rows.groupby("case_id", sort=True):
        n_profiles = len(group)
        if n_profiles > 1:
            group = group[group["sample_type"] == PRIMARY_TUMOR]
            if group.empty:
                raise ExpressionFileError(
                    f"{manifest_path}: case {case_id} has {n_profiles} expression profiles "
                    f"({_describe(rows[rows['case_id'] == case_id])}) and none is a "
                    f"{PRIMARY_TUMOR!r}; cannot choose one"
                )
            top = group["total_counts"].max()
            group = group[group["total_counts"] == top]
            if len(group) > 1:
                raise ExpressionFileError(
                    f"{manifest_path}: case {case_id} has {len(group)} {PRIMARY_TUMOR!r} "
                    f"profiles with the same number of gene-assigned reads ({top}): "
                    f"{_describe(group)}; cannot choose one"
                )
            log.info(
                "case %s: %d profiles, kept %s", case_id, n_profiles, group["path"].iloc[0]
            )
        chosen.append(group.assign(n_profiles=n_profiles))
    return pd.concat(chosen, ignore_index=True)


def _describe(rows: pd.DataFrame) -> str:
    return ", ".join(
        f"{path} [{sample}]" for path, sample in zip(rows["path"], rows["sample_type"], strict=True)
    )


def _project_ids(
    chosen: pd.DataFrame, rows: pd.DataFrame, clinical_path: str | os.PathLike[str] | None
) -> np.ndarray:
    """project_id per chosen case: from the clinical table if given, else the manifest, else ''."""
    if clinical_path is None:
        if "project_id" in rows.columns:
            return chosen["project_id"].to_numpy()
        return np.full(len(chosen), "", dtype=object)
    try:
        clinical = read_tsv(clinical_path, required=CLINICAL_COLUMNS)
    except MgiError as err:
        raise ExpressionFileError(str(err)) from err
    repeated = clinical["case_id"][clinical["case_id"].duplicated()]
    if not repeated.empty:
        raise ExpressionFileError(
            f"{clinical_path}: case(s) {sorted(set(repeated))[:5]} listed more than once; "
            "expected one row per case"
        )
    projects = clinical.set_index("case_id")["project_id"]
    missing = sorted(set(chosen["case_id"]) - set(projects.index))
    if missing:
        log.warning(
            "%s: %d expression case(s) absent, project_id left empty: %s",
            clinical_path, len(missing), missing[:5],
        )
    return chosen["case_id"].map(projects).fillna("").to_numpy(dtype=object)


def _var_table(genes: pd.DataFrame, first_path: Path) -> pd.DataFrame:
    stable = genes["gene_id"].str.replace(_VERSION, "", regex=True)
    repeated = stable[stable.duplicated()]
    if not repeated.empty:
        raise ExpressionFileError(
            f"{first_path}: gene ids {sorted(set(repeated))[:5]} repeat once the version is "
            "removed; expected unique unversioned gene ids"
        )
    return pd.DataFrame(
        {
            "gene_id_version": genes["gene_id"].to_numpy(),
            "gene_name": genes["gene_name"].to_numpy(),
            "gene_type": genes["gene_type"].to_numpy(),
        },
        index=pd.Index(stable.to_numpy()),
    )
