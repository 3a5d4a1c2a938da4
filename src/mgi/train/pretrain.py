"""Contrastive pre-training: align each patient's gene sequence with its images (CLIP loss).

Lightning Fabric owns the mechanics (devices, DDP over processes and nodes, mixed precision,
checkpoint I/O, TensorBoard); the loop itself stays here, in one screen: patient-level batches,
gradient accumulation, warm-up + cosine, NaN/inf stops, checkpoints every N steps, resume.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mgi.checkpoint import resume_state, run_fingerprint, save_pretrained, save_state
from mgi.errors import ConfigError, TrainingError
from mgi.io import atomic_path
from mgi.models import ClipLoss, ClipModel, retrieval_metrics
from mgi.options import PretrainSettings
from mgi.progress import progress
from mgi.train.build import (
    config_dict,
    describe_device,
    gene_config,
    image_channels,
    image_config,
    seed_everything,
    warmup_cosine,
)
from mgi.train.data import CohortData, load_cohort
from mgi.train.loop import History, adamw, make_fabric
from mgi.train.pairs import PatientPairs, augmentation, epoch_batches, local_part

log = logging.getLogger(__name__)

# Rules for the epoch whose weights model.pt keeps (pretrain.keep_by; see selection_score).
KEEP_BY = ("val_mean_rank", "val_loss", "last")
RETRIEVAL_KS = (1, 5, 10)


def pretrain(
    *,
    sequences_path: Path,
    splits_path: Path,
    qc_path: Path,
    settings: PretrainSettings,
    out_dir: Path,
    threads: int = 1,
) -> dict | None:
    """Train the CLIP model; write model.pt (the epoch `pretrain.keep_by` keeps), history.tsv and
    retrieval.json.

    Every process of a DDP run calls this; process 0 writes the outputs and returns the
    retrieval scores, the others return None. A run killed part-way resumes from
    `out_dir/checkpoints/last.ckpt` when called again with the same settings and inputs.
    """
    run = setup(sequences_path=sequences_path, splits_path=splits_path, qc_path=qc_path,
                settings=settings, out_dir=out_dir, threads=threads)
    opts, fabric = settings.pretrain, run.fabric
    bar = progress(total=run.total, initial=run.state["step"], desc="pretrain", unit="step",
                   disable=not fabric.is_global_zero)
    for epoch in range(run.state["epoch"], opts.epochs + 1):
        if out_of_patience(run, epoch - 1):  # a resumed run that had stopped early
            break
        train_one_epoch(run, epoch, bar=bar)
        row = validate_epoch(run, epoch)
        keep_if_best(run, row)
        stop = out_of_patience(run, epoch)
        if stop or epoch == opts.epochs or (opts.checkpoint_every
                                            and run.steps_per_epoch >= opts.checkpoint_every):
            run.checkpoint(epoch + 1, 0)
        if stop:
            log.info("no better epoch by %s in the %d since epoch %d: stopping after epoch %d "
                     "(pretrain.patience)", opts.keep_by, opts.patience,
                     run.state["best"]["epoch"], epoch)
            break
    bar.close()
    fabric.barrier()
    if not fabric.is_global_zero:
        return None
    return _finish(run.raw, run.data, run.state, run.gene_cfg, run.image_cfg,
                   device=fabric.device, out_dir=out_dir, processes=fabric.world_size,
                   keep_by=opts.keep_by, channels=image_channels(settings.imaging))


@dataclass
class PretrainRun:
    """What one pre-training run holds between its steps (see `setup`)."""

    settings: PretrainSettings
    fabric: Any
    data: CohortData
    raw: ClipModel  # the model itself; `model` is Fabric's wrapper of it
    model: Any
    optimizer: Any
    scheduler: Any
    loss_fn: ClipLoss
    eval_loss_fn: ClipLoss
    pairs: PatientPairs
    val_draws: tuple[torch.Tensor, ...]
    batch_size: int
    steps_per_epoch: int
    total: int
    gene_cfg: Any
    image_cfg: Any
    state: dict
    history: History
    last_path: Path

    def checkpoint(self, epoch: int, batch: int) -> None:
        """Save the resumable state: training goes on at (epoch, batch)."""
        self.state.update(epoch=epoch, batch=batch, history=self.history.rows,
                          torch_rng=torch.get_rng_state())
        save_state(self.fabric, self.last_path, self.state)


def setup(*, sequences_path: Path, splits_path: Path, qc_path: Path,
          settings: PretrainSettings, out_dir: Path, threads: int) -> PretrainRun:
    """Devices, data, model, optimiser and schedule of a run, resumed from its last checkpoint
    when that belongs to the very same run."""
    opts, seed = settings.pretrain, settings.seed
    check_keep_by(opts.keep_by)  # a wrong rule stops before training, not after an epoch
    fabric = make_fabric(opts, log_dir=out_dir / "tensorboard")
    fabric.launch()
    world = fabric.world_size
    seed_everything(seed, threads=max(1, threads // opts.devices))
    data = load_cohort(sequences_path=sequences_path, splits_path=splits_path, qc_path=qc_path)
    gene_cfg = gene_config(settings.model, settings.expression,
                           vocab_size=data.sequences.vocab_size,
                           seq_len=data.sequences.token_ids.shape[1])
    image_cfg = image_config(settings.model, settings.imaging, in_chans=data.images.shape[1])
    try:
        raw = ClipModel(gene_cfg, image_cfg, init_temperature=opts.init_temperature)
    except ValueError as err:  # an impossible combination of model.* and imaging.* keys
        raise ConfigError(f"model config: {err}") from err

    pairs = PatientPairs(data, data.items("train"), seed=seed,
                         augment=augmentation(modality=settings.imaging.modality,
                                              intensity=opts.augment, shift=opts.augment_shift,
                                              size=data.images.shape[-1]),
                         gene_dropout=opts.gene_dropout)
    val_draws = validation_draws(PatientPairs(data, data.items("val"), seed=seed))
    batch_size = min(opts.batch_size, len(pairs))
    if batch_size % world:
        raise ConfigError(
            f"pretrain.batch_size ({batch_size}, or the number of training patients when fewer) "
            f"must be a multiple of the number of processes ({world})"
        )
    batches_per_epoch = len(epoch_batches(len(pairs), batch_size=batch_size, world_size=world,
                                          seed=seed, epoch=1))
    steps_per_epoch = math.ceil(batches_per_epoch / opts.accumulate)
    total = steps_per_epoch * opts.epochs
    optimizer = adamw(raw, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = warmup_cosine(
        optimizer, total_steps=total, warmup_steps=round(total * opts.warmup_fraction))
    model, optimizer = fabric.setup(raw, optimizer)

    fingerprint = run_fingerprint(settings, stage="pretrain",
                                  inputs=[sequences_path, splits_path, qc_path])
    last_path = out_dir / "checkpoints" / "last.ckpt"
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 1,
             "batch": 0, "step": 0, "epoch_losses": [], "negatives": 0, "history": [],
             "best": {"score": (math.inf,), "epoch": 0,
                      "state_dict": copy.deepcopy(raw.state_dict())},
             "torch_rng": torch.get_rng_state(), "fingerprint": fingerprint}
    if resume_state(fabric, last_path, state, fingerprint=fingerprint):
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming from %s: epoch %d, batch %d, step %d", last_path, state["epoch"],
                 state["batch"], state["step"])
    history = History(out_dir / "history.tsv", state["history"], write=fabric.is_global_zero)
    log.info("pre-training on %d patients (%d images), %d steps of %d pairs on %d process(es), "
             "precision %s", len(pairs), len(data.items("train")), total, batch_size, world,
             fabric.strategy.precision.precision)
    return PretrainRun(settings=settings, fabric=fabric, data=data, raw=raw, model=model,
                       optimizer=optimizer, scheduler=scheduler, loss_fn=ClipLoss(),
                       eval_loss_fn=ClipLoss(gather=False), pairs=pairs, val_draws=val_draws,
                       batch_size=batch_size, steps_per_epoch=steps_per_epoch, total=total,
                       gene_cfg=gene_cfg, image_cfg=image_cfg, state=state, history=history,
                       last_path=last_path)


def train_one_epoch(run: PretrainRun, epoch: int, *, bar: tqdm) -> None:
    """One pass over the training patients (from the resumed batch), with gradient
    accumulation, clipping, NaN/inf stops and checkpoints every `checkpoint_every` steps."""
    opts, fabric, state = run.settings.pretrain, run.fabric, run.state
    model, optimizer, scheduler, loss_fn = run.model, run.optimizer, run.scheduler, run.loss_fn
    world, rank = fabric.world_size, fabric.global_rank
    batches = epoch_batches(len(run.pairs), batch_size=run.batch_size, world_size=world,
                            seed=run.settings.seed, epoch=epoch)
    first = state["batch"] if epoch == state["epoch"] else 0
    if first == 0:
        state["epoch_losses"] = []
    keys = [[(epoch, int(p)) for p in local_part(b, rank=rank, world_size=world)]
            for b in batches[first:]]
    loader = DataLoader(run.pairs, batch_sampler=keys, num_workers=opts.num_workers,
                        persistent_workers=False)
    model.train()
    for index, batch in enumerate(loader, start=first):
        group_start = index - index % opts.accumulate
        group_size = min(opts.accumulate, len(batches) - group_start)
        stepping = index + 1 == group_start + group_size
        images, tokens, values = fabric.to_device(batch)
        with fabric.no_backward_sync(model, enabled=not stepping):
            loss = loss_fn(*model(images, tokens, values))
            global_loss = _global_mean(fabric, loss)
            _check_finite(fabric, global_loss, "loss", epoch=epoch, step=state["step"],
                          lr=scheduler.get_last_lr()[0], checkpoint=run.last_path)
            fabric.backward(loss / group_size)
        state["epoch_losses"].append(global_loss)
        state["negatives"] = loss_fn.n_candidates
        if not stepping:
            continue
        norm = fabric.clip_gradients(model, optimizer, max_norm=1.0)
        if fabric.strategy.precision.precision != "16-mixed":  # fp16's scaler skips inf steps
            _check_finite(fabric, norm, "gradient norm", epoch=epoch, step=state["step"],
                          lr=scheduler.get_last_lr()[0], checkpoint=run.last_path)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] += 1
        bar.update()
        fabric.log_dict({"train/loss": global_loss, "train/lr": scheduler.get_last_lr()[0],
                         "train/negatives": loss_fn.n_candidates}, step=state["step"])
        if opts.checkpoint_every and state["step"] % opts.checkpoint_every == 0:
            run.checkpoint(epoch, index + 1)


def validate_epoch(run: PretrainRun, epoch: int) -> dict:
    """Score the validation draws after an epoch; add the epoch's row to history.tsv."""
    state = run.state
    val_loss, val = validate(run.raw, run.eval_loss_fn, run.val_draws, device=run.fabric.device)
    g2i, i2g = val["gene_to_image"], val["image_to_gene"]
    row = {"epoch": epoch, "step": state["step"],
           "train_loss": float(np.mean(state["epoch_losses"])), "val_loss": val_loss,
           "val_recall_at_1": g2i["recall@1"], "val_recall_at_5": g2i["recall@5"],
           "val_mean_rank": g2i["mean_rank"],
           "val_image_to_gene_recall_at_1": i2g["recall@1"],
           "val_image_to_gene_mean_rank": i2g["mean_rank"],
           "temperature": float(1.0 / run.raw.logit_scale.exp().item()),
           "lr": run.scheduler.get_last_lr()[0], "negatives": state["negatives"]}
    run.history.add(**row)
    run.fabric.log_dict({f"epoch/{k}": v for k, v in row.items() if k != "epoch"},
                        step=state["step"])
    return row


def out_of_patience(run: PretrainRun, epoch: int) -> bool:
    """Whether `pretrain.patience` epochs have passed since the best so far, after `epoch`."""
    opts = run.settings.pretrain
    if opts.patience is None or opts.keep_by == "last" or epoch < 1:
        return False
    return epoch - run.state["best"]["epoch"] >= opts.patience


def keep_if_best(run: PretrainRun, row: dict) -> None:
    """Keep a copy of the weights when the epoch's row ranks best by `pretrain.keep_by`."""
    score = selection_score(row, keep_by=run.settings.pretrain.keep_by)
    if score < run.state["best"]["score"]:
        run.state["best"] = {"score": score, "epoch": row["epoch"],
                             "state_dict": copy.deepcopy(run.raw.state_dict())}


def _global_mean(fabric, loss: torch.Tensor) -> float:
    """The loss averaged over every process (the whole global batch's loss)."""
    value = loss.detach().float()
    if fabric.world_size > 1:
        value = fabric.all_reduce(value, reduce_op="mean")
    return float(value)


def _check_finite(fabric, value: torch.Tensor | float, what: str, *, epoch: int, step: int,
                  lr: float, checkpoint: Path) -> None:
    """Stop with a clear message when `value` (equal on every process) is NaN or infinite."""
    if not math.isfinite(float(value)):
        raise TrainingError(
            f"pre-training diverged: the {what} is not finite at epoch {epoch}, step {step + 1} "
            f"(learning rate {lr:.3g}, precision {fabric.strategy.precision.precision}). Lower "
            f"pretrain.lr, raise pretrain.warmup_fraction or set pretrain.precision to 32-true, "
            f"then rerun. The last good checkpoint is {checkpoint}."
        )


def _finish(raw: ClipModel, data: CohortData, state: dict, gene_cfg, image_cfg, *,
            device: torch.device, out_dir: Path, processes: int, keep_by: str,
            channels: tuple[str, ...] | None) -> dict:
    """Load the best weights, score retrieval on every split, write retrieval.json and model.pt."""
    raw.load_state_dict(state["best"]["state_dict"])
    retrieval = {
        split: case_retrieval(raw, data, split, device=device, permutations=1000)
        for split in ("train", "val", "test")
    }
    retrieval["best_epoch"] = state["best"]["epoch"]
    retrieval["kept_by"] = keep_by
    retrieval["device"] = describe_device(device, processes=processes)
    with atomic_path(out_dir / "retrieval.json") as tmp:
        tmp.write_text(json.dumps(retrieval, indent=2))
    save_pretrained(out_dir / "model.pt", state_dict=raw.state_dict(),
                    gene_config=config_dict(gene_cfg), image_config=config_dict(image_cfg),
                    best_epoch=state["best"]["epoch"], channels=channels)
    test = retrieval["test"]["gene_to_image"]
    log.info("test retrieval gene->image recall@1 %.3f (chance %.3f, permutation p %.4f)",
             test["recall@1"], test["chance@1"], test["p_recall@1"])
    return retrieval


def check_keep_by(keep_by: str) -> None:
    """Raise ConfigError unless `keep_by` is one of KEEP_BY."""
    if keep_by not in KEEP_BY:
        raise ConfigError(f"pretrain.keep_by: {keep_by!r} is not one of {', '.join(KEEP_BY)}")


def selection_score(row: dict, *, keep_by: str) -> tuple[float, ...]:
    """How an epoch's history row ranks for keeping its weights (lower is better).

    `val_mean_rank`: the validation patients' mean rank of their true partner, gene -> image
    plus image -> gene, ties to the lower validation loss. It is what the retrieval scores
    measure; validation loss also punishes confident mistakes, so on small cohorts it is
    lowest before training has done much (a scratch run on the demo's data kept epoch 33 of
    600, its loss still at log N). `val_loss`: the lowest validation loss. `last`: the last epoch.
    """
    check_keep_by(keep_by)
    if keep_by == "val_mean_rank":
        return (row["val_mean_rank"] + row["val_image_to_gene_mean_rank"], row["val_loss"])
    if keep_by == "val_loss":
        return (row["val_loss"],)
    return (-row["epoch"],)  # last


def validation_draws(pairs: PatientPairs, *, rounds: int = 4) -> tuple[torch.Tensor, ...]:
    """`rounds` fixed draws of one image per patient (rounds, P, C, H, W), with the patients'
    token ids and values (P, L): what `validate` scores after every epoch, read once."""
    draws = [[pairs[(draw, p)] for p in range(len(pairs))] for draw in range(rounds)]
    images = torch.stack([torch.stack([image for image, _, _ in draw]) for draw in draws])
    tokens = torch.stack([t for _, t, _ in draws[0]])
    values = torch.stack([v for _, _, v in draws[0]])
    return images, tokens, values


@torch.no_grad()
def validate(model: ClipModel, loss_fn: ClipLoss, draws: tuple[torch.Tensor, ...], *,
             device: torch.device) -> tuple[float, dict]:
    """Mean CLIP loss and patient retrieval of a split over fixed image draws
    (`validation_draws`); each patient's image embedding is the mean over its draws.

    A cheap, fixed check for every epoch; the final scores (`case_retrieval`) use every image.
    """
    model.eval()
    images, tokens, values = draws
    gene_f = model.encode_genes(tokens.to(device), values.to(device))
    scale = model.scale()
    losses, image_feats = [], []
    for draw in images:
        image_f = model.encode_image(draw.to(device))
        losses.append(loss_fn(image_f, gene_f, scale).item())
        image_feats.append(image_f.float().cpu())
    per_patient = torch.nn.functional.normalize(torch.stack(image_feats).mean(0), dim=-1)
    scores = retrieval_metrics(per_patient, gene_f.float().cpu(), ks=RETRIEVAL_KS)
    return float(np.mean(losses)), _by_direction(scores)


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
    result = _by_direction(retrieval_metrics(images, genes, ks=RETRIEVAL_KS))
    result["n_patients"] = len(cases)
    if permutations:
        rng = np.random.default_rng(0)
        null = [_by_direction(retrieval_metrics(
            images, genes[torch.from_numpy(rng.permutation(len(cases)))], ks=RETRIEVAL_KS))
            for _ in range(permutations)]
        for direction in ("gene_to_image", "image_to_gene"):
            for key in [k for k in result[direction] if k.startswith("recall@")]:
                observed = result[direction][key]
                exceed = sum(n[direction][key] >= observed for n in null)
                result[direction][f"p_{key}"] = (1 + exceed) / (1 + permutations)
        result["cases"] = cases
        result["similarity"] = (genes @ images.T).round(decimals=4).tolist()
    return result
