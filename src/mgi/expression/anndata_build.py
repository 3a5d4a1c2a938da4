"""The cohort's STAR gene-count files (listed in the download manifest) as one AnnData matrix."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from mgi.acquire.gdc import EXPRESSION_DATA_TYPE, choose_primary_profiles
from mgi.errors import ConfigError, ExpressionFileError, MgiError
from mgi.expression.gtf import unversioned
from mgi.expression.matrix import read_matrix
from mgi.expression.star import QC_ROWS, read_star_cohort
from mgi.io import atomic_path, read_tsv

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["id", "filename", "case_id", "data_type", "sample_type", "path"]
CLINICAL_COLUMNS = ["case_id", "project_id"]
COUNTS_COLUMN = "unstranded"
# layer name -> STAR column it holds (the counts are always read, into X and layers["counts"])
VALUE_LAYERS = {"tpm": "tpm_unstranded", "fpkm": "fpkm_unstranded",
                "fpkm_uq": "fpkm_uq_unstranded"}
DUPLICATE_RULES = ("choose", "error")


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
    layers: Sequence[str] = ("tpm",),
    duplicates: str = "choose",
    matrix: str | os.PathLike[str] | None = None,
) -> ad.AnnData:
    """Return one expression profile per case: obs = cases, var = genes, X = raw counts.

    Files are the manifest rows with data_type "Gene Expression Quantification"; their `path`
    is relative to `raw_dir` (an absolute path, a file read in place, stays as it is). With
    `matrix` (a genes x samples matrix, `mgi.expression.matrix`) each row's `filename` names
    its sample column instead; a matrix has counts only, so `layers` are left out (logged) and
    the STAR QC counts are NaN. A case with several profiles is refused with duplicates="error";
    with "choose" the manifest's rule picks one (`mgi.acquire.gdc.choose_primary_profiles`,
    the rule the GDC query applies: never a normal-tissue profile, a primary tumour before
    other tumour samples, then the smallest sample barcode, then the smallest file id). Every
    profile or case left out is logged as a warning.

    obs (index case_id, sorted): case_id, file_id, file_name, sample_barcode, sample_type,
    project_id, n_profiles, total_counts and the STAR QC counts (n_unmapped, n_multimapping,
    n_no_feature, n_ambiguous). var (index: gene id without version): gene_id_version,
    gene_name, gene_type. X and layers["counts"]: unstranded counts (float32); one more
    float32 layer per name in `layers` (tpm, fpkm, fpkm_uq: the STAR file's *_unstranded
    column); uns["gene_model"]: the files' gene model (e.g. "GENCODE v36").
    """
    manifest_path = Path(manifest_path)
    raw_dir = Path(raw_dir)
    unknown = [name for name in layers if name not in VALUE_LAYERS]
    if unknown or duplicates not in DUPLICATE_RULES:
        raise ConfigError(
            f"build_expression: layers {list(layers)} / duplicates {duplicates!r}; expected "
            f"layers from {list(VALUE_LAYERS)} and duplicates one of {list(DUPLICATE_RULES)}"
        )
    rows = _expression_rows(manifest_path)
    rows = _drop_failed_downloads(rows, manifest_path.with_name("download_failures.tsv"))
    rows = _one_profile_per_case(rows, manifest_path, duplicates=duplicates)
    if matrix is not None:
        return _from_matrix(Path(matrix), rows, clinical_path=clinical_path, layers=layers)
    paths = [raw_dir / p for p in rows["path"]]
    for path, file_id in zip(paths, rows["id"], strict=True):
        if not path.is_file():
            raise ExpressionFileError(
                f"{path}: file not found (manifest {manifest_path}, file id {file_id}); "
                "expected every expression file of the manifest under the raw folder"
            )

    columns = {name: VALUE_LAYERS[name] for name in dict.fromkeys(layers)}
    genes, values, qc = read_star_cohort(
        paths, columns=(COUNTS_COLUMN, *columns.values()), dtype=np.float32
    )
    counts = values.pop(COUNTS_COLUMN)
    obs = _obs(rows, counts, clinical_path=clinical_path,
               qc={col: qc[col].to_numpy() for col in QC_ROWS.values()})
    adata = ad.AnnData(
        X=counts,
        obs=obs,
        var=_var_table(genes, paths[0]),
        layers={
            "counts": counts.copy(),
            **{name: values.pop(column) for name, column in columns.items()},
        },
    )
    adata.uns["gene_model"] = genes.attrs["gene_model"]
    log.info(
        "%d cases x %d genes (%s), layers %s",
        adata.n_obs, adata.n_vars, adata.uns["gene_model"], list(adata.layers),
    )
    return adata


def _obs(rows: pd.DataFrame, counts: np.ndarray, *, clinical_path: str | os.PathLike[str] | None,
         qc: dict[str, np.ndarray]) -> pd.DataFrame:
    """The cases' obs table: file and sample fields, project, total counts, STAR QC."""
    return pd.DataFrame(
        {
            "case_id": rows["case_id"].to_numpy(),
            "file_id": rows["id"].to_numpy(),
            "file_name": rows["filename"].to_numpy(),
            "sample_barcode": rows["sample_barcode"].to_numpy(),
            "sample_type": rows["sample_type"].to_numpy(),
            "project_id": _project_ids(rows, clinical_path),
            "n_profiles": rows["n_profiles"].to_numpy(),
            "total_counts": counts.sum(axis=1, dtype=np.float64),
            **qc,
        },
        index=pd.Index(rows["case_id"].to_numpy(), name=None),
    )


def _from_matrix(
    matrix: Path, rows: pd.DataFrame, *, clinical_path: str | os.PathLike[str] | None,
    layers: Sequence[str],
) -> ad.AnnData:
    """build_expression's AnnData from the matrix columns the rows' `filename` names."""
    genes, counts, gene_model = read_matrix(matrix, samples=rows["filename"].tolist())
    if layers:
        log.warning("%s: a count matrix has no %s values (no gene lengths); only the counts "
                    "are kept", matrix, list(layers))
    obs = _obs(rows, counts, clinical_path=clinical_path,  # no STAR QC rows in a matrix
               qc={col: np.full(len(rows), np.nan) for col in QC_ROWS.values()})
    adata = ad.AnnData(X=counts, obs=obs, var=_var_table(genes, matrix),
                       layers={"counts": counts.copy()})
    adata.uns["gene_model"] = gene_model
    log.info("%d cases x %d genes from matrix %s", adata.n_obs, adata.n_vars, matrix)
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


def _one_profile_per_case(
    rows: pd.DataFrame, manifest_path: Path, *, duplicates: str
) -> pd.DataFrame:
    """One row per case (sorted by case_id) with its n_profiles; see build_expression."""
    rows = rows.assign(n_profiles=rows.groupby("case_id")["id"].transform("size"))
    if "sample_barcode" not in rows.columns:
        rows = rows.assign(sample_barcode="")
    several = rows[rows["n_profiles"] > 1]
    if duplicates == "error" and not several.empty:
        case_id = sorted(several["case_id"])[0]
        group = several[several["case_id"] == case_id]
        raise ExpressionFileError(
            f"{manifest_path}: case {case_id} has {len(group)} expression profiles "
            f"({_describe(group)}) and expression.duplicate_profiles is 'error'; expected one "
            f"per case ({several['case_id'].nunique()} case(s) have several)"
        )
    chosen = choose_primary_profiles(rows)
    for row in rows[~rows["id"].isin(chosen["id"])].itertuples():
        log.warning("case %s: expression file %s (%s, sample %s) left out by the one-profile-"
                    "per-case rule", row.case_id, row.path, row.sample_type, row.sample_barcode)
    lost = sorted(set(rows["case_id"]) - set(chosen["case_id"]))
    if lost:
        log.warning("%d case(s) have only normal-tissue expression profiles and are left out: "
                    "%s", len(lost), lost[:10])
    return chosen.sort_values("case_id", ignore_index=True)


def _describe(rows: pd.DataFrame) -> str:
    return ", ".join(
        f"{path} [{sample}]" for path, sample in zip(rows["path"], rows["sample_type"], strict=True)
    )


def _project_ids(
    chosen: pd.DataFrame, clinical_path: str | os.PathLike[str] | None
) -> np.ndarray:
    """project_id per chosen case: from the clinical table if given, else the manifest, else ''."""
    if clinical_path is None:
        if "project_id" in chosen.columns:
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
    stable = unversioned(genes["gene_id"])
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
