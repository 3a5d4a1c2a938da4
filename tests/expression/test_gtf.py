"""GENCODE GTF gene positions: gene records only, ids without versions, release check, errors."""

from __future__ import annotations

import gzip

import pandas as pd
import pytest

from mgi.errors import ExpressionFileError
from mgi.expression.gtf import (
    check_gene_model,
    chromosome_rank,
    genomic_order,
    gtf_version,
    read_gene_positions,
)

HEADER = (
    "##description: evidence-based annotation of the human genome (GRCh38), version 36 "
    "(Ensembl 102)\n##provider: GENCODE\n##contact: gencode-help@ebi.ac.uk\n##format: gtf\n"
    "##date: 2020-10-01\n"
)


def record(chrom: str, feature: str, start: int, gene_id: str, name: str, extra: str = "") -> str:
    attrs = f'gene_id "{gene_id}"; gene_type "protein_coding"; gene_name "{name}"; level 2;'
    return f"{chrom}\tHAVANA\t{feature}\t{start}\t{start + 999}\t.\t+\t.\t{attrs}{extra}\n"


GTF = HEADER + "".join([
    record("chr1", "gene", 11869, "ENSG00000223972.5", "DDX11L1"),
    record("chr1", "transcript", 11869, "ENSG00000223972.5", "DDX11L1",
           ' transcript_id "ENST00000456328.2";'),
    record("chr1", "exon", 11869, "ENSG00000223972.5", "DDX11L1"),
    record("chrX", "gene", 100627108, "ENSG00000000003.15", "TSPAN6"),
    "#a comment line in the middle\n",
    record("chrY", "gene", 2691187, "ENSG00000002586.20_PAR_Y", "CD99"),
    record("chrX", "gene", 2691187, "ENSG00000002586.20", "CD99"),
    record("chr10", "gene", 500, "ENSG00000260370.1", "AC"),
    record("chr2", "gene", 900, "ENSG00000228037.1", "AL"),
])


@pytest.fixture(params=["plain", "gzip"])
def gtf_path(request, tmp_path):
    if request.param == "gzip":
        path = tmp_path / "gencode.v36.annotation.gtf.gz"
        path.write_bytes(gzip.compress(GTF.encode(), mtime=0))
    else:
        path = tmp_path / "gencode.v36.annotation.gtf"
        path.write_text(GTF)
    return path


def test_reads_gene_records_only_with_unversioned_ids(gtf_path):
    genes = read_gene_positions(gtf_path)
    assert genes.index.tolist() == [
        "ENSG00000223972", "ENSG00000000003", "ENSG00000002586_PAR_Y", "ENSG00000002586",
        "ENSG00000260370", "ENSG00000228037",
    ]
    assert genes.loc["ENSG00000000003"].to_dict() == {
        "gene_id_version": "ENSG00000000003.15", "gene_name": "TSPAN6",
        "gene_type": "protein_coding", "chromosome": "chrX", "start": 100627108,
        "end": 100628107, "strand": "+",
    }
    assert gtf_version(gtf_path) == 36


def test_genomic_order_is_numeric_by_chromosome_then_start(gtf_path):
    order = genomic_order(read_gene_positions(gtf_path)).sort_values()
    assert order.index.tolist() == [
        "ENSG00000223972", "ENSG00000228037", "ENSG00000260370",  # chr1, chr2, chr10
        "ENSG00000002586", "ENSG00000000003", "ENSG00000002586_PAR_Y",  # chrX x2, chrY
    ]
    names = pd.Series(["chr2", "10", "chrM", "X", "chrUn_KI270742v1", "chr1", "MT"])
    assert chromosome_rank(names).tolist() == [2, 10, 25, 23, 1000, 1, 25]


def test_gene_model_release_must_match_the_expression_files(gtf_path, caplog):
    check_gene_model(gtf_path, "GENCODE v36")
    with pytest.raises(ExpressionFileError, match=r"version 36 .*'GENCODE v22'"):
        check_gene_model(gtf_path, "GENCODE v22")
    bare = gtf_path.with_name("bare.gtf")
    bare.write_text(GTF.split("##date: 2020-10-01\n")[1])
    with caplog.at_level("WARNING"):
        check_gene_model(bare, "GENCODE v22")  # nothing to compare: a warning, not an error
    assert "cannot compare" in caplog.text


def test_bad_gtfs_are_named_with_the_problem(tmp_path):
    with pytest.raises(ExpressionFileError, match=r"missing.gtf: GTF file not found"):
        read_gene_positions(tmp_path / "missing.gtf")
    no_genes = tmp_path / "no_genes.gtf"
    no_genes.write_text(HEADER + record("chr1", "exon", 5, "ENSG1.1", "A"))
    with pytest.raises(ExpressionFileError, match=r"no_genes.gtf: no 'gene' records"):
        read_gene_positions(no_genes)
    short = tmp_path / "short.gtf"
    short.write_text(HEADER + "chr1\tHAVANA\tgene\t5\n")
    with pytest.raises(ExpressionFileError, match=r"short.gtf: cannot read as a GTF"):
        read_gene_positions(short)
    no_id = tmp_path / "no_id.gtf"
    no_id.write_text(HEADER + record("chr1", "gene", 5, "ENSG1.1", "A").replace("gene_id", "id"))
    with pytest.raises(ExpressionFileError, match=r"no_id.gtf: 'gene' record 1 has no gene_id"):
        read_gene_positions(no_id)
    twice = tmp_path / "twice.gtf"
    twice.write_text(HEADER + record("chr1", "gene", 5, "ENSG1.1", "A")
                     + record("chr2", "gene", 9, "ENSG1.2", "A"))
    with pytest.raises(ExpressionFileError, match=r"twice.gtf: gene id\(s\) \['ENSG1'\]"):
        read_gene_positions(twice)
