"""IDC radiology through idc-index: the real bundled index queried offline, downloads faked."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mgi.acquire import idc, radiology
from mgi.acquire.series import SERIES_COLUMNS, SERIES_TABLE_COLUMNS
from mgi.errors import AcquireError
from mgi.io import read_tsv


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
    """An idc-index stand-in: an index table, and a downloader writing n files per series."""

    def __init__(self, rows: list[dict], *, short: set[str] = frozenset()) -> None:
        self.index = pd.DataFrame(rows)
        self.short, self.calls = set(short), []

    def download_from_selection(self, *, downloadDir, seriesInstanceUID, dirTemplate, **_):
        uid = seriesInstanceUID[0]
        self.calls.append(uid)
        assert dirTemplate == "%SeriesInstanceUID"
        count = int(self.index.set_index("SeriesInstanceUID").loc[uid, "instanceCount"])
        folder = Path(downloadDir) / uid
        folder.mkdir(parents=True)
        for k in range(count - (uid in self.short)):
            (folder / f"{k:04d}.dcm").write_bytes(b"DICM")


def _row(uid: str, patient: str, description: str, count: int = 3) -> dict:
    return {"collection_id": "tcga_gbm", "PatientID": patient, "SeriesInstanceUID": uid,
            "Modality": "MR", "SeriesDescription": description, "instanceCount": count}


def test_idc_series_land_in_the_radiology_layout_and_bad_ones_are_reported(tmp_path):
    fake = FakeIdc([_row("1.1", "TCGA-AA-0001", "AX FLAIR"), _row("1.2", "TCGA-AA-0001", "T1 post"),
                    _row("2.1", "TCGA-AA-0002", "FLAIR", count=4),
                    _row("3.1", "TCGA-AA-0003", "FLAIR")], short={"2.1"})
    table, failures = radiology.acquire_mri(
        tmp_path, case_ids=["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0009"], api_url="unused",
        collection="TCGA-GBM", sequences=["FLAIR", "T1 post"], masks_url=None,
        provider="idc", idc_client=fake)
    assert table["case_id"].tolist() == ["TCGA-AA-0001"]
    assert table["path"].tolist() == ["radiology/TCGA-AA-0001"]
    case = tmp_path / "radiology" / "TCGA-AA-0001"
    assert sorted(p.name for p in (case / "1.1").iterdir()) == ["0000.dcm", "0001.dcm",
                                                                "0002.dcm"]
    listed = read_tsv(case / "series.tsv", required=SERIES_TABLE_COLUMNS)
    assert listed["sequence"].tolist() == ["FLAIR", "T1 post"]
    assert failures["SeriesInstanceUID"].tolist() == ["2.1"]
    assert "3 .dcm file(s) arrived, the index says 4" in failures["reason"][0]
    assert not (tmp_path / "radiology" / "TCGA-AA-0002" / "2.1").exists()  # nothing half-kept
    # a second run finds the series in place and fetches only the failed one again
    fake.calls.clear()
    radiology.acquire_mri(tmp_path, case_ids=["TCGA-AA-0001", "TCGA-AA-0002"], api_url="unused",
                     collection="TCGA-GBM", sequences=["FLAIR", "T1 post"], masks_url=None,
                     provider="idc", idc_client=fake)
    assert fake.calls == ["2.1"]


def test_collection_names_map_to_idc_ids_and_providers_are_checked(tmp_path):
    assert idc.collection_id("TCGA-LGG") == "tcga_lgg"
    with pytest.raises(AcquireError, match="provider: 'xnat'; expected 'nbia' or 'idc'"):
        radiology.acquire_mri(tmp_path, case_ids=[], api_url="", collection="TCGA-LGG",
                         sequences=["FLAIR"], masks_url=None, provider="xnat")
