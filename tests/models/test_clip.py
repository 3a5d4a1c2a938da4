"""ClipModel, ClipLoss (local and across ranks), retrieval metrics, and a tiny training run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mgi.models.clip import ClipLoss, ClipModel, retrieval_metrics
from mgi.models.gene_encoder import GeneEncoderConfig
from mgi.models.image_encoder import ImageEncoderConfig


def tiny_configs(embed_dim: int = 16) -> tuple[GeneEncoderConfig, ImageEncoderConfig]:
    gene = GeneEncoderConfig(
        kind="mamba",
        value_encoding="bins",
        vocab_size=8,
        seq_len=4,
        n_bins=10,
        d_model=16,
        n_layers=1,
        d_state=4,
        embed_dim=embed_dim,
    )
    image = ImageEncoderConfig(
        img_size=16, patch_size=8, width=32, depth=1, num_heads=2, embed_dim=embed_dim
    )
    return gene, image


def test_clip_model_returns_unit_features_and_clamped_scale():
    torch.manual_seed(0)
    model = ClipModel(*tiny_configs(), init_temperature=0.07, max_logit_scale=100)
    images = torch.randn(3, 3, 16, 16)
    ids = torch.tensor([[1, 2, 3, 4]] * 3)
    values = torch.randint(0, 10, (3, 4)).float()
    image_features, gene_features, scale = model(images, ids, values)
    assert image_features.shape == gene_features.shape == (3, 16)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(gene_features.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model(images, ids, values)[2].item() == pytest.approx(100.0, rel=1e-5)


def test_clip_model_needs_one_embedding_size():
    gene, _ = tiny_configs(embed_dim=16)
    _, image = tiny_configs(embed_dim=8)
    with pytest.raises(ValueError, match="embed_dim"):
        ClipModel(gene, image)


def test_clip_loss_equals_hand_computed_value():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gene = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits image->gene = 2 * [[1, .6], [0, .8]]; gene->image is its transpose
    expected = (
        math.log1p(math.exp(-0.8))
        + math.log1p(math.exp(-1.6))
        + math.log1p(math.exp(-2.0))
        + math.log1p(math.exp(-0.4))
    ) / 4
    assert ClipLoss()(image, gene, torch.tensor(2.0)).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_is_near_zero_for_aligned_pairs_and_higher_for_shuffled():
    features = torch.eye(8)
    loss = ClipLoss()
    aligned = loss(features, features, torch.tensor(100.0))
    shuffled = loss(features, features[torch.roll(torch.arange(8), 1)], torch.tensor(100.0))
    assert aligned.item() < 1e-6
    assert shuffled.item() > 50.0


def test_retrieval_metrics_identical_and_shifted_pairs():
    features = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    metrics = retrieval_metrics(features, features, ks=(1, 5))
    for direction in ("gene_to_image", "image_to_gene"):
        assert metrics[f"{direction}_recall@1"] == 1.0
        assert metrics[f"{direction}_recall@5"] == 1.0
        assert metrics[f"{direction}_mean_rank"] == 1.0
    assert metrics["chance_recall@1"] == pytest.approx(1 / 6)
    assert metrics["chance_recall@5"] == pytest.approx(5 / 6)
    assert metrics["n"] == 6
    # gene i equals image i+1: its own image is never first but always second
    images = torch.eye(4)
    genes = images[torch.roll(torch.arange(4), -1)]
    shifted = retrieval_metrics(images, genes, ks=(1, 2))
    assert shifted["gene_to_image_recall@1"] == 0.0
    assert shifted["gene_to_image_recall@2"] == 1.0
    assert shifted["gene_to_image_mean_rank"] == 2.0
    assert shifted["image_to_gene_mean_rank"] == 2.0


@pytest.mark.slow  # spawns two ranks (DDP-style), ~5 s
def test_clip_loss_uses_negatives_from_every_rank(tmp_path):
    from tests.models import _clip_dist_worker as worker  # light: the spawned ranks import it

    mp.start_processes(
        worker.run,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    images, genes = (t.requires_grad_() for t in worker.paired_features())
    full = ClipLoss()(images, genes, torch.tensor(3.0))
    # the mean of the ranks' losses is the global-batch loss ...
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(full.item(), rel=1e-5)
    # ... and each rank's features get the gradient of the sum of all ranks' losses
    (2 * full).backward()
    torch.testing.assert_close(torch.cat([r["image_grad"] for r in ranks]), images.grad)
    torch.testing.assert_close(torch.cat([r["gene_grad"] for r in ranks]), genes.grad)


def _train_clip(*, shuffle_pairs: bool, steps: int = 30) -> list[float]:
    """Losses of `steps` AdamW steps on fresh batches of 8 pairs whose image brightness encodes
    the binned value of gene 1 (distinct values per batch); shuffle_pairs breaks the pairing."""
    torch.manual_seed(0)
    model = ClipModel(*tiny_configs())
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        bins = torch.randperm(10, generator=g)[:8]
        brightness = (bins.float() / 9 * 2 - 1) * 3
        images = brightness.view(8, 1, 1, 1).expand(8, 3, 16, 16)
        images = images + 0.05 * torch.randn(8, 3, 16, 16, generator=g)
        ids = torch.tensor([1, 2, 3, 4]).repeat(8, 1)
        values = torch.cat([bins.float()[:, None], torch.full((8, 3), 5.0)], dim=1)
        if shuffle_pairs:
            values = values[torch.randperm(8, generator=g)]
        loss = loss_fn(*model(images, ids, values))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_clip_training_on_paired_synthetic_data_lowers_the_loss():
    losses = _train_clip(shuffle_pairs=False)
    control = _train_clip(shuffle_pairs=True)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    last_control = sum(control[-5:]) / 5
    assert last < first - 0.3, losses
    # below what unpaired data allows (chance, ln 8 ~ 2.08): the pairing itself was learned
    assert last < last_control - 0.2, (losses, control)
