"""Progress in a log file is whole lines, not carriage-return redraws."""

from __future__ import annotations

import io

from mgi.progress import progress


def test_off_a_terminal_progress_writes_whole_lines_and_a_last_one():
    log = io.StringIO()  # not a TTY, as a rule's log file
    for _ in progress(range(1000), desc="pretrain", unit="step", file=log, interval=3600):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, lines  # the first, and the last when done; no redraw per step
    assert lines[-1].startswith("pretrain: 1000/1000 step")


def test_updates_by_hand_report_the_count():
    log = io.StringIO()
    bar = progress(total=5, desc="download", unit="B", file=log, interval=0)
    for _ in range(5):
        bar.update()
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("download: 5/5 B")
