"""models stage: Mamba gene encoder, ViT image encoder, CLIP pre-training and segmentation models.

Names are re-exported lazily (PEP 562) so that `import mgi.models.mamba` does not pay for
importing timm and MONAI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "BiMamba": "mamba",
    "Mamba": "mamba",
    "selective_scan": "mamba",
    "GeneEncoder": "gene_encoder",
    "GeneEncoderConfig": "gene_encoder",
    "ImageEncoder": "image_encoder",
    "ImageEncoderConfig": "image_encoder",
    "ClipLoss": "clip",
    "ClipModel": "clip",
    "retrieval_metrics": "clip",
    "SegmentationModel": "segment",
    "UNetConfig": "segment",
    "UNetSegmentation": "segment",
    "freeze_encoder": "segment",
    "load_pretrained": "segment",
}
__all__ = [
    "BiMamba",
    "ClipLoss",
    "ClipModel",
    "GeneEncoder",
    "GeneEncoderConfig",
    "ImageEncoder",
    "ImageEncoderConfig",
    "Mamba",
    "SegmentationModel",
    "UNetConfig",
    "UNetSegmentation",
    "freeze_encoder",
    "load_pretrained",
    "retrieval_metrics",
    "selective_scan",
]

if TYPE_CHECKING:
    from mgi.models.clip import ClipLoss, ClipModel, retrieval_metrics
    from mgi.models.gene_encoder import GeneEncoder, GeneEncoderConfig
    from mgi.models.image_encoder import ImageEncoder, ImageEncoderConfig
    from mgi.models.mamba import BiMamba, Mamba, selective_scan
    from mgi.models.segment import (
        SegmentationModel,
        UNetConfig,
        UNetSegmentation,
        freeze_encoder,
        load_pretrained,
    )


def __getattr__(name: str):
    """The public object `name`, imported from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mgi.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mgi.models.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
