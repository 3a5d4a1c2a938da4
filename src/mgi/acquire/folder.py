"""Images already on disk (sources.tcia.provider folder): one subfolder per patient, read in place.

A patient folder is joined to the cohort's GDC case ids by the TCGA barcode in its name, with
'_' read as '-' ('TCGA_CS_4941_19960909' and 'TCGA-CS-4941' are case TCGA-CS-4941); a name
without a barcode must be the case id itself. What a patient folder holds is the layout:

- lgg_tif: the LGG segmentation set's slice TIFFs `{folder}_{n}.tif`, with masks
  `{folder}_{n}_mask.tif` beside them; the image row points at the folder (absolute path).
- nifti: one NIfTI volume per sequence role (`imaging.mri.roles.<role>.nifti`) and optionally
  a label map (`sources.tcia.nifti_labels`); the row points at the folder and the label map.
- dicom: DICOM series at any depth (patient/study/series/*.dcm as TCIA delivers them); the
  series of each role are chosen now (`choice.choose_case_series`) and listed, with their
  absolute paths, in `radiology/{case_id}/series.tsv` under the raw folder, which the row
  points at. Masks come from sources.tcia.masks_url, as for the other providers.

Nothing is copied. A patient folder that does not hold its layout is a failure row
(`FAILURE_COLUMNS`) and the cohort goes on; a folder with no usable patient at all is an
AcquireError.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from mgi.acquire.series import FAILURE_COLUMNS
from mgi.errors import AcquireError, SeriesError
from mgi.imaging.mri.choice import choose_case_series, write_series_table
from mgi.imaging.mri.dicom import read_dicom
from mgi.imaging.mri.masks import mask_files
from mgi.imaging.mri.nifti import nifti_files, role_files
from mgi.layout import IMAGE_TABLE_COLUMNS
from mgi.options import MriOptions

log = logging.getLogger(__name__)

LAYOUTS = ("dicom", "lgg_tif", "nifti")
_BARCODE = re.compile(r"(?<![A-Z0-9])TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}(?![A-Z0-9])", re.IGNORECASE)
SHOWN = 5  # names quoted in a message or log line


def folder_case_id(name: str) -> str:
    """The case id a patient folder's name gives: its TCGA barcode ('_' as '-'), else the name."""
    match = _BARCODE.search(name.replace("_", "-"))
    return match.group(0).upper() if match else name


def patient_folders(folder: Path, *, case_ids: list[str]) -> dict[str, Path]:
    """Case id -> its patient subfolder of `folder`; several for one case: the first by name."""
    wanted = set(case_ids)
    found: dict[str, Path] = {}
    ignored = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        case_id = folder_case_id(sub.name)
        if case_id not in wanted:
            ignored.append(sub.name)
        elif case_id in found:
            log.warning("case %s has several folders in %s; using %s, ignoring %s", case_id,
                        folder, found[case_id].name, sub.name)
        else:
            found[case_id] = sub
    if ignored:
        log.info("%s: %d folder(s) match no case of the cohort and are ignored: %s", folder,
                 len(ignored), ignored[:SHOWN])
    absent = sorted(wanted - set(found))
    if absent:
        log.warning("%d of %d case(s) have no folder in %s; they have no image: %s",
                    len(absent), len(wanted), folder, absent[:SHOWN])
    return found


def _contents(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
    return f"found {names[:SHOWN]}{more}" if names else "the folder is empty"


def _row(case_id: str, path: str, mask_path: str) -> dict[str, str]:
    return {"image_id": case_id, "case_id": case_id, "modality": "mri", "path": path,
            "mask_path": mask_path}


def _lgg_row(case_id: str, patient: Path) -> dict[str, str]:
    name = re.compile(rf"^{re.escape(patient.name)}_\d+\.tiff?$", re.IGNORECASE)
    if not any(name.match(p.name) for p in patient.iterdir() if p.is_file()):
        raise SeriesError(f"{patient}: no slice TIFF '{patient.name}_<n>.tif'; layout lgg_tif "
                          f"expects the LGG segmentation set's slices; {_contents(patient)}")
    masks = mask_files(patient)
    return _row(case_id, str(patient.resolve()), str(patient.resolve()) if masks else "")


def _nifti_row(
    case_id: str, patient: Path, *, labels: re.Pattern[str], options: MriOptions
) -> dict[str, str]:
    files = nifti_files(patient)
    label_maps = [p for p in files if labels.search(p.name)]
    if len(label_maps) > 1:
        raise SeriesError(f"{patient}: {len(label_maps)} NIfTI files match the label map "
                          f"pattern {labels.pattern!r} (sources.tcia.nifti_labels): "
                          f"{[p.name for p in label_maps]}; expected at most one")
    volumes = role_files(files, options=options, exclude=label_maps)
    if not volumes:
        patterns = {r: options.roles[r].nifti for r in options.sequences}
        raise SeriesError(f"{patient}: no NIfTI volume of the sequences "
                          f"{list(options.sequences)}; layout nifti expects file names "
                          f"matching {patterns}; {_contents(patient)}")
    mask = str(label_maps[0].resolve()) if label_maps else ""
    return _row(case_id, str(patient.resolve()), mask)


def _not_mr(patient: Path) -> list[str]:
    """'<file>: not an MR image (...)' for each folder under `patient` whose DICOM is not MR."""
    found = []
    for folder in [patient, *sorted(p for p in patient.rglob("*") if p.is_dir())]:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        for path in files:
            try:
                ds = read_dicom(path, stop_before_pixels=True)
            except SeriesError:
                continue  # not DICOM: a README, a mask, a thumbnail
            modality = str(ds.get("Modality", ""))
            if modality != "MR":
                sop = ds.get("SOPClassUID")
                found.append(f"{path}: not an MR image: Modality {modality!r}, SOP class "
                             f"{sop.name if sop else 'none'}")
            break  # one file tells the folder's series
    return found


def _dicom_row(
    case_id: str, patient: Path, *, raw_dir: Path, options: MriOptions,
    choices: list[pd.DataFrame],
) -> dict[str, str]:
    choice = choose_case_series(patient, case_id=case_id, options=options)
    if not choice.table.empty:
        choices.append(choice.table.assign(case_id=case_id))
    if not choice.folders:
        why = "; ".join(_not_mr(patient)[:SHOWN])
        raise SeriesError(f"{patient}: no MR series for any of the sequences "
                          f"{list(options.sequences)} ({choice.summary()})"
                          + (f"; {why}" if why else ""))
    write_series_table(choice, raw_dir / "radiology" / case_id / "series.tsv")
    return _row(case_id, f"radiology/{case_id}", "")


def patient_row(
    case_id: str, patient: Path, *, layout: str, labels: re.Pattern[str], raw_dir: Path,
    options: MriOptions, choices: list[pd.DataFrame],
) -> dict[str, str]:
    """The image table row of one patient folder read in `layout`; SeriesError if it does not
    hold that layout. The dicom layout writes `radiology/{case_id}/series.tsv` under `raw_dir`
    and appends its candidate series to `choices`."""
    if layout == "lgg_tif":
        return _lgg_row(case_id, patient)
    if layout == "nifti":
        return _nifti_row(case_id, patient, labels=labels, options=options)
    return _dicom_row(case_id, patient, raw_dir=raw_dir, options=options, choices=choices)


def label_pattern(text: str, key: str) -> re.Pattern[str]:
    """`text` compiled (case-insensitive); AcquireError naming config key `key` if invalid."""
    return _pattern(text, key)


def _pattern(text: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as err:
        raise AcquireError(f"{key}: {text!r} is not a regular expression ({err})") from err


def folder_images(
    folder: str | os.PathLike[str], *, layout: str, case_ids: list[str], nifti_labels: str,
    raw_dir: str | os.PathLike[str], options: MriOptions,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Image table rows of the cases' patient folders, the failures, and the series choices.

    Returns (rows in IMAGE_TABLE_COLUMNS, failures in FAILURE_COLUMNS, the dicom layout's
    candidate series of every case with a case_id column; empty for the other layouts).
    """
    folder, raw_dir = Path(folder), Path(raw_dir)
    if layout not in LAYOUTS:
        raise AcquireError(f"sources.tcia.layout: {layout!r}, expected one of {LAYOUTS}")
    if not folder.is_dir():
        raise AcquireError(f"sources.tcia.folder: {folder} is not a folder; expected the folder "
                           "holding one subfolder per patient")
    labels = _pattern(nifti_labels, "sources.tcia.nifti_labels")
    for role in (*options.sequences, options.reference):
        if layout == "nifti" and options.roles[role].nifti is not None:
            _pattern(options.roles[role].nifti, f"imaging.mri.roles.{role}.nifti")
    found = patient_folders(folder, case_ids=case_ids)
    if not found:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise AcquireError(
            f"sources.tcia.folder {folder}: none of its {len(subfolders)} subfolder(s) "
            f"{subfolders[:SHOWN]} is named by the TCGA barcode of one of the {len(case_ids)} "
            f"case(s) of the cohort (e.g. {sorted(case_ids)[:3]}); expected one subfolder per "
            "patient such as 'TCGA-CS-4941' or 'TCGA_CS_4941_19960909'")
    rows, failures, choices = [], [], []
    for case_id, patient in sorted(found.items()):
        try:
            rows.append(patient_row(case_id, patient, layout=layout, labels=labels,
                                    raw_dir=raw_dir, options=options, choices=choices))
        except SeriesError as err:
            log.error("case %s: %s", case_id, err)
            failures.append({"case_id": case_id, "SeriesInstanceUID": "", "sequence": "",
                             "reason": " ".join(str(err).split())})
    if not rows:
        reasons = "; ".join(f["reason"] for f in failures[:2])
        raise AcquireError(f"sources.tcia.folder {folder}: none of the {len(found)} patient "
                           f"folder(s) of the cohort's cases holds images in layout {layout!r} "
                           f"(sources.tcia.layout): {reasons}")
    log.info("%s (layout %s): %d case(s) with images, %d failed", folder, layout, len(rows),
             len(failures))
    return (pd.DataFrame(rows, columns=IMAGE_TABLE_COLUMNS),
            pd.DataFrame(failures, columns=FAILURE_COLUMNS),
            pd.concat(choices, ignore_index=True) if choices else pd.DataFrame())
