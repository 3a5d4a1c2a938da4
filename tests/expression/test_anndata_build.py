"""Manifest + STAR files -> one AnnData profile per case; duplicates, missing files, h5ad."""

from __future__ import annotations

import gzip
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mgi.errors import ExpressionFileError, MgiError
from mgi.expression.anndata_build import build_expression, write_h5ad


def test_one_obs_per_case_with_counts_tpm_and_gene_annotation(
    tmp_path, genes, counts_matrix, cohort_writer
):
    counts = counts_matrix(5, len(genes))
    manifest = cohort_writer(tmp_path, genes, counts, case_ids=["c4", "c2", "c0", "c3", "c1"])
    adata = build_expression(manifest, raw_dir=tmp_path)

    assert adata.obs_names.tolist() == ["c0", "c1", "c2", "c3", "c4"]  # sorted by case
    assert adata.obs["file_id"].tolist() == ["file-002", "file-004", "file-001", "file-003",
                                             "file-000"]
    for column in ("case_id", "file_id", "sample_type", "project_id", "n_unmapped",
                   "n_multimapping", "n_no_feature", "n_ambiguous", "total_counts"):
        assert column in adata.obs.columns
    assert adata.obs["n_unmapped"].tolist() == [1000] * 5
    assert adata.var_names.tolist() == [g.split(".")[0] for g in genes["gene_id"]]
    assert adata.var["gene_id_version"].tolist() == genes["gene_id"].tolist()
    assert adata.var["gene_name"].tolist() == genes["gene_name"].tolist()
    assert adata.var["gene_type"].tolist() == genes["gene_type"].tolist()

    expected = counts[[2, 4, 1, 3, 0]]
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X, expected)
    np.testing.assert_array_equal(adata.layers["counts"], expected)
    np.testing.assert_allclose(
        adata.layers["tpm"], expected / expected.sum(axis=1, keepdims=True) * 1e6, rtol=1e-6
    )
    np.testing.assert_array_equal(adata.obs["total_counts"], expected.sum(axis=1))
    assert adata.uns["gene_model"] == "GENCODE v36"


def test_real_gdc_sample_builds_a_one_case_matrix(tmp_path, gdc_sample):
    rel = "expression/f1/sample.rna_seq.augmented_star_gene_counts.tsv.gz"
    (tmp_path / rel).parent.mkdir(parents=True)
    shutil.copyfile(gdc_sample, tmp_path / rel)
    pd.DataFrame([{
        "id": "f1", "filename": "sample.tsv.gz", "md5": "", "size": "", "state": "",
        "case_id": "TCGA-XX-0001", "data_type": "Gene Expression Quantification",
        "sample_type": "Primary Tumor", "path": rel,
    }]).to_csv(tmp_path / "manifest.tsv", sep="\t", index=False)
    adata = build_expression(tmp_path / "manifest.tsv", raw_dir=tmp_path)
    assert adata.shape == (1, 96)
    assert adata.var_names[0] == "ENSG00000000003"
    assert adata.var.loc["ENSG00000000003", "gene_name"] == "TSPAN6"
    assert adata.X[0, 0] == 429
    assert adata.obs.loc["TCGA-XX-0001", "n_unmapped"] == 38463


def test_par_y_genes_keep_their_suffix_so_ids_stay_unique(
    tmp_path, genes, counts_matrix, cohort_writer
):
    genes = genes.copy()
    genes.loc[5, "gene_id"] = genes.loc[4, "gene_id"].split(".")[0] + ".9_PAR_Y"
    manifest = cohort_writer(tmp_path, genes, counts_matrix(2, len(genes)))
    adata = build_expression(manifest, raw_dir=tmp_path)
    assert adata.var_names[4] == "ENSG00000000005"
    assert adata.var_names[5] == "ENSG00000000005_PAR_Y"
    assert adata.var_names.is_unique


def test_duplicate_profiles_follow_the_manifest_rule_and_dropped_ones_are_warned(
    tmp_path, genes, counts_matrix, cohort_writer, caplog
):
    counts = counts_matrix(7, len(genes))
    counts[1] = counts[0] * 3  # case A: the normal sample has the most reads, yet loses
    manifest = cohort_writer(
        tmp_path, genes, counts,
        case_ids=["A", "A", "B", "B", "C", "D", "D"],
        sample_types=["Primary Tumor", "Solid Tissue Normal", "Recurrent Tumor", "Primary Tumor",
                      "Solid Tissue Normal", "Primary Tumor", "Primary Tumor"],
        sample_barcodes=["A-01A", "A-11A", "B-02A", "B-01B", "C-11A", "D-01B", "D-01A"],
    )
    with caplog.at_level("WARNING"):
        adata = build_expression(manifest, raw_dir=tmp_path)
    # A: primary before normal; B: primary before recurrent; D: the smaller barcode.
    assert adata.obs_names.tolist() == ["A", "B", "D"]
    assert adata.obs["file_id"].tolist() == ["file-000", "file-003", "file-006"]
    assert adata.obs["sample_barcode"].tolist() == ["A-01A", "B-01B", "D-01A"]
    assert adata.obs["n_profiles"].tolist() == [2, 2, 2]
    np.testing.assert_array_equal(adata.X[1], counts[3])
    # Nothing disappears silently: each file left out, and case C, is named in a warning.
    for name in ("file-001", "file-002", "file-004", "file-005"):
        assert name in caplog.text
    assert "only normal-tissue expression profiles and are left out: ['C']" in caplog.text


def test_duplicates_are_refused_when_the_config_says_error(
    tmp_path, genes, counts_matrix, cohort_writer
):
    manifest = cohort_writer(
        tmp_path, genes, counts_matrix(3, len(genes)),
        case_ids=["A", "B", "B"],
        sample_types=["Primary Tumor", "Recurrent Tumor", "Primary Tumor"],
    )
    with pytest.raises(ExpressionFileError) as err:
        build_expression(manifest, raw_dir=tmp_path, duplicates="error")
    message = str(err.value)
    assert str(manifest) in message and "case B has 2 expression profiles" in message
    assert "file-001" in message and "file-002" in message
    assert "[Recurrent Tumor]" in message and "duplicate_profiles is 'error'" in message
    # One profile per case passes with "error" too.
    single = cohort_writer(tmp_path / "single", genes, counts_matrix(2, len(genes)))
    assert build_expression(single, raw_dir=tmp_path / "single", duplicates="error").n_obs == 2


def test_value_layers_are_read_as_asked(tmp_path, genes, counts_matrix, cohort_writer):
    counts = counts_matrix(3, len(genes))
    manifest = cohort_writer(tmp_path, genes, counts)
    adata = build_expression(manifest, raw_dir=tmp_path, layers=["tpm", "fpkm_uq"])
    assert sorted(adata.layers) == ["counts", "fpkm_uq", "tpm"]
    tpm = counts / counts.sum(axis=1, keepdims=True) * 1e6
    np.testing.assert_allclose(adata.layers["fpkm_uq"], tpm / 3, rtol=1e-5)  # conftest: tpm/3
    assert sorted(build_expression(manifest, raw_dir=tmp_path, layers=[]).layers) == ["counts"]
    with pytest.raises(MgiError, match="layers"):
        build_expression(manifest, raw_dir=tmp_path, layers=["rpkm"])


def test_missing_file_of_the_manifest_is_named(tmp_path, genes, counts_matrix, cohort_writer):
    manifest = cohort_writer(tmp_path, genes, counts_matrix(3, len(genes)))
    victim = next((tmp_path / "expression" / "file-001").iterdir())
    victim.unlink()
    with pytest.raises(ExpressionFileError, match=rf"{victim}: file not found .*file id file-001"):
        build_expression(manifest, raw_dir=tmp_path)


def test_files_whose_download_failed_are_left_out_with_a_warning(
    tmp_path, genes, counts_matrix, cohort_writer, caplog
):
    manifest = cohort_writer(tmp_path, genes, counts_matrix(3, len(genes)))
    next((tmp_path / "expression" / "file-001").iterdir()).unlink()
    (tmp_path / "download_failures.tsv").write_text(
        "id\tfilename\tcase_id\tdata_type\tpath\treason\n"
        "file-001\tx.tsv\tcase-001\tGene Expression Quantification\tx\tmd5 mismatch\n")
    adata = build_expression(manifest, raw_dir=tmp_path)
    assert "case-001" not in adata.obs_names and adata.n_obs == 2
    assert "case-001" in caplog.text and "download failed" in caplog.text


def test_other_data_types_are_ignored_and_gzip_files_read(
    tmp_path, genes, counts_matrix, cohort_writer
):
    slide = {"id": "s1", "filename": "x.svs", "md5": "", "size": "", "state": "",
             "case_id": "case-000", "data_type": "Slide Image", "sample_type": "Primary Tumor",
             "path": "slides/x.svs"}
    manifest = cohort_writer(tmp_path, genes, counts_matrix(2, len(genes)), extra_rows=[slide])
    # Gzip one file in place and point the manifest at it.
    table = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    plain = tmp_path / table.loc[0, "path"]
    gz = plain.with_name(plain.name + ".gz")
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    table.loc[0, "path"] = str(gz.relative_to(tmp_path))
    table.to_csv(manifest, sep="\t", index=False)
    adata = build_expression(manifest, raw_dir=tmp_path)
    assert adata.obs_names.tolist() == ["case-000", "case-001"]


def test_manifest_without_expression_rows_or_columns_raises(tmp_path):
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("id\tfilename\tcase_id\n")
    with pytest.raises(ExpressionFileError, match=r"missing column\(s\) \['data_type'"):
        build_expression(manifest, raw_dir=tmp_path)
    manifest.write_text("id\tfilename\tcase_id\tdata_type\tsample_type\tpath\n"
                        "s\tx.svs\tc\tSlide Image\tPrimary Tumor\tslides/x.svs\n")
    with pytest.raises(ExpressionFileError, match="no rows with data_type"):
        build_expression(manifest, raw_dir=tmp_path)


def test_project_id_comes_from_the_clinical_table(tmp_path, genes, counts_matrix, cohort_writer):
    manifest = cohort_writer(tmp_path, genes, counts_matrix(3, len(genes)))
    clinical = tmp_path / "clinical.tsv"
    pd.DataFrame({"case_id": ["case-000", "case-001"], "project_id": ["TCGA-LGG", "TCGA-GBM"],
                  "age": ["50", "60"]}).to_csv(clinical, sep="\t", index=False)
    adata = build_expression(manifest, raw_dir=tmp_path, clinical_path=clinical)
    # case-002 is absent from the clinical table: kept, with an empty project id.
    assert adata.obs["project_id"].tolist() == ["TCGA-LGG", "TCGA-GBM", ""]


def test_write_h5ad_round_trips_and_leaves_no_temporary_file(
    tmp_path, genes, counts_matrix, cohort_writer
):
    manifest = cohort_writer(tmp_path / "raw", genes, counts_matrix(3, len(genes)))
    adata = build_expression(manifest, raw_dir=tmp_path / "raw")
    out = write_h5ad(adata, tmp_path / "results" / "expression.h5ad")
    assert sorted(p.name for p in out.parent.iterdir()) == ["expression.h5ad"]
    back = ad.read_h5ad(out)
    np.testing.assert_array_equal(back.X, adata.X)
    np.testing.assert_array_equal(back.layers["tpm"], adata.layers["tpm"])
    pd.testing.assert_frame_equal(back.obs, adata.obs, check_dtype=False)
    assert back.uns["gene_model"] == "GENCODE v36"
