"""Patient-level image-gene pairs for contrastive pre-training.

A step pairs each patient of the batch with one of its images (drawn afresh every epoch) and its
gene sequence, so no patient meets itself as a negative. Every random choice (batch order,
which image, augmentation) is seeded by (seed, epoch, patient): the same run gives the same
batches on any number of workers or processes, and a resumed run picks up exactly where the
killed one stopped.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAffine,
    RandFlip,
    Randomizable,
    RandRotate90,
    RandScaleIntensity,
    RandShiftIntensity,
)
from monai.utils import MAX_SEED
from torch.utils.data import Dataset

from mgi.errors import TrainingError
from mgi.train.data import CohortData


def epoch_batches(n_patients: int, *, batch_size: int, world_size: int, seed: int,
                  epoch: int) -> list[np.ndarray]:
    """One epoch of global batches of patient indices (a seeded permutation cut in batch_size).

    A short last batch is cut to a multiple of `world_size` (every process gets the same number
    of pairs, as gathering features needs) and dropped when it has no negative left.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_patients)
    batches = []
    for start in range(0, n_patients, batch_size):
        batch = order[start:start + batch_size]
        batch = batch[:len(batch) - len(batch) % world_size]
        if len(batch) >= max(2, world_size):
            batches.append(batch)
    return batches


def local_part(batch: np.ndarray, *, rank: int, world_size: int) -> np.ndarray:
    """This process's contiguous slice of a global batch (rank order = gathered order)."""
    return batch.reshape(world_size, -1)[rank]


def augmentation(*, modality: str, intensity: float, shift: float = 0.0,
                 size: int = 0) -> Compose | None:
    """MONAI transforms of one (C, H, W) image: flips and small intensity (WSI: colour) jitter.

    MRI slices are flipped left-right only (anatomy keeps its up-down orientation); WSI tiles
    are flipped both ways and rotated by multiples of 90 degrees. The jitter scales and shifts
    intensities by up to `intensity` (per channel for WSI). With `shift` > 0, images of `size`
    pixels are also moved by up to shift * size and turned by up to 0.15 rad. None when
    `intensity` < 0.
    """
    if intensity < 0:
        return None
    transforms = [RandFlip(prob=0.5, spatial_axis=1)]
    if shift > 0:  # a small rotation and shift (zero-padded): where things sit is no identity
        transforms.append(RandAffine(prob=1.0, rotate_range=(0.15,),
                                     translate_range=(shift * size, shift * size),
                                     padding_mode="zeros"))
    wsi = modality == "wsi"
    if wsi:
        transforms += [RandFlip(prob=0.5, spatial_axis=0), RandRotate90(prob=0.5)]
    if intensity > 0:
        transforms += [RandScaleIntensity(factors=intensity, prob=1.0, channel_wise=wsi),
                       RandShiftIntensity(offsets=intensity, prob=1.0, channel_wise=wsi)]
    return Compose(transforms)


class PatientPairs(Dataset):
    """Pairs keyed by (epoch, patient index): one seeded image of the patient and its genes."""

    def __init__(self, data: CohortData, items: np.ndarray, *, seed: int,
                 augment: Compose | None = None, gene_dropout: float = 0.0) -> None:
        self.data = data
        self.seed = seed
        self.augment = augment
        if augment is not None:
            augment.set_random_state(seed=0)  # each transform its own random state, to reseed
        self.gene_dropout = gene_dropout
        by_patient: dict[str, list[int]] = {}
        for item in items:
            by_patient.setdefault(data.item_case[item], []).append(int(item))
        if len(by_patient) < 2:
            raise TrainingError(
                f"contrastive pre-training needs at least 2 patients with images, got "
                f"{len(by_patient)}"
            )
        self.patients = sorted(by_patient)
        self.items = [np.array(by_patient[p]) for p in self.patients]

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image (C, H, W), token ids (L,), values (L,)) of patient `key[1]` in epoch `key[0]`."""
        epoch, patient = key
        draw, aug_seed, gene_seed = np.random.SeedSequence(
            [self.seed, epoch, patient]).generate_state(3)
        item = self.items[patient][int(draw) % len(self.items[patient])]
        image = torch.from_numpy(self.data.images[item])
        if self.augment is not None:
            reseed(self.augment, int(aug_seed))
            tracking = get_track_meta()
            set_track_meta(False)  # plain tensors: no metadata (affines) to record per call
            try:
                image = self.augment(image)
            finally:
                set_track_meta(tracking)
            if isinstance(image, MetaTensor):
                image = image.as_tensor()
        row = self.data.case_row[self.patients[patient]]
        tokens = self.data.sequences.token_ids[row].astype(np.int64)
        values = self.data.sequences.values[row].astype(np.float32)
        if self.gene_dropout > 0:
            tokens, values = drop_genes(tokens, values, rate=self.gene_dropout,
                                        rng=np.random.default_rng(int(gene_seed)))
        return image.float().contiguous(), torch.from_numpy(tokens), torch.from_numpy(values)


def reseed(transform: Randomizable, seed: int) -> None:
    """Seed `transform` (a Compose: each random transform in it) as its
    `set_random_state(seed=seed)` does, by reseeding the random states it holds.

    MONAI's `set_random_state` makes a new `np.random.RandomState` for the Compose and for each
    transform, for every item: about 0.4 ms each, 0.1 s of a demo pre-training step. Reseeding
    gives the very same streams (tests/train/test_pairs.py compares the two).
    """
    own = type(transform).set_random_state
    if own is not Randomizable.set_random_state and own is not Compose.set_random_state:
        transform.set_random_state(seed=seed)  # seeds more than its own state (RandAffine)
        return
    transform.R.seed(seed % MAX_SEED)
    if isinstance(transform, Compose):
        for inner in transform.transforms:
            if isinstance(inner, Randomizable):
                reseed(inner, int(transform.R.randint(MAX_SEED, dtype="uint32")))


def drop_genes(tokens: np.ndarray, values: np.ndarray, *, rate: float,
               rng: np.random.Generator, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leave out each real gene token with probability `rate`, keeping the order of the rest.

    The kept tokens close up and PADs fill the end, as the Mamba encoder needs; at least one
    real token always stays. No single gene can then serve as a patient's fingerprint.
    """
    real = tokens != pad_id
    keep = real & (rng.random(len(tokens)) >= rate)
    if not keep.any() and real.any():
        keep[np.flatnonzero(real)[0]] = True
    order = np.concatenate([np.flatnonzero(keep), np.flatnonzero(~keep)])
    out_tokens, out_values = tokens[order].copy(), values[order].copy()
    out_tokens[keep.sum():] = pad_id
    out_values[keep.sum():] = 0
    return out_tokens, out_values
