"""Gene selection and order: scanpy normalisation and HVGs, rank-value order, fixed order."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from mgi.errors import ConfigError, ExpressionFileError
from mgi.expression import order as order_module
from mgi.expression.order import GeneOrder, SequenceConfig, normalised


def make_adata(counts: np.ndarray, *, types: list[str] | None = None) -> ad.AnnData:
    """AnnData as build_expression makes it: counts in X and layers, gene ids as var names."""
    n_cases, n_genes = counts.shape
    var = pd.DataFrame(
        {
            "gene_name": [f"G{i}" for i in range(n_genes)],
            "gene_type": types or ["protein_coding"] * n_genes,
        },
        index=[f"ENSG{i:011d}" for i in range(n_genes)],
    )
    obs = pd.DataFrame(index=[f"case-{i:02d}" for i in range(n_cases)])
    x = counts.astype(np.float32)
    tpm = x / np.maximum(x.sum(axis=1, keepdims=True), 1) * 1e6
    return ad.AnnData(X=x, obs=obs, var=var, layers={"counts": x.copy(), "tpm": tpm})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"order": "random"}, "expression.order: 'random'"),
        ({"normalize": "cpm"}, "expression.normalize"),
        ({"values": "raw"}, "expression.values"),
        ({"min_fraction_expressed": 1.5}, "min_fraction_expressed"),
        ({"n_hvg": 0}, "expression.n_hvg"),
        ({"n_bins": 2}, "expression.n_bins"),
        ({"seq_len": 1}, "expression.seq_len"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SequenceConfig(**kwargs)


def test_config_from_mapping_accepts_lists_and_rejects_unknown_keys():
    cfg = SequenceConfig.from_mapping({"gene_types": ["protein_coding", "lncRNA"], "seq_len": 64})
    assert cfg.gene_types == ("protein_coding", "lncRNA") and cfg.seq_len == 64
    assert cfg.as_dict()["gene_types"] == ["protein_coding", "lncRNA"]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['seqlen'\]"):
        SequenceConfig.from_mapping({"seqlen": 64})


def test_cpm_normalisation_is_scanpy_normalize_total_then_log1p(monkeypatch, counts_matrix):
    adata = make_adata(counts_matrix(6, 40))
    calls = []
    real = sc.pp.normalize_total
    monkeypatch.setattr(
        order_module.sc.pp, "normalize_total",
        lambda *a, **k: calls.append(k) or real(*a, **k),
    )
    linear, logged = normalised(adata, method="log1p_cpm")
    assert calls and calls[0]["target_sum"] == 1e6
    counts = adata.layers["counts"].astype(np.float64)
    np.testing.assert_allclose(linear, counts / counts.sum(axis=1, keepdims=True) * 1e6)
    np.testing.assert_allclose(logged, np.log1p(linear))
    _, tpm_log = normalised(adata, method="tpm")
    np.testing.assert_allclose(tpm_log, np.log1p(adata.layers["tpm"]), rtol=1e-6)


def test_selection_keeps_wanted_types_expressed_in_enough_train_cases():
    counts = np.full((10, 6), 5)
    counts[:, 1] = 0                      # never expressed
    counts[:9, 2] = 0                     # expressed in 1 of 10 train cases: 10%, kept
    counts[:, 3] = 0                      # expressed in no train case ...
    types = ["protein_coding"] * 5 + ["lncRNA"]
    adata = make_adata(counts, types=types)
    fitted = GeneOrder(SequenceConfig(min_fraction_expressed=0.1, seq_len=8)).fit(adata)
    assert fitted.genes_.tolist() == [0, 2, 4]
    fitted = GeneOrder(SequenceConfig(min_fraction_expressed=0.2, seq_len=8)).fit(adata)
    assert fitted.genes_.tolist() == [0, 4]
    every_type = SequenceConfig(gene_types=(), min_fraction_expressed=0.2, seq_len=8)
    assert GeneOrder(every_type).fit(adata).genes_.tolist() == [0, 4, 5]


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
def test_no_gene_passing_the_filters_is_an_error():
    adata = make_adata(np.zeros((4, 5)))
    with pytest.raises(ExpressionFileError, match="no gene of type"):
        GeneOrder(SequenceConfig(seq_len=8)).fit(adata)


def test_rank_puts_a_gene_at_ten_times_its_median_first():
    rng = np.random.default_rng(1)
    counts = rng.integers(50, 60, size=(9, 200)) * 100
    train = make_adata(counts)
    fitted = GeneOrder(SequenceConfig(seq_len=8, min_fraction_expressed=0)).fit(train)
    case = np.median(counts, axis=0, keepdims=True).astype(int)
    case[0, 13] *= 10  # 10x its median (~9.6x in CPM, the library grows); others at ~0.96x
    linear, _ = fitted.expression(make_adata(case))
    ratio = linear[0] / fitted.medians_
    assert ratio[13] > 9 and np.delete(ratio, 13).max() < 1.2
    positions = fitted.transform(linear)
    assert positions.shape == (1, 7)
    assert positions[0, 0] == 13  # vocabulary order == var order here (ids sorted)
    assert len(set(positions[0].tolist())) == 7


def test_rank_divides_by_the_nonzero_train_median():
    # Gene 0: CPM 1e3 in every expressing train case (zeros ignored by the median); gene 1: 1e5.
    counts = np.array([[1, 100, 899], [0, 100, 900], [0, 100, 900], [1, 100, 899]])
    fitted = GeneOrder(SequenceConfig(seq_len=8, min_fraction_expressed=0)).fit(make_adata(counts))
    np.testing.assert_allclose(fitted.medians_[:2], [1e3, 1e5])
    # A case with gene 0 at 3x its median and gene 1 at 2x ranks gene 0 first though it is
    # far less expressed; gene 2 (below its median) comes last; padding after.
    linear, _ = fitted.expression(make_adata(np.array([[3, 200, 797]])))
    assert fitted.transform(linear).tolist() == [[0, 1, 2, -1, -1, -1, -1]]


def test_rank_drops_zero_genes_and_cuts_at_seq_len():
    counts = np.arange(1, 41)[None, :].repeat(5, axis=0)
    fitted = GeneOrder(SequenceConfig(seq_len=10, min_fraction_expressed=0)).fit(
        make_adata(counts)
    )
    case = np.zeros((1, 40), dtype=int)
    case[0, [3, 30]] = [8, 31]  # gene 3 at twice its median's share, gene 30 at once
    linear, _ = fitted.expression(make_adata(case))
    assert fitted.transform(linear).tolist() == [[3, 30] + [-1] * 7]
    linear, _ = fitted.expression(make_adata(counts[:1]))
    assert (fitted.transform(linear) >= 0).sum() == 9  # seq_len - 1: <cls> takes one place


def test_fixed_order_without_hvg_is_var_order_for_every_case(counts_matrix):
    adata = make_adata(counts_matrix(6, 30) + 1)
    cfg = SequenceConfig(order="fixed", seq_len=12, min_fraction_expressed=0)
    fitted = GeneOrder(cfg).fit(adata)
    positions = fitted.transform(fitted.expression(adata)[0])
    assert (positions == positions[0]).all()
    assert fitted.genes_[positions[0]].tolist() == list(range(11))


def test_hvg_is_scanpy_seurat_on_train_log_data_in_dispersion_order(counts_matrix):
    counts = counts_matrix(30, 120, seed=3) + 1
    counts[:, 7] = counts[:, 7] * np.tile([0, 10], 15)  # strongly variable across cases
    adata = make_adata(counts)
    cfg = SequenceConfig(order="fixed", n_hvg=15, seq_len=64, min_fraction_expressed=0)
    fitted = GeneOrder(cfg).fit(adata)

    expected = ad.AnnData(X=np.log1p(normalised(adata, method="log1p_cpm")[0]))
    table = sc.pp.highly_variable_genes(expected, flavor="seurat", n_top_genes=15, inplace=False)
    hvg = table.index[table["highly_variable"]].astype(int)
    by_dispersion = table.loc[table["highly_variable"], "dispersions_norm"]
    by_dispersion = by_dispersion.sort_values(ascending=False, kind="stable")
    assert sorted(fitted.genes_.tolist()) == sorted(hvg.tolist())
    in_sequence = fitted.genes_[fitted.transform(fitted.expression(adata)[0])[0]]
    assert in_sequence[:15].tolist() == by_dispersion.index.astype(int).tolist()
    assert (fitted.transform(fitted.expression(adata)[0])[0, 15:] == -1).all()
