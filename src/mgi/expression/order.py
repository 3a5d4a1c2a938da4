"""Which genes make a sequence, in which order: normalisation, gene selection and ordering.

Everything that is fitted (the genes kept, their non-zero medians, the highly-variable genes)
is fitted on the training cases only; applying it to a case uses that case's values alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from mgi.errors import ConfigError, ExpressionFileError
from mgi.expression.gtf import genomic_order, unversioned
from mgi.options import ExpressionOptions

log = logging.getLogger(__name__)

CPM_TARGET = 1e6
# expression.normalize -> the AnnData layer it reads (log1p_cpm reads the counts)
LAYER_OF = {"log1p_cpm": "counts", "tpm": "tpm", "fpkm_uq": "fpkm_uq"}


def normalised(
    adata: ad.AnnData, *, method: str, genes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (linear, log1p) values per case x gene: CPM (scanpy), or the TPM or FPKM-UQ layer.

    Library sizes are over all genes; `genes` (var positions) then picks the columns returned.
    Each case is scaled by its own library size (a fixed target, never a cohort median), so a
    case's values do not depend on the other cases.
    """
    import scanpy as sc  # here, not at the top: training jobs read sequences without it (2 s)

    if method == "log1p_cpm":
        counts = ad.AnnData(X=np.asarray(_counts(adata), dtype=np.float64))
        sc.pp.normalize_total(counts, target_sum=CPM_TARGET)
        linear = counts.X
    elif method in ("tpm", "fpkm_uq"):
        layer = LAYER_OF[method]
        if layer not in adata.layers:
            raise ExpressionFileError(
                f"expression matrix: no {layer!r} layer; expected one for expression.normalize "
                f"{method!r} (the expression_matrix rule reads it when that is configured)"
            )
        linear = np.asarray(_dense(adata.layers[layer]), dtype=np.float64)
    else:
        raise ConfigError(f"expression.normalize: {method!r}; expected one of {list(LAYER_OF)}")
    if genes is not None:
        linear = linear[:, genes]
    return linear, sc.pp.log1p(linear.copy())


class GeneOrder:
    """Gene selection and per-case gene order, fitted on the training cases (fit / transform).

    Fitted attributes: `genes_` (positions in var of the selected genes, sorted by gene id: the
    vocabulary order), `medians_` (non-zero train median of each selected gene's linear value),
    `fixed_` (for orders "fixed" and "genomic": indices into `genes_`, in sequence order) and
    `hvg_` (the scanpy table of the highly-variable-gene fit, or None).
    """

    def __init__(self, config: ExpressionOptions) -> None:
        self.config = config

    def fit(
        self,
        train: ad.AnnData,
        *,
        positions: pd.DataFrame | None = None,
        gene_list: list[str] | None = None,
    ) -> GeneOrder:
        """Fit gene selection, medians and the fixed order on `train`; return self.

        `positions` (read_gene_positions: chromosome and start by unversioned gene id) is
        required by order "genomic"; genes it lacks are left out, with a warning. `gene_list`
        (ids or names) restricts the genes and, for order "fixed", gives their order.

        Orders "fixed" and "genomic" give every case the same genes, so at most seq_len - 1
        of them are kept: by normalised dispersion with n_hvg, by list order with a gene list
        (fixed), else by mean train log1p value (descending); "genomic" then sorts those by
        chromosome and start.
        """
        cfg = self.config
        if train.n_obs == 0:
            raise ExpressionFileError("gene sequences: no training cases; expected at least one")
        if "gene_type" not in train.var.columns:
            raise ExpressionFileError("expression matrix: var has no 'gene_type' column")
        candidate = np.ones(train.n_vars, dtype=bool)
        if cfg.gene_types:
            candidate &= train.var["gene_type"].isin(cfg.gene_types).to_numpy()
        listed = None
        if gene_list is not None:
            listed = _list_positions(train.var, gene_list)
            in_list = np.zeros(train.n_vars, dtype=bool)
            in_list[listed] = True
            candidate &= in_list
        if cfg.order == "genomic":
            if positions is None:
                raise ConfigError(
                    "expression.order 'genomic' needs gene positions (a GENCODE GTF); none given"
                )
            located = train.var_names.isin(positions.index)
            unplaced = int((candidate & ~located).sum())
            if unplaced:
                log.warning("%d candidate gene(s) have no 'gene' record in the GTF; left out "
                            "of the genomic order", unplaced)
            candidate &= located
        expressed = (_counts(train) > 0).mean(axis=0)
        candidate &= expressed >= cfg.min_fraction_expressed
        linear, logged = normalised(train, method=cfg.normalize, genes=np.flatnonzero(candidate))
        positive = (linear > 0).any(axis=0)  # a median needs one expressing train case
        positions_kept = np.flatnonzero(candidate)[positive]
        linear, logged = linear[:, positive], logged[:, positive]
        if positions_kept.size == 0:
            raise ExpressionFileError(
                f"gene sequences: no gene of type {list(cfg.gene_types)} is expressed in "
                f">= {cfg.min_fraction_expressed:.0%} of the {train.n_obs} training cases"
                + (" among the genes of expression.gene_list" if gene_list is not None else "")
            )

        # `chosen` indexes the candidate columns of linear / logged, in priority order.
        self.hvg_ = None
        if cfg.n_hvg is not None:
            chosen = self._highly_variable(train, logged, positions_kept)
        elif listed is not None and cfg.order == "fixed":
            rank_in_list = {pos: i for i, pos in enumerate(listed)}
            chosen = np.argsort([rank_in_list[p] for p in positions_kept], kind="stable")
        elif cfg.order in ("fixed", "genomic"):
            chosen = np.argsort(-logged.mean(axis=0), kind="stable")
        else:
            chosen = np.arange(positions_kept.size)
        if cfg.order in ("fixed", "genomic"):
            if chosen.size > cfg.seq_len - 1:
                log.info("%d genes selected; the first %d (by priority) fit in a sequence",
                         chosen.size, cfg.seq_len - 1)
            chosen = chosen[: cfg.seq_len - 1]
        if cfg.order == "genomic":
            ids = train.var_names[positions_kept[chosen]]
            along = genomic_order(positions.loc[ids]).to_numpy()
            chosen = chosen[np.argsort(along, kind="stable")]
        ids = train.var_names.to_numpy()[positions_kept[chosen]].astype(str)
        by_id = np.argsort(ids, kind="stable")
        self.genes_ = positions_kept[chosen[by_id]]
        self.fixed_ = np.argsort(by_id, kind="stable")  # sequence order -> vocabulary index
        lin = linear[:, chosen[by_id]]
        self.medians_ = np.nanmedian(np.where(lin > 0, lin, np.nan), axis=0)
        log.info(
            "%d genes selected from %d (%d training cases)",
            self.genes_.size, train.n_vars, train.n_obs,
        )
        return self

    def expression(self, adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
        """Return (linear, log1p) values of the selected genes, columns in vocabulary order."""
        return normalised(adata, method=self.config.normalize, genes=self.genes_)

    def transform(self, linear: np.ndarray) -> np.ndarray:
        """Return (n_cases, seq_len - 1) vocabulary indices in sequence order, -1 for padding.

        rank: genes by value / train median, descending; zero values dropped; ties in gene-id
        order (Geneformer's rank-value encoding). fixed and genomic: the fitted order for every
        case, unexpressed genes included (their value says 0).
        """
        n_cases, width = linear.shape[0], self.config.seq_len - 1
        if self.config.order in ("fixed", "genomic"):
            row = np.full(width, -1, dtype=np.int64)
            row[: self.fixed_.size] = self.fixed_
            return np.tile(row, (n_cases, 1))
        score = linear / self.medians_
        ranked = np.argsort(-score, axis=1, kind="stable")[:, :width]
        kept = np.take_along_axis(score, ranked, axis=1) > 0
        out = np.full((n_cases, width), -1, dtype=np.int64)
        out[:, : ranked.shape[1]] = np.where(kept, ranked, -1)
        return out

    def _highly_variable(
        self, train: ad.AnnData, logged: np.ndarray, positions: np.ndarray
    ) -> np.ndarray:
        """Top-n highly-variable genes, as columns of `logged` (scanpy, flavor seurat, train).

        `logged` holds the train values of the genes at var `positions`. Returned by normalised
        dispersion, descending (ties in var order); scanpy may flag more than n where
        dispersions tie at the cut, so the list is cut at n.
        """
        import scanpy as sc  # as in normalised

        n_top = min(self.config.n_hvg, positions.size)
        data = ad.AnnData(X=logged, var=pd.DataFrame(index=train.var_names[positions]))
        data.uns["log1p"] = {"base": None}  # values are natural-log log1p already
        table = sc.pp.highly_variable_genes(
            data, flavor="seurat", n_top_genes=n_top, inplace=False
        )
        self.hvg_ = table
        flagged = np.flatnonzero(table["highly_variable"].to_numpy())
        dispersion = table["dispersions_norm"].to_numpy()[flagged]
        order = flagged[np.argsort(-np.nan_to_num(dispersion, nan=-np.inf), kind="stable")]
        return order[:n_top]


def read_gene_list(path: str | os.PathLike[str]) -> list[str]:
    """Genes of a list file: one gene id (version optional) or name per line, first column.

    Blank lines and lines starting with '#' are skipped; so is a first line `gene_id` or
    `gene_name` (a TSV header).
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ExpressionFileError(f"{path}: cannot read the gene list ({err})") from err
    entries = [line.split("\t")[0].strip() for line in lines]
    entries = [e for e in entries if e and not e.startswith("#")]
    if entries and entries[0] in ("gene_id", "gene_name"):
        entries = entries[1:]
    if not entries:
        raise ExpressionFileError(f"{path}: no gene in the list; expected one id or name per line")
    return entries


def _list_positions(var: pd.DataFrame, entries: list[str]) -> list[int]:
    """Positions in var of the listed genes, in list order (ids first, else names; once each)."""
    by_id = {gene: i for i, gene in enumerate(var.index.astype(str))}
    by_name: dict[str, list[int]] = {}
    if "gene_name" in var.columns:
        for i, name in enumerate(var["gene_name"].astype(str)):
            by_name.setdefault(name, []).append(i)
    found, absent = [], []
    for entry, gene_id in zip(entries, unversioned(pd.Series(entries)), strict=True):
        if gene_id in by_id:
            found.append(by_id[gene_id])
        elif len(by_name.get(entry, [])) == 1:
            found.append(by_name[entry][0])
        elif entry in by_name:
            raise ExpressionFileError(
                f"expression.gene_list: name {entry!r} matches {len(by_name[entry])} genes; "
                "expected a unique name, or give the gene id"
            )
        else:
            absent.append(entry)
    if absent:
        log.warning("expression.gene_list: %d of %d gene(s) not in the expression matrix, "
                    "e.g. %s", len(absent), len(entries), absent[:5])
    return list(dict.fromkeys(found))


def _counts(adata: ad.AnnData) -> np.ndarray:
    return _dense(adata.layers.get("counts", adata.X))


def _dense(matrix: Any) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
