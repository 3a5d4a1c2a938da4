"""A cohort's MR studies from either provider (TCIA's NBIA API or IDC), and their masks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import requests

from mgi.acquire import idc, tcia
from mgi.errors import AcquireError
from mgi.layout import IMAGE_TABLE_COLUMNS

log = logging.getLogger(__name__)


def acquire_mri(
    raw_dir: str | os.PathLike[str], *, case_ids: list[str], api_url: str, collection: str,
    sequences: list[str], masks_url: str | None, parallel: int = 4, retries: int = 3,
    backoff: float = 0.5, provider: str = "nbia", idc_client: object | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fetch the cases' MR series (and masks); return the image table rows and the failures.

    `provider` "nbia" asks TCIA's NBIA API at `api_url`; "idc" lists the series in the
    Imaging Data Commons index (idc-index, offline) and fetches them with its downloader.
    One image row per case with at least one series in place: image_id = case_id,
    path `radiology/{case_id}`, mask_path `masks/{case_id}` when masks were found, else ''.
    """
    raw_dir = Path(raw_dir)
    if provider not in ("nbia", "idc"):
        raise AcquireError(f"sources.tcia.provider: {provider!r}; expected 'nbia' or 'idc'")
    with requests.Session() as session:
        if provider == "idc":
            series = idc.list_series(collection=collection, patient_ids=case_ids,
                                     idc=idc_client)
        else:
            series = tcia.list_series(session, api_url, collection=collection, patient_ids=case_ids,
                                 retries=retries, backoff=backoff)
        selected = tcia.select_series(series, sequences=sequences)
        without = sorted(set(case_ids) - set(selected["PatientID"]))
        if without:
            log.warning("%d case(s) have no MR series matching %s in %s: %s", len(without),
                        sequences, collection, without[:10])
        if provider == "idc":
            cases, failures = idc.download_radiology(selected, raw_dir / "radiology",
                                                     idc=idc_client)
        else:
            cases, failures = tcia.download_radiology(
                selected, raw_dir / "radiology", api_url=api_url, parallel=parallel,
                retries=retries, backoff=backoff)
        masks = (tcia.copy_masks(masks_url, raw_dir / "masks", case_ids=list(cases),
                                 session=session) if masks_url else {})
    rows = [{"image_id": case_id, "case_id": case_id, "modality": "mri",
             "path": f"radiology/{case_id}",
             "mask_path": f"masks/{masks[case_id].name}" if case_id in masks else ""}
            for case_id in sorted(cases)]
    return pd.DataFrame(rows, columns=IMAGE_TABLE_COLUMNS), failures
