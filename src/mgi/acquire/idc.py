"""Radiology from NCI's Imaging Data Commons through idc-index: the alternative to TCIA's NBIA.

`idc-index` ships the IDC series index with the package (idc-index-data, pinned, so a query is
reproducible and runs offline); its own downloader (s5cmd, from IDC's public buckets) fetches
the files. Series are listed in the same columns as `tcia.list_series`, so the sequence choice
(`mgi.imaging.mri.choice`) and the on-disk layout (`radiology/{case}/{uid}/*.dcm`) are shared
with the NBIA path.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from mgi.acquire.http import replace_dir, temporary_dir
from mgi.acquire.series import FAILURE_COLUMNS, SERIES_COLUMNS, cases_in_place
from mgi.errors import AcquireError

log = logging.getLogger(__name__)

# idc-index column -> the NBIA getSeries field it stands for
_COLUMNS = {"SeriesInstanceUID": "SeriesInstanceUID", "PatientID": "PatientID",
            "Modality": "Modality", "SeriesDescription": "SeriesDescription",
            "instanceCount": "ImageCount"}


def collection_id(collection: str) -> str:
    """IDC's collection_id of a TCIA collection name ("TCGA-LGG" -> "tcga_lgg")."""
    return collection.strip().lower().replace("-", "_").replace(" ", "_")


def client() -> Any:
    """An idc-index client (its bundled index; nothing fetched until a download)."""
    try:
        from idc_index import IDCClient
    except ImportError as err:  # a dependency, but say what is missing if it is not there
        raise AcquireError("sources.tcia.provider 'idc' needs the idc-index package") from err
    return IDCClient()


def list_series(
    *, collection: str, patient_ids: list[str] | None = None, idc: Any = None
) -> pd.DataFrame:
    """The collection's series in IDC (tcia.SERIES_COLUMNS), only `patient_ids`' if given."""
    idc = idc if idc is not None else client()
    index = idc.index
    wanted = collection_id(collection)
    rows = index[index["collection_id"] == wanted]
    if rows.empty:
        known = sorted(c for c in index["collection_id"].unique() if c.startswith(wanted[:4]))
        raise AcquireError(f"IDC index: no collection {wanted!r} (from {collection!r}); "
                           f"similar ones: {known[:10]}")
    if patient_ids is not None:
        rows = rows[rows["PatientID"].isin(set(patient_ids))]
    table = rows.rename(columns=_COLUMNS).reindex(columns=SERIES_COLUMNS)
    table["ImageCount"] = pd.to_numeric(table["ImageCount"], errors="coerce").fillna(0)
    table = table.astype({"ImageCount": int}).fillna("")
    log.info("IDC %s: %d series of %d patient(s)", wanted, len(table), table["PatientID"].nunique())
    return table.reset_index(drop=True)


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")


def download_series(idc: Any, uid: str, dest: Path, *, image_count: int) -> Path:
    """Fetch one series with idc-index into `dest` (flat .dcm files), whole or not at all."""
    if dest.is_dir() and len(_dicom_files(dest)) == image_count:
        log.info("series %s: already in %s", uid, dest)
        return dest
    with temporary_dir(dest) as tmp:
        fetched, staged = tmp / "fetched", tmp / "series"
        fetched.mkdir()
        staged.mkdir()
        idc.download_from_selection(downloadDir=str(fetched), seriesInstanceUID=[uid],
                                    dirTemplate="%SeriesInstanceUID", quiet=True,
                                    show_progress_bar=False)
        files = _dicom_files(fetched)
        if len(files) != image_count:
            raise AcquireError(f"IDC series {uid}: {len(files)} .dcm file(s) arrived, the index "
                               f"says {image_count}")
        for path in files:
            shutil.move(path, staged / path.name)
        replace_dir(staged, dest)
    return dest


def download_radiology(
    selected: pd.DataFrame, radiology_dir: str | os.PathLike[str], *, idc: Any = None
) -> tuple[dict[str, Path], pd.DataFrame]:
    """Download the selected series; return {case_id: case folder} and the failures.

    Same layout and failure table as `tcia.download_radiology`; a series that fails (network,
    wrong file count) is reported and the others go on.
    """
    idc = idc if idc is not None else client()
    radiology_dir = Path(radiology_dir)
    ok, failures = [], []
    for row in selected.itertuples(index=False):
        dest = radiology_dir / row.PatientID / row.SeriesInstanceUID
        try:
            download_series(idc, row.SeriesInstanceUID, dest, image_count=int(row.ImageCount))
            ok.append(row)
        except Exception as err:  # the downloader raises many kinds; each is reported, not fatal
            reason = " ".join(str(err).split()) or type(err).__name__
            log.error("case %s, series %s (%s): %s", row.PatientID, row.SeriesInstanceUID,
                      row.sequence, reason)
            failures.append({"case_id": row.PatientID, "SeriesInstanceUID": row.SeriesInstanceUID,
                             "sequence": row.sequence, "reason": reason})
    done = pd.DataFrame(ok, columns=selected.columns)
    cases = cases_in_place(done, radiology_dir)
    log.info("IDC radiology: %d series of %d case(s) in place, %d failed", len(done),
             len(cases), len(failures))
    return cases, pd.DataFrame(failures, columns=FAILURE_COLUMNS)
