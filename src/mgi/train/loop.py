"""Pieces both training stages share: optimiser groups, mixed precision, curves on disk."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pandas as pd
import torch

from mgi.io import write_tsv
from mgi.options import PretrainOptions

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


def resolve_precision(precision: str, *, accelerator: str) -> str:
    """Lightning precision of `precision` ("auto": bf16-mixed on a bf16 GPU, 16-mixed on an older
    GPU, 32-true on a CPU, where autocast gains little)."""
    if precision != "auto":
        return precision
    cuda = accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())
    if not cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def make_fabric(opts: PretrainOptions, *, log_dir: Path | None = None):
    """A Lightning Fabric for one training stage's options (device, devices, num_nodes, precision).

    More than one process in all (devices x num_nodes) means DDP: NCCL on GPUs, gloo on CPUs.
    Fabric starts the other local processes itself, or joins those that torchrun or SLURM's
    srun started. With `log_dir`, scalars also go to TensorBoard there.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import TensorBoardLogger

    from mgi.train.build import pick_device

    accelerator = opts.device
    pick_device(accelerator)  # 'cuda' without a GPU stops here, with its message
    processes = opts.devices * opts.num_nodes
    loggers = [TensorBoardLogger(root_dir=log_dir, name="", version="")] if log_dir else []
    return Fabric(
        accelerator=accelerator,
        devices=opts.devices,
        num_nodes=opts.num_nodes,
        strategy="ddp" if processes > 1 else "auto",
        precision=resolve_precision(opts.precision, accelerator=accelerator),
        loggers=loggers,
    )


class History:
    """Per-epoch training curves, rewritten to a TSV after every epoch (so a crash keeps them).

    `rows` restores the curves of a resumed run; its clock continues from their last `seconds`.
    """

    def __init__(self, path: Path, rows: list[dict] | None = None, *, write: bool = True) -> None:
        self.path = path
        self.rows: list[dict] = list(rows or [])
        self.write = write
        offset = float(self.rows[-1]["seconds"]) if self.rows else 0.0
        self.start = time.perf_counter() - offset

    def add(self, **values: float) -> None:
        """Append one epoch's values and rewrite the file."""
        values["seconds"] = round(time.perf_counter() - self.start, 3)
        self.rows.append(values)
        if self.write:
            write_tsv(pd.DataFrame(self.rows), self.path)
