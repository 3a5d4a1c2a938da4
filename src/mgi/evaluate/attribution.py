"""Which genes the aligned embedding leans on: Integrated Gradients of the image–gene similarity.

For each held-out patient, f = cos(gene embedding of its sequence, its own image embedding), the
image side fixed (the mean of its items' embeddings, as in retrieval). Attributions come from
captum's Integrated Gradients:

* Mamba and Transformer gene encoders: the input embedding of each position (token + value
  embedding, the output of `gene_encoder.dropout`) is scaled from zero, which is what the
  encoder sees at a PAD position, to its value. Straight-line IG along that ray misses most of
  the change: every RMSNorm (pre-norm blocks, final norm) is scale-free except where its input
  is as small as sqrt(eps), so the similarity changes at tiny scales (down to about 1e-12 in a
  trained demo model) and little after. The same ray is therefore traversed on a log scale,
  scale = PATH_FLOOR ** (1 - t), with captum's IntegratedGradients over one t per position:
  a line integral does not depend on the speed along the path, so the attributions are the
  zero-baseline IG ones (less the piece from 0 to PATH_FLOOR, which counts in the
  completeness error), with the integration points where the change happens. A position's
  attribution is its gene's (a gene appears at most once in a sequence).
* MLP gene encoder (order-free): Integrated Gradients on the expression values, from zero.

Completeness: a patient's attributions sum to f(x) − f(baseline) up to the integration error,
which is reported (`max_abs_delta`). Per gene, over patients: the mean |attribution| (a gene
outside a patient's sequence counts 0 for that patient), the signed mean, and the number of
patients whose sequence holds it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from mgi.errors import MgiError
from mgi.expression.gtf import unversioned
from mgi.io import atomic_path, read_tsv, write_tsv

log = logging.getLogger(__name__)

# The input embedding is scaled by PATH_FLOOR ** (1 - t), t from 0 to 1 (see the module docstring).
PATH_FLOOR = 1e-12
INTERNAL_BATCH = 256  # sequences per forward pass of the integration (bounds the memory)
TABLE_COLUMNS = ["rank", "gene_id", "gene_name", "token_id", "mean_abs", "mean_signed", "share",
                 "n_patients", "planted"]


def _similarity(gene_encoder: torch.nn.Module, token_ids: Tensor, values: Tensor,
                image_features: Tensor) -> Tensor:
    """Cosine similarity of each row's gene embedding with its (unit-norm) image embedding."""
    genes = F.normalize(gene_encoder(token_ids, values), dim=-1)
    return (genes * image_features).sum(-1)


def similarity_attributions(gene_encoder: torch.nn.Module, token_ids: Tensor, values: Tensor,
                            image_features: Tensor, *, n_steps: int = 64,
                            internal_batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-position attributions (B, L) of the similarity and their completeness errors (B,).

    `image_features` are (B, D) targets (normalised here); the module docstring has the path.
    """
    from captum.attr import IntegratedGradients

    gene_encoder.eval()
    image_features = F.normalize(image_features.float(), dim=-1).detach()
    token_ids, values = token_ids.long(), values.float()
    if gene_encoder.cfg.kind == "mlp":
        def by_values(vals: Tensor, tokens: Tensor, images: Tensor) -> Tensor:
            return _similarity(gene_encoder, tokens, vals, images)

        ig = IntegratedGradients(by_values)
        attr, delta = ig.attribute(values, baselines=torch.zeros_like(values),
                                   additional_forward_args=(token_ids, image_features),
                                   n_steps=n_steps, internal_batch_size=internal_batch_size,
                                   return_convergence_delta=True)
        return attr.detach(), delta.detach()

    def by_presence(t: Tensor, tokens: Tensor, vals: Tensor, images: Tensor) -> Tensor:
        scale = (PATH_FLOOR ** (1.0 - t)).unsqueeze(-1)
        hook = gene_encoder.dropout.register_forward_hook(lambda m, i, out: out * scale)
        try:
            return _similarity(gene_encoder, tokens, vals, images)
        finally:
            hook.remove()

    ig = IntegratedGradients(by_presence)
    ones = torch.ones(token_ids.shape, device=token_ids.device)
    attr = ig.attribute(ones, baselines=torch.zeros_like(ones),
                        additional_forward_args=(token_ids, values, image_features),
                        n_steps=n_steps, internal_batch_size=internal_batch_size).detach()
    with torch.no_grad():
        full = _similarity(gene_encoder, token_ids, values, image_features)
        hook = gene_encoder.dropout.register_forward_hook(lambda m, i, out: torch.zeros_like(out))
        try:
            base = _similarity(gene_encoder, token_ids, values, image_features)
        finally:
            hook.remove()
    return attr, attr.sum(1) - (full - base)


def per_gene(attributions: np.ndarray, token_ids: np.ndarray, vocab: pd.DataFrame) -> pd.DataFrame:
    """Per vocabulary gene: mean |attribution| and signed mean over patients, patients holding it.

    Special tokens (no gene_id) are left out; genes in no patient's sequence are left out.
    """
    vocab_size = int(vocab["token_id"].max()) + 1
    n = len(attributions)
    dense = np.zeros((n, vocab_size))
    present = np.zeros((n, vocab_size), dtype=bool)
    rows = np.repeat(np.arange(n), token_ids.shape[1])
    np.add.at(dense, (rows, token_ids.ravel()), attributions.ravel())
    present[rows, token_ids.ravel()] = True
    genes = vocab[vocab["gene_id"].astype(str) != ""].copy()
    ids = genes["token_id"].to_numpy(dtype=np.int64)
    genes["mean_abs"] = np.abs(dense[:, ids]).mean(0)
    genes["mean_signed"] = dense[:, ids].mean(0)
    genes["n_patients"] = present[:, ids].sum(0)
    total = np.abs(dense).mean(0).sum()
    genes["share"] = genes["mean_abs"] / total if total > 0 else 0.0
    genes = genes[genes["n_patients"] > 0]
    genes = genes.sort_values(["mean_abs", "token_id"], ascending=[False, True], kind="stable")
    genes["rank"] = np.arange(1, len(genes) + 1)
    return genes.reset_index(drop=True)


def mark_planted(table: pd.DataFrame, planted: pd.DataFrame) -> pd.DataFrame:
    """Add `planted` (the truth's program, or empty) by gene id without version, else by name."""
    by_id = dict(zip(unversioned(planted["gene_id"]), planted["program"], strict=True))
    by_name = dict(zip(planted["gene_name"], planted["program"], strict=True))
    marks = [by_id.get(g) or by_name.get(n, "")
             for g, n in zip(unversioned(table["gene_id"]), table["gene_name"], strict=True)]
    return table.assign(planted=marks)


def planted_enrichment(table: pd.DataFrame, *, top_k: int) -> dict:
    """Planted genes among the top k against chance (hypergeometric over the scored genes)."""
    from scipy import stats

    k = min(top_k, len(table))
    is_planted = table["planted"].astype(str) != ""
    n_planted, n_genes = int(is_planted.sum()), len(table)
    observed = int(is_planted.iloc[:k].sum())
    expected = k * n_planted / n_genes if n_genes else float("nan")
    p = float(stats.hypergeom.sf(observed - 1, n_genes, n_planted, k)) if n_genes else 1.0
    return {"top_k": k, "planted_in_top_k": observed, "expected_by_chance": expected,
            "p_hypergeometric": p, "planted_scored": n_planted, "genes_scored": n_genes}


def load_clip(model_path: Path):
    """The pre-trained CLIP model, rebuilt from its checkpoint's configs (CPU, eval mode)."""
    from mgi.checkpoint import load_pretrained
    from mgi.models import ClipModel, GeneEncoderConfig, ImageEncoderConfig

    checkpoint = load_pretrained(model_path)
    image = {**checkpoint.image_config, "weights": None}  # the state dict holds the weights
    model = ClipModel(GeneEncoderConfig(**checkpoint.gene_config), ImageEncoderConfig(**image))
    model.load_state_dict(checkpoint.state_dict)
    return model.eval()


def gene_attribution(*, model_path: Path, sequences_path: Path, vocab_path: Path,
                     splits_path: Path, qc_path: Path, table_path: Path, summary_path: Path,
                     planted_path: Path | None = None, splits: Sequence[str] = ("val", "test"),
                     n_steps: int = 64, threads: int = 1) -> pd.DataFrame:
    """Write the per-gene attribution table (TSV) and its summary (JSON); return the table."""
    from mgi.expression.tokens import read_sequences
    from mgi.train.build import pick_device, seed_everything
    from mgi.train.data import load_cohort
    from mgi.train.pretrain import case_embeddings

    start = time.perf_counter()
    seed_everything(0, threads=threads)
    device = pick_device("auto")
    model = load_clip(model_path).to(device)
    data = load_cohort(sequences_path=sequences_path, splits_path=splits_path, qc_path=qc_path)
    vocab = read_sequences(sequences_path, vocab_path=vocab_path).vocab
    cases, images, tokens, values = [], [], [], []
    for split in splits:
        if not len(data.items(split)):
            continue
        split_cases, split_images, _ = case_embeddings(model, data, split, device=device)
        token_ids, gene_values = data.genes(np.array([np.flatnonzero(data.item_case == c)[0]
                                                      for c in split_cases]))
        cases += split_cases
        images.append(split_images)
        tokens.append(token_ids)
        values.append(gene_values)
    if not cases:
        raise MgiError(f"{splits_path}: no patient with images in split(s) {list(splits)}")
    token_ids, gene_values = torch.cat(tokens).to(device), torch.cat(values).to(device)
    image_features = torch.cat(images).to(device)
    attr, delta = similarity_attributions(model.gene_encoder, token_ids, gene_values,
                                          image_features, n_steps=n_steps,
                                          internal_batch_size=INTERNAL_BATCH)
    with torch.no_grad():
        similarity = _similarity(model.gene_encoder, token_ids, gene_values, image_features)
    attr, delta, similarity = attr.cpu(), delta.cpu(), similarity.cpu()
    token_ids = token_ids.cpu()
    table = per_gene(attr.numpy().astype(np.float64), token_ids.numpy(), vocab)
    table["planted"] = ""
    if planted_path is not None and Path(planted_path).is_file():
        table = mark_planted(table, read_tsv(planted_path,
                                             required=["gene_id", "gene_name", "program"]))
    special_ids = vocab.loc[vocab["gene_id"].astype(str) == "", "token_id"].to_numpy()
    specials = np.isin(token_ids.numpy(), special_ids)
    abs_attr = attr.abs().numpy()
    summary = {
        "method": ("Integrated Gradients on the expression values" if model.gene_encoder.cfg.kind
                   == "mlp" else "Integrated Gradients on the scale of each position's input "
                   "embedding (log-spaced path)"),
        "baseline": "zero values" if model.gene_encoder.cfg.kind == "mlp"
        else "all-zero embedding (the encoder's PAD)",
        "target": "cosine similarity of a patient's gene embedding and its own image embedding",
        "encoder": model.gene_encoder.cfg.kind,
        "splits": list(splits), "n_patients": len(cases), "cases": cases, "n_steps": n_steps,
        "mean_similarity": float(similarity.mean()),
        "max_abs_delta": float(delta.abs().max()),
        "special_token_share": float(abs_attr[specials].sum() / max(abs_attr.sum(), 1e-30)),
        "planted_truth": bool(planted_path is not None and Path(planted_path).is_file()),
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 3),
    }
    table = table[TABLE_COLUMNS]
    write_tsv(table, table_path)
    with atomic_path(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    log.info("attributions of %d genes over %d patients (max |delta| %.2g); top: %s",
             len(table), len(cases), summary["max_abs_delta"],
             ", ".join(table["gene_name"].astype(str).head(5)))
    return table
