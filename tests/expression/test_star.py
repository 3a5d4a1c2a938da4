"""STAR gene-count reader: the real GDC layout, synthetic files, and every malformed input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from mgi.errors import ExpressionFileError
from mgi.expression.star import read_star_cohort, read_star_counts


def test_real_gdc_sample_reads_96_genes_qc_rows_and_gene_model(gdc_sample):
    star = read_star_counts(gdc_sample)
    assert star.gene_model == "GENCODE v36"
    assert star.genes.shape == (96, 3)
    assert list(star.genes.columns) == ["gene_id", "gene_name", "gene_type"]
    assert star.genes.iloc[0].tolist() == ["ENSG00000000003.15", "TSPAN6", "protein_coding"]
    assert not star.genes["gene_id"].str.startswith("N_").any()
    assert star.qc == {
        "n_unmapped": 38463, "n_multimapping": 438275,
        "n_no_feature": 2115417, "n_ambiguous": 318096,
    }
    counts, tpm = star.values["unstranded"], star.values["tpm_unstranded"]
    assert counts.dtype == np.int64 and counts.shape == (96,)
    assert counts[:3].tolist() == [429, 2, 20]
    assert tpm[0] == pytest.approx(92548.07751878405)
    # The GDC computes TPM over the genes of the file: here the 96-gene subset sums to 1e6.
    assert tpm.sum() == pytest.approx(1e6, rel=1e-6)


def test_real_sample_gzip_and_plain_copies_read_the_same(gdc_sample, tmp_path):
    plain = tmp_path / "sample.tsv"
    plain.write_bytes(gzip.decompress(gdc_sample.read_bytes()))
    genes, values, qc = read_star_cohort([gdc_sample, plain], columns=("unstranded",))
    assert genes.shape == (96, 3)
    assert values["unstranded"].shape == (2, 96)
    np.testing.assert_array_equal(values["unstranded"][0], values["unstranded"][1])
    assert qc.index.tolist() == [str(gdc_sample), str(plain)]


def test_synthetic_file_round_trips_counts_tpm_and_qc(tmp_path, write_star, genes):
    counts = np.arange(len(genes)) * 3
    tpm = np.linspace(0.5, 99.5, len(genes))
    path = write_star(tmp_path / "a.tsv.gz", genes, counts, tpm=tpm, qc=(5, 6, 7, 8))
    star = read_star_counts(path, columns=("unstranded", "tpm_unstranded", "stranded_first"))
    np.testing.assert_array_equal(star.values["unstranded"], counts)
    np.testing.assert_allclose(star.values["tpm_unstranded"], tpm)
    np.testing.assert_array_equal(star.values["stranded_first"], 0)
    assert star.qc == {"n_unmapped": 5, "n_multimapping": 6, "n_no_feature": 7, "n_ambiguous": 8}
    assert star.genes["gene_id"].tolist() == genes["gene_id"].tolist()


def test_gzip_is_detected_by_content_not_suffix(tmp_path, write_star, genes):
    path = write_star(tmp_path / "a.tsv.gz", genes, np.ones(len(genes), dtype=int))
    renamed = path.rename(tmp_path / "no_suffix.tsv")
    assert read_star_counts(renamed).values["unstranded"].sum() == len(genes)


def _lines(write_star, tmp_path, genes):
    path = write_star(tmp_path / "ok.tsv", genes, np.arange(len(genes)) + 1)
    return path.read_text().splitlines()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda ls: [ls[0], ls[1].replace("unstranded\t", "counts\t", 1), *ls[2:]],
         "missing column(s) ['unstranded']"),
        (lambda ls: [*ls[:7], ls[7].replace("\t2\t0\t", "\tmany\t0\t", 1), *ls[8:]],
         "line 8 (ENSG00000000002.2), column 'unstranded': 'many' is not numeric"),
        (lambda ls: [*ls[:8], ls[8].replace("\t3\t0\t", "\t-3\t0\t", 1), *ls[9:]],
         "line 9 (ENSG00000000003.3), column 'unstranded': '-3'; expected a non-negative"),
        (lambda ls: [*ls[:8], ls[8].replace("\t3\t0\t", "\t3.5\t0\t", 1), *ls[9:]],
         "line 9 (ENSG00000000003.3), column 'unstranded': '3.5' is not an integer"),
        (lambda ls: [*ls[:6], "\t".join([*ls[6].split("\t")[:6], "-1.0", "0", "0"]), *ls[7:]],
         "line 7 (ENSG00000000001.1), column 'tpm_unstranded': '-1.0'"),
        (lambda ls: ls[1:], "line 1 is 'gene_id"),
        (lambda ls: [], "file is empty"),
        (lambda ls: ls[:2], "QC row(s) ['N_unmapped', 'N_multimapping'"),
        (lambda ls: [*ls[:4], *ls[5:]], "QC row(s) ['N_noFeature'] missing"),
        (lambda ls: ls[:6], "no gene rows"),
        (lambda ls: [*ls[:7], ls[7].rsplit("\t", 1)[0], *ls[8:]], "line 8 has 8 fields"),
        (lambda ls: [*ls, ls[-1]], "gene id(s) repeated, e.g. 'ENSG00000000012.5'"),
    ],
    ids=[
        "missing-column", "non-numeric-count", "negative-count", "fractional-count",
        "negative-tpm", "no-gene-model-line", "empty", "no-qc-rows", "one-qc-row-missing",
        "no-genes", "short-row", "repeated-gene",
    ],
)
def test_malformed_file_raises_naming_file_and_problem(
    tmp_path, write_star, genes, edit, expected
):
    lines = edit(_lines(write_star, tmp_path, genes))
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(ExpressionFileError) as err:
        read_star_counts(bad)
    assert str(err.value).startswith(f"{bad}: ")
    assert expected in str(err.value)


def test_error_line_number_counts_from_the_top_of_a_gzip_file(tmp_path, write_star, genes):
    counts = np.ones(len(genes), dtype=int)
    text = write_star(tmp_path / "ok.tsv", genes, counts).read_text().splitlines()
    text[10] = text[10].replace("\t1\t0\t", "\tx\t0\t", 1)
    bad = tmp_path / "bad.tsv.gz"
    bad.write_bytes(gzip.compress(("\n".join(text) + "\n").encode()))
    with pytest.raises(ExpressionFileError, match=r"bad\.tsv\.gz: line 11 .*'x' is not numeric"):
        read_star_counts(bad)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(ExpressionFileError, match=r"absent\.tsv: file not found"):
        read_star_counts(tmp_path / "absent.tsv")
    corrupt = tmp_path / "corrupt.tsv.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ExpressionFileError, match=r"corrupt\.tsv\.gz: cannot read"):
        read_star_counts(corrupt)


def test_cohort_stacks_files_in_the_order_given(tmp_path, write_star, genes):
    paths = [
        write_star(tmp_path / f"{i}.tsv", genes, np.full(len(genes), i), qc=(i, 0, 0, 0))
        for i in (3, 1, 2)
    ]
    out_genes, values, qc = read_star_cohort(paths)
    assert out_genes["gene_id"].tolist() == genes["gene_id"].tolist()
    assert out_genes.attrs["gene_model"] == "GENCODE v36"
    assert values["unstranded"][:, 0].tolist() == [3, 1, 2]
    assert values["tpm_unstranded"].shape == (3, len(genes))
    assert qc["n_unmapped"].tolist() == [3, 1, 2]
    assert qc.index.tolist() == [str(p) for p in paths]


def test_cohort_with_two_gene_models_names_the_odd_file(tmp_path, write_star, genes):
    counts = np.ones(len(genes), dtype=int)
    a = write_star(tmp_path / "a.tsv", genes, counts)
    odd = write_star(tmp_path / "odd.tsv", genes, counts, gene_model="GENCODE v22")
    with pytest.raises(ExpressionFileError, match=r"odd\.tsv: gene model 'GENCODE v22' differs"):
        read_star_cohort([a, odd])


def test_cohort_with_other_gene_order_names_the_odd_file(tmp_path, write_star, genes):
    counts = np.ones(len(genes), dtype=int)
    a = write_star(tmp_path / "a.tsv", genes, counts)
    odd = write_star(tmp_path / "odd.tsv", genes.iloc[::-1], counts)
    short = write_star(tmp_path / "short.tsv", genes.iloc[:-1], counts[:-1])
    with pytest.raises(ExpressionFileError, match=r"odd\.tsv: gene ids differ .*\(gene 1 is"):
        read_star_cohort([a, odd])
    with pytest.raises(ExpressionFileError, match=r"short\.tsv: gene ids differ .*\(11 genes"):
        read_star_cohort([a, short])


def test_cohort_reports_the_first_bad_file_in_input_order(tmp_path, write_star, genes):
    counts = np.ones(len(genes), dtype=int)
    good = [write_star(tmp_path / f"{i}.tsv", genes, counts) for i in range(4)]
    (tmp_path / "bad1.tsv").write_text("")
    (tmp_path / "bad2.tsv").write_text("")
    paths = [good[0], tmp_path / "bad1.tsv", good[1], tmp_path / "bad2.tsv", *good[2:]]
    with pytest.raises(ExpressionFileError, match=r"bad1\.tsv: file is empty"):
        read_star_cohort(paths, max_workers=2)
