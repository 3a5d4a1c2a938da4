"""The series tables that both radiology providers (TCIA's NBIA, IDC) list and fetch alike."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# A provider's series listing (NBIA's getSeries fields; IDC's index renamed to match)
SERIES_COLUMNS = ["SeriesInstanceUID", "PatientID", "Modality", "SeriesDescription", "ImageCount"]
# image_failures.tsv: series that could not be fetched, cases without a usable study
FAILURE_COLUMNS = ["case_id", "SeriesInstanceUID", "sequence", "reason"]


def cases_in_place(done: pd.DataFrame, radiology_dir: Path) -> dict[str, Path]:
    """{case_id: radiology/{case}} of the cases with at least one series fetched whole."""
    return {str(case_id): radiology_dir / str(case_id)
            for case_id in sorted(done["PatientID"].astype(str).unique())}
