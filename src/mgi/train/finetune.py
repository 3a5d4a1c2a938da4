"""Segmentation fine-tuning of one variant; every variant goes through this same code."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from tqdm import tqdm

from mgi.errors import ConfigError, TrainingError
from mgi.models import SegmentationModel, freeze_encoder, load_pretrained
from mgi.train.build import (
    gene_config,
    image_config,
    pick_device,
    seed_everything,
    warmup_cosine,
)
from mgi.train.data import CohortData, load_cohort
from mgi.train.loop import History, adamw, autocast, save_checkpoint

log = logging.getLogger(__name__)

# variant -> (uses the pre-trained encoders, fuses the gene encoder)
VARIANTS = {
    "mgi": (True, True),
    "mgi_image_only": (True, False),
    "vit_scratch": (False, False),
}


def build_variant(variant: str, settings: dict, *, vocab_size: int, in_chans: int
                  ) -> SegmentationModel:
    """The segmentation network of a variant (untrained)."""
    if variant not in VARIANTS:
        raise TrainingError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    _, with_genes = VARIANTS[variant]
    try:
        return SegmentationModel(
            image_config(settings, in_chans=in_chans),
            gene_config(settings, vocab_size=vocab_size) if with_genes else None,
            fusion=settings["finetune"]["fusion"] if with_genes else "none",
            decoder_channels=settings["finetune"]["decoder_channels"],
        )
    except ValueError as err:  # an impossible combination of model.* and imaging.* keys
        raise ConfigError(f"model / finetune config of variant {variant}: {err}") from err


def finetune(
    *,
    variant: str,
    sequences_path: Path,
    splits_path: Path,
    qc_path: Path,
    pretrained_path: Path | None,
    settings: dict,
    out_dir: Path,
    threads: int = 1,
) -> None:
    """Train one variant with Dice+CE; keep the epoch with the best validation patient Dice."""
    seed_everything(settings["seed"], threads=threads)
    opts = settings["finetune"]
    device = pick_device(opts["device"])
    data = load_cohort(sequences_path=sequences_path, splits_path=splits_path, qc_path=qc_path)
    if data.masks is None:
        raise TrainingError(f"{qc_path}: no image bank has tumour masks; nothing to fine-tune on")
    model = build_variant(variant, settings, vocab_size=data.sequences.vocab_size,
                          in_chans=data.images.shape[1])
    uses_pretrained, with_genes = VARIANTS[variant]
    if uses_pretrained:
        if pretrained_path is None:
            raise TrainingError(f"variant {variant} needs the pre-trained model (--pretrained)")
        checkpoint = torch.load(pretrained_path, map_location="cpu", weights_only=True)
        loaded = load_pretrained(model, checkpoint["state_dict"])
        log.info("loaded %d pre-trained tensors from %s", len(loaded), pretrained_path)
        freeze = opts["freeze"]
        freeze_encoder(model, image=freeze in ("image", "both"),
                       gene=with_genes and freeze in ("gene", "both"))
    model.to(device)
    loss_fn = DiceCELoss(sigmoid=True)
    rng = np.random.default_rng(settings["seed"])
    train_items = data.items("train", labelled=True)
    steps_per_epoch = int(np.ceil(len(train_items) / opts["batch_size"]))
    total = steps_per_epoch * opts["epochs"]
    optimizer = adamw(model, lr=opts["lr"], weight_decay=opts["weight_decay"],
                      fusion_lr_scale=opts["fusion_lr_scale"])
    scheduler = warmup_cosine(optimizer, total_steps=total, warmup_steps=max(1, total // 10))
    history = History(out_dir / "history.tsv")
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    log.info("fine-tuning %s on %d slices, %d steps on %s", variant, len(train_items), total,
             device)
    for epoch in tqdm(range(1, opts["epochs"] + 1), desc=f"finetune {variant}", unit="epoch"):
        model.train()
        losses = []
        order = rng.permutation(train_items)
        for start in range(0, len(order), opts["batch_size"]):
            batch = np.sort(order[start:start + opts["batch_size"]])
            images, masks = augment(data, batch, rng=rng, device=device)
            with autocast(device):
                logits = model(images, *gene_inputs(data, batch, with_genes, device))
                loss = loss_fn(logits.float(), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        val_dice = patient_dice(model, data, "val", with_genes=with_genes, device=device)
        history.add(epoch=epoch, train_loss=float(np.mean(losses)), val_dice=val_dice,
                    lr=scheduler.get_last_lr()[0])
        if val_dice > best[0]:
            best = (val_dice, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    log.info("best validation patient Dice %.4f at epoch %d", best[0], best[1])
    save_checkpoint({
        "variant": variant,
        "state_dict": model.state_dict(),
        "settings": settings,
        "vocab_size": data.sequences.vocab_size,
        "in_chans": int(data.images.shape[1]),
        "best_epoch": best[1],
        "val_dice": best[0],
    }, out_dir / "model.pt")


def gene_inputs(data: CohortData, batch: np.ndarray, with_genes: bool, device: torch.device
                ) -> tuple[torch.Tensor, ...]:
    """(token ids, values) of the batch's patients for a variant with genes, else nothing."""
    if not with_genes:
        return ()
    return tuple(t.to(device) for t in data.genes(batch))


def augment(data: CohortData, batch: np.ndarray, *, rng: np.random.Generator,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and masks of a batch with random flips and 90-degree turns, applied to both alike."""
    images = torch.from_numpy(data.images[batch])
    masks = torch.from_numpy(data.masks[batch].astype(np.float32))[:, None]
    if rng.random() < 0.5:
        images, masks = images.flip(-1), masks.flip(-1)
    if rng.random() < 0.5:
        images, masks = images.flip(-2), masks.flip(-2)
    turns = int(rng.integers(4))
    images, masks = images.rot90(turns, (-2, -1)), masks.rot90(turns, (-2, -1))
    return images.contiguous().to(device), masks.contiguous().to(device)


@torch.no_grad()
def predict(model: SegmentationModel, data: CohortData, items: np.ndarray, *, with_genes: bool,
            device: torch.device, batch_size: int = 32) -> np.ndarray:
    """Tumour probabilities (N, H, W) of items."""
    model.eval()
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        images = torch.from_numpy(data.images[batch]).to(device)
        logits = model(images, *gene_inputs(data, batch, with_genes, device))
        out.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *data.images.shape[2:]), np.float32)


def patient_dice(model: SegmentationModel, data: CohortData, split: str, *, with_genes: bool,
                 device: torch.device, threshold: float = 0.5) -> float:
    """Mean over patients of the 3D Dice of all their slices (validation score)."""
    from mgi.evaluate.metrics import volume_metrics

    items = data.items(split, labelled=True)
    probs = predict(model, data, items, with_genes=with_genes, device=device)
    scores = []
    for case in sorted(set(data.item_case[items])):
        sel = data.item_case[items] == case
        metrics = volume_metrics(probs[sel] >= threshold, data.masks[items][sel].astype(bool))
        scores.append(metrics["dice"])
    return float(np.nanmean(scores)) if scores else float("nan")
