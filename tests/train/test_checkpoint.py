"""Which checkpoint a rerun may resume: same settings, inputs and code only."""

from __future__ import annotations

from pathlib import Path

from mgi import checkpoint
from mgi.checkpoint import code_digest, run_fingerprint

SETTINGS = {"seed": 0, "pretrain": {"epochs": 3, "lr": 0.001, "num_workers": 2, "devices": 1}}


def _package(root: Path, source: str) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models" / "mamba.py").write_text(source)
    (root / "README.txt").write_text("not code")
    return root


def test_code_digest_follows_python_sources_only(tmp_path):
    a = _package(tmp_path / "a", "x = 1\n")
    b = _package(tmp_path / "b", "x = 1\n")
    (b / "README.txt").write_text("other text")
    assert code_digest(a) == code_digest(b)
    (b / "models" / "mamba.py").write_text("x = 2\n")
    assert code_digest(a) != code_digest(b)


def test_fingerprint_changes_with_settings_inputs_and_code_not_execution_keys(
    tmp_path, monkeypatch
):
    data = tmp_path / "sequences.npz"
    data.write_bytes(b"one")
    base = run_fingerprint(SETTINGS, stage="pretrain", inputs=[data])
    executed_otherwise = {**SETTINGS, "pretrain": {**SETTINGS["pretrain"], "num_workers": 8}}
    assert run_fingerprint(executed_otherwise, stage="pretrain", inputs=[data]) == base
    other_lr = {**SETTINGS, "pretrain": {**SETTINGS["pretrain"], "lr": 0.01}}
    assert run_fingerprint(other_lr, stage="pretrain", inputs=[data]) != base
    data.write_bytes(b"two")
    assert run_fingerprint(SETTINGS, stage="pretrain", inputs=[data]) != base
    data.write_bytes(b"one")
    monkeypatch.setattr(checkpoint, "code_digest", lambda: b"edited package")
    assert run_fingerprint(SETTINGS, stage="pretrain", inputs=[data]) != base
