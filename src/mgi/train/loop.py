"""Pieces both training stages share: optimiser groups, mixed precision, curves on disk."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pandas as pd
import torch

from mgi.io import atomic_path, write_tsv

# Parameter names of the gene fusion layers of mgi.models.SegmentationModel.
FUSION_PREFIXES = ("films.", "cross_norm.", "cross_attention.")


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float,
          fusion_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW without decay on biases, norms and the temperature; fusion layers at a scaled rate.

    The fusion layers (FiLM, cross-attention) start from identity while everything else starts
    pre-trained, so they may learn at `fusion_lr_scale` times the rate of the rest.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_gain = param.ndim < 2 or "logit_scale" in name or name.endswith(("A_log", ".D"))
        is_fusion = name.startswith(FUSION_PREFIXES)
        groups.setdefault((is_gain, is_fusion), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.0 if is_gain else weight_decay,
          "lr": lr * (fusion_lr_scale if is_fusion else 1.0)}
         for (is_gain, is_fusion), params in sorted(groups.items())],
        lr=lr,
    )


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 on CPU (where autocast gains little)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class History:
    """Per-epoch training curves, rewritten to a TSV after every epoch (so a crash keeps them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def add(self, **values: float) -> None:
        """Append one epoch's values and rewrite the file."""
        values["seconds"] = round(time.perf_counter() - self.start, 3)
        self.rows.append(values)
        write_tsv(pd.DataFrame(self.rows), self.path)


def save_checkpoint(payload: dict, path: Path) -> None:
    """torch.save, atomically."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
