"""Progress of long work: a live tqdm bar on a terminal, periodic whole lines in a log file.

A tqdm bar redraws itself with carriage returns, which in a rule's log file (stderr is not a
terminal there) piles up as one line of thousands of characters. `progress` keeps tqdm's counting
and rate estimate but, off a terminal, writes one plain line at most every `interval` seconds
and a last one when done.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _LineFile:
    """A file that takes whole lines only: tqdm's own lone newline on closing is dropped."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def write(self, text: str) -> None:
        if text != "\n":
            self.file.write(text)

    def flush(self) -> None:
        self.file.flush()


class _Lines(tqdm):
    """tqdm that writes each refresh as a new line instead of redrawing in place."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = self.__str__() if msg is None else msg
        if text.strip():
            self.fp.write(text.strip("\r") + "\n")
            self.fp.flush()
        return True


def progress(iterable: Iterable | None = None, *, desc: str, unit: str = "it",
             total: float | None = None, initial: float = 0, disable: bool = False,
             interval: float = LOG_INTERVAL_S, file: Any = None, **kwargs: Any) -> tqdm:
    """A progress bar over `iterable` (or updated by hand up to `total`): tqdm on a terminal,
    else a line at most every `interval` seconds on `file` (stderr)."""
    file = file or sys.stderr
    if getattr(file, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial,
                    disable=disable, file=file, **kwargs)
    return _Lines(iterable, desc=desc, unit=unit, total=total, initial=initial,
                  disable=disable, file=_LineFile(file), mininterval=interval, maxinterval=interval,
                  miniters=1, bar_format=LOG_FORMAT, **kwargs)
