"""The Cancer Imaging Archive (NBIA search API v4): the cohort's MR series, and LGG-style masks.

`getSeries?Collection=...` lists a collection's series (JSON: SeriesInstanceUID, PatientID,
Modality, SeriesDescription, ImageCount, ...); `getImage?SeriesInstanceUID=...` returns one
series as a zip of DICOM files. A case's series land in `radiology/{case_id}/{uid}/`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from mgi.acquire.http import (
    SessionPerThread,
    TransientError,
    extract_zip,
    pause,
    redact,
    replace_dir,
    send,
    stream_to_file,
    temporary_dir,
)
from mgi.acquire.series import (
    FAILURE_COLUMNS,
    SERIES_COLUMNS,
    cases_in_place,
)
from mgi.errors import AcquireError
from mgi.io import atomic_path

log = logging.getLogger(__name__)

# LGG layout (Buda et al. 2019): {folder}/{folder}_{slice}_mask.tif, folder = {patient}_{date}
_LGG_FOLDER = re.compile(r"^(?P<patient>.+)_(?P<date>\d{8})$")
_TCGA_BARCODE = re.compile(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)
_LGG_MASK = re.compile(r"^(?P<folder>.+)_(?P<number>\d+)_mask\.tiff?$", re.IGNORECASE)


def _norm(text: str) -> str:
    """Case-folded words: runs of anything but letters and digits become one space."""
    return " ".join(re.split(r"[^0-9a-z]+", str(text).casefold())).strip()


def list_series(
    session: requests.Session, api_url: str, *, collection: str,
    patient_ids: Iterable[str] | None = None, retries: int = 5, backoff: float = 0.5,
) -> pd.DataFrame:
    """Return the collection's series (SERIES_COLUMNS), only those of `patient_ids` if given."""
    url = f"{api_url.rstrip('/')}/getSeries"
    response = send(session, "GET", url, params={"Collection": collection},
                    what=f"NBIA getSeries {collection!r}", retries=retries, backoff=backoff)
    text = response.text.strip()
    try:
        records = response.json() if text else []  # NBIA answers an empty body for no series
    except ValueError as err:
        raise AcquireError(f"NBIA getSeries {collection!r}: answer is not JSON "
                           f"({text[:200]!r})") from err
    if not isinstance(records, list):
        raise AcquireError(f"NBIA getSeries {collection!r}: expected a JSON list of series")
    table = pd.DataFrame(records)
    missing = [c for c in SERIES_COLUMNS if c not in table.columns]
    if records and missing:
        raise AcquireError(f"NBIA getSeries {collection!r}: series lack field(s) {missing}")
    table = table.reindex(columns=SERIES_COLUMNS)
    table["ImageCount"] = pd.to_numeric(table["ImageCount"], errors="coerce").fillna(0).astype(int)
    table = table.fillna("").astype({c: str for c in SERIES_COLUMNS if c != "ImageCount"})
    if patient_ids is not None:
        table = table[table["PatientID"].isin(set(patient_ids))]
    log.info("NBIA %s: %d series of %d patient(s)", collection, len(table),
             table["PatientID"].nunique())
    return table.reset_index(drop=True)


def _count_dicom(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")


def download_series(
    session: requests.Session, api_url: str, uid: str, dest: str | os.PathLike[str], *,
    image_count: int | None = None, retries: int = 3, backoff: float = 0.5,
) -> Path:
    """Download one series into folder `dest` (its .dcm files, flat); return dest.

    The zip from getImage is saved and extracted in a hidden folder beside dest, then renamed
    into place, so dest is whole or absent. A member with an absolute path or '..' rejects the
    archive; a count of .dcm files other than `image_count` is retried, then AcquireError.
    A dest already holding `image_count` .dcm files is left as it is.
    """
    dest = Path(dest)
    if dest.is_dir() and image_count is not None and _count_dicom(dest) == image_count:
        log.info("series %s: already in %s", uid, dest)
        return dest
    url = f"{api_url.rstrip('/')}/getImage"
    what = f"NBIA getImage {uid}"
    failure = TransientError("no attempt made")
    for attempt in range(retries + 1):
        with temporary_dir(dest) as tmp:
            archive, staged = tmp / "series.zip", tmp / "series"
            try:
                stream_to_file(session, url, archive, what=what,
                               params={"SeriesInstanceUID": uid})
                staged.mkdir()
                extract_zip(archive, staged, keep_suffix=".dcm", flatten=True)
                found = _count_dicom(staged)
                if image_count is not None and found != image_count:
                    raise TransientError(f"{what}: archive holds {found} .dcm file(s), "
                                         f"getSeries ImageCount says {image_count}")
                if found == 0:
                    raise TransientError(f"{what}: archive holds no .dcm file")
                replace_dir(staged, dest)
                return dest
            except TransientError as err:
                failure = err
        if attempt < retries:
            delay = pause(attempt, backoff=backoff, retry_after=failure.retry_after)
            log.warning("%s; retry %d/%d after %.1f s", redact(failure.reason, session),
                        attempt + 1, retries, delay)
    raise AcquireError(redact(f"{failure.reason} (after {retries + 1} attempts)", session))


def download_radiology(
    selected: pd.DataFrame, radiology_dir: str | os.PathLike[str], *, api_url: str,
    parallel: int = 4, retries: int = 3, backoff: float = 0.5,
) -> tuple[dict[str, Path], pd.DataFrame]:
    """Download the selected series per case; return {case_id: case folder} and the failures.

    Writes `radiology/{case_id}/{uid}/*.dcm`; failures (FAILURE_COLUMNS) are series that could
    not be fetched whole. Which series feeds which sequence is chosen afterwards, from the
    files' DICOM tags (`radiology.acquire_mri`).
    """
    radiology_dir = Path(radiology_dir)
    jobs = list(selected.itertuples(index=False))

    def fetch(row) -> str:
        dest = radiology_dir / row.PatientID / row.SeriesInstanceUID
        try:
            download_series(sessions.get(), api_url, row.SeriesInstanceUID, dest,
                            image_count=int(row.ImageCount), retries=retries, backoff=backoff)
        except AcquireError as err:
            log.error("case %s, series %s (%s): %s", row.PatientID, row.SeriesInstanceUID,
                      row.sequence, err)
            return str(err)
        return ""

    with SessionPerThread() as sessions, ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        reasons = list(pool.map(fetch, jobs))
    ok = selected[np.array([not r for r in reasons], dtype=bool)]
    failures = pd.DataFrame(
        [{"case_id": row.PatientID, "SeriesInstanceUID": row.SeriesInstanceUID,
          "sequence": row.sequence, "reason": reason}
         for row, reason in zip(jobs, reasons, strict=True) if reason],
        columns=FAILURE_COLUMNS,
    )
    cases = cases_in_place(ok, radiology_dir)
    log.info("radiology: %d series of %d case(s) in place, %d failed", len(ok), len(cases),
             len(failures))
    return cases, failures


def lgg_case_id(folder_name: str) -> str | None:
    """Case id of an LGG folder name (TCGA_CS_4941_19960909 -> TCGA-CS-4941); None if not one."""
    match = _LGG_FOLDER.match(folder_name)
    return match.group("patient").replace("_", "-") if match else None


def _lgg_masks(root: Path) -> dict[str, dict[int, Path]]:
    """Map case id -> {slice number: mask file} over every LGG folder under `root`."""
    found: dict[str, dict[int, Path]] = {}
    folders: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        match = _LGG_MASK.match(path.name)
        if not path.is_file() or not match or match.group("folder") != path.parent.name:
            continue
        case_id = lgg_case_id(path.parent.name)
        if case_id is None:
            continue
        first = folders.setdefault(case_id, path.parent)
        if first != path.parent:
            log.warning("masks: case %s has several folders; using %s, ignoring %s",
                        case_id, first, path.parent)
            continue
        found.setdefault(case_id, {})[int(match.group("number"))] = path
    return found


def copy_masks(
    source: str, masks_dir: str | os.PathLike[str], *, case_ids: Iterable[str],
    session: requests.Session | None = None, retries: int = 5, backoff: float = 0.5,
) -> dict[str, Path]:
    """Copy the cases' segmentation labels under masks/; return {case_id: what was written}.

    `source` is a local folder, or an http(s) URL of a zip of one, holding either
    LGG-style slice TIFFs, `{patient}_{date}/{patient}_{date}_{n}_mask.tif` (any depth; each
    becomes `masks/{case_id}/{case_id}_{n}_mask.tif`), or BraTS-style NIfTI label maps whose
    file name holds the TCGA barcode (e.g. `TCGA-02-0006_1996.08.23_GlistrBoost_Manually
    Corrected.nii.gz`; copied to `masks/{case_id}.nii.gz`; the MRI stage samples them onto the
    DICOM slices through the affine). Everything is written beside and renamed into place.
    Cases without labels are simply absent: they serve pre-training only.
    """
    masks_dir = Path(masks_dir)
    wanted = set(case_ids)
    if re.match(r"^https?://", source, re.IGNORECASE):
        with temporary_dir(masks_dir / "download") as tmp:
            archive = tmp / "masks.zip"
            own = session is None
            session = session or requests.Session()
            try:
                for attempt in range(retries + 1):
                    try:
                        stream_to_file(session, source, archive, what=f"masks archive {source}")
                        break
                    except TransientError as err:
                        if attempt == retries:
                            raise AcquireError(f"masks archive {source}: {err.reason} "
                                               f"(after {retries + 1} attempts)") from err
                        pause(attempt, backoff=backoff, retry_after=err.retry_after)
            finally:
                if own:
                    session.close()
            # labels only, not the images beside them
            extract_zip(archive, tmp / "masks", keep_suffix=("_mask.tif", ".nii", ".nii.gz"))
            return _copy_labels(tmp / "masks", masks_dir, wanted)
    root = Path(source)
    if not root.is_dir():
        raise AcquireError(f"sources.tcia.masks_url: {source!r} is neither a folder nor an "
                           "http(s) URL")
    return _copy_labels(root, masks_dir, wanted)


def _copy_labels(root: Path, masks_dir: Path, wanted: set[str]) -> dict[str, Path]:
    """LGG slice TIFFs where the folder has them, else NIfTI label maps named by barcode."""
    if _lgg_masks(root):
        return _copy_lgg_masks(root, masks_dir, wanted)
    return _copy_nifti_labels(root, masks_dir, wanted)


def _nifti_labels(root: Path) -> dict[str, Path]:
    """Map case id -> NIfTI label map under `root` (the first by name where a case has several)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not path.name.lower().endswith((".nii", ".nii.gz")):
            continue
        match = _TCGA_BARCODE.search(path.name.replace("_", "-"))
        if match is None:
            continue
        case_id = match.group(0).upper()
        if case_id in found:
            log.warning("labels: case %s has several label maps; using %s, ignoring %s",
                        case_id, found[case_id].name, path.name)
            continue
        found[case_id] = path
    return found


def _copy_nifti_labels(root: Path, masks_dir: Path, wanted: set[str]) -> dict[str, Path]:
    found = _nifti_labels(root)
    copied = {}
    for case_id in sorted(wanted & set(found)):
        suffix = ".nii.gz" if found[case_id].name.lower().endswith(".gz") else ".nii"
        dest = masks_dir / f"{case_id}{suffix}"
        with atomic_path(dest, suffix=suffix) as tmp:
            shutil.copyfile(found[case_id], tmp)
        copied[case_id] = dest
    log.info("label maps: %d of %d case(s) found in %s", len(copied), len(wanted), root)
    return copied


def _copy_lgg_masks(root: Path, masks_dir: Path, wanted: set[str]) -> dict[str, Path]:
    found = _lgg_masks(root)
    copied = {}
    for case_id in sorted(wanted & set(found)):
        dest = masks_dir / case_id
        with temporary_dir(dest) as tmp:
            for number, path in sorted(found[case_id].items()):
                shutil.copyfile(path, tmp / f"{case_id}_{number}_mask.tif")
            replace_dir(tmp, dest)
        copied[case_id] = dest
    log.info("masks: %d of %d case(s) found in %s", len(copied), len(wanted), root)
    return copied
