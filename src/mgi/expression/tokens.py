"""Gene token sequences: vocabulary, value encoding, and the sequences file (npz + vocab.tsv).

A case's sequence is `<cls>` followed by its ordered gene tokens (order.py), padded with `<pad>`
to seq_len; `values` holds one number per token (0 at `<cls>` and `<pad>`).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from mgi.errors import ExpressionFileError, MgiError
from mgi.expression.encoding import SequenceEncoding
from mgi.io import atomic_path, read_tsv, write_tsv
from mgi.options import ExpressionOptions, as_dict

log = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<cls>", "<mask>")
PAD, CLS, MASK = 0, 1, 2
SPLITS = ("train", "val", "test")
VOCAB_COLUMNS = ["token_id", "gene_id", "gene_name"]
NPZ_KEYS = ("case_id", "split", "token_ids", "values", "attrs_json")


@dataclass
class GeneSequences:
    """Token and value sequences of the cases, with their splits, vocabulary and fit summary."""

    case_ids: np.ndarray  # (N,) str
    splits: np.ndarray  # (N,) str: train | val | test
    token_ids: np.ndarray  # (N, seq_len) int32
    values: np.ndarray  # (N, seq_len) float32
    vocab: pd.DataFrame | None = None  # token_id, gene_id, gene_name
    attrs: dict[str, Any] = field(default_factory=dict)
    encoding: SequenceEncoding | None = None  # the fit that made them (build_sequences)

    @property
    def vocab_size(self) -> int:
        """Number of tokens (specials included) the encoder's embedding must hold."""
        return len(self.vocab) if self.vocab is not None else int(self.attrs["vocab_size"])


class ValueEncoder:
    """Per-token values, fitted on the train cases: per-sample quantile bins (scGPT), log1p over
    the train std (`continuous`), or log1p standardised per gene (`zscore`)."""

    def __init__(self, config: ExpressionOptions) -> None:
        self.config = config

    def fit(self, train_log: np.ndarray) -> ValueEncoder:
        """Fit the scales on the train log1p values (cases x genes); return self.

        `continuous`: one scale, the std of every train value. `zscore`: each gene's train mean
        and std (std 0, a gene constant over the train cases, is taken as 1), as scanpy's
        pp.scale does on one matrix; written out here because pp.scale cannot fit on the train
        cases and apply the same centring to the others.
        """
        std = float(np.std(train_log)) if train_log.size else 0.0
        self.scale_ = std if std > 0 else 1.0
        self.gene_mean_ = train_log.mean(axis=0)
        gene_std = train_log.std(axis=0)
        self.gene_std_ = np.where(gene_std > 0, gene_std, 1.0)
        return self

    def transform(self, logged: np.ndarray) -> np.ndarray:
        """Return one value per case x selected gene (bins: 0 for zero, else 1..n_bins-1)."""
        if self.config.values == "continuous":
            return logged / self.scale_
        if self.config.values == "zscore":
            return (logged - self.gene_mean_) / self.gene_std_
        return quantile_bins(logged, n_bins=self.config.n_bins)


def quantile_bins(values: np.ndarray, *, n_bins: int) -> np.ndarray:
    """Return per-row quantile bins: 0 where a value is 0, else 1..n_bins-1 within its row.

    As scGPT's binning: edges are the row's non-zero quantiles at n_bins-1 even steps; unlike
    scGPT, ties on an edge go to the upper bin rather than to a random one (deterministic).
    """
    out = np.zeros(values.shape, dtype=np.float64)
    steps = np.linspace(0.0, 1.0, n_bins - 1)
    for i, row in enumerate(values):
        nonzero = row > 0
        if nonzero.any():
            edges = np.quantile(row[nonzero], steps)
            out[i, nonzero] = np.digitize(row[nonzero], edges)
    return out


def build_vocab(genes: pd.DataFrame) -> pd.DataFrame:
    """Return the vocabulary: specials (ids 0-2), then `genes` (gene_id, gene_name) from id 3."""
    specials = pd.DataFrame(
        {"token_id": range(len(SPECIALS)), "gene_id": "", "gene_name": list(SPECIALS)}
    )
    body = pd.DataFrame(
        {
            "token_id": np.arange(len(genes)) + len(SPECIALS),
            "gene_id": genes["gene_id"].to_numpy(),
            "gene_name": genes["gene_name"].to_numpy(),
        }
    )
    return pd.concat([specials, body], ignore_index=True)


def build_sequences(
    adata: ad.AnnData,
    splits: pd.DataFrame,
    *,
    config: ExpressionOptions | None = None,
    positions: pd.DataFrame | None = None,
    gene_list: list[str] | None = None,
) -> GeneSequences:
    """Return the gene sequences of the cases in `splits`, fitted on its train cases only.

    Cases of `adata` not in `splits` are left out; rows follow the order of `adata.obs`.
    `positions` (gene positions from the GTF) is needed by order "genomic"; `gene_list`
    restricts the genes (see GeneOrder.fit).
    """
    config = config or ExpressionOptions()
    cases, case_split = _cases_in_splits(adata, splits)
    is_train = case_split == "train"
    if not is_train.any():
        raise ExpressionFileError("splits: no case of the expression matrix is in 'train'")
    encoding = SequenceEncoding.fit(cases[is_train], config=config, positions=positions,
                                    gene_list=gene_list)
    return encode_sequences(adata, splits, encoding=encoding)


def encode_sequences(
    adata: ad.AnnData, splits: pd.DataFrame, *, encoding: SequenceEncoding
) -> GeneSequences:
    """Return the gene sequences of the cases in `splits` under a fitted `encoding` (from this
    cohort's train cases, or another cohort's: nothing is fitted here)."""
    cases, case_split = _cases_in_splits(adata, splits)
    token_ids, values = encoding.encode(cases)
    config, medians = encoding.config, encoding.medians
    vocab = encoding.vocab
    attrs = {
        "config": as_dict(config),
        "gene_model": encoding.gene_model,
        "n_cases": {s: int((case_split == s).sum()) for s in SPLITS},
        "n_genes": int(encoding.gene_ids.size),
        "vocab_size": len(vocab),
        "specials": {name: i for i, name in enumerate(SPECIALS)},
        "train_median_summary": {
            "min": float(medians.min()),
            "median": float(np.median(medians)),
            "max": float(medians.max()),
        },
        "continuous_scale": encoding.scale if config.values == "continuous" else None,
    }
    log.info("%d sequences of %d tokens, vocabulary of %d genes", token_ids.shape[0],
             config.seq_len, encoding.gene_ids.size)
    return GeneSequences(
        case_ids=cases.obs_names.to_numpy().astype(str),
        splits=case_split,
        token_ids=token_ids,
        values=values,
        vocab=vocab,
        attrs=attrs,
        encoding=encoding,
    )


def _cases_in_splits(adata: ad.AnnData, splits: pd.DataFrame) -> tuple[ad.AnnData, np.ndarray]:
    """The cases of `adata` that `splits` lists (in adata's order) and their splits."""
    if not adata.obs_names.is_unique:
        raise ExpressionFileError("expression matrix: case ids (obs names) repeat; expected unique")
    split_of = _check_splits(splits, adata)
    cases = adata[adata.obs_names.isin(split_of.index)]
    return cases, split_of.loc[cases.obs_names].to_numpy().astype(str)


def write_sequences(
    seqs: GeneSequences,
    *,
    sequences_path: str | os.PathLike[str],
    vocab_path: str | os.PathLike[str],
) -> tuple[Path, Path]:
    """Write sequences.npz and vocab.tsv atomically (same input, same bytes); return both paths."""
    if seqs.vocab is None:
        raise ExpressionFileError(f"{vocab_path}: the sequences carry no vocabulary to write")
    arrays = {
        "case_id": np.asarray(seqs.case_ids, dtype=str),
        "split": np.asarray(seqs.splits, dtype=str),
        "token_ids": np.asarray(seqs.token_ids, dtype=np.int32),
        "values": np.asarray(seqs.values, dtype=np.float32),
        "attrs_json": np.asarray(json.dumps(seqs.attrs, sort_keys=True)),
    }
    # np.savez stamps its members with zipfile's fixed 1980 date, so equal arrays give equal
    # bytes (pinned by a test); a file handle keeps it from appending a second ".npz".
    with atomic_path(sequences_path, suffix=".npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    write_tsv(seqs.vocab[VOCAB_COLUMNS], vocab_path)
    return Path(sequences_path), Path(vocab_path)


def read_sequences(
    path: str | os.PathLike[str], *, vocab_path: str | os.PathLike[str] | None = None
) -> GeneSequences:
    """Return the sequences stored at `path` (and the vocabulary, if `vocab_path` is given)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise ExpressionFileError(
                    f"{path}: missing array(s) {missing}; expected {list(NPZ_KEYS)}"
                )
            data = {k: npz[k] for k in NPZ_KEYS}
    except FileNotFoundError as err:
        raise ExpressionFileError(f"{path}: file not found") from err
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ExpressionFileError(f"{path}: not a sequences .npz file ({err})") from err
    n = len(data["case_id"])
    tokens, values = data["token_ids"], data["values"]
    if tokens.ndim != 2 or tokens.shape != values.shape or len(data["split"]) != n or (
        tokens.shape[0] != n
    ):
        raise ExpressionFileError(
            f"{path}: shapes disagree (case_id {data['case_id'].shape}, split "
            f"{data['split'].shape}, token_ids {tokens.shape}, values {values.shape}); expected "
            "N cases and (N, seq_len) tokens and values"
        )
    vocab = None
    if vocab_path is not None:
        try:
            vocab = read_tsv(vocab_path, required=VOCAB_COLUMNS)
        except MgiError as err:
            raise ExpressionFileError(str(err)) from err
        vocab["token_id"] = vocab["token_id"].astype(np.int64)
    return GeneSequences(
        case_ids=data["case_id"],
        splits=data["split"],
        token_ids=tokens,
        values=values,
        vocab=vocab,
        attrs=json.loads(str(data["attrs_json"][()])),
    )


def _check_splits(splits: pd.DataFrame, adata: ad.AnnData) -> pd.Series:
    """Return split by case_id; raise if the table is malformed or names an unknown case."""
    missing = [c for c in ("case_id", "split") if c not in splits.columns]
    if missing:
        raise ExpressionFileError(
            f"splits: missing column(s) {missing}; found {list(splits.columns)}"
        )
    case_ids = splits["case_id"].astype(str)
    repeated = sorted(set(case_ids[case_ids.duplicated()]))
    if repeated:
        raise ExpressionFileError(f"splits: case(s) {repeated[:5]} listed more than once")
    odd = sorted(set(splits["split"].astype(str)) - set(SPLITS))
    if odd:
        raise ExpressionFileError(f"splits: split value(s) {odd}; expected one of {list(SPLITS)}")
    absent = sorted(set(case_ids) - set(adata.obs_names))
    if absent:
        raise ExpressionFileError(
            f"splits: {len(absent)} case(s) not in the expression matrix, e.g. {absent[:5]}"
        )
    return pd.Series(splits["split"].astype(str).to_numpy(), index=case_ids.to_numpy())
