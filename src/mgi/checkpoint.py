"""Every checkpoint's format, written and read here alone.

- model checkpoints: `pretrain/model.pt` (the CLIP model's weights and encoder configs) and
  `finetune/{variant}/model.pt` (a variant's weights, the settings that rebuild it, or the record
  of its failure); training writes them, fine-tuning, attribution and evaluation read them;
- training checkpoints (`pretrain/checkpoints/last.ckpt`) that a killed run resumes from, and
  only the run they belong to (`run_fingerprint`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mgi.errors import MgiError
from mgi.io import atomic_path
from mgi.options import FinetuneSettings, as_dict, build

log = logging.getLogger(__name__)

# Options that change how a run is executed, not what it computes: a checkpoint taken with other
# values still resumes.
EXECUTION_KEYS = ("devices", "num_nodes", "num_workers", "checkpoint_every", "device")
PACKAGE_ROOT = Path(__file__).resolve().parent  # src/mgi


def code_digest(root: Path = PACKAGE_ROOT) -> bytes:
    """SHA-256 over the package's Python sources (relative path and bytes of each, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.digest()


def run_fingerprint(settings: object, *, stage: str, inputs: list[Path]) -> str:
    """SHA-256 of the stage's settings (execution-only keys of `stage` left out), the input
    files and the package's code: a rerun after a code change (DVC's or Snakemake's) starts
    afresh instead of resuming the finished run's checkpoint."""
    kept = as_dict(settings)
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


# --- model checkpoints ----------------------------------------------------------------------


def save_checkpoint(payload: dict, path: Path) -> None:
    """torch.save, atomically."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def _load(path: Path, *, what: str, keys: tuple[str, ...], data: bytes | None = None) -> dict:
    try:
        source = io.BytesIO(data) if data is not None else path
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise MgiError(f"{path}: cannot read the {what} checkpoint ({err})") from err
    missing = [key for key in keys if key not in checkpoint]
    if not isinstance(checkpoint, dict) or missing:
        raise MgiError(f"{path}: not a {what} checkpoint (no {missing})")
    return checkpoint


@dataclass(frozen=True)
class Pretrained:
    """A pre-training checkpoint: the CLIP model's weights and the encoders' configs."""

    state_dict: dict
    gene_config: dict  # GeneEncoderConfig's fields
    image_config: dict  # ImageEncoderConfig's fields
    best_epoch: int
    # the image channels in order (imaging.mri.sequences of an MRI pre-training); None for
    # slides and for checkpoints written before the field existed
    channels: tuple[str, ...] | None = None


def save_pretrained(path: Path, *, state_dict: dict, gene_config: dict, image_config: dict,
                    best_epoch: int, channels: tuple[str, ...] | None = None) -> None:
    """Write pretrain/model.pt."""
    save_checkpoint({"state_dict": state_dict, "gene_config": gene_config,
                     "image_config": image_config, "best_epoch": best_epoch,
                     "channels": list(channels) if channels is not None else None}, path)


def load_pretrained(path: Path, *, data: bytes | None = None) -> Pretrained:
    """Read pretrain/model.pt, or its bytes `data` (MgiError naming `path` if not one)."""
    checkpoint = _load(path, what="pre-training", keys=("state_dict", "gene_config",
                                                        "image_config"), data=data)
    channels = checkpoint.get("channels")
    return Pretrained(checkpoint["state_dict"], checkpoint["gene_config"],
                      checkpoint["image_config"], int(checkpoint.get("best_epoch", 0)),
                      tuple(channels) if channels is not None else None)


@dataclass(frozen=True)
class Finetuned:
    """A fine-tuned variant's checkpoint: its weights and what rebuilds its network, or, when
    its training failed, the error (`failed` True, the rest None)."""

    variant: str
    failed: bool
    error: str = ""
    state_dict: dict | None = None
    settings: FinetuneSettings | None = None
    vocab_size: int | None = None
    in_chans: int | None = None
    best_epoch: int | None = None
    val_dice: float | None = None


def save_finetuned(path: Path, *, variant: str, state_dict: dict, settings: FinetuneSettings,
                   vocab_size: int, in_chans: int, best_epoch: int, val_dice: float) -> None:
    """Write finetune/{variant}/model.pt of a variant that trained."""
    save_checkpoint({"variant": variant, "state_dict": state_dict,
                     "settings": as_dict(settings), "vocab_size": vocab_size,
                     "in_chans": in_chans, "best_epoch": best_epoch, "val_dice": val_dice}, path)


def save_failed(path: Path, *, variant: str, error: str) -> None:
    """Write finetune/{variant}/model.pt of a variant whose training failed."""
    save_checkpoint({"variant": variant, "failed": True, "error": error}, path)


def load_finetuned(path: Path, *, data: bytes | None = None) -> Finetuned:
    """Read finetune/{variant}/model.pt (MgiError naming the file if it is not one); `data`:
    the file's bytes, already read (a bundle's member; `path` then names it in errors)."""
    checkpoint = _load(path, what="fine-tuned", keys=("variant",), data=data)
    if checkpoint.get("failed"):
        return Finetuned(checkpoint["variant"], True, str(checkpoint.get("error", "")))
    missing = [key for key in ("state_dict", "settings", "vocab_size", "in_chans", "best_epoch",
                               "val_dice") if key not in checkpoint]
    if missing:
        raise MgiError(f"{path}: not a fine-tuned checkpoint (no {missing})")
    return Finetuned(checkpoint["variant"], False, "", checkpoint["state_dict"],
                     build(FinetuneSettings, checkpoint["settings"]),
                     int(checkpoint["vocab_size"]), int(checkpoint["in_chans"]),
                     int(checkpoint["best_epoch"]), float(checkpoint["val_dice"]))
