"""Segmentation fine-tuning of one variant; every variant goes through this same code."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.losses import DiceCELoss

from mgi.checkpoint import Pretrained, save_failed, save_finetuned
from mgi.checkpoint import load_pretrained as read_pretrained
from mgi.errors import ConfigError, MgiError, TrainingError
from mgi.io import write_tsv
from mgi.models import SegmentationModel, UNetSegmentation, freeze_encoder, load_pretrained
from mgi.models.metrics import volume_metrics
from mgi.options import FinetuneSettings
from mgi.progress import progress
from mgi.train.build import (
    config_dict,
    gene_config,
    image_channels,
    image_config,
    pick_device,
    seed_everything,
    unet_config,
    warmup_cosine,
)
from mgi.train.data import CohortData, load_cohort
from mgi.train.loop import History, adamw, autocast
from mgi.variants import VariantSpec, variant_spec

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_dice", "lr", "seconds"]


def build_variant(variant: str, settings: FinetuneSettings, *, vocab_size: int, seq_len: int,
                  in_chans: int) -> SegmentationModel | UNetSegmentation:
    """The segmentation network of a variant (untrained)."""
    spec = variant_spec(variant)
    try:
        if spec.network == "unet":
            return UNetSegmentation(unet_config(settings.finetune.unet, settings.imaging,
                                                in_chans=in_chans))
        kind = spec.gene_kind(settings.model.gene_encoder.kind)
        gene = (gene_config(settings.model, settings.expression, vocab_size=vocab_size,
                            seq_len=seq_len, kind=kind)
                if spec.genes else None)
        return SegmentationModel(
            image_config(settings.model, settings.imaging, in_chans=in_chans),
            gene,
            fusion=settings.finetune.fusion if spec.genes else "none",
            decoder_channels=settings.finetune.decoder_channels,
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
    settings: FinetuneSettings,
    out_dir: Path,
    threads: int = 1,
) -> bool:
    """Train one variant with Dice+CE, keep the epoch with the best validation patient Dice;
    True when it trained.

    A failure once the data is loaded (an error, a loss that is not finite, out of GPU memory)
    is, with finetune.on_failure `record`, logged with its traceback and written as model.pt
    {"variant", "failed": True, "error"} beside the curves so far (returns False); with `raise`
    it propagates.
    """
    seed_everything(settings.seed, threads=threads)
    opts = settings.finetune
    device = pick_device(opts.device)
    data = load_cohort(sequences_path=sequences_path, splits_path=splits_path, qc_path=qc_path)
    if data.masks is None:
        raise TrainingError(f"{qc_path}: no image bank has tumour masks; nothing to fine-tune on")
    history = History(out_dir / "history.tsv")
    try:
        model, best = _train(variant, data, settings, pretrained_path=pretrained_path,
                             device=device, history=history)
    except Exception as err:
        if opts.on_failure == "raise":
            raise
        log.exception("fine-tuning %s failed; recorded as failed (finetune.on_failure: record)",
                      variant)
        if not history.rows:
            write_tsv(pd.DataFrame(columns=HISTORY_COLUMNS), history.path)
        save_failed(out_dir / "model.pt", variant=variant, error=error_line(err))
        return False
    log.info("best validation patient Dice %.4f at epoch %d", best[0], best[1])
    save_finetuned(out_dir / "model.pt", variant=variant, state_dict=model.state_dict(),
                   settings=settings, vocab_size=data.sequences.vocab_size,
                   in_chans=int(data.images.shape[1]), best_epoch=best[1], val_dice=best[0])
    return True


def error_line(err: BaseException) -> str:
    """An exception as one line: a stage error's message, else its type and message."""
    text = str(err) if isinstance(err, MgiError) else f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."


# Fields of the encoder configs that shape the weights; each disagreement with the checkpoint
# is named with the config key (or input) that sets it on the fine-tuning side.
GENE_FIELDS = {
    "vocab_size": "the gene vocabulary (expression/vocab.tsv)",
    "seq_len": "expression.seq_len",
    "value_encoding": "expression.values",
    "n_bins": "expression.n_bins",
    "d_model": "model.gene_encoder.d_model",
    "n_layers": "model.gene_encoder.n_layers",
    "d_state": "model.gene_encoder.d_state",
    "d_conv": "model.gene_encoder.d_conv",
    "expand": "model.gene_encoder.expand",
    "bidirectional": "model.gene_encoder.bidirectional",
    "n_heads": "model.gene_encoder.n_heads",
    "embed_dim": "model.embed_dim",
}
IMAGE_FIELDS = {
    "model_name": "model.image_encoder.model_name",
    "img_size": "imaging image size (imaging.mri.image_px or imaging.wsi.tile_px)",
    "patch_size": "model.image_encoder.patch_size",
    "in_chans": "image channels (imaging.mri.sequences)",
    "width": "model.image_encoder.width",
    "depth": "model.image_encoder.depth",
    "num_heads": "model.image_encoder.num_heads",
    "embed_dim": "model.embed_dim",
    "pos_embed": "model.image_encoder.pos_embed",
}


def check_pretrained(checkpoint: Pretrained, *, path: Path, gene: dict | None, image: dict,
                     channels: tuple[str, ...] | None) -> None:
    """Refuse a pre-training whose encoder configs or image channels differ from what the
    fine-tuning builds (`gene` None: a variant without genes), naming both values."""
    problems = []
    for what, ours, theirs, fields in (("gene", gene, checkpoint.gene_config, GENE_FIELDS),
                                       ("image", image, checkpoint.image_config, IMAGE_FIELDS)):
        if ours is None:
            continue
        for key, source in fields.items():
            if key in theirs and key in ours and theirs[key] != ours[key]:
                problems.append(f"{what} encoder {key}: pre-trained {theirs[key]!r}, fine-tuning "
                                f"builds {ours[key]!r} (from {source})")
    if checkpoint.channels is not None and channels is not None and (
            tuple(checkpoint.channels) != tuple(channels)):
        problems.append(f"image channels: pre-trained on {list(checkpoint.channels)}, "
                        f"imaging.mri.sequences here is {list(channels)}")
    if problems:
        raise ConfigError(f"{path}: the pre-training does not fit this fine-tuning; "
                          + "; ".join(problems)
                          + ". Set the fine-tuning cohort's keys to the pre-training's values.")


def _load_pretrained(model: SegmentationModel, variant: str, spec: VariantSpec,
                     settings: FinetuneSettings, pretrained_path: Path | None, *,
                     data: CohortData) -> None:
    """Copy the pre-trained encoders into the model, after checking the gene encoder kind and
    that the encoders' configs and image channels are the pre-training's."""
    if pretrained_path is None:
        raise TrainingError(f"variant {variant} needs the pre-trained model (--pretrained)")
    checkpoint = read_pretrained(pretrained_path)
    gene = None
    if spec.genes:
        kind = spec.gene_kind(settings.model.gene_encoder.kind)
        trained = checkpoint.gene_config.get("kind")
        if trained is not None and trained != kind:
            raise TrainingError(
                f"{pretrained_path}: pre-trained with gene encoder {trained!r}, but variant "
                f"{variant} uses {kind!r}"
            )
        gene = config_dict(gene_config(settings.model, settings.expression,
                                       vocab_size=data.sequences.vocab_size,
                                       seq_len=data.sequences.token_ids.shape[1], kind=kind))
    image = config_dict(image_config(settings.model, settings.imaging,
                                     in_chans=data.images.shape[1]))
    check_pretrained(checkpoint, path=pretrained_path, gene=gene, image=image,
                     channels=image_channels(settings.imaging))
    loaded = load_pretrained(model, checkpoint.state_dict)
    log.info("loaded %d pre-trained tensors from %s", len(loaded), pretrained_path)
    freeze = settings.finetune.freeze
    freeze_encoder(model, image=freeze in ("image", "both"),
                   gene=spec.genes and freeze in ("gene", "both"))


def _train(variant: str, data: CohortData, settings: FinetuneSettings, *,
           pretrained_path: Path | None, device: torch.device, history: History
           ) -> tuple[torch.nn.Module, tuple[float, int]]:
    """The trained model (best validation epoch's weights) and (best val Dice, its epoch)."""
    opts = settings.finetune
    spec = variant_spec(variant)
    model = build_variant(variant, settings, vocab_size=data.sequences.vocab_size,
                          seq_len=data.sequences.token_ids.shape[1],
                          in_chans=data.images.shape[1])
    if spec.pretrained:
        _load_pretrained(model, variant, spec, settings, pretrained_path, data=data)
    model.to(device)
    loss_fn = DiceCELoss(sigmoid=True)
    rng = np.random.default_rng(settings.seed)
    train_items = data.items("train", labelled=True)
    steps_per_epoch = int(np.ceil(len(train_items) / opts.batch_size))
    total = steps_per_epoch * opts.epochs
    # the CNN baseline takes its own peak rate (a U-Net trains at a higher one than a ViT)
    lr = opts.unet.lr if spec.network == "unet" else opts.lr
    optimizer = adamw(model, lr=lr, weight_decay=opts.weight_decay,
                      fusion_lr_scale=opts.fusion_lr_scale)
    scheduler = warmup_cosine(optimizer, total_steps=total, warmup_steps=max(1, total // 10))
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    log.info("fine-tuning %s on %d slices, %d steps on %s", variant, len(train_items), total,
             device)
    step = 0
    for epoch in progress(range(1, opts.epochs + 1), desc=f"finetune {variant}", unit="epoch"):
        model.train()
        losses = []
        order = rng.permutation(train_items)
        for start in range(0, len(order), opts.batch_size):
            batch = np.sort(order[start:start + opts.batch_size])
            images, masks = augment(data, batch, rng=rng, device=device)
            with autocast(device):
                logits = model(images, *gene_inputs(data, batch, spec.genes, device))
                loss = loss_fn(logits.float(), masks)
            step += 1
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingError(
                    f"fine-tuning {variant} diverged: the loss is not finite at epoch {epoch}, "
                    f"step {step} (learning rate {scheduler.get_last_lr()[0]:.3g}). Lower "
                    f"finetune.lr, then rerun."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(value)
        val_dice = patient_dice(model, data, "val", with_genes=spec.genes, device=device)
        history.add(epoch=epoch, train_loss=float(np.mean(losses)), val_dice=val_dice,
                    lr=scheduler.get_last_lr()[0])
        if val_dice > best[0]:
            best = (val_dice, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return model, (best[0], best[1])


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
def predict(model: torch.nn.Module, data: CohortData, items: np.ndarray, *, with_genes: bool,
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


def patient_dice(model: torch.nn.Module, data: CohortData, split: str, *, with_genes: bool,
                 device: torch.device, threshold: float = 0.5) -> float:
    """Mean over patients of the 3D Dice of all their slices (validation score)."""
    items = data.items(split, labelled=True)
    probs = predict(model, data, items, with_genes=with_genes, device=device)
    scores = []
    for case in sorted(set(data.item_case[items])):
        sel = data.item_case[items] == case
        metrics = volume_metrics(probs[sel] >= threshold, data.masks[items][sel].astype(bool))
        scores.append(metrics["dice"])
    return float(np.nanmean(scores)) if scores else float("nan")
