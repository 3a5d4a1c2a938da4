"""A cohort's MR studies from a provider (TCIA's NBIA API, IDC, or a folder on disk), the
series chosen per sequence role from their DICOM tags, and the masks.

What a provider's listing says (SeriesDescription, ImageCount) narrows what is fetched: series
whose description can serve no role (DWI, perfusion, localizers...) are not downloaded. The
choice itself needs the DICOM tags (plane, contrast agent, inversion time, ImageType), so it is
made on the fetched files (`mgi.imaging.mri.choice`): each case's `radiology/{case}/series.tsv`
names the series chosen per role, and `series_choice.tsv` beside the image table audits every
series of every case (chosen, candidate, rejected and why, not downloaded).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import requests

from mgi.acquire import idc, tcia
from mgi.acquire.series import FAILURE_COLUMNS
from mgi.errors import AcquireError
from mgi.imaging.mri.choice import (
    CHOICE_COLUMNS,
    choose_series,
    listing_candidates,
    read_overrides,
    scan_case,
    write_series_table,
)
from mgi.layout import IMAGE_TABLE_COLUMNS
from mgi.options import MriOptions, TciaOptions

log = logging.getLogger(__name__)

PROVIDERS = ("nbia", "idc", "folder")


def _not_fetched(series: pd.DataFrame, wanted: pd.DataFrame, failures: pd.DataFrame
                 ) -> pd.DataFrame:
    """Audit rows of the listed series that are not on disk, and why."""
    failed = dict(zip(failures["SeriesInstanceUID"], failures["reason"], strict=True))
    fetched = set(wanted["SeriesInstanceUID"]) - set(failed)
    left = series[~series["SeriesInstanceUID"].isin(fetched)]

    def why(row: pd.Series) -> str:
        if row["SeriesInstanceUID"] in failed:
            return f"download failed: {failed[row['SeriesInstanceUID']]}"
        if str(row["Modality"]).upper() != "MR":
            return "not MR"
        return "not downloaded: the description serves no sequence role, or too few images"

    reasons = left.apply(why, axis=1) if len(left) else pd.Series(dtype=str)
    return pd.DataFrame({
        "case_id": left["PatientID"], "SeriesInstanceUID": left["SeriesInstanceUID"],
        "SeriesDescription": left["SeriesDescription"], "n_slices": left["ImageCount"],
        "status": "not downloaded", "reason": reasons,
    }).reindex(columns=CHOICE_COLUMNS).fillna("")


def choose_downloaded(
    cases: dict[str, Path], *, options: MriOptions,
    overrides: dict[tuple[str, str], str] | None = None,
) -> tuple[dict[str, Path], pd.DataFrame, pd.DataFrame]:
    """Choose each downloaded case's series per role from their DICOM tags.

    Writes `radiology/{case}/series.tsv` for every case with at least one role filled; returns
    those cases, the audit rows (CHOICE_COLUMNS) and a failure row per case with none.
    """
    overrides = overrides or {}
    chosen, audits, failures = {}, [], []
    for case_id, folder in sorted(cases.items()):
        mine = {role: uid for (case, role), uid in overrides.items() if case == case_id}
        choice = choose_series(scan_case(folder), case_id=case_id, options=options,
                               overrides=mine)
        if not choice.table.empty:
            audits.append(choice.table)
        if choice.folders:
            write_series_table(choice, folder / "series.tsv")
            chosen[case_id] = folder
        else:
            (folder / "series.tsv").unlink(missing_ok=True)
            log.error("case %s: no series for any sequence role: %s", case_id, choice.summary())
            failures.append({"case_id": case_id, "SeriesInstanceUID": "", "sequence": "",
                             "reason": f"no usable series: {choice.summary()}"})
    audit = (pd.concat(audits, ignore_index=True) if audits
             else pd.DataFrame(columns=CHOICE_COLUMNS))
    return chosen, audit, pd.DataFrame(failures, columns=FAILURE_COLUMNS)


def acquire_mri(
    raw_dir: str | os.PathLike[str], *, case_ids: list[str], tcia_options: TciaOptions,
    mri: MriOptions, parallel: int = 4, retries: int = 3, backoff: float = 0.5,
    idc_client: object | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Fetch the cases' MR series (and masks); return the image table rows, the failures and
    the series-choice audit (CHOICE_COLUMNS).

    `tcia_options.provider` "nbia" asks TCIA's NBIA API at `api_url`; "idc" lists the series in
    the Imaging Data Commons index (idc-index, offline) and fetches them with its downloader;
    "folder" reads the images already in `tcia_options.folder` (a relative one from the working
    directory) in `tcia_options.layout`, without network or collection (`mgi.acquire.folder`).
    One image row per case with at least one role filled: image_id = case_id, path
    `radiology/{case_id}`, mask_path `masks/{case_id}` when masks were found, else ''.
    """
    raw_dir = Path(raw_dir)
    provider = tcia_options.provider
    if provider not in PROVIDERS:
        raise AcquireError(f"sources.tcia.provider: {provider!r}; expected one of {PROVIDERS}")
    if provider == "folder":
        return _from_folder(raw_dir, case_ids=case_ids, tcia_options=tcia_options, mri=mri)
    overrides = read_overrides(Path(mri.series_overrides)) if mri.series_overrides else {}
    collection, api_url = tcia_options.collection, tcia_options.api_url
    with requests.Session() as session:
        if provider == "idc":
            series = idc.list_series(collection=collection, patient_ids=case_ids,
                                     idc=idc_client)
        else:
            series = tcia.list_series(session, api_url, collection=collection,
                                      patient_ids=case_ids, retries=retries, backoff=backoff)
        wanted = listing_candidates(series, options=mri)
        forced = series[series["SeriesInstanceUID"].isin(set(overrides.values()))
                        & ~series["SeriesInstanceUID"].isin(set(wanted["SeriesInstanceUID"]))]
        wanted = pd.concat([wanted, forced.assign(roles="override")], ignore_index=True)
        wanted = wanted.assign(sequence=wanted["roles"])  # failure rows name what it was for
        without = sorted(set(case_ids) - set(wanted["PatientID"]))
        if without:
            log.warning("%d case(s) have no MR series that could serve %s in %s: %s",
                        len(without), list(mri.sequences), collection, without[:10])
        if provider == "idc":
            cases, failures = idc.download_radiology(wanted, raw_dir / "radiology",
                                                     idc=idc_client)
        else:
            cases, failures = tcia.download_radiology(
                wanted, raw_dir / "radiology", api_url=api_url, parallel=parallel,
                retries=retries, backoff=backoff)
        chosen, audit, unusable = choose_downloaded(cases, options=mri, overrides=overrides)
        masks_url = tcia_options.masks_url
        masks = (tcia.copy_masks(masks_url, raw_dir / "masks", case_ids=list(chosen),
                                 session=session) if masks_url else {})
    audit = pd.concat([audit, _not_fetched(series, wanted, failures)], ignore_index=True)
    audit = audit.sort_values(["case_id", "status", "SeriesInstanceUID"], kind="stable")
    rows = [{"image_id": case_id, "case_id": case_id, "modality": "mri",
             "path": f"radiology/{case_id}",
             "mask_path": f"masks/{masks[case_id].name}" if case_id in masks else ""}
            for case_id in sorted(chosen)]
    failures = pd.concat([failures, unusable], ignore_index=True)
    return (pd.DataFrame(rows, columns=IMAGE_TABLE_COLUMNS), failures,
            audit.reset_index(drop=True))


def _from_folder(
    raw_dir: Path, *, case_ids: list[str], tcia_options: TciaOptions, mri: MriOptions,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The folder provider's rows; masks_url fills the mask of cases whose folder has none."""
    folder = tcia_options.folder
    if not folder:
        raise AcquireError("sources.tcia.folder: not set; provider 'folder' needs the folder "
                           "holding one subfolder per patient")
    from mgi.acquire.folder import folder_images

    root = Path(folder) if Path(folder).is_absolute() else Path.cwd() / folder
    rows, failures, audit = folder_images(root, layout=tcia_options.layout, case_ids=case_ids,
                                          nifti_labels=tcia_options.nifti_labels,
                                          raw_dir=raw_dir, options=mri)
    masks_url = tcia_options.masks_url
    if masks_url:
        without = rows.loc[rows["mask_path"] == "", "case_id"].tolist()
        masks = tcia.copy_masks(masks_url, raw_dir / "masks", case_ids=without) if without \
            else {}
        found = rows["case_id"].map(lambda c: f"masks/{masks[c].name}" if c in masks else "")
        rows["mask_path"] = rows["mask_path"].where(rows["mask_path"] != "", found)
    return rows, failures, audit.reindex(columns=CHOICE_COLUMNS).fillna("")
