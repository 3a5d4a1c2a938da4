"""Gene selection and order: scanpy normalisation and HVGs, rank-value order, fixed order."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from mgi.errors import ConfigError, ExpressionFileError
from mgi.expression.order import GeneOrder, normalised, read_gene_list
from mgi.options import ExpressionOptions, as_dict, build


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
        ({"seq_len": 4}, "expression.seq_len"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(kwargs, message):
    # the schema's bounds and enums (the only place they are written) are checked on building
    with pytest.raises(ConfigError, match=message):
        build(ExpressionOptions, kwargs, where="expression")


def test_config_from_mapping_accepts_lists_and_rejects_unknown_keys():
    cfg = build(ExpressionOptions, {"gene_types": ["protein_coding", "lncRNA"], "seq_len": 64},
                where="expression")
    assert cfg.gene_types == ("protein_coding", "lncRNA") and cfg.seq_len == 64
    assert as_dict(cfg)["gene_types"] == ["protein_coding", "lncRNA"]
    with pytest.raises(ConfigError, match=r"expression.seqlen: unknown key; did you mean"):
        build(ExpressionOptions, {"seqlen": 64}, where="expression")


def test_cpm_normalisation_is_scanpy_normalize_total_then_log1p(monkeypatch, counts_matrix):
    adata = make_adata(counts_matrix(6, 40))
    calls = []
    real = sc.pp.normalize_total
    monkeypatch.setattr(
        sc.pp, "normalize_total",
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
    fitted = GeneOrder(ExpressionOptions(min_fraction_expressed=0.1, seq_len=8)).fit(adata)
    assert fitted.genes_.tolist() == [0, 2, 4]
    fitted = GeneOrder(ExpressionOptions(min_fraction_expressed=0.2, seq_len=8)).fit(adata)
    assert fitted.genes_.tolist() == [0, 4]
    every_type = ExpressionOptions(gene_types=(), min_fraction_expressed=0.2, seq_len=8)
    assert GeneOrder(every_type).fit(adata).genes_.tolist() == [0, 4, 5]


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
def test_no_gene_passing_the_filters_is_an_error():
    adata = make_adata(np.zeros((4, 5)))
    with pytest.raises(ExpressionFileError, match="no gene of type"):
        GeneOrder(ExpressionOptions(seq_len=8)).fit(adata)


def test_rank_puts_a_gene_at_ten_times_its_median_first():
    rng = np.random.default_rng(1)
    counts = rng.integers(50, 60, size=(9, 200)) * 100
    train = make_adata(counts)
    fitted = GeneOrder(ExpressionOptions(seq_len=8, min_fraction_expressed=0)).fit(train)
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
    config = ExpressionOptions(seq_len=8, min_fraction_expressed=0)
    fitted = GeneOrder(config).fit(make_adata(counts))
    np.testing.assert_allclose(fitted.medians_[:2], [1e3, 1e5])
    # A case with gene 0 at 3x its median and gene 1 at 2x ranks gene 0 first though it is
    # far less expressed; gene 2 (below its median) comes last; padding after.
    linear, _ = fitted.expression(make_adata(np.array([[3, 200, 797]])))
    assert fitted.transform(linear).tolist() == [[0, 1, 2, -1, -1, -1, -1]]


def test_rank_drops_zero_genes_and_cuts_at_seq_len():
    counts = np.arange(1, 41)[None, :].repeat(5, axis=0)
    fitted = GeneOrder(ExpressionOptions(seq_len=10, min_fraction_expressed=0)).fit(
        make_adata(counts)
    )
    case = np.zeros((1, 40), dtype=int)
    case[0, [3, 30]] = [8, 31]  # gene 3 at twice its median's share, gene 30 at once
    linear, _ = fitted.expression(make_adata(case))
    assert fitted.transform(linear).tolist() == [[3, 30] + [-1] * 7]
    linear, _ = fitted.expression(make_adata(counts[:1]))
    assert (fitted.transform(linear) >= 0).sum() == 9  # seq_len - 1: <cls> takes one place


def test_fixed_order_without_hvg_keeps_the_most_expressed_train_genes_in_that_order():
    means = np.arange(1, 31) * 10  # gene i has mean 10 * (i + 1)
    counts = np.tile(means, (6, 1))
    counts[:, [4, 17]] = counts[:, [17, 4]]  # genes 4 and 17 swap places
    adata = make_adata(counts)
    cfg = ExpressionOptions(order="fixed", seq_len=6, min_fraction_expressed=0)
    fitted = GeneOrder(cfg).fit(adata)
    positions = fitted.transform(fitted.expression(make_adata(counts[:2] * 0 + 1))[0])
    assert (positions == positions[0]).all()  # the same genes for every case, expressed or not
    assert fitted.genes_[positions[0]].tolist() == [29, 28, 27, 26, 25]


def positions_table(chromosomes: list[str], starts: list[int]) -> pd.DataFrame:
    """Gene positions as read_gene_positions returns them, for make_adata's gene ids."""
    ids = [f"ENSG{i:011d}" for i in range(len(starts))]
    return pd.DataFrame(
        {"chromosome": chromosomes, "start": starts, "end": [s + 10 for s in starts]},
        index=ids,
    )


def test_genomic_order_is_chromosome_then_start_for_every_case():
    counts = np.full((4, 6), 100)
    counts[0, 0] = 0  # gene 0 not expressed in one case: it keeps its place (value 0)
    positions = positions_table(
        ["chr2", "chr10", "chr1", "chrX", "chr1", "chr2"], [500, 10, 900, 5, 100, 20]
    )
    cfg = ExpressionOptions(order="genomic", seq_len=10, min_fraction_expressed=0)
    fitted = GeneOrder(cfg).fit(make_adata(counts), positions=positions)
    sequence = fitted.transform(fitted.expression(make_adata(counts))[0])
    expected = [4, 2, 5, 0, 1, 3]  # chr1:100, chr1:900, chr2:20, chr2:500, chr10 (not 1 < 2), X
    for row in sequence:
        assert fitted.genes_[row[:6]].tolist() == expected
        assert (row[6:] == -1).all()


def test_genomic_order_keeps_the_most_expressed_genes_when_they_do_not_fit():
    counts = np.tile(np.array([5, 50, 10, 40, 30, 20]), (3, 1))
    positions = positions_table(["chr1"] * 6, [60, 50, 40, 30, 20, 10])
    cfg = ExpressionOptions(order="genomic", seq_len=4, min_fraction_expressed=0)
    fitted = GeneOrder(cfg).fit(make_adata(counts), positions=positions)
    row = fitted.transform(fitted.expression(make_adata(counts))[0])[0]
    # top three by expression: genes 1, 3, 4; then by start: 4 (20), 3 (30), 1 (50)
    assert fitted.genes_[row].tolist() == [4, 3, 1]


def test_genomic_order_leaves_out_genes_missing_from_the_gtf_and_needs_positions(caplog):
    counts = np.full((3, 5), 100)
    positions = positions_table(["chr1"] * 5, [50, 40, 30, 20, 10]).drop(index="ENSG00000000002")
    cfg = ExpressionOptions(order="genomic", seq_len=10, min_fraction_expressed=0)
    with caplog.at_level("WARNING"):
        fitted = GeneOrder(cfg).fit(make_adata(counts), positions=positions)
    assert sorted(fitted.genes_.tolist()) == [0, 1, 3, 4]
    assert "1 candidate gene(s) have no 'gene' record in the GTF" in caplog.text
    with pytest.raises(ConfigError, match=r"genomic.*needs gene positions"):
        GeneOrder(cfg).fit(make_adata(counts))


def test_gene_list_restricts_the_genes_and_gives_the_fixed_order(caplog):
    counts = np.full((3, 8), 100)
    adata = make_adata(counts)
    entries = ["G5", "ENSG00000000002.7", "NOT_A_GENE", "G0", "G5"]  # names, versioned id
    cfg = ExpressionOptions(order="fixed", seq_len=10, min_fraction_expressed=0)
    with caplog.at_level("WARNING"):
        fitted = GeneOrder(cfg).fit(adata, gene_list=entries)
    row = fitted.transform(fitted.expression(adata)[0])[0]
    assert fitted.genes_[row[:3]].tolist() == [5, 2, 0] and (row[3:] == -1).all()
    assert "1 of 5 gene(s) not in the expression matrix" in caplog.text
    ranked = GeneOrder(ExpressionOptions(seq_len=10, min_fraction_expressed=0)).fit(
        adata, gene_list=entries
    )
    assert sorted(ranked.genes_.tolist()) == [0, 2, 5]
    with pytest.raises(ExpressionFileError, match=r"among the genes of expression.gene_list"):
        GeneOrder(cfg).fit(adata, gene_list=["NOT_A_GENE"])


def test_gene_list_file_skips_comments_header_and_extra_columns(tmp_path):
    path = tmp_path / "genes.tsv"
    path.write_text("gene_id\tnote\n# a comment\nENSG1.2\tx\n\nTP53\n")
    assert read_gene_list(path) == ["ENSG1.2", "TP53"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ExpressionFileError, match=r"empty.txt: no gene in the list"):
        read_gene_list(tmp_path / "empty.txt")


def test_fpkm_uq_normalisation_is_log1p_of_its_layer():
    adata = make_adata(np.array([[1, 2, 3], [4, 5, 6]]))
    adata.layers["fpkm_uq"] = np.array([[10.0, 0.0, 3.0], [1.0, 2.0, 0.5]], dtype=np.float32)
    linear, logged = normalised(adata, method="fpkm_uq")
    np.testing.assert_allclose(linear, adata.layers["fpkm_uq"])
    np.testing.assert_allclose(logged, np.log1p(adata.layers["fpkm_uq"]), rtol=1e-6)
    del adata.layers["fpkm_uq"]
    with pytest.raises(ExpressionFileError, match="no 'fpkm_uq' layer"):
        normalised(adata, method="fpkm_uq")


def test_hvg_is_scanpy_seurat_on_train_log_data_in_dispersion_order(counts_matrix):
    counts = counts_matrix(30, 120, seed=3) + 1
    counts[:, 7] = counts[:, 7] * np.tile([0, 10], 15)  # strongly variable across cases
    adata = make_adata(counts)
    cfg = ExpressionOptions(order="fixed", n_hvg=15, seq_len=64, min_fraction_expressed=0)
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
