"""Per-image QC rows: one small TSV per image, merged into `results/{cohort}/images/qc.tsv`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from mgi.io import read_tsv, write_tsv

NUMERIC_COLUMNS = ("n_items", "spacing_mm", "mpp", "level", "seconds")
# A QC row has these keys; an MRI row has spacing_mm (no mpp), a WSI row mpp (no spacing_mm).
MERGED_COLUMNS = ("image_id", "case_id", "modality", "status", "reason", "n_items",
                  "spacing_mm", "mpp", "level", "seconds")


def write_qc_row(row: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write one QC row as a one-row TSV, atomically; return the path."""
    return write_tsv(pd.DataFrame([row]), path)


def merge_qc(paths: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """Return the QC rows of many images as one table, numeric columns typed, sorted by image_id."""
    frames = [read_tsv(path, required=["image_id", "status"]) for path in paths]
    if not frames:
        return pd.DataFrame(columns=list(MERGED_COLUMNS))
    merged = pd.concat(frames, ignore_index=True, sort=False)
    for column in NUMERIC_COLUMNS:
        if column in merged:
            merged[column] = pd.to_numeric(merged[column].replace("", None), errors="coerce")
    ordered = [c for c in MERGED_COLUMNS if c in merged] + [
        c for c in merged.columns if c not in MERGED_COLUMNS
    ]
    return merged[ordered].sort_values("image_id", kind="stable").reset_index(drop=True)
