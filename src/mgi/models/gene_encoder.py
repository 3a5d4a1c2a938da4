"""Gene encoder: an ordered gene sequence (token ids + expression values) -> one embedding.

Three interchangeable trunks share the embedding and pooling: "mamba" (MGI's choice, residual
(Bi)Mamba blocks), "transformer" (a Geneformer-style baseline) and "mlp" (an order-free baseline
over the dense expression vector).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mgi.models.mamba import SCAN_BACKENDS, BiMamba, Mamba

log = logging.getLogger(__name__)

GENE_ENCODER_KINDS = ("mamba", "transformer", "mlp")
VALUE_ENCODINGS = ("bins", "continuous")


@dataclass
class GeneEncoderConfig:
    """Hyper-parameters of a `GeneEncoder` (as open_clip's CLIPTextCfg)."""

    kind: str  # "mamba" | "transformer" | "mlp"
    vocab_size: int  # including PAD (and any special tokens)
    seq_len: int  # longest sequence; sizes the transformer's position table
    value_encoding: str  # "bins" (integer bin ids < n_bins) | "continuous"
    n_bins: int = 51
    d_model: int = 64
    n_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    bidirectional: bool = True
    n_heads: int = 4
    dropout: float = 0.0
    embed_dim: int = 64
    scan_backend: str = "auto"
    recompute: bool = False  # mamba: rerun each block in backward instead of storing it
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        choices = {
            "kind": GENE_ENCODER_KINDS,
            "value_encoding": VALUE_ENCODINGS,
            "scan_backend": SCAN_BACKENDS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"GeneEncoderConfig.{field} must be one of {allowed}, "
                    f"got {getattr(self, field)!r}"
                )
        for field in (
            "vocab_size",
            "seq_len",
            "n_bins",
            "d_model",
            "n_layers",
            "d_state",
            "d_conv",
            "expand",
            "n_heads",
            "embed_dim",
        ):
            if int(getattr(self, field)) < 1:
                raise ValueError(
                    f"GeneEncoderConfig.{field} must be a positive integer, "
                    f"got {getattr(self, field)!r}"
                )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"GeneEncoderConfig.pad_token_id must be in [0, vocab_size={self.vocab_size}), "
                f"got {self.pad_token_id}"
            )
        if self.kind == "transformer" and self.d_model % self.n_heads:
            raise ValueError(
                f"GeneEncoderConfig.d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads}) for kind 'transformer'"
            )


class MambaResidualBlock(nn.Module):
    """x + (Bi)Mamba(RMSNorm(x)), the pre-norm residual block of Mamba language models."""

    def __init__(self, cfg: GeneEncoderConfig) -> None:
        super().__init__()
        kwargs = dict(
            d_state=cfg.d_state,
            d_conv=cfg.d_conv,
            expand=cfg.expand,
            scan_backend=cfg.scan_backend,
            recompute=cfg.recompute,
        )
        self.norm = nn.RMSNorm(cfg.d_model)
        self.mixer = (
            BiMamba(cfg.d_model, **kwargs) if cfg.bidirectional else Mamba(cfg.d_model, **kwargs)
        )

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        """Block output (B, L, d_model)."""
        h = self.norm(x)
        if isinstance(self.mixer, BiMamba):
            return x + self.mixer(h, padding_mask=padding_mask)
        return x + self.mixer(h)  # causal: trailing PADs cannot reach earlier tokens


class GeneEncoder(nn.Module):
    """Gene sequence -> pooled embedding (B, embed_dim).

    For kind "mamba" PAD tokens must be trailing (sequences are left-aligned, padded at the end):
    the forward direction is causal and the backward direction reverses only the real tokens,
    so PADs never influence real tokens. For "transformer" PADs are masked out of attention.
    """

    def __init__(self, cfg: GeneEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.kind == "mlp":
            # Order-free baseline: an MLP over the dense (B, vocab_size) expression vector. No
            # per-token embeddings exist, so DDP sees no unused parameters.
            self.mlp = nn.Sequential(
                nn.Linear(cfg.vocab_size, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, d)
            )
        else:
            self.token_embedding = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
            if cfg.value_encoding == "bins":
                self.value_embedding = nn.Embedding(cfg.n_bins, d)
            else:
                self.value_embedding = nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d))
            self.dropout = nn.Dropout(cfg.dropout)
        if cfg.kind == "mamba":
            self.blocks = nn.ModuleList(MambaResidualBlock(cfg) for _ in range(cfg.n_layers))
            self.norm_f = nn.RMSNorm(d)
        elif cfg.kind == "transformer":
            self.position_embedding = nn.Embedding(cfg.seq_len, d)
            layer = nn.TransformerEncoderLayer(
                d,
                cfg.n_heads,
                dim_feedforward=4 * d,
                dropout=cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.transformer = nn.TransformerEncoder(
                layer, cfg.n_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False
            )
        self.proj = nn.Linear(d, cfg.embed_dim)

    def _check_inputs(self, token_ids: Tensor, values: Tensor) -> None:
        cfg = self.cfg
        if token_ids.dim() != 2 or token_ids.shape != values.shape:
            raise ValueError(
                f"token_ids and values must both be (batch, length); got {tuple(token_ids.shape)} "
                f"and {tuple(values.shape)}"
            )
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= cfg.vocab_size):
            raise ValueError(
                f"token_ids must lie in [0, vocab_size={cfg.vocab_size}), got range "
                f"[{int(token_ids.min())}, {int(token_ids.max())}]"
            )
        if cfg.kind == "transformer" and token_ids.shape[1] > cfg.seq_len:
            raise ValueError(
                f"sequence length {token_ids.shape[1]} exceeds "
                f"GeneEncoderConfig.seq_len={cfg.seq_len}"
            )
        binned = cfg.value_encoding == "bins" and values.numel()
        if binned and (values.min() < 0 or values.max() >= cfg.n_bins):
            raise ValueError(
                f"binned values must lie in [0, n_bins={cfg.n_bins}), got range "
                f"[{float(values.min())}, {float(values.max())}]"
            )

    def _embed(self, token_ids: Tensor, values: Tensor, padding_mask: Tensor) -> Tensor:
        if self.cfg.value_encoding == "bins":
            value_emb = self.value_embedding(values.long())
        else:
            value_emb = self.value_embedding(values.unsqueeze(-1).to(self.proj.weight.dtype))
        x = self.token_embedding(token_ids) + value_emb
        return self.dropout(x.masked_fill(padding_mask.unsqueeze(-1), 0.0))

    def forward_tokens(self, token_ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Token features (B, L', d_model) and their padding mask (B, L', True = PAD).

        For "mamba" and "transformer" L' = L; PAD positions hold zeros. For "mlp" the whole
        expression profile is one token (L' = 1, never PAD).
        """
        self._check_inputs(token_ids, values)
        cfg = self.cfg
        padding_mask = token_ids == cfg.pad_token_id
        if cfg.kind == "mlp":
            scale = 1.0 / max(cfg.n_bins - 1, 1) if cfg.value_encoding == "bins" else 1.0
            vals = values.to(self.proj.weight.dtype).masked_fill(padding_mask, 0.0) * scale
            dense = vals.new_zeros(token_ids.shape[0], cfg.vocab_size)
            dense = dense.scatter_add(1, token_ids.long(), vals)
            features = self.mlp(dense).unsqueeze(1)
            return features, torch.zeros(
                features.shape[:2], dtype=torch.bool, device=features.device
            )
        x = self._embed(token_ids, values, padding_mask)
        if cfg.kind == "mamba":
            trailing = padding_mask.int().diff(dim=1).ge(0).all()
            if not bool(trailing):
                raise ValueError("mamba gene encoder needs trailing PADs (left-aligned sequences)")
            for block in self.blocks:
                x = block(x, padding_mask)
            x = self.norm_f(x)
        else:
            positions = torch.arange(x.shape[1], device=x.device)
            x = x + self.position_embedding(positions)
            x = self.transformer(x, src_key_padding_mask=padding_mask)
        return x.masked_fill(padding_mask.unsqueeze(-1), 0.0), padding_mask

    def forward(self, token_ids: Tensor, values: Tensor) -> Tensor:
        """Pooled gene embedding (B, embed_dim): masked mean over non-PAD tokens, projected."""
        features, padding_mask = self.forward_tokens(token_ids, values)
        keep = (~padding_mask).unsqueeze(-1).to(features.dtype)
        pooled = (features * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.proj(pooled)
