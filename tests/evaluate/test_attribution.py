"""Gene attribution of the image–gene similarity (Integrated Gradients, captum)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mgi.evaluate.attribution import (
    mark_planted,
    per_gene,
    planted_enrichment,
    similarity_attributions,
)
from mgi.models import GeneEncoder, GeneEncoderConfig

VOCAB = pd.DataFrame({"token_id": range(12), "gene_id": ["", "", ""] + [f"G{i}" for i in range(9)],
                      "gene_name": ["<pad>", "<cls>", "<mask>"] + [f"g{i}" for i in range(9)]})


def _encoder(kind: str, *, seed: int = 0) -> GeneEncoder:
    torch.manual_seed(seed)
    cfg = GeneEncoderConfig(kind=kind, vocab_size=12, seq_len=8, value_encoding="bins", n_bins=5,
                            d_model=8, n_layers=1, d_state=4, n_heads=2, embed_dim=4)
    return GeneEncoder(cfg).eval()


def _batch(n: int = 5, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences of <cls> + 6 distinct genes + a trailing PAD, binned values, image targets."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, 8), np.int64)
    tokens[:, 0] = 1
    for row in tokens:
        row[1:7] = rng.choice(np.arange(3, 12), size=6, replace=False)
    values = rng.integers(1, 5, size=(n, 8)).astype(np.float32)
    values[:, 7] = 0
    images = F.normalize(torch.from_numpy(rng.normal(size=(n, 4)).astype(np.float32)), dim=-1)
    return torch.from_numpy(tokens), torch.from_numpy(values), images


def _similarity(encoder, tokens, values, images) -> torch.Tensor:
    with torch.no_grad():
        return (F.normalize(encoder(tokens, values), dim=-1) * images).sum(-1)


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_a_model_reading_one_gene_puts_that_gene_first(kind: str):
    encoder = _encoder(kind)
    gene = 7
    with torch.no_grad():  # only gene 7 has a non-zero input embedding
        keep = encoder.token_embedding.weight[gene].clone() + 1.0
        encoder.token_embedding.weight.zero_()
        encoder.token_embedding.weight[gene] = keep
        encoder.value_embedding.weight.zero_()
    tokens, values, images = _batch(6)
    tokens[:, 3] = gene  # every patient holds it
    tokens[:, 1:3] = torch.tensor([3, 4])
    attr, _ = similarity_attributions(encoder, tokens, values, images, n_steps=32)
    assert (attr[tokens != gene] == 0).all()
    assert (attr[tokens == gene] != 0).all()
    table = per_gene(attr.numpy(), tokens.numpy(), VOCAB)
    assert table.iloc[0]["token_id"] == gene and table.iloc[0]["rank"] == 1
    assert table.iloc[0]["share"] == pytest.approx(1.0)
    assert (table.iloc[1:]["mean_abs"] == 0).all()
    assert "<cls>" not in set(table["gene_name"])


def test_an_mlp_encoder_reading_one_gene_puts_that_gene_first():
    encoder = _encoder("mlp")
    gene = 5
    with torch.no_grad():
        column = encoder.mlp[0].weight[:, gene].clone() + 0.5
        encoder.mlp[0].weight.zero_()
        encoder.mlp[0].weight[:, gene] = column
    tokens, values, images = _batch(6, seed=1)
    tokens[:, 2] = gene
    tokens[:, 1] = 3
    attr, _ = similarity_attributions(encoder, tokens, values, images, n_steps=32)
    table = per_gene(attr.numpy(), tokens.numpy(), VOCAB)
    assert table.iloc[0]["token_id"] == gene
    assert (table.iloc[1:]["mean_abs"] == 0).all()


@pytest.mark.parametrize("kind", ["mamba", "transformer", "mlp"])
def test_attributions_sum_to_the_similarity_gain_over_the_baseline(kind: str):
    """Completeness: per patient, sum of attributions = f(x) − f(baseline)."""
    encoder = _encoder(kind, seed=3)
    tokens, values, images = _batch(5, seed=2)
    attr, delta = similarity_attributions(encoder, tokens, values, images, n_steps=64)
    full = _similarity(encoder, tokens, values, images)
    if kind == "mlp":
        base = _similarity(encoder, tokens, torch.zeros_like(values), images)
    else:  # the all-zero input embedding
        hook = encoder.dropout.register_forward_hook(lambda m, i, out: torch.zeros_like(out))
        base = _similarity(encoder, tokens, values, images)
        hook.remove()
    gain = full - base
    assert gain.abs().max() > 1e-3  # a non-trivial check
    np.testing.assert_allclose(attr.sum(1).numpy(), gain.numpy(), atol=2e-3, rtol=1e-2)
    assert delta.abs().max() < 2e-3


def test_per_gene_averages_over_patients_counting_absent_genes_as_zero():
    tokens = np.array([[1, 3, 4, 0], [1, 4, 5, 0]])
    attr = np.array([[0.5, 1.0, -2.0, 0.0], [0.5, 1.0, 3.0, 0.0]])
    table = per_gene(attr, tokens, VOCAB).set_index("gene_name")
    assert list(table.index) == ["g1", "g2", "g0"]  # (2 + 1) / 2, (0 + 3) / 2, (1 + 0) / 2
    assert table.loc["g1", "mean_abs"] == pytest.approx(1.5)
    assert table.loc["g1", "mean_signed"] == pytest.approx(-0.5)
    assert table.loc["g1", "n_patients"] == 2
    assert table.loc["g0", "mean_abs"] == pytest.approx(0.5)  # one patient of two
    assert table.loc["g0", "n_patients"] == 1
    # the <cls> token's attribution counts in the total of the shares, not as a gene
    assert table["share"].sum() == pytest.approx(3.5 / 4.0)


def test_planted_genes_are_matched_without_version_and_counted_against_chance():
    table = pd.DataFrame({"gene_id": [f"ENSG{i:011d}" for i in range(10)],
                          "gene_name": [f"g{i}" for i in range(10)]})
    planted = pd.DataFrame({"gene_id": ["ENSG00000000000.3", "ENSG00000000009.1"],
                            "gene_name": ["x", "g1"], "program": ["subtype", "burden"]})
    marked = mark_planted(table, planted)
    assert list(marked["planted"][:3]) == ["subtype", "burden", ""]
    found = planted_enrichment(marked, top_k=2)
    assert found["planted_in_top_k"] == 2 and found["planted_scored"] == 3
    assert found["expected_by_chance"] == pytest.approx(2 * 3 / 10)
    assert found["p_hypergeometric"] == pytest.approx(3 / 45)  # C(3,2) / C(10,2)
