"""IDC radiology through idc-index: the real bundled index queried offline, downloads faked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from mgi.acquire import idc, radiology
from mgi.acquire.series import SERIES_COLUMNS
from mgi.acquire.studies import write_study
from mgi.errors import AcquireError
from mgi.io import read_tsv
from mgi.options import MriOptions, TciaOptions
from tests.acquire.conftest import study_listing


@pytest.fixture(scope="module")
def real_client():
    """The real idc-index client: its index ships with the package, so no network is used."""
    pytest.importorskip("idc_index")
    return idc.client()


def test_real_tcga_collection_is_listed_offline(real_client):
    series = idc.list_series(collection="TCGA-BRCA", idc=real_client)
    assert list(series.columns) == SERIES_COLUMNS
    mr = series[series["Modality"] == "MR"]
    assert len(mr) > 100 and mr["PatientID"].str.fullmatch(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}").all()
    assert (mr["ImageCount"] > 0).all() and mr["SeriesInstanceUID"].is_unique
    one = mr["PatientID"].iloc[0]
    only = idc.list_series(collection="TCGA-BRCA", patient_ids=[one], idc=real_client)
    assert set(only["PatientID"]) == {one}
    with pytest.raises(AcquireError, match=r"no collection 'tcga_nope'.*similar ones: \['tcga_"):
        idc.list_series(collection="TCGA-NOPE", idc=real_client)


class FakeIdc:
    """An idc-index stand-in: an index table, and a downloader copying the series' files."""

    def __init__(self, truths: list, *, short: set[str] = frozenset()) -> None:
        rows = [{"collection_id": "tcga_gbm", "instanceCount": r.pop("ImageCount"), **r}
                for truth in truths for r in study_listing(truth, collection="TCGA-GBM")]
        self.index = pd.DataFrame(rows)
        self.folders = {uid: s.folder for truth in truths for uid, s in truth.series.items()}
        self.short, self.calls = set(short), []

    def download_from_selection(self, *, downloadDir, seriesInstanceUID, dirTemplate, **_):
        uid = seriesInstanceUID[0]
        self.calls.append(uid)
        assert dirTemplate == "%SeriesInstanceUID"
        folder = Path(downloadDir) / uid
        folder.mkdir(parents=True)
        files = sorted(self.folders[uid].glob("*.dcm"))
        for path in files[:len(files) - (uid in self.short)]:
            shutil.copyfile(path, folder / path.name)


def test_idc_series_land_in_the_radiology_layout_and_bad_ones_are_reported(tmp_path):
    one = write_study(tmp_path / "studies", case_id="TCGA-AA-0001", kind="standard", site="ge")
    two = write_study(tmp_path / "studies", case_id="TCGA-AA-0002", kind="no_post",
                      site="philips")
    flair = two.roles["FLAIR"]
    fake = FakeIdc([one, two], short={flair})
    mri = MriOptions(sequences=("FLAIR", "T1 post"))
    tcia_options = TciaOptions(provider="idc", collection="TCGA-GBM")
    table, failures, audit = radiology.acquire_mri(
        tmp_path, case_ids=["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0009"],
        tcia_options=tcia_options, mri=mri, idc_client=fake)
    assert table["case_id"].tolist() == ["TCGA-AA-0001"]
    assert table["path"].tolist() == ["radiology/TCGA-AA-0001"]
    case = tmp_path / "radiology" / "TCGA-AA-0001"
    listed = read_tsv(case / "series.tsv", required=["SeriesInstanceUID", "sequence", "path"])
    assert dict(zip(listed["sequence"], listed["SeriesInstanceUID"], strict=True)) == {
        r: one.roles[r] for r in ("FLAIR", "T1 post")}
    assert (case / one.roles["FLAIR"]).is_dir()
    # the second patient's only FLAIR failed to arrive and the study has no post-contrast T1:
    # no role can be filled, so the patient is a failure row, not an image
    assert failures["SeriesInstanceUID"].tolist() == [flair, ""]
    assert "file(s) arrived, the index says" in failures["reason"][0]
    assert failures["case_id"].tolist()[1] == "TCGA-AA-0002"
    assert failures["reason"].tolist()[1].startswith("no usable series: FLAIR: ")
    assert not (tmp_path / "radiology" / "TCGA-AA-0002" / flair).exists()  # nothing half-kept
    assert not (tmp_path / "radiology" / "TCGA-AA-0002" / "series.tsv").exists()
    assert set(audit["case_id"]) == {"TCGA-AA-0001", "TCGA-AA-0002"}
    assert audit.loc[audit["SeriesInstanceUID"] == flair, "reason"].str.contains(
        "download failed").all()
    # a second run finds the series in place and fetches only the failed one again
    fake.calls.clear()
    radiology.acquire_mri(tmp_path, case_ids=["TCGA-AA-0001", "TCGA-AA-0002"],
                          tcia_options=tcia_options, mri=mri, idc_client=fake)
    assert fake.calls == [flair]


def test_collection_names_map_to_idc_ids_and_providers_are_checked(tmp_path):
    assert idc.collection_id("TCGA-LGG") == "tcga_lgg"
    with pytest.raises(AcquireError, match="provider: 'xnat'; expected one of"):
        radiology.acquire_mri(tmp_path, case_ids=[], tcia_options=TciaOptions(provider="xnat"),
                              mri=MriOptions())
