"""Small I/O helpers shared by every stage: atomic writes and TSV tables."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file: on error the temporary file is removed and any
    existing file at `path` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix if suffix is not None else ".partial",
        dir=target.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def compression_of(path: str | os.PathLike[str]) -> str | None:
    """"gzip" if the file starts with the gzip magic number (whatever its suffix), else None."""
    with open(path, "rb") as handle:
        return "gzip" if handle.read(2) == b"\x1f\x8b" else None


def write_tsv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write `frame` as a tab-separated table, atomically; return the path."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)
    return Path(path)


def read_tsv(path: str | os.PathLike[str], *, required: list[str] | None = None) -> pd.DataFrame:
    """Read a tab-separated table as strings; raise if a required column is missing."""
    from mgi.errors import MgiError

    path = Path(path)
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except FileNotFoundError as err:
        raise MgiError(f"{path}: file not found") from err
    except pd.errors.EmptyDataError as err:
        raise MgiError(f"{path}: file is empty, expected a tab-separated table") from err
    missing = [c for c in (required or []) if c not in frame.columns]
    if missing:
        raise MgiError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds.

    On error the temporary folder is removed and any existing folder at `path` is left as it was.
    """
    import shutil

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
        old = None
        if target.exists():
            old = tmp.with_name(f"{tmp.name}.old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
