"""ImageEncoder: output and intermediate shapes, local weights, no downloads."""

from __future__ import annotations

import pytest
import torch
from timm.layers import build_sincos2d_pos_embed

from mgi.models.image_encoder import ImageEncoder, ImageEncoderConfig, evenly_spaced_blocks
from mgi.train.loop import adamw


def tiny_config(**overrides) -> ImageEncoderConfig:
    base = dict(img_size=32, patch_size=8, width=32, depth=4, num_heads=2, embed_dim=16)
    return ImageEncoderConfig(**{**base, **overrides})


def test_output_and_intermediate_shapes():
    torch.manual_seed(0)
    encoder = ImageEncoder(tiny_config())
    x = torch.randn(2, 3, 32, 32)
    assert encoder(x).shape == (2, 16)
    assert (encoder.width, encoder.grid, encoder.depth) == (32, 4, 4)
    maps = encoder.forward_intermediates(x, n=4)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 4
    maps2 = encoder.forward_intermediates(x, n=2)
    torch.testing.assert_close(maps2[0], maps[1])  # blocks 1 and 3 of 0..3
    torch.testing.assert_close(maps2[1], maps[3])


def test_single_channel_images_and_other_patch_sizes():
    encoder = ImageEncoder(tiny_config(in_chans=1, img_size=48, patch_size=16))
    x = torch.randn(1, 1, 48, 48)
    assert encoder(x).shape == (1, 16)
    assert [tuple(m.shape) for m in encoder.forward_intermediates(x, n=3)] == [(1, 32, 3, 3)] * 3


def test_evenly_spaced_blocks_end_at_the_last_block():
    assert evenly_spaced_blocks(12, 4) == [2, 5, 8, 11]
    assert evenly_spaced_blocks(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_blocks(12, 1) == [11]
    with pytest.raises(ValueError, match="depth 2"):
        evenly_spaced_blocks(2, 4)


def test_weights_from_a_local_file_are_loaded(tmp_path):
    torch.manual_seed(0)
    source = ImageEncoder(tiny_config())
    path = tmp_path / "vit.pth"
    torch.save(source.backbone.state_dict(), path)
    torch.manual_seed(1)
    fresh = ImageEncoder(tiny_config(pos_embed="learn"))
    torch.manual_seed(1)
    loaded = ImageEncoder(tiny_config(weights=str(path), pos_embed="learn"))
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(loaded.backbone(x), fresh.backbone(x))
    torch.testing.assert_close(loaded.backbone(x), source.backbone(x))


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "vit.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageEncoder(tiny_config(weights=str(missing), pos_embed="learn"))


def test_img_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="patch_size"):
        tiny_config(img_size=30)


def test_wrong_image_size_is_reported():
    encoder = ImageEncoder(tiny_config())
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        encoder(torch.zeros(1, 3, 48, 48))


def test_checkpoint_for_another_resolution_is_resampled(tmp_path):
    """A checkpoint of the same ViT at 64 px / patch 16 loads into 32 px / patch 8."""
    import timm

    source = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=4,
        num_heads=2,
        num_classes=0,
    )
    path = tmp_path / "vit64.pth"
    torch.save(source.state_dict(), path)
    encoder = ImageEncoder(tiny_config(weights=str(path), pos_embed="learn"))
    torch.testing.assert_close(
        encoder.backbone.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight
    )
    assert encoder.backbone.pos_embed.shape == (1, 1 + 16, 32)


def test_sincos_position_table_is_fixed_and_learn_is_trained():
    torch.manual_seed(0)
    encoder = ImageEncoder(tiny_config())  # sincos by default
    table = encoder.backbone.pos_embed
    assert not table.requires_grad
    assert encoder.fixed_parameter_names() == {"backbone.pos_embed"}
    torch.testing.assert_close(table[0, 0], torch.zeros(32))  # the class token's entry
    torch.testing.assert_close(table[0, 1:], build_sincos2d_pos_embed([4, 4], dim=32))
    before = table.detach().clone()
    patches = encoder.backbone.patch_embed.proj.weight.detach().clone()
    optimiser = adamw(encoder, lr=0.1, weight_decay=0.05)
    encoder(torch.randn(2, 3, 32, 32)).square().sum().backward()
    optimiser.step()
    torch.testing.assert_close(encoder.backbone.pos_embed.detach(), before, rtol=0, atol=0)
    assert not torch.equal(encoder.backbone.patch_embed.proj.weight.detach(), patches)  # trained

    learned = ImageEncoder(tiny_config(pos_embed="learn"))
    assert learned.backbone.pos_embed.requires_grad and not learned.fixed_parameter_names()
    assert learned.backbone.pos_embed.abs().max() < 0.1  # timm's near-zero start
    assert set(learned.state_dict()) == set(encoder.state_dict())  # checkpoints load either way


def test_sincos_with_weights_or_an_unknown_table_is_refused():
    with pytest.raises(ValueError, match=r"pos_embed 'sincos'.*vit\.pth.*'learn'"):
        tiny_config(weights="vit.pth")
    with pytest.raises(ValueError, match=r"pos_embed must be one of .*'rope'"):
        tiny_config(pos_embed="rope")
    with pytest.raises(ValueError, match="width divisible by 4, got width 30"):
        ImageEncoder(tiny_config(width=30))
