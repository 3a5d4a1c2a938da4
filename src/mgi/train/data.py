"""Training data: image items from the image banks, paired with each patient's gene sequence.

Pixels stay in the HDF5 banks (a TCGA slide cohort does not fit in memory) and are read item by
item on demand, in whichever process asks (DataLoader workers open their own file handles).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from mgi.errors import TrainingError
from mgi.expression.tokens import GeneSequences, read_sequences
from mgi.imaging.bank import BankHeader, read_bank_header
from mgi.io import read_tsv


class BankArray:
    """The items of several banks as one read-on-demand array: model-ready images or 0/1 masks.

    Index it with an int (one item) or a 1-D integer array (stacked items, in that order), as a
    NumPy array. Banks without masks read as all-zero masks.
    """

    def __init__(self, headers: list[BankHeader], *, field: str) -> None:
        if field not in ("images", "masks"):
            raise ValueError(f"field must be 'images' or 'masks', got {field!r}")
        self.headers = headers
        self.field = field
        self.offsets = np.cumsum([0] + [h.n_items for h in headers])
        channels, height, width = headers[0].item_shape
        self.item_shape = (channels, height, width) if field == "images" else (height, width)
        self._handles: dict[Path, h5py.File] = {}
        self._pid = os.getpid()
        self._in_memory: list[np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of every item as served (float32 images, uint8 masks)."""
        per_item = int(np.prod(self.item_shape)) * (4 if self.field == "images" else 1)
        return len(self) * per_item

    @property
    def in_memory(self) -> bool:
        """Whether items are served from memory (`load_into_memory`) rather than the files."""
        return self._in_memory is not None

    def load_into_memory(self, *, max_bytes: int) -> bool:
        """Read every bank once and serve items from memory, when they fit in `max_bytes`.

        A small cohort (the demo's banks hold 9 MB) is then not read from HDF5 item by item at
        every step; a TCGA slide cohort stays on disk. True when loaded.
        """
        if self.nbytes > max_bytes:
            return False
        self._in_memory = [self._read(bank, np.arange(header.n_items))
                           for bank, header in enumerate(self.headers)]
        return True

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, C, H, W) for images, (N, H, W) for masks."""
        return (int(self.offsets[-1]), *self.item_shape)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _file(self, header: BankHeader) -> h5py.File:
        if self._pid != os.getpid():  # a forked worker: never share the parent's HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        if header.path not in self._handles:
            self._handles[header.path] = h5py.File(header.path, "r")
        return self._handles[header.path]

    def _read(self, bank: int, rows: np.ndarray) -> np.ndarray:
        if self.in_memory:
            return self._in_memory[bank][rows]
        header = self.headers[bank]
        if self.field == "masks":
            if not header.has_masks:
                return np.zeros((len(rows), *self.item_shape), np.uint8)
            return self._file(header)["masks"][rows].astype(np.uint8)
        return to_model_input(self._file(header)["images"][rows])

    def __getitem__(self, index) -> np.ndarray:
        if self._in_memory is not None and isinstance(index, (int, np.integer)):
            # one item from memory, as pre-training asks for it at every step: a copy, as below
            if not 0 <= index < len(self):
                raise IndexError(f"item index out of range [0, {len(self)})")
            bank = int(np.searchsorted(self.offsets, index, side="right")) - 1
            return self._in_memory[bank][index - self.offsets[bank]].copy()
        single = np.ndim(index) == 0
        items = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if items.size and (items.min() < 0 or items.max() >= len(self)):
            raise IndexError(f"item index out of range [0, {len(self)})")
        out = np.empty((len(items), *self.item_shape),
                       np.float32 if self.field == "images" else np.uint8)
        banks = np.searchsorted(self.offsets, items, side="right") - 1
        for bank in np.unique(banks):
            chosen = np.flatnonzero(banks == bank)
            rows = items[chosen] - self.offsets[bank]
            unique, inverse = np.unique(rows, return_inverse=True)  # h5py wants sorted rows
            out[chosen] = self._read(int(bank), unique)[inverse]
        return out[0] if single else out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

log = logging.getLogger(__name__)

# Cohorts whose model-ready pixels fit in this are held in memory (see load_cohort)
IN_MEMORY_BYTES = 1 << 30


@dataclass
class CohortData:
    """Image items of the paired patients, each with its patient's gene sequence row."""

    images: BankArray  # (N, C, H, W) float32, model-ready, read on demand
    masks: BankArray | None  # (N, H, W) uint8 0/1, or None where no bank has masks
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


def load_cohort(*, sequences_path: Path, splits_path: Path, qc_path: Path,
                in_memory_bytes: int = IN_MEMORY_BYTES) -> CohortData:
    """Every usable bank item of the paired patients, with split and gene rows.

    Banks sit beside the QC table (`images/{image_id}.h5`); failed images are skipped (their
    reason is in the QC table). Pixels and masks are read on demand, or held in memory when
    each fits in `in_memory_bytes`.
    """
    sequences = read_sequences(sequences_path)
    splits = read_tsv(splits_path, required=["case_id", "split"])
    split_of = dict(zip(splits["case_id"], splits["split"], strict=True))
    case_row = {case: i for i, case in enumerate(sequences.case_ids)}
    qc = read_tsv(qc_path, required=["image_id", "case_id", "status"])
    headers: list[BankHeader] = []
    cases, item_splits, coords, image_ids, indices, labelled = [], [], [], [], [], []
    for row in qc.itertuples():
        split = split_of.get(row.case_id)
        if row.status != "ok" or split not in ("train", "val", "test"):
            continue
        if row.case_id not in case_row:
            raise TrainingError(f"{sequences_path}: no gene sequence for case {row.case_id}")
        header = read_bank_header(qc_path.parent / f"{row.image_id}.h5")
        if headers and header.item_shape != headers[0].item_shape:
            raise TrainingError(
                f"{header.path}: items of shape {header.item_shape}, but "
                f"{headers[0].path} has {headers[0].item_shape}; one cohort needs one item shape"
            )
        headers.append(header)
        n = header.n_items
        labelled += [header.has_masks] * n
        cases += [row.case_id] * n
        image_ids += [row.image_id] * n
        indices.append(np.arange(n))
        item_splits += [split] * n
        coords.append(np.asarray(header.coords)[:, 0] if n else np.zeros(0))
    if not headers:
        raise TrainingError(f"{qc_path}: no usable image of a paired patient")
    images = BankArray(headers, field="images")
    masks = BankArray(headers, field="masks") if any(h.has_masks for h in headers) else None
    for array in (images, masks):
        if array is not None:
            array.load_into_memory(max_bytes=in_memory_bytes)
    log.info("%d items of %d patients in %d banks (%s)", len(cases), len(set(cases)),
             len(headers), "held in memory" if images.in_memory else "read on demand")
    return CohortData(
        images=images,
        masks=masks,
        item_case=np.array(cases, dtype=object),
        item_split=np.array(item_splits, dtype=object),
        item_coord=np.concatenate(coords),
        item_image=np.array(image_ids, dtype=object),
        item_index=np.concatenate(indices),
        sequences=sequences,
        case_row=case_row,
        item_labelled=np.array(labelled, dtype=bool),
    )

