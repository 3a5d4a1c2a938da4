"""source local: a cohort of files on disk named by a sample sheet (mgi.acquire.local)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mgi.acquire.gdc import EXPRESSION_DATA_TYPE, MANIFEST_COLUMNS
from mgi.acquire.local import local_cohort, read_sample_sheet
from mgi.acquire.studies import write_study
from mgi.cli import main
from mgi.errors import AcquireError, TrainingError
from mgi.expression.anndata_build import build_expression
from mgi.io import write_tsv
from mgi.layout import IMAGE_TABLE_COLUMNS
from mgi.options import MriOptions
from mgi.train.splits import make_splits

from .local_files import gene_ids, write_lgg_patient, write_sheet, write_star

LABELS = r"(?i)(seg|label|mask)[^/]*\.nii(\.gz)?$"


def _cohort(sheet: Path, tmp_path: Path, *, matrix: Path | None = None, modality: str = "mri"):
    return local_cohort(sheet, matrix=matrix, modality=modality, raw_dir=tmp_path / "raw",
                        mri=MriOptions(), nifti_labels=LABELS)


def _files(root: Path, n: int = 3) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Sheet rows with paths relative to `root` (the sheet's folder), and the counts written."""
    rows, counts = [], {}
    for i in range(n):
        case = f"P{i}"
        counts[case] = write_star(root / "expr" / f"{case}.tsv", seed=i)
        write_lgg_patient(root / "mri", f"{case}_scan")
        rows.append({"case_id": case, "expression": f"expr/{case}.tsv",
                     "image": f"mri/{case}_scan", "age": 40 + i})
    return rows, counts


def test_a_sheet_of_star_files_and_lgg_folders_gives_the_raw_tables(tmp_path: Path):
    root = tmp_path / "mine"
    rows, counts = _files(root)
    cohort = _cohort(write_sheet(root / "samples.tsv", rows), tmp_path)

    manifest = cohort.manifest
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["case_id"].tolist() == ["P0", "P1", "P2"]
    assert (manifest["data_type"] == EXPRESSION_DATA_TYPE).all()
    assert manifest["path"].tolist() == [str((root / f"expr/P{i}.tsv").resolve())
                                         for i in range(3)]
    images = cohort.images
    assert list(images.columns) == IMAGE_TABLE_COLUMNS
    folders = [str((root / f"mri/P{i}_scan").resolve()) for i in range(3)]
    assert images["path"].tolist() == folders
    assert images["mask_path"].tolist() == folders  # the LGG folder's own masks
    assert cohort.clinical.to_dict("list") == {
        "case_id": ["P0", "P1", "P2"], "project_id": ["", "", ""], "age": ["40", "41", "42"]}
    assert cohort.splits.empty and cohort.image_failures.empty
    assert cohort.expression_failures.empty

    manifest_path = write_tsv(manifest, tmp_path / "raw/manifest.tsv")
    clinical_path = write_tsv(cohort.clinical, tmp_path / "raw/clinical.tsv")
    adata = build_expression(manifest_path, raw_dir=tmp_path / "raw", clinical_path=clinical_path)
    assert adata.obs_names.tolist() == ["P0", "P1", "P2"]
    np.testing.assert_array_equal(adata.layers["counts"][1], counts["P1"])


def test_a_matrix_column_per_patient_builds_the_expression(tmp_path: Path):
    root = tmp_path / "mine"
    rows, _ = _files(root)
    genes = gene_ids(30)
    values = np.arange(30 * 3).reshape(30, 3)
    matrix = pd.DataFrame(values, index=pd.Index(genes, name="gene"),
                          columns=["s_a", "s_b", "s_c"])
    matrix.insert(0, "gene_type", "protein_coding")
    matrix.to_csv(root / "counts.csv")
    for row, sample in zip(rows, ["s_c", "s_a", "s_b"], strict=True):
        row["expression"] = sample
    cohort = _cohort(write_sheet(root / "samples.tsv", rows), tmp_path, matrix=root / "counts.csv")
    assert cohort.manifest["filename"].tolist() == ["s_c", "s_a", "s_b"]
    assert set(cohort.manifest["path"]) == {str((root / "counts.csv").resolve())}

    manifest_path = write_tsv(cohort.manifest, tmp_path / "raw/manifest.tsv")
    adata = build_expression(manifest_path, raw_dir=tmp_path / "raw",
                             matrix=root / "counts.csv")
    np.testing.assert_array_equal(adata.X[0], values[:, 2])  # P0 is sample s_c
    assert adata.var["gene_type"].unique().tolist() == ["protein_coding"]
    assert adata.var_names[0] == genes[0].split(".")[0]


def test_an_h5ad_matrix_with_samples_as_obs(tmp_path: Path):
    root = tmp_path / "mine"
    rows, _ = _files(root, n=2)
    values = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    ad.AnnData(X=values, obs=pd.DataFrame(index=["x", "y"]),
               var=pd.DataFrame(index=gene_ids(3))).write_h5ad(root / "m.h5ad")
    rows[0]["expression"], rows[1]["expression"] = "y", "x"
    cohort = _cohort(write_sheet(root / "s.tsv", rows), tmp_path, matrix=root / "m.h5ad")
    manifest_path = write_tsv(cohort.manifest, tmp_path / "raw/manifest.tsv")
    adata = build_expression(manifest_path, raw_dir=tmp_path, matrix=root / "m.h5ad", layers=())
    np.testing.assert_array_equal(adata.X, values[::-1])


def test_a_dicom_study_is_chosen_in_place(tmp_path: Path):
    root = tmp_path / "mine"
    write_star(root / "e.tsv", seed=1)
    truth = write_study(root / "studies", case_id="P9", size=16)
    sheet = write_sheet(root / "s.tsv", [{"case_id": "P9", "expression": "e.tsv",
                                          "image": "studies/P9"}])
    cohort = _cohort(sheet, tmp_path)
    assert cohort.images.loc[0, "path"] == "radiology/P9"
    series = pd.read_csv(tmp_path / "raw/radiology/P9/series.tsv", sep="\t")
    assert len(series) >= 1
    assert truth is not None and not cohort.choices.empty


def test_real_lgg_folders_and_gdc_star_file(tmp_path: Path, test_data: Path):
    star = test_data / "gdc/gdc-rnaseq-tool_test_set_1.final.tsv.gz"
    folders = sorted(p for p in (test_data / "lgg_mri").iterdir() if p.is_dir())
    if not star.is_file() or not folders:
        pytest.skip(f"{star} or the LGG folders not found")
    rows = [{"case_id": p.name[:12].replace("_", "-"), "expression": str(star),
             "image": str(p), "grade": "G2"} for p in folders]
    cohort = _cohort(write_sheet(tmp_path / "samples.tsv", rows), tmp_path)
    assert cohort.images["path"].tolist() == [str(p.resolve()) for p in folders]
    assert cohort.images["mask_path"].tolist() == [str(p.resolve()) for p in folders]
    assert cohort.manifest["case_id"].tolist() == [r["case_id"] for r in rows]
    assert cohort.clinical["grade"].tolist() == ["G2"] * len(rows)
    manifest_path = write_tsv(cohort.manifest, tmp_path / "raw/manifest.tsv")
    adata = build_expression(manifest_path, raw_dir=tmp_path / "raw")
    assert adata.n_obs == len(folders) and adata.uns["gene_model"] == "GENCODE v36"
    assert adata.n_vars == 96


@pytest.mark.parametrize(("change", "row", "column", "told"), [
    (lambda rows: [{k: v for k, v in r.items() if k != "image"} for r in rows], 1, "image",
     "column missing"),
    (lambda rows: [*rows, dict(rows[0], age=7)], 4, "case_id", "already on row 1"),
    (lambda rows: [rows[0], dict(rows[1], image=""), rows[2]], 2, "image", "empty"),
    (lambda rows: [rows[0], rows[1], dict(rows[2], case_id="P 2")], 3, "case_id", "'P 2'"),
    (lambda rows: [dict(r, split=s) for r, s in zip(rows, ["train", "val", "exam"],
                                                    strict=True)], 3, "split", "'exam'"),
    (lambda rows: [dict(r, split=s) for r, s in zip(rows, ["train", "", "test"],
                                                    strict=True)], 2, "split", "on every row"),
    (lambda rows: [rows[0], dict(rows[1], mask="no/such.nii.gz"), rows[2]], 2, "mask",
     "not found"),
])
def test_a_bad_sheet_stops_naming_row_and_column(tmp_path, change, row, column, told):
    root = tmp_path / "mine"
    rows, _ = _files(root)
    sheet = write_sheet(root / "samples.tsv", change(rows))
    with pytest.raises(AcquireError) as err:
        _cohort(sheet, tmp_path)
    message = str(err.value)
    assert str(sheet) in message
    assert f"row {row} " in message or f"row(s) [{row}]" in message
    assert f"column {column!r}" in message
    assert told in message


def test_a_matrix_column_the_matrix_lacks_names_row_and_column(tmp_path: Path):
    sheet = write_sheet(tmp_path / "s.tsv", [
        {"case_id": "A", "expression": "s1", "image": "a"},
        {"case_id": "B", "expression": "s9", "image": "b"}])
    with pytest.raises(AcquireError, match=r"row 2 \(case_id 'B'\), column 'expression': no "
                                           r"sample 's9'"):
        read_sample_sheet(sheet, matrix_columns=["s1", "s2"])


def test_missing_or_unreadable_files_are_failures_and_the_patient_is_left_out(tmp_path: Path):
    root = tmp_path / "mine"
    rows, _ = _files(root, n=4)
    rows[1]["image"] = "mri/gone"
    rows[2]["expression"] = "expr/gone.tsv"
    (root / "expr/P3.tsv").write_text("not a STAR file\n")
    cohort = _cohort(write_sheet(root / "samples.tsv", rows), tmp_path)
    assert cohort.manifest["case_id"].tolist() == ["P0"]
    assert cohort.images["case_id"].tolist() == ["P0"]
    assert cohort.clinical["case_id"].tolist() == ["P0"]
    failures = cohort.image_failures
    assert failures["case_id"].tolist() == ["P1"]
    assert "mri/gone: MR study folder not found" in failures.loc[0, "reason"]
    expr = cohort.expression_failures.set_index("case_id")["reason"]
    assert sorted(expr.index) == ["P2", "P3"]
    assert "expression file not found" in expr["P2"]
    assert "unreadable STAR counts file" in expr["P3"]


def test_a_slide_per_patient_for_wsi(tmp_path: Path):
    root = tmp_path / "mine"
    write_star(root / "e.tsv", seed=0)
    (root / "slide.svs").write_bytes(b"II*\x00")
    sheet = write_sheet(root / "s.tsv", [
        {"case_id": "A", "expression": "e.tsv", "image": "slide.svs"},
        {"case_id": "B", "expression": "e.tsv", "image": "absent.svs"}])
    cohort = _cohort(sheet, tmp_path, modality="wsi")
    assert cohort.images.to_dict("records") == [{
        "image_id": "A", "case_id": "A", "modality": "wsi",
        "path": str((root / "slide.svs").resolve()), "mask_path": ""}]
    assert cohort.image_failures["case_id"].tolist() == ["B"]


def test_mgi_acquire_local_writes_the_tables_and_given_splits_fix_the_splits(tmp_path: Path):
    root = tmp_path / "mine"
    rows, _ = _files(root, n=4)
    for row, split in zip(rows, ["test", "train", "val", "train"], strict=True):
        row["split"] = split
    sheet = write_sheet(root / "samples.tsv", rows)
    raw = tmp_path / "raw"
    settings = {"sources": {"local": {"samples": str(sheet)}}, "imaging": {"modality": "mri"}}
    assert main(["acquire", "local", "--settings", json.dumps(settings), "--manifest",
                 str(raw / "manifest.tsv"), "--clinical", str(raw / "clinical.tsv"),
                 "--images", str(raw / "images.tsv"), "--raw-dir", str(raw)]) == 0
    for name in ("manifest", "clinical", "images", "given_splits", "expression_failures",
                 "image_failures"):
        assert (raw / f"{name}.tsv").is_file(), name
    given = pd.read_csv(raw / "given_splits.tsv", sep="\t")
    assert given["split"].tolist() == ["test", "train", "val", "train"]

    adata = build_expression(raw / "manifest.tsv", raw_dir=raw, clinical_path=raw / "clinical.tsv")
    expression = tmp_path / "expression.h5ad"
    adata.write_h5ad(expression)
    qc = write_tsv(pd.DataFrame({"image_id": ["P0", "P1", "P2", "P3"],
                                 "case_id": ["P0", "P1", "P2", "P3"],
                                 "status": "ok", "n_items": "4"}), tmp_path / "qc.tsv")
    splits = make_splits(expression_path=expression, qc_path=qc, val_fraction=0.2,
                         test_fraction=0.2, seed=0, given_path=raw / "given_splits.tsv")
    assert splits.to_dict("list") == {"case_id": ["P0", "P1", "P2", "P3"],
                                      "split": ["test", "train", "val", "train"]}
    given.loc[given["case_id"] == "P2", "split"] = "train"  # no val patient left
    write_tsv(given, raw / "given_splits.tsv")
    with pytest.raises(TrainingError, match=r"split\(s\) \['val'\]"):
        make_splits(expression_path=expression, qc_path=qc, val_fraction=0.2,
                    test_fraction=0.2, seed=0, given_path=raw / "given_splits.tsv")

