"""Optimiser groups: no decay on gains, fusion layers at their own learning rate."""

from __future__ import annotations

import torch
from torch import nn

from mgi.train.loop import adamw


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.films = nn.ModuleList([nn.Linear(4, 8)])


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_fusion_layers_get_scaled_rate_and_gains_no_decay():
    net = _Net()
    opt = adamw(net, lr=1e-3, weight_decay=0.05, fusion_lr_scale=10)
    assert _group_of(opt, net.encoder.weight)["lr"] == 1e-3
    assert _group_of(opt, net.films[0].weight)["lr"] == 1e-2
    assert _group_of(opt, net.films[0].bias)["lr"] == 1e-2
    assert _group_of(opt, net.encoder.weight)["weight_decay"] == 0.05
    assert _group_of(opt, net.encoder.bias)["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == 4


def test_frozen_parameters_are_left_out():
    net = _Net()
    net.encoder.weight.requires_grad_(False)
    opt = adamw(net, lr=1e-3, weight_decay=0.0)
    assert all(p is not net.encoder.weight for g in opt.param_groups for p in g["params"])


def test_fusion_prefixes_name_the_segmentation_models_fusion_layers():
    from mgi.models import GeneEncoderConfig, ImageEncoderConfig, SegmentationModel
    from mgi.train.loop import FUSION_PREFIXES

    image = ImageEncoderConfig(img_size=16, patch_size=8, width=16, depth=3, num_heads=2,
                               embed_dim=8)
    gene = GeneEncoderConfig(kind="mlp", vocab_size=10, seq_len=4, value_encoding="bins",
                             d_model=8, embed_dim=8)
    for fusion in ("film", "cross_attention"):
        model = SegmentationModel(image, gene, fusion=fusion, decoder_channels=4)
        assert any(n.startswith(FUSION_PREFIXES) for n, _ in model.named_parameters()), fusion
