"""A cohort's MR studies from a provider (TCIA's NBIA API, IDC or a local folder), and masks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import requests

from mgi.acquire import idc, tcia
from mgi.errors import AcquireError
from mgi.layout import IMAGE_TABLE_COLUMNS
from mgi.options import MriOptions, TciaOptions

PROVIDERS = ("nbia", "idc", "folder")

log = logging.getLogger(__name__)


def acquire_mri(
    raw_dir: str | os.PathLike[str], *, case_ids: list[str], api_url: str, collection: str,
    sequences: list[str], masks_url: str | None, parallel: int = 4, retries: int = 3,
    backoff: float = 0.5, provider: str = "nbia", idc_client: object | None = None,
    folder: str | os.PathLike[str] | None = None, layout: str = "dicom",
    nifti_labels: str = TciaOptions.nifti_labels, options: MriOptions | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fetch the cases' MR series (and masks); return the image table rows and the failures.

    `provider` "nbia" asks TCIA's NBIA API at `api_url`; "idc" lists the series in the
    Imaging Data Commons index (idc-index, offline) and fetches them with its downloader.
    One image row per case with at least one series in place: image_id = case_id,
    path `radiology/{case_id}`, mask_path `masks/{case_id}` when masks were found, else ''.
    "folder" reads the images already in `folder` (a relative one from the working directory)
    in `layout`, without network or collection: see `mgi.acquire.folder`; `options` are
    imaging.mri (the roles' choice rules and NIfTI names).
    """
    raw_dir = Path(raw_dir)
    if provider not in PROVIDERS:
        raise AcquireError(f"sources.tcia.provider: {provider!r}; expected 'nbia' or 'idc' "
                           "(remote) or 'folder' (images on disk)")
    if provider == "folder":
        return _from_folder(raw_dir, case_ids=case_ids, folder=folder, layout=layout,
                            nifti_labels=nifti_labels, masks_url=masks_url,
                            options=options or MriOptions(sequences=tuple(sequences)))
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


def _from_folder(
    raw_dir: Path, *, case_ids: list[str], folder: str | os.PathLike[str] | None, layout: str,
    nifti_labels: str, masks_url: str | None, options: MriOptions,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The folder provider's rows; masks_url fills the mask of cases whose folder has none."""
    if not folder:
        raise AcquireError("sources.tcia.folder: not set; provider 'folder' needs the folder "
                           "holding one subfolder per patient")
    # imported here: it imports the MRI package (scikit-image, SimpleITK), which the other
    # providers do not need
    from mgi.acquire.folder import folder_images

    root = Path(folder) if Path(folder).is_absolute() else Path.cwd() / folder
    rows, failures, _ = folder_images(root, layout=layout, case_ids=case_ids,
                                      nifti_labels=nifti_labels, raw_dir=raw_dir,
                                      options=options)
    if masks_url:
        without = rows.loc[rows["mask_path"] == "", "case_id"].tolist()
        masks = tcia.copy_masks(masks_url, raw_dir / "masks", case_ids=without) if without \
            else {}
        found = rows["case_id"].map(lambda c: f"masks/{masks[c].name}" if c in masks else "")
        rows["mask_path"] = rows["mask_path"].where(rows["mask_path"] != "", found)
    return rows, failures
