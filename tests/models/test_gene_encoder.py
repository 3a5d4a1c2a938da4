"""GeneEncoder: shapes, PAD invariance, order (in)sensitivity and gradient flow for each trunk."""

from __future__ import annotations

import pytest
import torch

from mgi.models.gene_encoder import GeneEncoder, GeneEncoderConfig

VOCAB, N_BINS = 30, 11

VARIANTS = {
    "bimamba-bins": dict(kind="mamba", bidirectional=True, value_encoding="bins"),
    "mamba-continuous": dict(kind="mamba", bidirectional=False, value_encoding="continuous"),
    "transformer-bins": dict(kind="transformer", value_encoding="bins"),
    "transformer-continuous": dict(kind="transformer", value_encoding="continuous"),
    "mlp-bins": dict(kind="mlp", value_encoding="bins"),
    "mlp-continuous": dict(kind="mlp", value_encoding="continuous"),
}


def make_encoder(variant: str, **overrides) -> GeneEncoder:
    torch.manual_seed(0)
    cfg = GeneEncoderConfig(
        vocab_size=VOCAB,
        seq_len=16,
        n_bins=N_BINS,
        d_model=16,
        n_layers=2,
        d_state=4,
        n_heads=2,
        embed_dim=8,
        **{**VARIANTS[variant], **overrides},
    )
    return GeneEncoder(cfg).eval()


def make_batch(batch: int = 3, length: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct gene ids (1..VOCAB-1) per row with trailing PADs in row 1, and bin values."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(VOCAB - 1, generator=g)[:length] + 1 for _ in range(batch)])
    values = torch.randint(0, N_BINS, (batch, length), generator=g).float()
    ids[1, length - 3 :] = 0
    return ids, values


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes(variant):
    encoder = make_encoder(variant)
    ids, values = make_batch()
    assert encoder(ids, values).shape == (3, 8)
    features, mask = encoder.forward_tokens(ids, values)
    if encoder.cfg.kind == "mlp":
        assert features.shape == (3, 1, 16) and not mask.any()
    else:
        assert features.shape == (3, 8, 16)
        assert mask.tolist() == (ids == 0).tolist()
        assert features[mask].abs().max() == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_pads_do_not_change_the_embedding(variant):
    encoder = make_encoder(variant)
    ids, values = make_batch()
    expected = encoder(ids, values)
    # more trailing PADs, with arbitrary values at every PAD position
    ids_padded = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    values_padded = torch.cat([values, torch.full((3, 5), 7.0)], dim=1)
    values_padded[ids_padded == 0] = 3.0
    torch.testing.assert_close(encoder(ids_padded, values_padded), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["bimamba-bins", "mamba-continuous", "transformer-bins"])
def test_sequence_models_depend_on_gene_order(variant):
    encoder = make_encoder(variant)
    ids, values = make_batch()
    full_rows = [0, 2]  # row 1 has PADs, which must stay trailing
    ids, values = ids[full_rows], values[full_rows]
    order = torch.arange(7, -1, -1)
    reordered = encoder(ids[:, order], values[:, order])
    assert (reordered - encoder(ids, values)).abs().amax(dim=1).min() > 1e-4


@pytest.mark.parametrize("variant", ["mlp-bins", "mlp-continuous"])
def test_mlp_ignores_gene_order(variant):
    encoder = make_encoder(variant)
    ids, values = make_batch()
    order = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(encoder(ids[:, order], values[:, order]), encoder(ids, values))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_the_embeddings(variant):
    encoder = make_encoder(variant).train()
    ids, values = make_batch()
    encoder(ids, values).square().sum().backward()
    used = ids.unique()
    used = used[used != 0]
    if encoder.cfg.kind == "mlp":
        used = ids[(ids != 0) & (values != 0)].unique()  # a zero value gives no signal
        grad = encoder.mlp[0].weight.grad  # (d_model, vocab): one column per gene
        assert grad[:, used].abs().sum(0).min() > 0
        unused = torch.ones(VOCAB, dtype=torch.bool)
        unused[used] = False
        assert grad[:, unused].abs().max() == 0
        return
    token_grad = encoder.token_embedding.weight.grad
    assert token_grad[used].abs().sum(1).min() > 0
    assert token_grad[0].abs().max() == 0  # PAD embedding stays fixed
    value_params = list(encoder.value_embedding.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in value_params)
    assert all(p.grad is not None for p in encoder.parameters())


def test_mamba_rejects_pads_before_real_tokens():
    encoder = make_encoder("bimamba-bins")
    ids, values = make_batch()
    with pytest.raises(ValueError, match="trailing PADs"):
        encoder(ids.flip(1), values)


def test_invalid_inputs_and_config_are_named():
    with pytest.raises(ValueError, match="kind"):
        GeneEncoderConfig(kind="lstm", vocab_size=5, seq_len=4, value_encoding="bins")
    with pytest.raises(ValueError, match="value_encoding"):
        GeneEncoderConfig(kind="mamba", vocab_size=5, seq_len=4, value_encoding="raw")
    with pytest.raises(ValueError, match="n_heads"):
        GeneEncoderConfig(
            kind="transformer",
            vocab_size=5,
            seq_len=4,
            value_encoding="bins",
            d_model=10,
            n_heads=4,
        )
    encoder = make_encoder("transformer-bins")
    ids, values = make_batch()
    with pytest.raises(ValueError, match="n_bins"):
        encoder(ids, values + N_BINS)
    with pytest.raises(ValueError, match="vocab_size"):
        encoder(ids + VOCAB, values)
    with pytest.raises(ValueError, match="seq_len"):
        encoder(torch.ones(1, 17, dtype=torch.long), torch.zeros(1, 17))
