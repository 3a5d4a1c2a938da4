"""Image encoder: a timm Vision Transformer, pooled and projected to the joint embedding size."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models import load_checkpoint
from torch import Tensor, nn

log = logging.getLogger(__name__)


POS_EMBEDS = ("sincos", "learn")


@dataclass
class ImageEncoderConfig:
    """Hyper-parameters of an `ImageEncoder` (as open_clip's CLIPVisionCfg).

    width, depth and num_heads override the timm model's embed_dim, depth and num_heads.
    weights is a local checkpoint file for the timm backbone; nothing is ever downloaded.
    pos_embed "sincos" fixes the position table to 2-D sine-cosine values (MoCo v3, MAE), never
    trained; "learn" keeps timm's learned table (needed to use a checkpoint's own).
    """

    model_name: str = "vit_tiny_patch16_224"
    img_size: int = 64
    patch_size: int = 8
    in_chans: int = 3
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    embed_dim: int = 64
    weights: str | None = None
    pos_embed: str = "sincos"

    def __post_init__(self) -> None:
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(
                f"ImageEncoderConfig.pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}"
            )
        if self.weights is not None and self.pos_embed == "sincos":
            raise ValueError(
                "ImageEncoderConfig.pos_embed 'sincos' would replace the position table of the "
                f"weights {self.weights}: use pos_embed 'learn' with weights"
            )
        for field in ("img_size", "patch_size", "in_chans", "embed_dim"):
            if int(getattr(self, field)) < 1:
                raise ValueError(
                    f"ImageEncoderConfig.{field} must be a positive integer, "
                    f"got {getattr(self, field)!r}"
                )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"ImageEncoderConfig.img_size ({self.img_size}) must be a multiple of "
                f"patch_size ({self.patch_size})"
            )


def evenly_spaced_blocks(depth: int, n: int) -> list[int]:
    """Indices of n blocks spread evenly over depth, ending at the last (12, 4 -> 2, 5, 8, 11)."""
    if not 1 <= n <= depth:
        raise ValueError(f"cannot take {n} intermediate feature maps from a ViT of depth {depth}")
    return [(i + 1) * depth // n - 1 for i in range(n)]


class ImageEncoder(nn.Module):
    """Image (B, C, H, W) -> embedding (B, embed_dim), with access to intermediate ViT maps."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        overrides = {
            key: value
            for key, value in (
                ("embed_dim", cfg.width),
                ("depth", cfg.depth),
                ("num_heads", cfg.num_heads),
            )
            if value is not None
        }
        self.backbone = timm.create_model(
            cfg.model_name,
            pretrained=False,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=0,
            **overrides,
        )
        if not hasattr(self.backbone, "forward_intermediates") or not hasattr(
            self.backbone, "blocks"
        ):
            raise ValueError(
                f"ImageEncoderConfig.model_name {cfg.model_name!r} is not a timm VisionTransformer"
            )
        if cfg.pos_embed == "sincos":
            self._fix_sincos_pos_embed()
        if cfg.weights is not None:
            self.load_backbone_weights(cfg.weights)
        self.proj = nn.Linear(self.width, cfg.embed_dim)

    def _fix_sincos_pos_embed(self) -> None:
        """Fill the patch positions of the table with 2-D sin-cos values and stop training it.

        From scratch on a few dozen patients, timm's learned table (initialised near zero)
        stayed nearly flat, and the ViT barely told where a lesion sat: on the demo, a ridge
        read-out of held-out embeddings predicted the lesion row at r 0.1, against 0.91 with
        this fixed table. The class token's entry stays zero; the parameter keeps its name and
        shape, so checkpoints load either way.
        """
        backbone = self.backbone
        if backbone.pos_embed is None or self.width % 4:
            raise ValueError(
                f"ImageEncoderConfig.pos_embed 'sincos' needs a ViT with a position table and a "
                f"width divisible by 4, got width {self.width} for {self.cfg.model_name!r}"
            )
        table = build_sincos2d_pos_embed(list(backbone.patch_embed.grid_size), dim=self.width)
        prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        with torch.no_grad():
            backbone.pos_embed.zero_()
            backbone.pos_embed[0, prefix:] = table
        backbone.pos_embed.requires_grad_(False)

    def fixed_parameter_names(self) -> set[str]:
        """Parameters that are never trained (the sin-cos position table), under this module."""
        return {"backbone.pos_embed"} if self.cfg.pos_embed == "sincos" else set()

    def load_backbone_weights(self, path: str | Path) -> None:
        """Load a local timm checkpoint into the ViT (position embeddings resampled to img_size)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image encoder weights file not found: {path}")
        from timm.models.vision_transformer import checkpoint_filter_fn

        load_checkpoint(self.backbone, str(path), strict=True, filter_fn=checkpoint_filter_fn)
        log.info("loaded image encoder weights from %s", path)

    @property
    def width(self) -> int:
        """Channels of the ViT tokens (timm's embed_dim)."""
        return int(self.backbone.embed_dim)

    @property
    def grid(self) -> int:
        """Side of the token grid, img_size / patch_size."""
        return self.cfg.img_size // self.cfg.patch_size

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.backbone.blocks)

    @property
    def num_heads(self) -> int:
        """Attention heads per block."""
        return int(self.backbone.blocks[0].attn.num_heads)

    def _check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"image encoder expects images (B, {cfg.in_chans}, {cfg.img_size}, "
                f"{cfg.img_size}) as set by ImageEncoderConfig, got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Pooled, projected image embedding (B, embed_dim)."""
        self._check_input(x)
        return self.proj(self.backbone(x))

    def forward_intermediates(self, x: Tensor, n: int = 4) -> list[Tensor]:
        """n feature maps (B, width, grid, grid) from evenly spaced blocks, the last included."""
        self._check_input(x)
        indices = evenly_spaced_blocks(self.depth, n)
        return self.backbone.forward_intermediates(
            x, indices=indices, output_fmt="NCHW", intermediates_only=True
        )
