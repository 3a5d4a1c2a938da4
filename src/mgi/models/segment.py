"""Segmentation: the ViT image encoder, a UNETR-style 2D decoder and optional gene fusion.

The decoder follows monai.networks.nets.UNETR (Hatamizadeh et al. 2022) built from MONAI's own
blocks, but is fed from the timm ViT's intermediate maps, so the pre-trained CLIP image encoder
plugs in unchanged. For a patch size p = 2**k the decoder has k up-sampling stages; the ViT gives
k maps from evenly spaced blocks: k - 1 skips (earliest -> finest scale) and the bottleneck (the
last block, after the ViT's final norm, as UNETR). With p = 16 this is UNETR's 4-map layout.

UNetSegmentation wraps a plain MONAI U-Net, the from-scratch CNN baseline (unet_scratch).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import UNet
from torch import Tensor, nn

from mgi.errors import TrainingError
from mgi.models.gene_encoder import GeneEncoder, GeneEncoderConfig
from mgi.models.image_encoder import ImageEncoder, ImageEncoderConfig

log = logging.getLogger(__name__)

FUSIONS = ("film", "cross_attention", "none")
NORM_NAME = "instance"  # UNETR's default


class FiLM(nn.Module):
    """Feature-wise affine modulation x * gamma + beta from a condition vector; identity at init."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)  # gamma = 1 + 0, beta = 0 at init
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """Modulated x (B, C, H, W)."""
        delta_gamma, beta = self.linear(cond)[:, :, None, None].chunk(2, dim=1)
        return x * (1.0 + delta_gamma) + beta


class ConditionNorm(nn.BatchNorm1d):
    """Standardises the gene condition per dimension over the batch (running statistics in eval).

    A contrastive gene embedding sits near a sphere on which patients differ by small angles (on
    the demo each dimension spreads by about 0.007 across patients around values near 0.2), so
    a zero-initialised FiLM first learns the part all patients share and barely sees the part
    that tells them apart. Standardised, that part is order 1. On the demo this took the mgi
    variant from test Dice 0.43 to 0.86 with everything else equal. No affine parameters: the
    FiLM layers that follow learn the scale. eps is 1e-6, not BatchNorm's 1e-5: at a spread of
    0.007 (variance 5e-5) the default would shrink the standardised values by a tenth.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=1e-6, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, dim) standardised; a training batch of one uses the running statistics."""
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, training=False,
                                eps=self.eps)
        return super().forward(x)


def _patch_levels(cfg: ImageEncoderConfig, depth: int) -> int:
    """k with patch_size = 2**k, after checking the sizes UNETR's x2 up-blocks can restore."""
    p = cfg.patch_size
    if p < 2 or p & (p - 1):
        raise ValueError(
            f"segmentation needs ImageEncoderConfig.patch_size to be a power of two >= 2 "
            f"(each UNETR up-block doubles the resolution), got {p}"
        )
    if cfg.img_size % p:
        raise ValueError(
            f"segmentation needs ImageEncoderConfig.img_size ({cfg.img_size}) to be a multiple "
            f"of patch_size ({p})"
        )
    levels = int(math.log2(p))
    if depth < levels:
        raise ValueError(
            f"patch_size {p} needs {levels} ViT feature maps but the ViT has only {depth} blocks"
        )
    return levels


class SegmentationModel(nn.Module):
    """Images (B, C, H, W) [+ genes] -> mask logits (B, out_channels, H, W)."""

    def __init__(
        self,
        image: ImageEncoderConfig,
        gene: GeneEncoderConfig | None = None,
        *,
        fusion: str = "film",
        out_channels: int = 1,
        decoder_channels: int = 16,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion if gene is not None else "none"
        self.image_encoder = ImageEncoder(image)
        self.levels = _patch_levels(image, self.image_encoder.depth)
        self.gene_encoder = GeneEncoder(gene) if self.fusion != "none" else None

        width, fs, k = self.image_encoder.width, decoder_channels, self.levels
        block = dict(spatial_dims=2, kernel_size=3, norm_name=NORM_NAME, res_block=True)
        self.encoder1 = UnetrBasicBlock(
            in_channels=image.in_chans, out_channels=fs, stride=1, **block
        )
        # skip j (1 <= j < k) sits at scale 1/2**j with fs * 2**j channels (UNETR's encoder2..4)
        self.vit_skips = nn.ModuleList(
            UnetrPrUpBlock(
                in_channels=width,
                out_channels=fs * 2**j,
                num_layer=k - j - 1,
                stride=1,
                upsample_kernel_size=2,
                conv_block=True,
                **block,
            )
            for j in range(1, k)
        )
        # decoder stage j goes from scale 1/2**(j+1) to 1/2**j; applied deepest first
        self.decoders = nn.ModuleList(
            UnetrUpBlock(
                in_channels=width if j == k - 1 else fs * 2 ** (j + 1),
                out_channels=fs * 2**j,
                upsample_kernel_size=2,
                **block,
            )
            for j in reversed(range(k))
        )
        self.out = UnetOutBlock(spatial_dims=2, in_channels=fs, out_channels=out_channels)

        if self.fusion == "film":
            self.cond_norm = ConditionNorm(gene.embed_dim)
            self.films = nn.ModuleList(FiLM(gene.embed_dim, fs * 2**j) for j in reversed(range(k)))
        elif self.fusion == "cross_attention":
            self.cross_norm = nn.LayerNorm(width)
            self.cross_attention = nn.MultiheadAttention(
                width,
                self.image_encoder.num_heads,
                kdim=gene.d_model,
                vdim=gene.d_model,
                batch_first=True,
            )
        for name in self.unused_parameter_names():  # keeps DDP happy; weights still load
            self.get_parameter(name).requires_grad_(False)

    def unused_parameter_names(self) -> set[str]:
        """Encoder parameters kept for checkpoint compatibility that forward never uses."""
        unused = {f"image_encoder.proj.{n}" for n, _ in self.image_encoder.proj.named_parameters()}
        if self.fusion == "cross_attention":
            unused |= {
                f"gene_encoder.proj.{n}" for n, _ in self.gene_encoder.proj.named_parameters()
            }
        return unused

    def _cross_attend(self, bottleneck: Tensor, token_ids: Tensor, values: Tensor) -> Tensor:
        genes, padding_mask = self.gene_encoder.forward_tokens(token_ids, values)
        if bool(padding_mask.all(dim=1).any()):
            raise ValueError(
                "every sample needs at least one non-PAD gene token for cross-attention"
            )
        b, c, h, w = bottleneck.shape
        tokens = bottleneck.flatten(2).transpose(1, 2)  # (B, h*w, C)
        attended, _ = self.cross_attention(
            self.cross_norm(tokens), genes, genes, key_padding_mask=padding_mask, need_weights=False
        )
        return (tokens + attended).transpose(1, 2).reshape(b, c, h, w)

    def forward(
        self, images: Tensor, token_ids: Tensor | None = None, values: Tensor | None = None
    ) -> Tensor:
        """Mask logits (B, out_channels, H, W) at the input resolution."""
        if self.fusion != "none" and (token_ids is None or values is None):
            raise ValueError(f"fusion {self.fusion!r} needs token_ids and values")
        maps = self.image_encoder.forward_intermediates(images, n=self.levels)
        norm = self.image_encoder.backbone.norm  # UNETR decodes the ViT's final, normed output
        x = norm(maps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.fusion == "cross_attention":
            x = self._cross_attend(x, token_ids, values)
        cond = (self.cond_norm(self.gene_encoder(token_ids, values)) if self.fusion == "film"
                else None)
        skips = [self.encoder1(images)] + [
            blk(m) for blk, m in zip(self.vit_skips, maps[:-1], strict=True)
        ]
        for i, decoder in enumerate(self.decoders):
            x = decoder(x, skips[self.levels - 1 - i])
            if cond is not None:
                x = self.films[i](x, cond)
        return self.out(x)


@dataclass
class UNetConfig:
    """A plain 2D MONAI U-Net (monai.networks.nets.UNet), the from-scratch CNN baseline."""

    in_chans: int
    img_size: int
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    norm: str = "batch"  # "batch" (Buda et al. 2019) or "instance" (MONAI's default)
    out_channels: int = 1

    def __post_init__(self) -> None:
        self.channels, self.strides = tuple(self.channels), tuple(self.strides)
        if self.norm not in ("batch", "instance"):
            raise ValueError(f"U-Net norm must be 'batch' or 'instance', got {self.norm!r}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"U-Net needs one stride per down-sampling step, len(channels) - 1 = "
                f"{len(self.channels) - 1}, got {len(self.strides)} strides"
            )
        scale = math.prod(self.strides)
        if self.img_size % scale:
            raise ValueError(
                f"U-Net strides {list(self.strides)} shrink by {scale}, which must divide the "
                f"image size {self.img_size}"
            )


class UNetSegmentation(nn.Module):
    """Images (B, C, H, W) -> mask logits (B, out_channels, H, W); takes no genes.

    Same call signature as SegmentationModel, so one training loop serves both.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(
            spatial_dims=2,
            in_channels=cfg.in_chans,
            out_channels=cfg.out_channels,
            channels=cfg.channels,
            strides=cfg.strides,
            num_res_units=cfg.num_res_units,
            norm=cfg.norm,
        )

    def forward(
        self, images: Tensor, token_ids: Tensor | None = None, values: Tensor | None = None
    ) -> Tensor:
        """Mask logits at the input resolution (gene inputs are not accepted)."""
        if token_ids is not None or values is not None:
            raise ValueError("the U-Net baseline takes no gene inputs")
        return self.unet(images)


def load_pretrained(model: SegmentationModel, clip_state_dict: dict[str, Tensor]) -> list[str]:
    """Names of the encoder weights copied from a ClipModel state dict (all or nothing)."""
    state = {key.removeprefix("module."): value for key, value in clip_state_dict.items()}
    own = model.state_dict()
    prefixes = ["image_encoder."] + (["gene_encoder."] if model.gene_encoder is not None else [])
    selected: dict[str, Tensor] = {}
    for prefix in prefixes:
        source = {k for k in state if k.startswith(prefix)}
        target = {k for k in own if k.startswith(prefix)}
        if not source:
            raise TrainingError(f"pre-trained state dict has no '{prefix}*' weights")
        missing, unexpected = sorted(target - source), sorted(source - target)
        if missing or unexpected:
            raise TrainingError(
                f"pre-trained '{prefix}*' weights do not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (different encoder config?)"
            )
        for key in sorted(source):
            if state[key].shape != own[key].shape:
                raise TrainingError(
                    f"pre-trained weight {key} has shape {tuple(state[key].shape)}, "
                    f"model expects {tuple(own[key].shape)}"
                )
            selected[key] = state[key]
    with torch.no_grad():
        model.load_state_dict(selected, strict=False)
    log.info("loaded %d pre-trained encoder tensors", len(selected))
    return list(selected)


def freeze_encoder(model: nn.Module, *, image: bool, gene: bool) -> None:
    """Set requires_grad of the image / gene encoder parameters: True freezes, False unfreezes."""
    unused = model.unused_parameter_names() if hasattr(model, "unused_parameter_names") else set()
    for prefix, frozen in (("image_encoder", image), ("gene_encoder", gene)):
        encoder = getattr(model, prefix, None)
        if encoder is None:
            continue
        fixed = getattr(encoder, "fixed_parameter_names", set)()  # e.g. a sin-cos table
        for name, param in encoder.named_parameters():
            param.requires_grad_(not frozen and f"{prefix}.{name}" not in unused
                                 and name not in fixed)
