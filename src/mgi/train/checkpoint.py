"""Training checkpoints that a killed run resumes from, and only the run they belong to."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Options that change how a run is executed, not what it computes: a checkpoint taken with other
# values still resumes.
EXECUTION_KEYS = ("devices", "num_nodes", "num_workers", "checkpoint_every", "device")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/mgi


def code_digest(root: Path = PACKAGE_ROOT) -> bytes:
    """SHA-256 over the package's Python sources (relative path and bytes of each, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.digest()


def run_fingerprint(settings: dict, *, stage: str, inputs: list[Path]) -> str:
    """SHA-256 of the settings (execution-only keys of `stage` left out), the input files and
    the package's code: a rerun after a code change (DVC's or Snakemake's) starts afresh
    instead of resuming the finished run's checkpoint."""
    kept = json.loads(json.dumps(settings))
    for key in EXECUTION_KEYS:
        kept.get(stage, {}).pop(key, None)
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode())
    digest.update(code_digest())
    for path in inputs:
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def save_state(fabric: Any, path: Path, state: dict) -> None:
    """fabric.save to a temporary name, then rename on the writing process (all must call it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fabric.save(tmp, state)
    if fabric.is_global_zero:
        os.replace(tmp, path)
    fabric.barrier()


def resume_state(fabric: Any, path: Path, state: dict, *, fingerprint: str) -> bool:
    """Restore `state` in place from `path` when it was written by this very run.

    A checkpoint of other settings or inputs is left alone (and named in the log); training
    then starts afresh and overwrites it at its first checkpoint.
    """
    if not path.exists():
        return False
    stored = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("fingerprint")
    if stored != fingerprint:
        log.warning("%s belongs to other settings or inputs; starting afresh", path)
        return False
    remainder = fabric.load(path, state, weights_only=False)
    state.update(remainder)
    return True
