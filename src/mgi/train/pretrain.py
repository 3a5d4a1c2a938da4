"""Contrastive pre-training: align each patient's gene sequence with its images (CLIP loss)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mgi.errors import ConfigError
from mgi.io import atomic_path
from mgi.models import ClipLoss, ClipModel, retrieval_metrics
from mgi.train.build import (
    config_dict,
    describe_device,
    gene_config,
    image_config,
    pick_device,
    seed_everything,
    warmup_cosine,
)
from mgi.train.data import CohortData, load_cohort, unique_case_batches
from mgi.train.loop import History, adamw, autocast, save_checkpoint

log = logging.getLogger(__name__)


def pretrain(
    *,
    sequences_path: Path,
    splits_path: Path,
    qc_path: Path,
    settings: dict,
    out_dir: Path,
    threads: int = 1,
) -> dict:
    """Train the CLIP model; write model.pt (best on validation), history.tsv, retrieval.json."""
    seed_everything(settings["seed"], threads=threads)
    opts = settings["pretrain"]
    device = pick_device(opts["device"])
    data = load_cohort(sequences_path=sequences_path, splits_path=splits_path, qc_path=qc_path)
    gene_cfg = gene_config(settings, vocab_size=data.sequences.vocab_size)
    image_cfg = image_config(settings, in_chans=data.images.shape[1])
    try:
        model = ClipModel(gene_cfg, image_cfg, init_temperature=opts["init_temperature"])
    except ValueError as err:  # an impossible combination of model.* and imaging.* keys
        raise ConfigError(f"model config: {err}") from err
    model.to(device)
    loss_fn = ClipLoss()
    rng = np.random.default_rng(settings["seed"])
    train_items = data.items("train")
    steps_per_epoch = len(unique_case_batches(
        data.item_case, train_items, batch_size=opts["batch_size"], rng=np.random.default_rng(0)))
    total = steps_per_epoch * opts["epochs"]
    optimizer = adamw(model, lr=opts["lr"], weight_decay=opts["weight_decay"])
    scheduler = warmup_cosine(
        optimizer, total_steps=total, warmup_steps=round(total * opts["warmup_fraction"]))
    history = History(out_dir / "history.tsv")
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    log.info("pre-training on %d items of %d patients, %d steps on %s", len(train_items),
             len(set(data.item_case[train_items])), total, device)
    for epoch in tqdm(range(1, opts["epochs"] + 1), desc="pretrain", unit="epoch"):
        model.train()
        losses = []
        for batch in unique_case_batches(
                data.item_case, train_items, batch_size=opts["batch_size"], rng=rng):
            images = torch.from_numpy(data.images[batch]).to(device)
            flip = torch.from_numpy(rng.random(len(batch)) < 0.5).to(device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            tokens, values = (t.to(device) for t in data.genes(batch))
            with autocast(device):
                loss = loss_fn(*model(images, tokens, values))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        val_loss = contrastive_loss(model, loss_fn, data, "val", device=device,
                                    batch_size=opts["batch_size"])
        val = case_retrieval(model, data, "val", device=device)
        history.add(epoch=epoch, train_loss=float(np.mean(losses)), val_loss=val_loss,
                    val_recall_at_1=val["gene_to_image"]["recall@1"],
                    temperature=float(1.0 / model.logit_scale.exp().item()),
                    lr=scheduler.get_last_lr()[0])
        if val_loss < best[0]:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    retrieval = {
        split: case_retrieval(model, data, split, device=device, permutations=1000)
        for split in ("train", "val", "test")
    }
    retrieval["best_epoch"] = best[1]
    retrieval["device"] = describe_device(device)
    with atomic_path(out_dir / "retrieval.json") as tmp:
        tmp.write_text(json.dumps(retrieval, indent=2))
    save_checkpoint({
        "state_dict": model.state_dict(),
        "gene_config": config_dict(gene_cfg),
        "image_config": config_dict(image_cfg),
        "best_epoch": best[1],
    }, out_dir / "model.pt")
    test = retrieval["test"]["gene_to_image"]
    log.info("test retrieval gene->image recall@1 %.3f (chance %.3f, permutation p %.4f)",
             test["recall@1"], test["chance@1"], test["p_recall@1"])
    return retrieval


@torch.no_grad()
def contrastive_loss(model: ClipModel, loss_fn: ClipLoss, data: CohortData, split: str, *,
                     device: torch.device, batch_size: int) -> float:
    """Mean CLIP loss over fixed batches (one item per patient) of a split."""
    model.eval()
    items = data.items(split)
    batches = unique_case_batches(data.item_case, items, batch_size=batch_size,
                                  rng=np.random.default_rng(0))
    losses = []
    for batch in batches:
        images = torch.from_numpy(data.images[batch]).to(device)
        tokens, values = (t.to(device) for t in data.genes(batch))
        losses.append(loss_fn(*model(images, tokens, values)).item())
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def case_embeddings(model: ClipModel, data: CohortData, split: str, *,
                    device: torch.device) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Per patient: the mean of its items' image embeddings (renormalised), its gene embedding."""
    model.eval()
    items = data.items(split)
    cases = sorted(set(data.item_case[items]))
    image_feats = []
    for start in range(0, len(items), 64):
        batch = items[start:start + 64]
        images = torch.from_numpy(data.images[batch]).to(device)
        image_feats.append(model.image_encoder(images).float().cpu())
    feats = torch.nn.functional.normalize(torch.cat(image_feats), dim=-1)
    per_case = torch.stack([feats[torch.from_numpy(data.item_case[items] == c)].mean(0)
                            for c in cases])
    per_case = torch.nn.functional.normalize(per_case, dim=-1)
    rows = np.array([data.case_row[c] for c in cases])
    tokens = torch.from_numpy(data.sequences.token_ids[rows].astype(np.int64)).to(device)
    values = torch.from_numpy(data.sequences.values[rows].astype(np.float32)).to(device)
    genes = torch.nn.functional.normalize(model.gene_encoder(tokens, values).float().cpu(), dim=-1)
    return cases, per_case, genes


def _by_direction(flat: dict[str, float]) -> dict:
    """retrieval_metrics' flat keys as {direction: {recall@k, chance@k, mean_rank}}."""
    nested: dict = {}
    for direction in ("gene_to_image", "image_to_gene"):
        scores = {key[len(direction) + 1:]: value for key, value in flat.items()
                  if key.startswith(direction)}
        scores.update({key.replace("chance_recall", "chance"): value
                       for key, value in flat.items() if key.startswith("chance_recall")})
        nested[direction] = scores
    return nested


def case_retrieval(model: ClipModel, data: CohortData, split: str, *, device: torch.device,
                   permutations: int = 0) -> dict:
    """Patient-level retrieval (gene->image, image->gene) with chance and permutation p-values."""
    cases, images, genes = case_embeddings(model, data, split, device=device)
    result = _by_direction(retrieval_metrics(images, genes))
    result["n_patients"] = len(cases)
    if permutations:
        rng = np.random.default_rng(0)
        null = [_by_direction(retrieval_metrics(
            images, genes[torch.from_numpy(rng.permutation(len(cases)))]))
            for _ in range(permutations)]
        for direction in ("gene_to_image", "image_to_gene"):
            for key in [k for k in result[direction] if k.startswith("recall@")]:
                observed = result[direction][key]
                exceed = sum(n[direction][key] >= observed for n in null)
                result[direction][f"p_{key}"] = (1 + exceed) / (1 + permutations)
        result["cases"] = cases
        result["similarity"] = (genes @ images.T).round(decimals=4).tolist()
    return result
