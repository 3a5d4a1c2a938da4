"""Your own cohort (source local): a sample sheet naming each patient's files, read in place.

The sheet (sources.local.samples, TSV) has one row per patient and is checked against
`samples.schema.yaml` (workflow/schemas/): case_id, expression (a GDC STAR counts file, or a
column of the genes x samples matrix sources.local.matrix), image (an MR study folder: DICOM
series, NIfTI volumes or LGG-set slices, its layout read from what it holds; or a slide file
for imaging.modality wsi), optional mask and split; any other column is a clinical field.
Relative paths resolve against the sheet's folder.

A mistake in the sheet (a missing column, a repeated case, a value of the wrong type, an unknown
split, a split on some rows only, a mask or matrix column that does not exist) stops with an
AcquireError naming the sheet, the row (1-based data row, with its case_id) and the column. A
patient whose expression or image file is missing or unreadable is listed in the failures
tables (expression_failures.tsv, image_failures.tsv) and left out of the cohort.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pandas as pd
import yaml

from mgi.acquire import folder, gdc
from mgi.acquire.series import FAILURE_COLUMNS as IMAGE_FAILURE_COLUMNS
from mgi.errors import AcquireError, MgiError, SeriesError
from mgi.expression.matrix import matrix_samples
from mgi.expression.star import read_star_counts
from mgi.imaging.mri.build import layout_of
from mgi.layout import IMAGE_TABLE_COLUMNS
from mgi.options import MriOptions

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "samples.schema.yaml"
FILE_COLUMNS = ("expression", "image", "mask", "split")
SPLIT_COLUMNS = ["case_id", "split"]
LOCAL_STATE = "local"  # manifest `state` of a file read in place


@functools.cache
def samples_schema() -> dict:
    """The sample sheet's JSON schema (one row = one JSON object, empty cells null)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


@dataclass(frozen=True)
class LocalCohort:
    """The tables of a local cohort, in the columns every source writes."""

    manifest: pd.DataFrame  # gdc.MANIFEST_COLUMNS; `path` absolute (a STAR file or the matrix)
    clinical: pd.DataFrame  # case_id, project_id, then the sheet's other columns
    images: pd.DataFrame  # IMAGE_TABLE_COLUMNS
    splits: pd.DataFrame  # SPLIT_COLUMNS: the sheet's splits, empty when it gives none
    expression_failures: pd.DataFrame  # gdc.FAILURE_COLUMNS
    image_failures: pd.DataFrame  # series.FAILURE_COLUMNS
    choices: pd.DataFrame  # the dicom studies' candidate series (case_id column)


def _where(sheet: Path, row: int, case_id: object, column: str) -> str:
    return f"sample sheet {sheet}: row {row} (case_id {case_id!r}), column {column!r}"


def read_sample_sheet(
    path: str | os.PathLike[str], *, matrix_columns: list[str] | None = None
) -> pd.DataFrame:
    """The sheet's rows as strings ('' for empty cells), checked against the schema.

    `matrix_columns`: the samples of sources.local.matrix, which the expression column must
    name; None = expression names STAR files. Raises AcquireError naming row and column.
    """
    sheet = Path(path)
    try:
        table = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False, comment=None)
    except FileNotFoundError as err:
        raise AcquireError(f"sources.local.samples: sample sheet {sheet} not found") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise AcquireError(f"sample sheet {sheet}: not a tab-separated table ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    table = table.apply(lambda col: col.str.strip())
    if table.empty:
        raise AcquireError(f"sample sheet {sheet}: no data row; expected one row per patient")
    schema = samples_schema()
    missing = [c for c in schema["required"] if c not in table.columns]
    if missing:
        first = table.iloc[0].get("case_id", "")
        raise AcquireError(f"{_where(sheet, 1, first, missing[0])}: column missing (header "
                           f"{list(table.columns)}); expected the columns {schema['required']} "
                           "and optionally mask, split")
    validator = jsonschema.Draft202012Validator(schema)
    for number, record in enumerate(table.to_dict("records"), start=1):
        row = {key: (value if value != "" else None) for key, value in record.items()}
        error = jsonschema.exceptions.best_match(validator.iter_errors(row))
        if error is not None:
            column = str(error.path[0]) if error.path else "?"
            told = "empty" if error.instance is None else f"value {error.instance!r}"
            raise AcquireError(f"{_where(sheet, number, record['case_id'], column)}: {told} "
                               f"is refused ({error.message}); expected "
                               f"{_expected(schema['properties'][column])}")
    _check_unique(table, sheet)
    _check_splits(table, sheet)
    if matrix_columns is not None:
        known = set(matrix_columns)
        for number, (case_id, name) in enumerate(zip(table["case_id"], table["expression"],
                                                     strict=True), start=1):
            if name not in known:
                raise AcquireError(f"{_where(sheet, number, case_id, 'expression')}: no sample "
                                   f"{name!r} in sources.local.matrix; expected one of its "
                                   f"{len(known)} column(s), e.g. {sorted(known)[:3]}")
    return table


def _expected(node: dict) -> str:
    if "enum" in node:
        return "one of " + ", ".join(str(v) for v in node["enum"] if v is not None) + " or empty"
    if "pattern" in node:
        return f"a value matching {node['pattern']}"
    return "a value (" + node.get("description", "").split(";")[0].split(".")[0].strip() + ")"


def _check_unique(table: pd.DataFrame, sheet: Path) -> None:
    first: dict[str, int] = {}
    for number, case_id in enumerate(table["case_id"], start=1):
        if case_id in first:
            raise AcquireError(f"{_where(sheet, number, case_id, 'case_id')}: already on row "
                               f"{first[case_id]}; expected one row per patient")
        first[case_id] = number


def _check_splits(table: pd.DataFrame, sheet: Path) -> None:
    if "split" not in table.columns:
        return
    given = table["split"] != ""
    if given.any() and not given.all():
        rows = [i + 1 for i in range(len(table)) if not given.iloc[i]]
        cases = table.loc[~given, "case_id"].tolist()
        raise AcquireError(f"sample sheet {sheet}: row(s) {rows[:10]} (case_id {cases[:10]}), "
                           "column 'split': empty while other rows give a split; expected a "
                           "split (train, val, test) on every row or on none")


def _resolve(sheet: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return (path if path.is_absolute() else sheet.parent / path).resolve()


def local_cohort(
    samples: str | os.PathLike[str], *, matrix: str | os.PathLike[str] | None, modality: str,
    raw_dir: str | os.PathLike[str], mri: MriOptions, nifti_labels: str,
) -> LocalCohort:
    """The manifest, clinical, image and split tables of the sheet's patients, files in place.

    A patient whose expression file (STAR) or image is missing or unreadable is a failures
    row and is left out of every table; AcquireError if no patient is left. The dicom layout's
    series choice is written under `raw_dir`/radiology/{case_id}/ (as the folder provider does).
    """
    sheet, raw_dir = Path(samples).resolve(), Path(raw_dir)
    matrix_path = Path(matrix).expanduser().resolve() if matrix else None
    if matrix_path is not None and not matrix_path.is_file():
        raise AcquireError(f"sources.local.matrix: {matrix_path} not found; expected a genes x "
                           "samples TSV/CSV or .h5ad file")
    try:
        columns = matrix_samples(matrix_path) if matrix_path is not None else None
    except MgiError as err:
        raise AcquireError(f"sources.local.matrix: {err}") from err
    table = read_sample_sheet(sheet, matrix_columns=columns)
    if modality not in ("mri", "wsi"):
        raise AcquireError(f"imaging.modality: {modality!r}, expected 'mri' or 'wsi'")
    labels = folder.label_pattern(nifti_labels, "sources.tcia.nifti_labels")
    _check_masks(table, sheet, modality=modality)
    manifest, images, expr_failures, image_failures, choices = [], [], [], [], []
    for record in table.to_dict("records"):
        case_id = record["case_id"]
        expr = _expression_row(record, sheet=sheet, matrix=matrix_path)
        if "reason" in expr:
            log.error("case %s: %s", case_id, expr["reason"])
            expr_failures.append(expr)
        try:
            image = _image_row(record, sheet=sheet, modality=modality, raw_dir=raw_dir,
                               mri=mri, labels=labels, choices=choices)
        except SeriesError as err:
            log.error("case %s: %s", case_id, err)
            image_failures.append({"case_id": case_id, "SeriesInstanceUID": "",
                                   "sequence": "", "reason": " ".join(str(err).split())})
            continue
        if "reason" not in expr:
            manifest.append(expr)
            images.append(image)
    kept = [row["case_id"] for row in manifest]
    if not kept:
        raise AcquireError(f"sample sheet {sheet}: none of its {len(table)} patient(s) has both "
                           "a readable expression profile and image; see the failures tables")
    left = table[table["case_id"].isin(kept)].reset_index(drop=True)
    log.info("sample sheet %s: %d patient(s) kept, %d left out (failures listed)", sheet,
             len(left), len(table) - len(left))
    return LocalCohort(
        manifest=pd.DataFrame(manifest, columns=gdc.MANIFEST_COLUMNS),
        clinical=_clinical(left),
        images=pd.DataFrame(images, columns=IMAGE_TABLE_COLUMNS),
        splits=(left[SPLIT_COLUMNS] if "split" in left.columns and (left["split"] != "").all()
                else pd.DataFrame(columns=SPLIT_COLUMNS)),
        expression_failures=pd.DataFrame(expr_failures, columns=gdc.FAILURE_COLUMNS),
        image_failures=pd.DataFrame(image_failures, columns=IMAGE_FAILURE_COLUMNS),
        choices=pd.concat(choices, ignore_index=True) if choices else pd.DataFrame(),
    )


def _check_masks(table: pd.DataFrame, sheet: Path, *, modality: str) -> None:
    """A mask the sheet names must exist (and only MR images have masks)."""
    if "mask" not in table.columns:
        return
    for number, record in enumerate(table.to_dict("records"), start=1):
        if not record["mask"]:
            continue
        where = _where(sheet, number, record["case_id"], "mask")
        if modality != "mri":
            raise AcquireError(f"{where}: {record['mask']!r} given for imaging.modality "
                               f"{modality!r}; expected masks only for mri (leave it empty)")
        path = _resolve(sheet, record["mask"])
        if not path.exists():
            raise AcquireError(f"{where}: {path} not found; expected a folder of LGG-style "
                               "slice mask TIFFs, a NIfTI label map or a DICOM-SEG file")


def _expression_row(record: dict, *, sheet: Path, matrix: Path | None) -> dict:
    """The manifest row of the patient's profile, or a failures row (with `reason`)."""
    case_id = record["case_id"]
    row = {"id": case_id, "case_id": case_id, "data_type": gdc.EXPRESSION_DATA_TYPE,
           "md5": "", "state": LOCAL_STATE, "sample_type": "", "sample_barcode": ""}
    if matrix is not None:
        return {**row, "filename": record["expression"], "path": str(matrix),
                "size": matrix.stat().st_size, "sample_barcode": record["expression"]}
    path = _resolve(sheet, record["expression"])
    row = {**row, "filename": path.name, "path": str(path)}
    if not path.is_file():
        return {**row, "reason": f"{path}: expression file not found (sample sheet column "
                                 "'expression'); expected a GDC STAR counts file"}
    try:
        read_star_counts(path, columns=("unstranded",))
    except (MgiError, OSError, ValueError) as err:
        return {**row, "reason": f"{path}: unreadable STAR counts file: "
                                 + " ".join(str(err).split())}
    return {**row, "size": path.stat().st_size}


def _image_row(
    record: dict, *, sheet: Path, modality: str, raw_dir: Path, mri: MriOptions,
    labels: re.Pattern[str], choices: list[pd.DataFrame],
) -> dict[str, str]:
    """The image table row of the patient; SeriesError if the image is missing or unreadable."""
    case_id = record["case_id"]
    path = _resolve(sheet, record["image"])
    if modality == "wsi":
        if not path.is_file():
            raise SeriesError(f"{path}: slide file not found (sample sheet column 'image')")
        return {"image_id": case_id, "case_id": case_id, "modality": "wsi", "path": str(path),
                "mask_path": ""}
    if not path.is_dir():
        raise SeriesError(f"{path}: MR study folder not found (sample sheet column 'image'); "
                          "expected a folder of DICOM series, NIfTI volumes or LGG-set slices")
    row = folder.patient_row(case_id, path, layout=layout_of(path), labels=labels,
                             raw_dir=raw_dir, options=mri, choices=choices)
    if record.get("mask"):
        row["mask_path"] = str(_resolve(sheet, record["mask"]))
    return row


def _clinical(table: pd.DataFrame) -> pd.DataFrame:
    extra = [c for c in table.columns
             if c not in ("case_id", "project_id", *FILE_COLUMNS)]
    project = table["project_id"] if "project_id" in table.columns else ""
    clinical = pd.DataFrame({"case_id": table["case_id"], "project_id": project})
    return pd.concat([clinical, table[extra]], axis=1)
