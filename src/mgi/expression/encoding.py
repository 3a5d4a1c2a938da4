"""The fitted gene-sequence encoding: everything build_sequences fits on the train cases, saved.

A `SequenceEncoding` turns any case's expression profile into the token and value sequence the
trained networks read, without the training cohort: the genes in vocabulary order, their train
medians (rank order), the fixed or genomic order, the value scales (continuous, z-score) and the
options. Saved as one .npz file with a JSON header (`encoding.npz`, same fit, same bytes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anndata as ad
import numpy as np
import pandas as pd

from mgi.errors import ExpressionFileError
from mgi.expression.gtf import unversioned
from mgi.expression.order import GeneOrder, normalised
from mgi.io import atomic_path
from mgi.options import ExpressionOptions, as_dict, build

log = logging.getLogger(__name__)

ENCODING_VERSION = 1
ENSEMBL_ID = re.compile(r"ENS[A-Z]*G\d+(\.\d+)?(_PAR_Y)?")
ARRAYS = ("gene_id", "gene_name", "medians", "fixed", "gene_mean", "gene_std", "chromosome",
          "start")


@dataclass(frozen=True, eq=False)
class SequenceEncoding:
    """The fit of a cohort's gene sequences (arrays in vocabulary order: sorted gene ids).

    `fixed`: orders fixed / genomic, vocabulary indices in sequence order (empty for rank);
    `chromosome` / `start`: the genes' positions where order genomic was fitted (else empty).
    """

    config: ExpressionOptions
    gene_ids: np.ndarray  # (G,) str, unversioned as in the expression matrix
    gene_names: np.ndarray  # (G,) str
    medians: np.ndarray  # (G,) float64: non-zero train median of each gene's linear value
    fixed: np.ndarray  # (F,) int64
    scale: float  # values continuous: std of every train log1p value
    gene_mean: np.ndarray  # (G,) float64: values zscore, train log1p mean
    gene_std: np.ndarray  # (G,) float64: values zscore, train log1p std (0 taken as 1)
    gene_model: str = ""
    chromosome: np.ndarray | None = None
    start: np.ndarray | None = None
    version: int = ENCODING_VERSION

    @classmethod
    def fit(cls, adata_train: ad.AnnData, *, config: ExpressionOptions,
            positions: pd.DataFrame | None = None,
            gene_list: list[str] | None = None) -> SequenceEncoding:
        """Fit gene selection, order and value scales on the train cases `adata_train`."""
        from mgi.expression.tokens import ValueEncoder

        order = GeneOrder(config).fit(adata_train, positions=positions, gene_list=gene_list)
        _, logged = order.expression(adata_train)
        values = ValueEncoder(config).fit(logged)
        var = adata_train.var.iloc[order.genes_]
        ids = var.index.to_numpy().astype(str)
        names = (var["gene_name"].fillna("").to_numpy().astype(str) if "gene_name" in var
                 else np.full(ids.size, "", dtype=str))
        chromosome = start = None
        if positions is not None and config.order == "genomic":
            placed = positions.reindex(ids)
            chromosome = placed["chromosome"].fillna("").to_numpy().astype(str)
            start = placed["start"].fillna(-1).to_numpy().astype(np.int64)
        fixed = (order.fixed_ if config.order in ("fixed", "genomic")
                 else np.zeros(0, dtype=np.int64))
        return cls(config=config, gene_ids=ids, gene_names=names,
                   medians=np.asarray(order.medians_, dtype=np.float64),
                   fixed=np.asarray(fixed, dtype=np.int64), scale=float(values.scale_),
                   gene_mean=np.asarray(values.gene_mean_, dtype=np.float64),
                   gene_std=np.asarray(values.gene_std_, dtype=np.float64),
                   gene_model=str(adata_train.uns.get("gene_model", "")),
                   chromosome=chromosome, start=start)

    @property
    def vocab(self) -> pd.DataFrame:
        """The vocabulary table: token_id, gene_id, gene_name (specials 0-2, then the genes)."""
        from mgi.expression.tokens import build_vocab

        return build_vocab(pd.DataFrame({"gene_id": self.gene_ids, "gene_name": self.gene_names}))

    def encode(self, adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
        """Return (token_ids (N, seq_len) int32, values (N, seq_len) float32) of adata's cases.

        Genes are matched by id, version suffixes ignored; genes the encoding knows and `adata`
        lacks count as not expressed, genes it does not know are ignored (both logged). Raises
        ExpressionFileError when adata's ids are of another kind (Ensembl ids vs symbols) or
        hold fewer than half of the encoding's genes.
        """
        from mgi.expression.tokens import CLS, PAD, SPECIALS, ValueEncoder

        columns = self._columns(adata)
        present = columns >= 0
        linear_in, logged_in = normalised(adata, method=self.config.normalize,
                                          genes=columns[present])
        n_cases = adata.n_obs
        linear = np.zeros((n_cases, self.gene_ids.size), dtype=np.float64)
        logged = np.zeros((n_cases, self.gene_ids.size), dtype=np.float64)
        linear[:, present], logged[:, present] = linear_in, logged_in
        order = GeneOrder(self.config)
        order.medians_, order.fixed_ = self.medians, self.fixed
        encoder = ValueEncoder(self.config)
        encoder.scale_, encoder.gene_mean_, encoder.gene_std_ = (
            self.scale, self.gene_mean, self.gene_std)
        gene_values = encoder.transform(logged)
        positions = order.transform(linear)

        seq_len = self.config.seq_len
        token_ids = np.full((n_cases, seq_len), PAD, dtype=np.int32)
        values = np.zeros((n_cases, seq_len), dtype=np.float32)
        token_ids[:, 0] = CLS
        kept = positions >= 0
        token_ids[:, 1:] = np.where(kept, positions + len(SPECIALS), PAD)
        gathered = np.take_along_axis(gene_values, np.maximum(positions, 0), axis=1)
        values[:, 1:] = np.where(kept, gathered, 0.0)
        return token_ids, values

    def _columns(self, adata: ad.AnnData) -> np.ndarray:
        """Column of adata.var of each encoding gene (vocabulary order), -1 where it lacks it."""
        ids = unversioned(pd.Series(np.asarray(adata.var_names, dtype=str))).to_numpy()
        mine, theirs = _id_kind(self.gene_ids), _id_kind(ids)
        if mine != theirs:
            raise ExpressionFileError(
                f"expression: gene ids look like {theirs} (e.g. {list(ids[:3])}); the encoding's "
                f"genes are {mine} (e.g. {list(self.gene_ids[:3])}): expected the same id space"
            )
        column = pd.Series(np.arange(ids.size), index=ids)
        column = column[~column.index.duplicated(keep="first")]
        wanted = unversioned(pd.Series(self.gene_ids)).to_numpy()
        columns = column.reindex(wanted).fillna(-1).to_numpy().astype(np.int64)
        missing = int((columns < 0).sum())
        if missing * 2 > wanted.size:
            raise ExpressionFileError(
                f"expression: only {wanted.size - missing} of the encoding's {wanted.size} genes "
                f"are present (e.g. missing {list(wanted[columns < 0][:3])}); expected at least "
                "half: is it the same gene model and id space?"
            )
        unknown = ids.size - (wanted.size - missing)
        (log.warning if missing else log.info)(
            "%d of the encoding's %d genes found in the cohort, %d missing (taken as not "
            "expressed); %d gene(s) of the cohort not in the encoding (ignored)",
            wanted.size - missing, wanted.size, missing, unknown)
        return columns

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the encoding as one .npz (arrays + JSON header), atomically; same fit, same
        bytes."""
        header = {"version": self.version, "config": as_dict(self.config),
                  "gene_model": self.gene_model, "scale": self.scale}
        arrays = {
            "header_json": np.asarray(json.dumps(header, sort_keys=True)),
            "gene_id": np.asarray(self.gene_ids, dtype=str),
            "gene_name": np.asarray(self.gene_names, dtype=str),
            "medians": np.asarray(self.medians, dtype=np.float64),
            "fixed": np.asarray(self.fixed, dtype=np.int64),
            "gene_mean": np.asarray(self.gene_mean, dtype=np.float64),
            "gene_std": np.asarray(self.gene_std, dtype=np.float64),
            "chromosome": np.asarray([] if self.chromosome is None else self.chromosome,
                                     dtype=str),
            "start": np.asarray([] if self.start is None else self.start, dtype=np.int64),
        }
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | BinaryIO) -> SequenceEncoding:
        """Read an encoding .npz (a path, or an open binary file); ExpressionFileError naming
        the file if it is not one (or of another format version)."""
        source = path if hasattr(path, "read") else Path(path)
        path = getattr(path, "name", "encoding") if hasattr(path, "read") else source
        try:
            with np.load(source, allow_pickle=False) as npz:
                missing = [k for k in ("header_json", *ARRAYS) if k not in npz.files]
                if missing:
                    raise ExpressionFileError(
                        f"{path}: missing array(s) {missing}; expected an encoding .npz"
                    )
                data = {k: npz[k] for k in ("header_json", *ARRAYS)}
        except FileNotFoundError as err:
            raise ExpressionFileError(f"{path}: file not found") from err
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ExpressionFileError(f"{path}: not an encoding .npz file ({err})") from err
        header = json.loads(str(data["header_json"][()]))
        if header.get("version") != ENCODING_VERSION:
            raise ExpressionFileError(
                f"{path}: encoding version {header.get('version')!r}; expected "
                f"{ENCODING_VERSION} (written by another mgi release)"
            )
        n = data["gene_id"].size
        if any(data[k].shape != (n,) for k in ("gene_name", "medians", "gene_mean", "gene_std")):
            raise ExpressionFileError(f"{path}: per-gene arrays disagree in length; expected {n}")
        return cls(config=build(ExpressionOptions, header["config"], where="expression"),
                   gene_ids=data["gene_id"], gene_names=data["gene_name"],
                   medians=data["medians"], fixed=data["fixed"], scale=float(header["scale"]),
                   gene_mean=data["gene_mean"], gene_std=data["gene_std"],
                   gene_model=str(header.get("gene_model", "")),
                   chromosome=data["chromosome"] if data["chromosome"].size else None,
                   start=data["start"] if data["start"].size else None,
                   version=int(header["version"]))


def _id_kind(ids: np.ndarray) -> str:
    """'Ensembl ids' or 'gene symbols', by what most ids look like."""
    ids = np.asarray(ids, dtype=str)
    if ids.size == 0:
        return "Ensembl ids"
    ensembl = np.fromiter((bool(ENSEMBL_ID.fullmatch(i)) for i in ids), dtype=bool,
                          count=ids.size)
    return "Ensembl ids" if ensembl.mean() >= 0.5 else "gene symbols"
