"""Which series of a case folder feeds each configured sequence (channel)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mgi.errors import MgiError, SeriesError
from mgi.imaging.mri.dicom import read_dicom, series_files
from mgi.io import read_tsv
from mgi.options import MriOptions

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



@dataclass
class SeriesChoice:
    """The series chosen for each role of one case, and why."""

    folders: dict[str, Path]  # role -> series folder
    reasons: dict[str, str]  # role -> why that series (or why none)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # every candidate, audited

    def summary(self) -> str:
        """One line: each role's outcome."""
        return "; ".join(f"{role}: {why}" for role, why in self.reasons.items())


def choose_case_series(
    series_root: str | os.PathLike[str], *, case_id: str, options: MriOptions
) -> SeriesChoice:
    """The series of `series_root` that feed each role of `options.sequences`."""
    found = find_series(series_root)
    folders, reasons = {}, {}
    for name in options.sequences:
        matches = found.get(description_key(name), [])
        if len(matches) > 1:
            raise SeriesError(f"{series_root}: {len(matches)} series described {name!r}: "
                              f"{[m.name for m in matches]}")
        if matches:
            folders[name] = matches[0]
            reasons[name] = "described so"
        else:
            reasons[name] = f"none found among {sorted(found)}"
    return SeriesChoice(folders, reasons)
