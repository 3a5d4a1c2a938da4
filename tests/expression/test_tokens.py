"""Gene token sequences: layout, vocabulary, value bins, no train leakage, byte-stable files."""

from __future__ import annotations

import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mgi.errors import ExpressionFileError
from mgi.expression.order import normalised
from mgi.expression.tokens import (
    CLS,
    PAD,
    build_sequences,
    quantile_bins,
    read_sequences,
    write_sequences,
)
from mgi.options import ExpressionOptions

N_CASES, N_GENES = 24, 80


def make_adata(counts: np.ndarray) -> ad.AnnData:
    """AnnData as build_expression makes it (ids unsorted in var, to test vocabulary sorting)."""
    n_cases, n_genes = counts.shape
    ids = [f"ENSG{(i * 37) % n_genes:011d}" for i in range(n_genes)]
    var = pd.DataFrame(
        {
            "gene_id_version": [f"{g}.1" for g in ids],
            "gene_name": [f"NAME{(i * 37) % n_genes}" for i in range(n_genes)],
            "gene_type": ["protein_coding" if i % 4 else "lncRNA" for i in range(n_genes)],
        },
        index=ids,
    )
    obs = pd.DataFrame(index=[f"case-{i:02d}" for i in range(n_cases)])
    x = counts.astype(np.float32)
    tpm = x / np.maximum(x.sum(axis=1, keepdims=True), 1) * 1e6
    adata = ad.AnnData(
        X=x, obs=obs, var=var, layers={"counts": x.copy(), "tpm": tpm, "fpkm_uq": tpm / 3}
    )
    adata.uns["gene_model"] = "GENCODE v36"
    return adata


def gene_positions(n_genes: int) -> pd.DataFrame:
    """Random chromosome and start of every gene id of make_adata (as read_gene_positions)."""
    rng = np.random.default_rng(5)
    return pd.DataFrame(
        {
            "chromosome": rng.choice(["chr1", "chr2", "chr10", "chrX"], size=n_genes),
            "start": rng.integers(1, 10**8, size=n_genes),
        },
        index=[f"ENSG{i:011d}" for i in range(n_genes)],
    )


@pytest.fixture
def cohort(counts_matrix) -> tuple[ad.AnnData, pd.DataFrame]:
    adata = make_adata(counts_matrix(N_CASES, N_GENES, seed=7))
    splits = pd.DataFrame(
        {
            "case_id": adata.obs_names[::-1],  # order of the table does not matter
            "split": (["train"] * 16 + ["val"] * 4 + ["test"] * 4)[::-1],
        }
    )
    return adata, splits


CONFIGS = [
    ExpressionOptions(seq_len=16, min_fraction_expressed=0.2),
    ExpressionOptions(seq_len=16, n_hvg=12, order="fixed", values="continuous"),
    ExpressionOptions(seq_len=32, normalize="tpm", n_hvg=20, n_bins=11),
    ExpressionOptions(seq_len=24, order="genomic", normalize="fpkm_uq"),
    ExpressionOptions(seq_len=24, order="genomic", n_hvg=16, values="continuous"),
    ExpressionOptions(seq_len=16, n_hvg=12, order="fixed", values="zscore"),
]
CONFIG_IDS = ["rank-bins", "fixed-hvg-continuous", "tpm-hvg", "genomic-fpkm_uq",
              "genomic-hvg-continuous", "fixed-hvg-zscore"]


def test_quantile_bins_are_zero_for_zero_and_span_one_to_n_bins_minus_one():
    rng = np.random.default_rng(0)
    values = rng.gamma(1.0, 3.0, size=(5, 200))
    values[:, ::3] = 0
    bins = quantile_bins(values, n_bins=11)
    assert (bins[values == 0] == 0).all()
    for row, binned in zip(values, bins, strict=True):
        nz = row > 0
        assert binned[nz].min() == 1 and binned[nz].max() == 10
        order = np.argsort(row[nz])
        assert (np.diff(binned[nz][order]) >= 0).all()  # monotone in the value
        assert np.bincount(binned[nz].astype(int))[1:10].std() < 3  # about equal-sized bins
    assert (quantile_bins(np.zeros((2, 4)), n_bins=5) == 0).all()


def test_sequences_are_cls_then_genes_then_padding(cohort):
    adata, splits = cohort
    cfg = ExpressionOptions(seq_len=16, min_fraction_expressed=0.2)
    seqs = build_sequences(adata, splits, config=cfg)
    assert seqs.token_ids.shape == seqs.values.shape == (N_CASES, 16)
    assert seqs.token_ids.dtype == np.int32 and seqs.values.dtype == np.float32
    assert (seqs.token_ids[:, 0] == CLS).all()
    pad = seqs.token_ids == PAD
    assert not pad[:, 0].any()
    # Padding only at the end: once padded, always padded.
    assert (np.diff(pad.astype(int), axis=1) >= 0).all()
    assert (seqs.values[:, 0] == 0).all() and (seqs.values[pad] == 0).all()
    genes = seqs.token_ids[:, 1:]
    in_gene = genes >= 3
    assert genes[in_gene].max() < len(seqs.vocab)
    for row in seqs.token_ids:
        kept = row[row >= 3]
        assert len(kept) == len(set(kept.tolist()))  # each gene at most once
    # bins: every gene token carries a non-zero bin (zero-expressed genes are dropped in rank)
    assert (seqs.values[:, 1:][in_gene] >= 1).all() and seqs.values.max() <= cfg.n_bins - 1
    assert seqs.case_ids.tolist() == adata.obs_names.tolist()
    assert seqs.splits.tolist() == (["test"] * 4 + ["val"] * 4 + ["train"] * 16)[::-1]


def test_vocabulary_is_specials_then_train_genes_sorted_by_id(cohort):
    adata, splits = cohort
    seqs = build_sequences(adata, splits, config=ExpressionOptions(seq_len=16))
    vocab = seqs.vocab
    assert vocab.columns.tolist() == ["token_id", "gene_id", "gene_name"]
    assert vocab.iloc[:3].values.tolist() == [[0, "", "<pad>"], [1, "", "<cls>"], [2, "", "<mask>"]]
    ids = vocab["gene_id"].iloc[3:].tolist()
    assert ids == sorted(ids) and len(ids) == seqs.attrs["n_genes"]
    assert vocab["token_id"].tolist() == list(range(len(vocab)))
    assert set(ids) <= set(adata.var_names[adata.var["gene_type"] == "protein_coding"])
    names = adata.var.loc[ids, "gene_name"].tolist()
    assert vocab["gene_name"].iloc[3:].tolist() == names


def test_continuous_values_are_log1p_cpm_over_the_train_std(cohort):
    adata, splits = cohort
    cfg = ExpressionOptions(seq_len=16, order="fixed", values="continuous",
                            min_fraction_expressed=0)
    seqs = build_sequences(adata, splits, config=cfg)
    gene_ids = seqs.vocab.set_index("token_id")["gene_id"]
    logged = np.log1p(normalised(adata, method="log1p_cpm")[0])
    selected = adata.var_names.get_indexer(gene_ids.iloc[3:])
    train = splits.set_index("case_id").loc[adata.obs_names, "split"].to_numpy() == "train"
    scale = np.std(logged[train][:, selected])
    assert seqs.attrs["continuous_scale"] == pytest.approx(scale)
    row = 5
    tokens = seqs.token_ids[row, 1:]
    genes = adata.var_names.get_indexer(gene_ids.loc[tokens[tokens >= 3]])
    np.testing.assert_allclose(
        seqs.values[row, 1 : 1 + len(genes)], logged[row, genes] / scale, rtol=1e-5
    )


@pytest.mark.parametrize("order", ["fixed", "rank"])
def test_zscore_values_are_log1p_cpm_standardised_per_gene_on_train(cohort, order):
    adata, splits = cohort
    cfg = ExpressionOptions(seq_len=16, order=order, values="zscore", min_fraction_expressed=0)
    seqs = build_sequences(adata, splits, config=cfg)
    gene_ids = seqs.vocab.set_index("token_id")["gene_id"]
    logged = np.log1p(normalised(adata, method="log1p_cpm")[0])
    train = splits.set_index("case_id").loc[adata.obs_names, "split"].to_numpy() == "train"
    for row in (0, 5, len(adata) - 1):
        tokens = seqs.token_ids[row, 1:]
        genes = adata.var_names.get_indexer(gene_ids.loc[tokens[tokens >= 3]])
        mean, std = logged[train][:, genes].mean(0), logged[train][:, genes].std(0)
        np.testing.assert_allclose(seqs.values[row, 1 : 1 + len(genes)],
                                   (logged[row, genes] - mean) / std, rtol=1e-4, atol=1e-5)
    if order == "fixed":  # every case holds the same genes: each column is one gene
        columns = seqs.values[seqs.splits == "train"][:, 1:]
        np.testing.assert_allclose(columns.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(columns.std(0), 1, atol=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_test_case_counts_change_only_that_case_row(cohort, cfg, tmp_path):
    """Leakage: a test case's values change its own row, nothing in the vocabulary or fit."""
    adata, splits = cohort
    positions = gene_positions(N_GENES)
    first = build_sequences(adata, splits, config=cfg, positions=positions)
    changed = adata.copy()
    test_case = splits.loc[splits["split"] == "test", "case_id"].iloc[0]
    row = changed.obs_names.get_loc(test_case)
    rng = np.random.default_rng(99)
    new = rng.poisson(200, size=N_GENES).astype(np.float32)
    for layer, divisor in (("counts", 1), ("tpm", new.sum() / 1e6), ("fpkm_uq", new.sum() / 3e6)):
        changed.layers[layer][row] = new / divisor
    changed.X[row] = new
    second = build_sequences(changed, splits, config=cfg, positions=positions)

    write_sequences(first, sequences_path=tmp_path / "a.npz", vocab_path=tmp_path / "a.tsv")
    write_sequences(second, sequences_path=tmp_path / "b.npz", vocab_path=tmp_path / "b.tsv")
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    assert first.attrs == second.attrs
    others = np.arange(N_CASES) != row
    np.testing.assert_array_equal(first.token_ids[others], second.token_ids[others])
    np.testing.assert_array_equal(first.values[others], second.values[others])
    assert not (
        np.array_equal(first.token_ids[row], second.token_ids[row])
        and np.array_equal(first.values[row], second.values[row])
    )


def test_genomic_sequences_follow_the_genome_and_carry_zero_values(cohort):
    adata, splits = cohort
    adata = adata.copy()
    coding = adata.var["gene_type"].to_numpy() == "protein_coding"
    means = np.where(coding, adata.layers["counts"].mean(axis=0), -1)
    silent = np.argsort(-means)[:5]  # surely selected: the most expressed coding genes
    row = adata.obs_names.get_loc(splits.loc[splits["split"] == "test", "case_id"].iloc[0])
    adata.layers["counts"][row, silent] = 0
    positions = gene_positions(N_GENES)
    cfg = ExpressionOptions(seq_len=24, order="genomic", min_fraction_expressed=0.2)
    seqs = build_sequences(adata, splits, config=cfg, positions=positions)
    gene_of = seqs.vocab.set_index("token_id")["gene_id"]
    rank = {"chr1": 1, "chr2": 2, "chr10": 10, "chrX": 23}
    for tokens in seqs.token_ids:
        genes = gene_of.loc[tokens[1:]].tolist()
        assert tokens[1:].tolist() == seqs.token_ids[0, 1:].tolist()  # one order for all cases
        keys = [(rank[positions.loc[g, "chromosome"]], positions.loc[g, "start"]) for g in genes]
        assert keys == sorted(keys)
    assert (seqs.token_ids[:, 1:] >= 3).all()  # 23 genes fit: no padding
    # The silenced genes keep their places in that case, with bin 0; others are binned >= 1.
    zero = np.isin(gene_of.loc[seqs.token_ids[row, 1:]], adata.var_names[silent])
    assert zero.sum() == 5
    assert (seqs.values[row, 1:][zero] == 0).all() and (seqs.values[row, 1:][~zero] >= 1).all()


def test_train_case_counts_do_change_the_fit(cohort):
    """The counterpart of the leakage test: it would pass vacuously if nothing were fitted."""
    adata, splits = cohort
    cfg = ExpressionOptions(seq_len=16, n_hvg=12, order="fixed")
    first = build_sequences(adata, splits, config=cfg)
    changed = adata.copy()
    train_rows = np.flatnonzero(
        adata.obs_names.isin(splits.loc[splits["split"] == "train", "case_id"])
    )
    boost = np.tile([0.0, 50.0], len(train_rows) // 2)[:, None]
    changed.layers["counts"][train_rows, :10] *= boost
    second = build_sequences(changed, splits, config=cfg)
    assert not first.vocab.equals(second.vocab)


def test_cases_outside_splits_are_left_out_and_unknown_cases_fail(cohort):
    adata, splits = cohort
    subset = splits.iloc[2:]
    seqs = build_sequences(adata, subset, config=ExpressionOptions(seq_len=16))
    assert sorted(seqs.case_ids.tolist()) == sorted(subset["case_id"].tolist())
    unknown = pd.concat([splits, pd.DataFrame({"case_id": ["ghost"], "split": ["test"]})])
    with pytest.raises(ExpressionFileError, match=r"not in the expression matrix.*'ghost'"):
        build_sequences(adata, unknown, config=ExpressionOptions(seq_len=16))
    no_train = splits.assign(split="val")
    with pytest.raises(ExpressionFileError, match=r"no case .* in 'train'"):
        build_sequences(adata, no_train, config=ExpressionOptions(seq_len=16))
    with pytest.raises(ExpressionFileError, match=r"split value\(s\) \['holdout'\]"):
        build_sequences(adata, splits.assign(split="holdout"), config=ExpressionOptions(seq_len=16))


def test_written_files_are_byte_identical_across_runs_and_read_back(cohort, tmp_path, monkeypatch):
    adata, splits = cohort
    cfg = CONFIGS[0]
    a = build_sequences(adata, splits, config=cfg)
    write_sequences(a, sequences_path=tmp_path / "1" / "sequences.npz",
                    vocab_path=tmp_path / "1" / "vocab.tsv")
    # A later run (the clock a day on) of a fresh build must give the same bytes.
    later = time.time() + 86400
    monkeypatch.setattr(time, "time", lambda: later)
    b = build_sequences(adata.copy(), splits.copy(), config=cfg)
    write_sequences(b, sequences_path=tmp_path / "2" / "sequences.npz",
                    vocab_path=tmp_path / "2" / "vocab.tsv")
    monkeypatch.undo()
    for name in ("sequences.npz", "vocab.tsv"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["sequences.npz", "vocab.tsv"]

    back = read_sequences(tmp_path / "1" / "sequences.npz", vocab_path=tmp_path / "1" / "vocab.tsv")
    np.testing.assert_array_equal(back.token_ids, a.token_ids)
    np.testing.assert_array_equal(back.values, a.values)
    assert back.case_ids.tolist() == a.case_ids.tolist()
    assert back.splits.tolist() == a.splits.tolist()
    assert back.attrs == a.attrs and back.attrs["config"]["seq_len"] == 16
    pd.testing.assert_frame_equal(back.vocab, a.vocab, check_dtype=False)
    with np.load(tmp_path / "1" / "sequences.npz") as npz:  # a plain np.load reads it
        assert sorted(npz.files) == ["attrs_json", "case_id", "split", "token_ids", "values"]
    assert read_sequences(tmp_path / "1" / "sequences.npz").vocab is None


def test_reading_a_bad_sequences_file_names_it(tmp_path):
    bad = tmp_path / "sequences.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ExpressionFileError, match=r"sequences\.npz: not a sequences \.npz"):
        read_sequences(bad)
    np.savez(bad, case_id=np.array(["a"]))
    with pytest.raises(ExpressionFileError, match=r"missing array\(s\) \['split'"):
        read_sequences(bad)
