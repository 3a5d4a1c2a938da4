"""SegmentationModel: output size, fusion behaviour, pre-trained weight transfer and freezing."""

from __future__ import annotations

import pytest
import torch

from mgi.errors import TrainingError
from mgi.models.clip import ClipModel
from mgi.models.gene_encoder import GeneEncoderConfig
from mgi.models.image_encoder import ImageEncoderConfig
from mgi.models.segment import (
    ConditionNorm,
    SegmentationModel,
    freeze_encoder,
    load_pretrained,
)


def gene_config(**overrides) -> GeneEncoderConfig:
    base = dict(
        kind="mamba",
        value_encoding="bins",
        vocab_size=20,
        seq_len=6,
        n_bins=10,
        d_model=16,
        n_layers=1,
        d_state=4,
        embed_dim=16,
    )
    return GeneEncoderConfig(**{**base, **overrides})


def image_config(**overrides) -> ImageEncoderConfig:
    base = dict(img_size=32, patch_size=8, width=32, depth=4, num_heads=2, embed_dim=16)
    return ImageEncoderConfig(**{**base, **overrides})


def make_model(fusion: str, seed: int = 0, **image_overrides) -> SegmentationModel:
    torch.manual_seed(seed)
    return SegmentationModel(
        image_config(**image_overrides),
        gene_config(),
        fusion=fusion,
        out_channels=2,
        decoder_channels=4,
    )


def inputs(size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, size, size, generator=g)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]])
    values = torch.randint(0, 10, (2, 6), generator=g).float()
    return images, ids, values


@pytest.mark.parametrize("patch_size", [8, 16])
@pytest.mark.parametrize("fusion", ["film", "cross_attention", "none"])
def test_logits_have_the_input_size(fusion, patch_size):
    model = make_model(fusion, patch_size=patch_size).eval()
    images, ids, values = inputs()
    with torch.no_grad():
        logits = model(images, ids, values) if fusion != "none" else model(images)
    assert logits.shape == (2, 2, 32, 32)
    assert len(model.decoders) == {8: 3, 16: 4}[patch_size]  # one x2 stage per patch level


@pytest.mark.parametrize("fusion", ["film", "cross_attention"])
def test_every_trainable_parameter_gets_a_gradient(fusion):
    """No unused trainable parameters: DDP works without find_unused_parameters."""
    model = make_model(fusion)
    model(*inputs()).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert "image_encoder.proj.weight" in model.unused_parameter_names()


def test_invalid_patch_and_depth_are_rejected():
    with pytest.raises(ValueError, match="power of two"):
        SegmentationModel(image_config(img_size=36, patch_size=12), None, fusion="none")
    with pytest.raises(ValueError, match="only 2 blocks"):
        SegmentationModel(image_config(patch_size=16, depth=2), None, fusion="none")
    with pytest.raises(ValueError, match="fusion"):
        SegmentationModel(image_config(), gene_config(), fusion="concat")


def test_film_at_init_equals_the_image_only_model():
    film = make_model("film").eval()
    image_only = SegmentationModel(image_config(), None, out_channels=2, decoder_channels=4).eval()
    assert image_only.gene_encoder is None
    result = image_only.load_state_dict(film.state_dict(), strict=False)
    assert result.missing_keys == []
    images, ids, values = inputs()
    with torch.no_grad():
        torch.testing.assert_close(film(images, ids, values), image_only(images))


def test_film_learns_to_use_the_genes():
    model = make_model("film")
    images, ids, values = inputs()
    other_values = (values + 3) % 10
    with torch.no_grad():
        torch.testing.assert_close(model(images, ids, values), model(images, ids, other_values))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(images, ids, values), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        difference = (model(images, ids, values) - model(images, ids, other_values)).abs().max()
    assert difference > 1e-4


def test_condition_norm_turns_a_small_patient_difference_into_an_order_one_one():
    """Embeddings near one point that differ by 0.01 along a direction come out near +-1."""
    norm = ConditionNorm(4)
    shared = torch.tensor([0.3, -0.2, 0.5, 0.1])
    sign = torch.tensor([1.0, -1.0] * 8)[:, None]
    cond = shared + 0.01 * sign * torch.tensor([1.0, 0.0, 0.0, 0.0])
    out = norm(cond)
    torch.testing.assert_close(out[:, 0], sign[:, 0], atol=1e-2, rtol=0)
    assert out[:, 1:].abs().max() < 1e-3  # no spread, nothing to amplify
    assert not any(p.requires_grad for p in norm.parameters())  # FiLM learns the scale


def test_condition_norm_uses_running_statistics_for_a_batch_of_one():
    norm = ConditionNorm(3)
    for _ in range(200):
        norm(torch.randn(8, 3, generator=torch.Generator().manual_seed(_)) * 2.0 + 5.0)
    single = torch.tensor([[5.0, 7.0, 3.0]])
    expected = (single - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(norm(single), expected)  # training mode, no error
    torch.testing.assert_close(norm.eval()(single), expected)
    assert abs(float(expected[0, 1]) - 1.0) < 0.2  # (7 - 5) / 2


def test_cross_attention_depends_on_the_genes_directly():
    model = make_model("cross_attention").eval()
    images, ids, values = inputs()
    with torch.no_grad():
        out = model(images, ids, values)
        assert not torch.allclose(out, model(images, ids, (values + 3) % 10), atol=1e-5)
        # values at PAD positions are ignored
        padded_values = values.clone()
        padded_values[1, 3:] = 9.0
        torch.testing.assert_close(model(images, ids, padded_values), out)


def test_gene_fusion_needs_gene_inputs():
    model = make_model("film")
    with pytest.raises(ValueError, match="token_ids"):
        model(inputs()[0])


@pytest.mark.parametrize("fusion", ["film", "none"])
def test_load_pretrained_copies_the_clip_encoders(fusion):
    torch.manual_seed(5)
    clip = ClipModel(gene_config(), image_config())
    model = make_model(fusion)
    # as saved from a DistributedDataParallel-wrapped model
    state = {f"module.{k}": v for k, v in clip.state_dict().items()}
    loaded = load_pretrained(model, state)
    expected = [k for k in clip.state_dict() if k.startswith("image_encoder.")]
    if fusion == "film":
        expected += [k for k in clip.state_dict() if k.startswith("gene_encoder.")]
    assert sorted(loaded) == sorted(expected)
    own = model.state_dict()
    for key in loaded:
        torch.testing.assert_close(own[key], clip.state_dict()[key], rtol=0, atol=0)


def test_load_pretrained_names_the_mismatched_key():
    clip = ClipModel(gene_config(vocab_size=25), image_config())
    model = make_model("film")
    before = model.image_encoder.backbone.pos_embed.detach().clone()
    with pytest.raises(TrainingError, match=r"gene_encoder\.token_embedding\.weight"):
        load_pretrained(model, clip.state_dict())
    # all or nothing: the image encoder was not half-loaded
    torch.testing.assert_close(model.image_encoder.backbone.pos_embed.detach(), before)


def test_freeze_encoder_toggles_requires_grad():
    model = make_model("film")
    freeze_encoder(model, image=True, gene=False)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.gene_encoder.parameters())
    assert all(p.requires_grad for p in model.decoders.parameters())
    freeze_encoder(model, image=False, gene=True)
    assert not any(p.requires_grad for p in model.gene_encoder.parameters())
    trainable = {n for n, p in model.image_encoder.named_parameters() if p.requires_grad}
    # the projection is unused here and the sin-cos position table is never trained
    assert trainable == {n for n, _ in model.image_encoder.named_parameters()} - {
        "proj.weight",
        "proj.bias",
        "backbone.pos_embed",
    }
    learned = make_model("film", pos_embed="learn")
    freeze_encoder(learned, image=False, gene=False)
    assert learned.image_encoder.backbone.pos_embed.requires_grad


def test_unet_baseline_keeps_the_input_size_and_takes_no_genes():
    from mgi.models.segment import UNetConfig, UNetSegmentation

    model = UNetSegmentation(UNetConfig(in_chans=3, img_size=32, channels=(4, 8, 16),
                                        strides=(2, 2), num_res_units=1)).eval()
    images, ids, values = inputs()
    with torch.no_grad():
        assert model(images).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="no gene inputs"):
        model(images, ids, values)


@pytest.mark.parametrize("channels, strides, named", [
    ((4, 8, 16), (2,), "one stride per down-sampling step"),
    ((4, 8, 16), (2, 3), "must divide the image size 32"),
])
def test_unet_config_refuses_strides_that_do_not_fit(channels, strides, named):
    from mgi.models.segment import UNetConfig

    with pytest.raises(ValueError, match=named):
        UNetConfig(in_chans=1, img_size=32, channels=channels, strides=strides)


def _small_lesions(n: int, *, px: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with one small bright disc each (about 3% of the pixels) and its mask."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(px), torch.arange(px), indexing="ij")
    centres = torch.randint(6, px - 6, (n, 2), generator=gen)
    masks = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2 <= 9).float()
    images = masks[:, None] * 2.0 + 0.5 * torch.randn(n, 1, px, px, generator=gen)
    return images, masks[:, None]


def test_unet_baseline_learns_small_lesions_with_its_default_norm():
    """Regression: with MONAI's instance norm the demo's U-Net predicted tumour everywhere."""
    from monai.losses import DiceCELoss

    from mgi.models.segment import UNetConfig, UNetSegmentation

    torch.manual_seed(0)
    model = UNetSegmentation(UNetConfig(in_chans=1, img_size=32, channels=(8, 16, 32),
                                        strides=(2, 2), num_res_units=1))
    images, masks = _small_lesions(32)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(sigmoid=True)
    for _ in range(80):  # instance norm: Dice about 0.2 here, a quarter of the pixels predicted
        loss = loss_fn(model(images), masks)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    test_images, test_masks = _small_lesions(8, seed=1)
    with torch.no_grad():
        pred = model(test_images) > 0
    dice = 2 * (pred & (test_masks > 0)).sum() / (pred.sum() + (test_masks > 0).sum())
    assert pred.float().mean() < 0.1 and dice > 0.6
