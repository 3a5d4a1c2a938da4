"""The `mgi` command line: stage errors are one clear line, not a traceback."""

from __future__ import annotations

from pathlib import Path

from mgi.cli import main


def test_stage_error_is_printed_without_traceback(tmp_path: Path, capsys):
    missing = tmp_path / "qc.tsv"
    code = main(["qc-merge", str(missing), "--out", str(tmp_path / "out.tsv")])
    err = capsys.readouterr().err
    assert code == 1
    assert str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "out.tsv").exists()


def test_bad_settings_json_names_the_option(tmp_path: Path, capsys):
    code = main(["synthesize", "--settings", "{not json", "--out-dir", str(tmp_path)])
    assert code == 1
    assert "--settings" in capsys.readouterr().err
