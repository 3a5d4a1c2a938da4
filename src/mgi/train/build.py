"""Model configurations (dataclasses) built from the validated workflow config, in one place."""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch

from mgi.models import GeneEncoderConfig, ImageEncoderConfig
from mgi.options import ExpressionOptions, ImagingOptions, ModelOptions, UNetOptions

if TYPE_CHECKING:  # segment imports MONAI (seconds): only the jobs that segment load it
    from mgi.models.segment import UNetConfig


def gene_config(model: ModelOptions, expression: ExpressionOptions, *, vocab_size: int,
                seq_len: int, kind: str | None = None) -> GeneEncoderConfig:
    """The gene encoder's config from the `model` and `expression` sections; `seq_len` from the
    sequences file, `kind` replaces model.gene_encoder.kind (the gene-encoder ablations)."""
    gene = model.gene_encoder
    return GeneEncoderConfig(
        kind=kind or gene.kind,
        vocab_size=vocab_size,
        seq_len=seq_len,
        # zscore values are continuous numbers to the model, as continuous ones are
        value_encoding="bins" if expression.values == "bins" else "continuous",
        n_bins=expression.n_bins,
        d_model=gene.d_model,
        n_layers=gene.n_layers,
        d_state=gene.d_state,
        d_conv=gene.d_conv,
        expand=gene.expand,
        bidirectional=gene.bidirectional,
        n_heads=gene.n_heads,
        dropout=gene.dropout,
        embed_dim=model.embed_dim,
        scan_backend=gene.scan_backend,
        recompute=gene.recompute,
    )


def image_config(model: ModelOptions, imaging: ImagingOptions, *, in_chans: int
                 ) -> ImageEncoderConfig:
    """The ViT's config from the `model` and `imaging` sections (channels from the image bank)."""
    image = model.image_encoder
    return ImageEncoderConfig(
        model_name=image.model_name,
        img_size=imaging.image_px,
        patch_size=image.patch_size,
        in_chans=in_chans,
        width=image.width,
        depth=image.depth,
        num_heads=image.num_heads,
        embed_dim=model.embed_dim,
        weights=image.weights,
        pos_embed=image.pos_embed,
    )


def image_channels(imaging: ImagingOptions) -> tuple[str, ...] | None:
    """The image channels in order: imaging.mri.sequences for MRI, None for slides (RGB)."""
    return tuple(imaging.mri.sequences) if imaging.modality == "mri" else None


def unet_config(unet: UNetOptions, imaging: ImagingOptions, *, in_chans: int) -> UNetConfig:
    """The U-Net baseline's config from `finetune.unet` (channels from the image bank)."""
    from mgi.models.segment import UNetConfig
    return UNetConfig(
        in_chans=in_chans,
        img_size=imaging.image_px,
        channels=tuple(unet.channels),
        strides=tuple(unet.strides),
        num_res_units=unet.num_res_units,
        norm=unet.norm,
    )


def config_dict(config: object) -> dict:
    """A model config as a plain dict, as stored in checkpoints."""
    return asdict(config)  # type: ignore[arg-type]


def seed_everything(seed: int, *, threads: int) -> None:
    """Seed Python, NumPy and PyTorch and set PyTorch's CPU threads."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))


def pick_device(name: str) -> torch.device:
    """`auto` = CUDA where available, else CPU; `cuda` without a GPU is an error."""
    from mgi.errors import TrainingError

    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested (pretrain/finetune.device), no GPU is visible")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def warmup_cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int):
    """Linear warm-up to the peak rate, then cosine decay to zero (a LambdaLR)."""
    import math

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def describe_device(device: torch.device, *, processes: int = 1) -> str:
    """The training device in words, for the report (GPU model, or CPU threads; DDP processes)."""
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        text = f"CPU, {torch.get_num_threads()} threads"
    return text if processes == 1 else f"{processes} processes x {text}"
