"""The series tables that both radiology providers (TCIA's NBIA, IDC) write and read alike."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mgi.io import write_tsv

# A provider's series listing (NBIA's getSeries fields; IDC's index renamed to match)
SERIES_COLUMNS = ["SeriesInstanceUID", "PatientID", "Modality", "SeriesDescription", "ImageCount"]
# radiology/{case}/series.tsv: the series in place and the sequence each stands for
SERIES_TABLE_COLUMNS = ["SeriesInstanceUID", "sequence", "SeriesDescription", "ImageCount"]
# image_failures.tsv: series that could not be fetched
FAILURE_COLUMNS = ["case_id", "SeriesInstanceUID", "sequence", "reason"]


def write_series_tables(done: pd.DataFrame, radiology_dir: Path) -> dict[str, Path]:
    """Write `radiology/{case}/series.tsv` of the series in place; return {case_id: folder}."""
    cases = {}
    for case_id, group in done.groupby("PatientID", sort=True):
        folder = radiology_dir / str(case_id)
        write_tsv(group.reindex(columns=SERIES_TABLE_COLUMNS), folder / "series.tsv")
        cases[str(case_id)] = folder
    return cases
