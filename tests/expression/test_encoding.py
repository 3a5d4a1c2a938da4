"""The fitted encoding (SequenceEncoding): byte-identical sequences, save/load, new cases."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
import pytest

from mgi.cli import main
from mgi.errors import ExpressionFileError
from mgi.expression.encoding import SequenceEncoding
from mgi.expression.tokens import build_sequences, read_sequences, write_sequences
from mgi.options import ExpressionOptions
from tests.expression.test_tokens import (
    CONFIG_IDS,
    CONFIGS,
    N_CASES,
    N_GENES,
    gene_positions,
    make_adata,
)

# sha256 of sequences.npz and vocab.tsv that build_sequences wrote before the encoding existed
# (commit b859c2b), on make_adata(counts_matrix(24, 80, seed=7)) and the `cohort` splits.
GOLDEN = {
    "rank-bins": ("fb1d48fed9c4fb415fb11fb0029a0d1ec9cf19f1d89362860153174c73eda2dd",
                  "c0001ffb6dc3ee84b0c6509fa074e7c2c1a83e0271b4bb3b5028eb9d922574b3"),
    "fixed-hvg-continuous": ("2f6607de86d01dc46e71d03c4ea8440dc4d36e47051149459ed76e643ed5c8ad",
                             "14975929d0cefd629b611dc264bc734294707c79be2d0de8df07848ecc28857e"),
    "tpm-hvg": ("043838e7f41bbda0fb5f69f1ee74f90b35ddd4077ec6da46a62654923a426f3b",
                "9739b3216426ed992eb9edbe76295150719f730a3c920809e1a2d8d8d490b866"),
    "genomic-fpkm_uq": ("055f6d446940a41287aa94c6a9fc556280bf65a86f3f1a35285f6f5c2729573b",
                        "e8719050f366c2fde111092acebca5db3d05604858ce430f042c75f4cd202870"),
    "genomic-hvg-continuous": ("0b61d801dc69b0459ef92672d1538f04eac7ef3d8049f6a0fdf450f4f7fa1d3f",
                               "9a39ee22bd9445bfe529c8f350cbd777ddbfb4f8d3acc518995d7862974455a9"),
    "fixed-hvg-zscore": ("8d67405d1112398c6458222fa4aa31ea5e2f51b4d1d91074cd3a32ab4cf13b84",
                         "14975929d0cefd629b611dc264bc734294707c79be2d0de8df07848ecc28857e"),
    "fixed-list": ("fce2e5f0eecdacb967bf81b9d29f3885af4d05dd89b537e62a3e626aba01fb71",
                   "a0b03e9434b05b1a8819ab591daa5fc3c5b2bc259f698086c51e8d00e0faa42b"),
}
CASES = [*zip(CONFIG_IDS, CONFIGS, strict=True),
         ("fixed-list", ExpressionOptions(seq_len=16, order="fixed"))]
GENE_LIST = [f"ENSG{i:011d}" for i in (5, 3, 40, 11, 70, 2)]


@pytest.fixture
def cohort(counts_matrix):
    adata = make_adata(counts_matrix(N_CASES, N_GENES, seed=7))
    splits = pd.DataFrame({"case_id": adata.obs_names[::-1],
                           "split": (["train"] * 16 + ["val"] * 4 + ["test"] * 4)[::-1]})
    return adata, splits


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_sequences_are_byte_identical_to_the_pre_encoding_output(cohort, name, cfg, tmp_path):
    adata, splits = cohort
    seqs = build_sequences(adata, splits, config=cfg, positions=gene_positions(N_GENES),
                           gene_list=GENE_LIST if name == "fixed-list" else None)
    write_sequences(seqs, sequences_path=tmp_path / "s.npz", vocab_path=tmp_path / "v.tsv")
    assert (_sha(tmp_path / "s.npz"), _sha(tmp_path / "v.tsv")) == GOLDEN[name]


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_saved_encoding_reencodes_every_case_identically(cohort, name, cfg, tmp_path):
    adata, splits = cohort
    seqs = build_sequences(adata, splits, config=cfg, positions=gene_positions(N_GENES),
                           gene_list=GENE_LIST if name == "fixed-list" else None)
    seqs.encoding.save(tmp_path / "a.npz")
    loaded = SequenceEncoding.load(tmp_path / "a.npz")
    loaded.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert loaded.config == cfg
    pd.testing.assert_frame_equal(loaded.vocab, seqs.vocab)
    tokens, values = loaded.encode(adata[seqs.case_ids])
    np.testing.assert_array_equal(tokens, seqs.token_ids)
    np.testing.assert_array_equal(values, seqs.values)
    if cfg.order == "genomic":
        assert loaded.chromosome is not None and loaded.chromosome.size == loaded.gene_ids.size


def test_new_cases_align_by_id_versions_ignored_missing_genes_unexpressed(cohort, caplog):
    adata, splits = cohort
    cfg = ExpressionOptions(seq_len=24, order="fixed", n_hvg=20, values="continuous")
    encoding = build_sequences(adata, splits, config=cfg).encoding
    new = adata[:3].copy()
    expected_tokens, expected_values = encoding.encode(new)
    # Versioned ids, shuffled columns, one extra gene: the same sequences.
    rng = np.random.default_rng(1)
    shuffled = new[:, rng.permutation(new.n_vars)].copy()
    shuffled.var_names = [f"{g}.7" for g in shuffled.var_names]
    tokens, values = encoding.encode(shuffled)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(values, expected_values, rtol=1e-6)
    # A known gene missing: its token stays, with value 0; the count is logged.
    dropped = str(encoding.gene_ids[0])
    fewer = new[:, new.var_names != dropped].copy()
    fewer.layers["counts"][:] = new.layers["counts"][:, new.var_names != dropped]
    with caplog.at_level(logging.WARNING, logger="mgi.expression.encoding"):
        tokens, values = encoding.encode(fewer)
    assert "19 of the encoding's 20 genes found in the cohort, 1 missing" in caplog.text
    at = tokens == 3  # token of vocabulary index 0
    assert at[:, 1:].sum(axis=1).tolist() == [1, 1, 1]
    assert (values[at] == 0).all()


def test_too_few_genes_or_another_id_space_is_refused(cohort):
    adata, splits = cohort
    encoding = build_sequences(adata, splits, config=ExpressionOptions(seq_len=16)).encoding
    keep = ~adata.var_names.isin(encoding.gene_ids[: encoding.gene_ids.size // 2 + 1])
    with pytest.raises(ExpressionFileError, match=r"only \d+ of the encoding's \d+ genes"):
        encoding.encode(adata[:, keep].copy())
    symbols = adata.copy()
    symbols.var_names = adata.var["gene_name"].to_numpy()
    with pytest.raises(ExpressionFileError, match=r"look like gene symbols.*Ensembl ids"):
        encoding.encode(symbols)


def test_loading_a_bad_or_other_version_encoding_names_the_file(cohort, tmp_path):
    adata, splits = cohort
    encoding = build_sequences(adata, splits, config=ExpressionOptions(seq_len=16)).encoding
    encoding.save(tmp_path / "e.npz")
    with np.load(tmp_path / "e.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["header_json"] = np.asarray(
        str(arrays["header_json"][()]).replace('"version": 1', '"version": 99'))
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(ExpressionFileError, match=r"v99.npz: encoding version 99; expected 1"):
        SequenceEncoding.load(tmp_path / "v99.npz")
    (tmp_path / "junk.npz").write_text("no")
    with pytest.raises(ExpressionFileError, match=r"junk\.npz: not an encoding"):
        SequenceEncoding.load(tmp_path / "junk.npz")


def test_cli_writes_the_encoding_and_encodes_with_a_given_one(cohort, tmp_path):
    adata, splits = cohort
    adata.write_h5ad(tmp_path / "expression.h5ad")
    splits.to_csv(tmp_path / "splits.tsv", sep="\t", index=False)
    common = ["sequences", "--expression", str(tmp_path / "expression.h5ad"),
              "--splits", str(tmp_path / "splits.tsv"),
              "--settings", '{"expression": {"seq_len": 16}}']
    assert main([*common, "--sequences", str(tmp_path / "a.npz"),
                 "--vocab", str(tmp_path / "a.tsv"), "--encoding", str(tmp_path / "enc.npz")]) == 0
    # Another cohort's encoding (here: fitted on 8 train cases only) is applied, not refitted.
    other = build_sequences(adata, splits.assign(split=["train"] * 8 + ["test"] * 16),
                            config=ExpressionOptions(seq_len=16, n_bins=5))
    other.encoding.save(tmp_path / "other.npz")
    assert main([*common, "--sequences", str(tmp_path / "b.npz"),
                 "--vocab", str(tmp_path / "b.tsv"),
                 "--from-encoding", str(tmp_path / "other.npz")]) == 0
    a = read_sequences(tmp_path / "a.npz", vocab_path=tmp_path / "a.tsv")
    b = read_sequences(tmp_path / "b.npz", vocab_path=tmp_path / "b.tsv")
    mine = SequenceEncoding.load(tmp_path / "enc.npz")
    np.testing.assert_array_equal(mine.encode(adata[a.case_ids])[0], a.token_ids)
    np.testing.assert_array_equal(b.token_ids, other.token_ids)
    np.testing.assert_array_equal(b.values, other.values)
    pd.testing.assert_frame_equal(b.vocab, other.vocab, check_dtype=False)
    assert b.attrs["config"]["n_bins"] == 5 and b.splits.tolist() == a.splits.tolist()
