"""The folder provider: patient folders already on disk joined to the cohort's cases, by layout."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import tifffile
from pydicom.uid import generate_uid

from mgi.acquire import radiology, remote
from mgi.acquire.folder import folder_case_id, folder_images
from mgi.acquire.gdc import EXPRESSION_DATA_TYPE, MANIFEST_COLUMNS
from mgi.acquire.series import FAILURE_COLUMNS
from mgi.errors import AcquireError
from mgi.imaging.bank import read_bank
from mgi.imaging.mri import build_mri_bank
from mgi.io import read_tsv
from mgi.layout import IMAGE_TABLE_COLUMNS
from mgi.options import TciaOptions
from tests.imaging.conftest import mri_options, write_mr_slice

DEFAULT_LABELS = TciaOptions.nifti_labels
BRATS = "TCGA-02-0006_1996.08.23"


def _lgg(root: Path, name: str, *, n: int = 3, masks: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[4:12, 4:12] = (60, 120, 90)
    for i in range(1, n + 1):
        tifffile.imwrite(folder / f"{name}_{i}.tif", image, photometric="rgb")
        if masks:
            tifffile.imwrite(folder / f"{name}_{i}_mask.tif",
                             np.full((16, 16), 255 * (i == 2), dtype=np.uint8))
    return folder


def _nifti(folder: Path, names: list[str], *, real: bool = False) -> Path:
    """NIfTI files of these names (tiny real volumes, or empty files where only names count)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if real:
            volume = np.zeros((6, 12, 12), dtype=np.int16)
            volume[1:5, 2:10, 2:10] = 200
            volume[2:4, 4:8, 4:8] = 1 if "Glistr" in name else 600
            sitk.WriteImage(sitk.GetImageFromArray(volume), str(folder / name))
        else:
            (folder / name).write_bytes(b"")
    return folder


BRATS_FILES = [f"{BRATS}_{s}.nii.gz" for s in ("flair", "t1", "t1Gd", "t2")]


def _dicom_patient(root: Path, name: str, *, depth: tuple[str, ...] = ()) -> Path:
    """A patient folder of three MR series (described by their roles), under `depth` folders."""
    patient = root / name
    for k, role in enumerate(("T1 pre", "FLAIR", "T1 post")):
        uid = generate_uid()
        for n in range(1, 4):
            stored = np.full((8, 8), 50)
            stored[2:6, 2:6] = 100 + 40 * n + 200 * k
            write_mr_slice(patient.joinpath(*depth, uid, f"{n}.dcm"), stored,
                           position=(0.0, 0.0, 2.0 * n), instance=n, series_uid=uid,
                           description=role, patient_id=folder_case_id(name))
    return patient


def _options(**values):
    return mri_options(min_slices=2, image_px=16, **values)


@pytest.mark.parametrize("name, case_id", [
    ("TCGA_CS_4941_19960909", "TCGA-CS-4941"),
    ("TCGA-02-0006", "TCGA-02-0006"),
    ("tcga_hT_a5ru_2001", "TCGA-HT-A5RU"),
    ("BraTS_TCGA-08-0355", "TCGA-08-0355"),
    ("PATIENT-7", "PATIENT-7"),  # no barcode: the name itself
])
def test_folder_names_give_case_ids_by_barcode(name, case_id):
    assert folder_case_id(name) == case_id


def test_lgg_tif_rows_join_by_barcode_and_point_at_the_folders(tmp_path, caplog):
    root = tmp_path / "kaggle_3m"
    first = _lgg(root, "TCGA_CS_4941_19960909")
    _lgg(root, "TCGA_CS_4941_20010101")  # a second folder of the case: ignored, warned
    bare = _lgg(root, "TCGA_HT_0002_20000101", masks=False)
    _lgg(root, "TCGA_ZZ_9999_20000101")  # not a case of the cohort
    (root / "data.csv").write_text("Patient\n")
    cases = ["TCGA-CS-4941", "TCGA-HT-0002", "TCGA-DU-0003"]
    with caplog.at_level(logging.INFO):
        rows, failures, choices = folder_images(
            root, layout="lgg_tif", case_ids=cases, nifti_labels=DEFAULT_LABELS,
            raw_dir=tmp_path / "raw", options=_options())
    assert list(rows.columns) == IMAGE_TABLE_COLUMNS
    assert rows.to_dict("records") == [
        {"image_id": "TCGA-CS-4941", "case_id": "TCGA-CS-4941", "modality": "mri",
         "path": str(first.resolve()), "mask_path": str(first.resolve())},
        {"image_id": "TCGA-HT-0002", "case_id": "TCGA-HT-0002", "modality": "mri",
         "path": str(bare.resolve()), "mask_path": ""},
    ]
    assert failures.empty and list(failures.columns) == FAILURE_COLUMNS
    assert choices.empty
    assert "case TCGA-CS-4941 has several folders" in caplog.text
    assert "TCGA_CS_4941_20010101" in caplog.text
    assert "1 of 3 case(s) have no folder" in caplog.text and "TCGA-DU-0003" in caplog.text
    assert "1 folder(s) match no case" in caplog.text


def test_an_lgg_patient_folder_without_its_slices_is_a_failure_row(tmp_path):
    root = tmp_path / "kaggle_3m"
    _lgg(root, "TCGA_CS_4941_19960909")
    odd = _nifti(root / "TCGA_HT_0002_20000101", ["t1.nii.gz"])
    rows, failures, _ = folder_images(
        root, layout="lgg_tif", case_ids=["TCGA-CS-4941", "TCGA-HT-0002"],
        nifti_labels=DEFAULT_LABELS, raw_dir=tmp_path / "raw", options=_options())
    assert rows["case_id"].tolist() == ["TCGA-CS-4941"]
    assert failures["case_id"].tolist() == ["TCGA-HT-0002"]
    reason = failures.loc[0, "reason"]
    assert f"{odd}: no slice TIFF 'TCGA_HT_0002_20000101_<n>.tif'" in reason
    assert "found ['t1.nii.gz']" in reason


def test_lgg_tif_pointed_at_nifti_folders_is_an_acquire_error(tmp_path):
    root = tmp_path / "brats"
    _nifti(root / "TCGA-02-0006", BRATS_FILES)
    _nifti(root / "TCGA-02-0009", BRATS_FILES)
    with pytest.raises(AcquireError, match=r"none of the 2 patient folder\(s\) .* layout "
                                           r"'lgg_tif' .*no slice TIFF 'TCGA-02-0006_<n>\.tif'"):
        folder_images(root, layout="lgg_tif", case_ids=["TCGA-02-0006", "TCGA-02-0009"],
                      nifti_labels=DEFAULT_LABELS, raw_dir=tmp_path / "raw", options=_options())


def test_nifti_rows_name_the_folder_and_label_map_and_refuse_ambiguous_files(tmp_path):
    root = tmp_path / "brats"
    label = f"{BRATS}_GlistrBoost_ManuallyCorrected.nii.gz"
    good = _nifti(root / "TCGA-02-0006", [*BRATS_FILES, label])
    unlabelled = _nifti(root / "TCGA-02-0011", BRATS_FILES[:2])
    _nifti(root / "TCGA-02-0009", [*BRATS_FILES, "TCGA-02-0009_FLAIR.nii"])
    _nifti(root / "TCGA-02-0010", [*BRATS_FILES, label, f"{BRATS}_GlistrBoost.nii.gz"])
    _nifti(root / "TCGA-02-0012", ["TCGA-02-0012_adc.nii.gz"])
    cases = ["TCGA-02-0006", "TCGA-02-0009", "TCGA-02-0010", "TCGA-02-0011", "TCGA-02-0012"]
    rows, failures, _ = folder_images(root, layout="nifti", case_ids=cases,
                                      nifti_labels=DEFAULT_LABELS, raw_dir=tmp_path / "raw",
                                      options=_options())
    assert rows[["case_id", "path", "mask_path"]].to_dict("records") == [
        {"case_id": "TCGA-02-0006", "path": str(good.resolve()),
         "mask_path": str((good / label).resolve())},
        {"case_id": "TCGA-02-0011", "path": str(unlabelled.resolve()), "mask_path": ""},
    ]
    reasons = dict(zip(failures["case_id"], failures["reason"], strict=True))
    assert sorted(reasons) == ["TCGA-02-0009", "TCGA-02-0010", "TCGA-02-0012"]
    assert "2 NIfTI files match the 'FLAIR' pattern" in reasons["TCGA-02-0009"]
    assert "'TCGA-02-0006_1996.08.23_flair.nii.gz', 'TCGA-02-0009_FLAIR.nii'" in \
        reasons["TCGA-02-0009"]
    assert "2 NIfTI files match the label map pattern" in reasons["TCGA-02-0010"]
    assert f"{BRATS}_GlistrBoost.nii.gz" in reasons["TCGA-02-0010"]
    assert "no NIfTI volume of the sequences" in reasons["TCGA-02-0012"]
    # a pattern naming the manually corrected map alone takes it (the BraTS cohort's)
    rows, failures, _ = folder_images(
        root, layout="nifti", case_ids=["TCGA-02-0010"], raw_dir=tmp_path / "raw",
        nifti_labels=r"(?i)_GlistrBoost_ManuallyCorrected\.nii(\.gz)?$", options=_options())
    assert Path(rows.loc[0, "mask_path"]).name == label and failures.empty


def test_rows_of_lgg_and_nifti_folders_bank_ok(tmp_path):
    raw = tmp_path / "raw"
    lgg = tmp_path / "kaggle_3m"
    _lgg(lgg, "TCGA_CS_4941_19960909")
    brats = tmp_path / "brats"
    _nifti(brats / "TCGA-02-0006",
           [*BRATS_FILES, f"{BRATS}_GlistrBoost_ManuallyCorrected.nii.gz"], real=True)
    for root, layout, case_id in ((lgg, "lgg_tif", "TCGA-CS-4941"),
                                  (brats, "nifti", "TCGA-02-0006")):
        rows, _, _ = folder_images(root, layout=layout, case_ids=[case_id],
                                   nifti_labels=DEFAULT_LABELS, raw_dir=raw, options=_options())
        row = rows.iloc[0]
        out = tmp_path / f"{case_id}.h5"
        qc = build_mri_bank(image_id=case_id, case_id=case_id, series_root=raw / row["path"],
                            mask_dir=raw / row["mask_path"], out_path=out, options=_options())
        assert qc["status"] == "ok", qc["reason"]
        bank = read_bank(out)
        assert bank.attrs["source_layout"] == layout
        assert bank.masks.sum() > 0


def test_dicom_patients_get_a_series_table_with_absolute_paths(tmp_path):
    root = tmp_path / "tcia"
    patient = _dicom_patient(root, "TCGA-CS-0001")
    raw = tmp_path / "raw"
    rows, failures, _ = folder_images(root, layout="dicom", case_ids=["TCGA-CS-0001"],
                                      nifti_labels=DEFAULT_LABELS, raw_dir=raw,
                                      options=_options())
    assert rows.to_dict("records") == [
        {"image_id": "TCGA-CS-0001", "case_id": "TCGA-CS-0001", "modality": "mri",
         "path": "radiology/TCGA-CS-0001", "mask_path": ""}]
    assert failures.empty
    table = read_tsv(raw / "radiology/TCGA-CS-0001/series.tsv")
    assert {"SeriesInstanceUID", "sequence", "SeriesDescription", "ImageCount", "path",
            "reason"} <= set(table.columns)
    assert sorted(table["sequence"]) == ["FLAIR", "T1 post", "T1 pre"]
    series = {p.resolve() for p in patient.iterdir()}
    assert {Path(p) for p in table["path"]} == series
    assert all(Path(p).is_absolute() for p in table["path"])
    assert table["ImageCount"].astype(int).tolist() == [3, 3, 3]


def test_a_nested_dicom_patient_banks_ok_through_its_series_table(tmp_path):
    root = tmp_path / "tcia"
    _dicom_patient(root, "TCGA-CS-0001", depth=("1.2.3-study",))
    raw = tmp_path / "raw"
    rows, failures, _ = folder_images(root, layout="dicom", case_ids=["TCGA-CS-0001"],
                                      nifti_labels=DEFAULT_LABELS, raw_dir=raw,
                                      options=_options())
    assert failures.empty
    qc = build_mri_bank(image_id="c", case_id="TCGA-CS-0001",
                        series_root=raw / rows.loc[0, "path"], mask_dir=None,
                        out_path=tmp_path / "c.h5", options=_options())
    assert qc["status"] == "ok", qc["reason"]


def test_a_spect_file_in_a_dicom_patient_folder_is_refused_naming_it(tmp_path, test_data):
    spect = test_data / "dicom/libvips_dicom_test_image.dcm"
    if not spect.is_file():
        pytest.skip(f"{spect} not found")
    root = tmp_path / "tcia"
    _dicom_patient(root, "TCGA-CS-0001")
    copy = root / "TCGA-CS-0002" / "1.2.3-study" / "4.5.6-series" / "spect.dcm"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(spect, copy)
    rows, failures, _ = folder_images(
        root, layout="dicom", case_ids=["TCGA-CS-0001", "TCGA-CS-0002"],
        nifti_labels=DEFAULT_LABELS, raw_dir=tmp_path / "raw", options=_options())
    assert rows["case_id"].tolist() == ["TCGA-CS-0001"]
    assert failures["case_id"].tolist() == ["TCGA-CS-0002"]
    assert f"{copy}: not an MR image: Modality 'NM'" in failures.loc[0, "reason"]
    assert not (tmp_path / "raw/radiology/TCGA-CS-0002").exists()


def test_unusable_folder_configs_are_acquire_errors(tmp_path):
    common = {"case_ids": ["TCGA-CS-4941"], "nifti_labels": DEFAULT_LABELS,
              "raw_dir": tmp_path / "raw", "options": _options()}
    with pytest.raises(AcquireError, match=r"sources.tcia.folder: .*nope is not a folder"):
        folder_images(tmp_path / "nope", layout="lgg_tif", **common)
    other = tmp_path / "other"
    _lgg(other, "TCGA_ZZ_0001_20000101")
    with pytest.raises(AcquireError, match=r"none of its 1 subfolder\(s\) "
                                           r"\['TCGA_ZZ_0001_20000101'\] is named by the TCGA "
                                           r"barcode of one of the 1 case\(s\)"):
        folder_images(other, layout="lgg_tif", **common)
    with pytest.raises(AcquireError, match=r"sources\.tcia\.layout: 'png'"):
        folder_images(other, layout="png", **common)
    with pytest.raises(AcquireError, match=r"sources.tcia.nifti_labels: '\(seg' is not"):
        folder_images(other, layout="nifti", **{**common, "nifti_labels": "(seg"})


def test_acquire_mri_folder_provider_needs_its_folder_and_reads_a_relative_one(
        tmp_path, monkeypatch):
    def tcia(**values) -> TciaOptions:
        return TciaOptions(provider="folder", layout="lgg_tif", **values)

    common = {"case_ids": ["TCGA-CS-4941"], "mri": _options()}
    with pytest.raises(AcquireError, match=r"sources\.tcia\.folder: not set"):
        radiology.acquire_mri(tmp_path / "raw", tcia_options=tcia(), **common)
    lgg = _lgg(tmp_path / "sets/kaggle_3m", "TCGA_CS_4941_19960909")
    monkeypatch.chdir(tmp_path)
    rows, failures, _ = radiology.acquire_mri(
        tmp_path / "raw", tcia_options=tcia(folder="sets/kaggle_3m"), **common)
    assert rows["path"].tolist() == [str(lgg.resolve())] and failures.empty


def test_masks_url_gives_dicom_patients_their_masks(tmp_path):
    root = tmp_path / "tcia"
    _dicom_patient(root, "TCGA-CS-0001")
    _dicom_patient(root, "TCGA-CS-0002")
    labels = _lgg(tmp_path / "labels", "TCGA_CS_0001_19960909")
    rows, _, audit = radiology.acquire_mri(
        tmp_path / "raw", case_ids=["TCGA-CS-0001", "TCGA-CS-0002"],
        tcia_options=TciaOptions(provider="folder", folder=str(root), layout="dicom",
                                 masks_url=str(labels.parent)), mri=_options())
    assert set(audit.loc[audit["status"] == "chosen", "case_id"]) == {"TCGA-CS-0001",
                                                                      "TCGA-CS-0002"}
    assert rows["mask_path"].tolist() == ["masks/TCGA-CS-0001", ""]
    assert sorted(p.name for p in (tmp_path / "raw/masks/TCGA-CS-0001").iterdir()) == [
        f"TCGA-CS-0001_{n}_mask.tif" for n in (1, 2, 3)]


def test_the_images_action_passes_the_folder_settings_through(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    manifest = pd.DataFrame([{
        "id": "e1", "filename": "e1.tsv", "md5": "0" * 32, "size": 1, "state": "released",
        "case_id": "TCGA-02-0006", "data_type": EXPRESSION_DATA_TYPE,
        "sample_type": "Primary Tumor", "path": "expression/e1/e1.tsv",
        "sample_barcode": "TCGA-02-0006-01A"}], columns=MANIFEST_COLUMNS)
    manifest.to_csv(raw / "manifest.tsv", sep="\t", index=False)
    brats = tmp_path / "brats"
    _nifti(brats / "TCGA-02-0006", [*BRATS_FILES, f"{BRATS}_seg.nii.gz"])
    settings = {
        "sources": {"tcia": {"provider": "folder", "folder": str(brats), "layout": "nifti",
                             "nifti_labels": r"_seg\.nii"}},
        "imaging": {"modality": "mri", "mri": {"sequences": ["FLAIR", "T2"]}},
    }
    args = argparse.Namespace(settings=json.dumps(settings), manifest=str(raw / "manifest.tsv"),
                              clinical=None, raw_dir=str(raw), images=str(raw / "images.tsv"))
    remote.run("images", args)
    images = read_tsv(raw / "images.tsv", required=IMAGE_TABLE_COLUMNS)
    assert Path(images.loc[0, "mask_path"]).name == f"{BRATS}_seg.nii.gz"
    assert read_tsv(raw / "image_failures.tsv").empty
