"""Which series of a case folder feeds each configured sequence (channel)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mgi.errors import MgiError, SeriesError
from mgi.imaging.mri.dicom import read_dicom, series_files
from mgi.io import read_tsv

log = logging.getLogger(__name__)

def description_key(text: str) -> str:
    return text.strip().casefold()


def find_series(series_root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Return the series folders under `series_root` keyed by case-folded sequence name.

    Where the acquire stage left a `series.tsv` (SeriesInstanceUID -> the configured sequence
    it was chosen for, since real descriptions such as "AX FLAIR" are not the configured
    names), that mapping names the folders; otherwise each folder's SeriesDescription does.
    """
    root = Path(series_root)
    if not root.is_dir():
        raise SeriesError(f"{root}: radiology folder not found")
    table = root / "series.tsv"
    if table.is_file():
        return _series_from_table(table)
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            ds = read_dicom(series_files(folder)[0], stop_before_pixels=True)
        except SeriesError as err:
            log.warning("skipping series folder %s: %s", folder, err)
            continue
        found.setdefault(description_key(str(ds.get("SeriesDescription", ""))), []).append(folder)
    return found


def _series_from_table(table: Path) -> dict[str, list[Path]]:
    """Series folders named by the acquire stage's series.tsv (SeriesInstanceUID, sequence)."""
    try:
        rows = read_tsv(table, required=["SeriesInstanceUID", "sequence"])
    except MgiError as err:
        raise SeriesError(str(err)) from err
    found: dict[str, list[Path]] = {}
    for uid, sequence in zip(rows["SeriesInstanceUID"], rows["sequence"], strict=True):
        folder = table.parent / uid
        if not folder.is_dir():
            raise SeriesError(f"{table}: series {uid} ({sequence}) has no folder {folder}")
        found.setdefault(description_key(sequence), []).append(folder)
    return found


def flair_name(sequences: tuple[str, ...]) -> str | None:
    return next((name for name in sequences if "flair" in name.casefold()), None)

