"""TCIA/NBIA client against the local fake API: series choice, safe extraction, masks, images."""

from __future__ import annotations

import argparse
import io
import json
import zipfile

import pytest
import requests

from mgi.acquire import remote, tcia
from mgi.acquire.series import FAILURE_COLUMNS, SERIES_COLUMNS
from mgi.acquire.studies import write_study
from mgi.errors import AcquireError
from mgi.io import read_tsv
from mgi.layout import IMAGE_TABLE_COLUMNS
from tests.acquire.conftest import study_listing, zip_folder

SEQUENCES = ["T1 pre", "FLAIR", "T1 post"]


def _series(uid: str, patient: str, description: str, count: int, modality: str = "MR") -> dict:
    return {"SeriesInstanceUID": uid, "PatientID": patient, "Modality": modality,
            "SeriesDescription": description, "ImageCount": count, "Collection": "TCGA-LGG",
            "StudyInstanceUID": f"study-{patient}"}


def _dcm_zip(api, n: int, *, extra: dict[str, bytes] | None = None) -> bytes:
    return api.zip({f"1-{i + 1:02d}.dcm": b"DICM" + bytes([i]) for i in range(n)} | (extra or {}))


def test_list_series_keeps_the_cohort_patients(fake_api):
    fake_api.series = [_series("1", "P1", "FLAIR", 3), _series("2", "P9", "FLAIR", 3)]
    with requests.Session() as session:
        table = tcia.list_series(session, fake_api.url, collection="TCGA-LGG",
                                 patient_ids=["P1", "P2"])
        empty = tcia.list_series(session, fake_api.url, collection="NO-SUCH")
    assert table["SeriesInstanceUID"].tolist() == ["1"]
    assert table["ImageCount"].tolist() == [3]
    assert fake_api.requests_to("/getSeries")[0].query == {"Collection": ["TCGA-LGG"]}
    assert empty.empty and list(empty.columns) == SERIES_COLUMNS


def test_download_series_keeps_only_the_dicom_files(fake_api, tmp_path):
    fake_api.zips["1.2.3"] = [_dcm_zip(fake_api, 3, extra={"LICENSE": b"CC BY"})]
    dest = tmp_path / "radiology/P1/1.2.3"
    with requests.Session() as session:
        tcia.download_series(session, fake_api.url, "1.2.3", dest, image_count=3)
        tcia.download_series(session, fake_api.url, "1.2.3", dest, image_count=3)  # in place
    assert sorted(p.name for p in dest.iterdir()) == ["1-01.dcm", "1-02.dcm", "1-03.dcm"]
    assert len(fake_api.requests_to("/getImage")) == 1
    assert [p.name for p in dest.parent.iterdir()] == ["1.2.3"]  # no temp folder left


@pytest.mark.parametrize("evil", ["../evil.dcm", "sub/../../evil.dcm", "/tmp/evil.dcm"])
def test_zip_slip_is_rejected(fake_api, tmp_path, sleeps, evil):
    fake_api.zips["9.9"] = [_dcm_zip(fake_api, 2, extra={evil: b"gotcha"})]
    dest = tmp_path / "radiology/P1/9.9"
    with requests.Session() as session, pytest.raises(AcquireError, match="absolute or contains"):
        tcia.download_series(session, fake_api.url, "9.9", dest, image_count=2)
    assert not dest.exists()
    assert not list(tmp_path.rglob("evil.dcm"))
    assert len(fake_api.requests_to("/getImage")) == 1  # not retried: the archive is bad


def test_image_count_mismatch_is_retried_then_reported(fake_api, tmp_path, sleeps):
    fake_api.zips["5.5"] = [_dcm_zip(fake_api, 2)]
    dest = tmp_path / "radiology/P1/5.5"
    with requests.Session() as session, pytest.raises(AcquireError, match="ImageCount says 3"):
        tcia.download_series(session, fake_api.url, "5.5", dest, image_count=3, retries=2)
    assert not dest.exists()
    assert len(fake_api.requests_to("/getImage")) == 3
    assert sleeps == [0.5, 1.0]


def test_image_count_mismatch_then_whole_series(fake_api, tmp_path, sleeps):
    fake_api.zips["5.5"] = [_dcm_zip(fake_api, 2), _dcm_zip(fake_api, 3)]
    dest = tmp_path / "radiology/P1/5.5"
    with requests.Session() as session:
        tcia.download_series(session, fake_api.url, "5.5", dest, image_count=3)
    assert len(list(dest.glob("*.dcm"))) == 3


def _write_lgg(root, folder: str, numbers: list[int]) -> None:
    (root / folder).mkdir(parents=True)
    for n in numbers:
        (root / folder / f"{folder}_{n}_mask.tif").write_bytes(f"mask {folder} {n}".encode())
        (root / folder / f"{folder}_{n}.tif").write_bytes(b"image, not a mask")


def test_lgg_case_id():
    assert tcia.lgg_case_id("TCGA_CS_4941_19960909") == "TCGA-CS-4941"
    assert tcia.lgg_case_id("README") is None


def test_copy_masks_from_a_local_lgg_folder(tmp_path):
    source = tmp_path / "kaggle_3m"
    _write_lgg(source, "TCGA_CS_4941_19960909", [1, 12])
    _write_lgg(source, "TCGA_HT_0001_20000101", [3])
    copied = tcia.copy_masks(str(source), tmp_path / "masks", case_ids=["TCGA-CS-4941", "X"])
    assert copied == {"TCGA-CS-4941": tmp_path / "masks/TCGA-CS-4941"}
    files = sorted(p.name for p in (tmp_path / "masks/TCGA-CS-4941").iterdir())
    assert files == ["TCGA-CS-4941_12_mask.tif", "TCGA-CS-4941_1_mask.tif"]
    assert (tmp_path / "masks/TCGA-CS-4941/TCGA-CS-4941_12_mask.tif").read_bytes() == \
        b"mask TCGA_CS_4941_19960909 12"
    assert not (tmp_path / "masks/TCGA-HT-0001").exists()


def test_copy_masks_of_the_real_lgg_sample(tmp_path, test_data):
    source = test_data / "lgg_mri"
    if not (source / "TCGA_CS_4941_19960909").is_dir():
        pytest.skip(f"LGG sample folder not found under {source}")
    tcia.copy_masks(str(source), tmp_path / "masks", case_ids=["TCGA-CS-4941"])
    copied = tmp_path / "masks/TCGA-CS-4941/TCGA-CS-4941_12_mask.tif"
    original = source / "TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12_mask.tif"
    assert copied.read_bytes() == original.read_bytes()


def test_copy_masks_from_a_zip_url(fake_api, tmp_path):
    fake_api.blobs["/lgg.zip"] = fake_api.zip({
        "kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_7_mask.tif": b"m7"})
    copied = tcia.copy_masks(f"{fake_api.url}/lgg.zip", tmp_path / "masks",
                             case_ids=["TCGA-CS-4941"])
    assert (copied["TCGA-CS-4941"] / "TCGA-CS-4941_7_mask.tif").read_bytes() == b"m7"
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["TCGA-CS-4941"]


def test_brats_style_nifti_label_maps_are_matched_by_barcode(fake_api, tmp_path, caplog):
    labels = tmp_path / "brats"
    (labels / "sub").mkdir(parents=True)
    names = {"TCGA-02-0006_1996.08.23_GlistrBoost_ManuallyCorrected.nii.gz": b"a",
             "sub/TCGA_08_0355_1997.11.03_GlistrBoost.nii": b"b",
             "TCGA-02-0006_other.nii.gz": b"c", "README.nii.gz": b"d"}
    for name, data in names.items():
        (labels / name).write_bytes(data)
    wanted = ["TCGA-02-0006", "TCGA-08-0355", "TCGA-99-9999"]
    with caplog.at_level("WARNING"):
        copied = tcia.copy_masks(str(labels), tmp_path / "masks", case_ids=wanted)
    assert sorted(copied) == ["TCGA-02-0006", "TCGA-08-0355"]  # a case without labels: absent
    assert copied["TCGA-02-0006"].name == "TCGA-02-0006.nii.gz"
    assert copied["TCGA-02-0006"].read_bytes() == b"a"  # first by name, the other warned
    assert copied["TCGA-08-0355"].name == "TCGA-08-0355.nii"
    assert "several label maps" in caplog.text
    # the same labels zipped behind a URL
    fake_api.blobs["/brats.zip"] = fake_api.zip({n: d for n, d in names.items()})
    zipped = tcia.copy_masks(f"{fake_api.url}/brats.zip", tmp_path / "masks2", case_ids=wanted)
    assert sorted(zipped) == ["TCGA-02-0006", "TCGA-08-0355"]


def test_copy_masks_refuses_a_missing_folder(tmp_path):
    with pytest.raises(AcquireError, match="neither a folder nor"):
        tcia.copy_masks(str(tmp_path / "nope"), tmp_path / "masks", case_ids=["A"])


def _run_images(fake_api, tmp_path, *, modality: str, manifest_rows: list[dict],
                masks_url: str | None = None) -> argparse.Namespace:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    fake_api.manifest(manifest_rows).to_csv(raw / "manifest.tsv", sep="\t", index=False)
    settings = {
        "sources": {"gdc": {"api_url": fake_api.url, "parallel": 2},
                    "tcia": {"api_url": fake_api.url, "collection": "TCGA-LGG",
                             "masks_url": masks_url}},
        "imaging": {"modality": modality, "mri": {"sequences": SEQUENCES}},
    }
    args = argparse.Namespace(settings=json.dumps(settings), manifest=str(raw / "manifest.tsv"),
                              clinical=None, raw_dir=str(raw), images=str(raw / "images.tsv"))
    remote.run("images", args)
    return args


def test_images_mri_fetches_candidates_chooses_by_tags_and_audits(fake_api, tmp_path, sleeps):
    truths = {case: write_study(tmp_path / "studies", case_id=case, kind=kind, site=site)
              for case, kind, site in [("TCGA-CS-4941", "standard", "ge"),
                                       ("TCGA-CS-0002", "t1_flair", "terse")]}
    rows = [fake_api.add_file(f"e{i}", b"x", case_id=c)
            for i, c in enumerate([*truths, "TCGA-CS-0003"])]
    fake_api.series = [row for truth in truths.values() for row in study_listing(truth)]
    fake_api.series.append({**fake_api.series[0], "PatientID": "TCGA-ZZ-0009",
                            "SeriesInstanceUID": "9.9"})  # not in the cohort
    for truth in truths.values():
        for uid, series in truth.series.items():
            fake_api.zips[uid] = [zip_folder(series.folder)]
    short = truths["TCGA-CS-0002"].roles["T1 post"]  # served one file short: fails
    fake_api.zips[short] = [api_zip_without_one(fake_api.zips[short][0])] * 5
    _write_lgg(tmp_path / "lgg", "TCGA_CS_4941_19960909", [1, 2])
    _run_images(fake_api, tmp_path, modality="mri", manifest_rows=rows,
                masks_url=str(tmp_path / "lgg"))

    raw = tmp_path / "raw"
    images = read_tsv(raw / "images.tsv", required=IMAGE_TABLE_COLUMNS)
    assert images.to_dict("records") == [
        {"image_id": c, "case_id": c, "modality": "mri", "path": f"radiology/{c}",
         "mask_path": "masks/TCGA-CS-4941" if c == "TCGA-CS-4941" else ""}
        for c in ["TCGA-CS-0002", "TCGA-CS-4941"]]
    # each role's series, chosen from the tags, is the one the study was written with
    chosen = {}
    for case in truths:
        table = read_tsv(raw / f"radiology/{case}/series.tsv")
        chosen[case] = dict(zip(table["sequence"], table["SeriesInstanceUID"], strict=True))
    assert chosen["TCGA-CS-4941"] == {r: truths["TCGA-CS-4941"].roles[r] for r in SEQUENCES}
    # the axial post-contrast T1 that failed to download gives way to the coronal one
    other = truths["TCGA-CS-0002"]
    assert {r: chosen["TCGA-CS-0002"][r] for r in ("T1 pre", "FLAIR")} == {
        r: other.roles[r] for r in ("T1 pre", "FLAIR")}
    stand_in = other.series[chosen["TCGA-CS-0002"]["T1 post"]]
    assert stand_in.spec.contrast == "t1post" and stand_in.spec.plane == "coronal"
    # only series whose description could serve a role were fetched: no localizer, DWI, ADC
    fetched = {s.query["SeriesInstanceUID"][0] for s in fake_api.requests_to("/getImage")}
    described = {uid: s.description for t in truths.values() for uid, s in t.series.items()}
    assert not any(word in described[uid].upper() for uid in fetched
                   for word in ("LOC", "DWI", "ADC"))
    # the audit lists every series of every case, with a status and a reason
    audit = read_tsv(raw / "series_choice.tsv", required=["case_id", "SeriesInstanceUID",
                                                          "status", "reason", "sequence"])
    assert set(audit["SeriesInstanceUID"]) == set(described)
    assert {"chosen", "candidate", "not downloaded"} <= set(audit["status"])
    # the T1-weighted FLAIR (TI about 800 ms) serves as the T1, never as the FLAIR
    trap = next(uid for uid, s in other.series.items() if s.spec.contrast == "t1flair")
    row = audit[audit["SeriesInstanceUID"] == trap].iloc[0]
    assert (row["status"], row["sequence"]) == ("chosen", "T1 pre")
    failures = read_tsv(raw / "image_failures.tsv", required=FAILURE_COLUMNS)
    assert failures["SeriesInstanceUID"].tolist() == [short]
    assert len(list((raw / "masks/TCGA-CS-4941").iterdir())) == 2
    assert (raw / "slides").is_dir()


def test_images_wsi_lists_the_slides_on_disk(fake_api, tmp_path):
    slide = fake_api.add_file("s1", b"svs", case_id="C1", data_type="Slide Image")
    absent = fake_api.add_file("s2", b"svs", case_id="C2", data_type="Slide Image")
    expr = fake_api.add_file("e1", b"x", case_id="C1")
    (tmp_path / "raw" / slide["path"]).parent.mkdir(parents=True)
    (tmp_path / "raw" / slide["path"]).write_bytes(b"svs")
    _run_images(fake_api, tmp_path, modality="wsi", manifest_rows=[expr, slide, absent])

    images = read_tsv(tmp_path / "raw/images.tsv", required=IMAGE_TABLE_COLUMNS)
    assert images.to_dict("records") == [{"image_id": "s1", "case_id": "C1", "modality": "wsi",
                                          "path": slide["path"], "mask_path": ""}]
    assert (tmp_path / "raw/radiology").is_dir() and (tmp_path / "raw/masks").is_dir()


def test_images_fails_clearly_without_any_image(fake_api, tmp_path):
    expr = fake_api.add_file("e1", b"x", case_id="C1")
    with pytest.raises(AcquireError, match="no mri image"):
        _run_images(fake_api, tmp_path, modality="mri", manifest_rows=[expr])


def api_zip_without_one(archive: bytes) -> bytes:
    """The same zip less its last member (a series served short)."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for name in source.namelist()[:-1]:
            out.writestr(name, source.read(name))
    return buffer.getvalue()
