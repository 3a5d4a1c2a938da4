"""Training data: image items from the image banks, paired with each patient's gene sequence."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mgi.errors import TrainingError
from mgi.expression.tokens import GeneSequences, read_sequences
from mgi.imaging.bank import read_bank
from mgi.io import read_tsv

log = logging.getLogger(__name__)


@dataclass
class CohortData:
    """Image items of the paired patients, each with its patient's gene sequence row."""

    images: np.ndarray  # (N, C, H, W) float32, model-ready
    masks: np.ndarray | None  # (N, H, W) uint8 0/1, or None where no bank has masks
    item_case: np.ndarray  # (N,) case id of each item
    item_split: np.ndarray  # (N,) split of each item
    item_coord: np.ndarray  # (N,) slice position (MRI) or tile x (WSI), to order a patient's items
    item_image: np.ndarray  # (N,) image id of the bank each item comes from
    item_index: np.ndarray  # (N,) index of the item inside its bank
    sequences: GeneSequences
    case_row: dict[str, int]  # case id -> row of sequences.token_ids
    item_labelled: np.ndarray | None = None  # (N,) bool: the item's bank has tumour masks

    def items(self, split: str, *, labelled: bool = False) -> np.ndarray:
        """Indices of the items of one split; with `labelled`, only items that have masks.

        Images without labels serve pre-training only: segmentation trains and is scored on
        labelled items, never on an unlabelled image read as "no tumour".
        """
        chosen = self.item_split == split
        if labelled and self.item_labelled is not None:
            chosen &= self.item_labelled
        return np.flatnonzero(chosen)

    def genes(self, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and values of the patients of `items`."""
        rows = np.array([self.case_row[c] for c in self.item_case[items]])
        tokens = torch.from_numpy(self.sequences.token_ids[rows].astype(np.int64))
        values = torch.from_numpy(self.sequences.values[rows].astype(np.float32))
        return tokens, values


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Bank pixels as float32 model input: WSI uint8 tiles scaled to about unit range."""
    if images.dtype == np.uint8:
        return ((images.astype(np.float32) / 255.0) - 0.5) / 0.25
    return images.astype(np.float32)


def load_cohort(*, sequences_path: Path, splits_path: Path, qc_path: Path) -> CohortData:
    """Every usable bank item of the paired patients, in memory, with split and gene rows.

    Banks sit beside the QC table (`images/{image_id}.h5`); failed images are skipped (their
    reason is in the QC table).
    """
    sequences = read_sequences(sequences_path)
    splits = read_tsv(splits_path, required=["case_id", "split"])
    split_of = dict(zip(splits["case_id"], splits["split"], strict=True))
    case_row = {case: i for i, case in enumerate(sequences.case_ids)}
    qc = read_tsv(qc_path, required=["image_id", "case_id", "status"])
    images, masks, cases, item_splits, coords, image_ids, indices = [], [], [], [], [], [], []
    labelled = []
    any_mask = False
    for row in qc.itertuples():
        split = split_of.get(row.case_id)
        if row.status != "ok" or split not in ("train", "val", "test"):
            continue
        if row.case_id not in case_row:
            raise TrainingError(f"{sequences_path}: no gene sequence for case {row.case_id}")
        bank = read_bank(qc_path.parent / f"{row.image_id}.h5")
        n = len(bank.images)
        images.append(to_model_input(bank.images))
        if bank.masks is not None:
            any_mask = True
            masks.append(bank.masks.astype(np.uint8))
        else:
            masks.append(np.zeros((n, *bank.images.shape[2:]), dtype=np.uint8))
        labelled += [bank.masks is not None] * n
        cases += [row.case_id] * n
        image_ids += [row.image_id] * n
        indices.append(np.arange(n))
        item_splits += [split] * n
        coords.append(np.asarray(bank.coords)[:, 0] if len(bank.coords) else np.zeros(n))
    if not images:
        raise TrainingError(f"{qc_path}: no usable image of a paired patient")
    log.info("loaded %d items of %d patients", len(cases), len(set(cases)))
    return CohortData(
        images=np.concatenate(images),
        masks=np.concatenate(masks) if any_mask else None,
        item_case=np.array(cases, dtype=object),
        item_split=np.array(item_splits, dtype=object),
        item_coord=np.concatenate(coords),
        item_image=np.array(image_ids, dtype=object),
        item_index=np.concatenate(indices),
        sequences=sequences,
        case_row=case_row,
        item_labelled=np.array(labelled, dtype=bool),
    )


def unique_case_batches(
    item_case: np.ndarray, items: np.ndarray, *, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of batches in which no patient appears twice (so no false negatives in CLIP).

    Each patient's items are shuffled; each round takes one item from each of a shuffled set of
    patients, so every item is seen once per epoch.
    """
    by_case: dict[str, list[int]] = {}
    for i in rng.permutation(items):
        by_case.setdefault(item_case[i], []).append(int(i))
    batches = []
    while by_case:
        cases = list(by_case)
        rng.shuffle(cases)
        for start in range(0, len(cases), batch_size):
            batch = np.array([by_case[c].pop() for c in cases[start:start + batch_size]])
            if len(batch) >= 2:  # a contrastive batch needs at least one negative
                batches.append(batch)
        by_case = {c: v for c, v in by_case.items() if v}
    return batches
