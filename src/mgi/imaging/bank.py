"""Image bank: one HDF5 file per image holding its items (slices or tiles), masks, coords, attrs.

Layout (h5py):

- ``images``  (N, C, H, W): float16 for MRI slices, uint8 for WSI tiles
- ``masks``   (N, H, W) uint8 0/1, optional
- ``coords``  (N, k) float64: MRI (slice z position, InstanceNumber); WSI (level-0 x, y)
- attrs: ``image_id``, ``case_id``, ``modality``, ``status`` ("ok" | "failed"), ``reason``,
  plus stage-specific attrs (spacing, mpp, level, sequences as a JSON string, ...).

Datasets are chunked one item per chunk with lzf compression, so a training loader reading random
items decompresses only what it uses. A failed bank holds empty datasets and status "failed".
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mgi.errors import BankError
from mgi.io import atomic_path

REQUIRED_ATTRS = ("image_id", "case_id", "modality", "status", "reason")
REQUIRED_DATASETS = ("images", "coords")
MODALITIES = ("mri", "wsi")
STATUSES = ("ok", "failed")
# dtype of the `images` dataset per modality (also used for the empty arrays of a failed bank)
IMAGE_DTYPES = {"mri": np.float16, "wsi": np.uint8}
COORD_COLUMNS = {"mri": 2, "wsi": 2}


@dataclass
class Bank:
    """Everything one image bank holds, loaded in memory."""

    images: np.ndarray
    masks: np.ndarray | None
    coords: np.ndarray
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def ok(self) -> bool:
        """True when the bank was built successfully."""
        return self.attrs.get("status") == "ok"


def _attr_value(key: str, value: Any) -> Any:
    """Turn an attr into something HDF5 stores: dicts and string lists become JSON strings."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in value) and value:
            return np.asarray(value, dtype=np.float64)
        return json.dumps(list(value))
    if isinstance(value, (str, bool, int, float, np.integer, np.floating, np.ndarray)):
        return value
    raise BankError(f"attr {key!r}: cannot store a {type(value).__name__} in an image bank")


def _python_value(value: Any) -> Any:
    """Turn an attr read by h5py back into a plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _create(handle: h5py.File, name: str, data: np.ndarray) -> None:
    """Write one dataset chunked one item per chunk, lzf-compressed (plain when empty)."""
    if data.size == 0:
        handle.create_dataset(name, data=data)
        return
    handle.create_dataset(
        name, data=data, chunks=(1, *data.shape[1:]), compression="lzf", shuffle=False
    )


def _checked_attrs(path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """`attrs` with status/reason defaults, or BankError naming what is missing or wrong."""
    attrs = {"status": "ok", "reason": "", **attrs}
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise BankError(f"{path}: attrs missing {missing}")
    if attrs["modality"] not in MODALITIES:
        raise BankError(f"{path}: attr modality must be one of {MODALITIES}, "
                        f"got {attrs['modality']!r}")
    if attrs["status"] not in STATUSES:
        raise BankError(f"{path}: attr status must be one of {STATUSES}, got {attrs['status']!r}")
    return attrs


def write_bank(
    path: str | os.PathLike[str],
    *,
    images: np.ndarray,
    masks: np.ndarray | None = None,
    coords: np.ndarray,
    attrs: dict[str, Any],
) -> Path:
    """Write an image bank held in memory, atomically; return its path (see bank_writer)."""
    path = Path(path)
    images = np.asarray(images)
    if images.ndim != 4:
        raise BankError(f"{path}: images must be (N, C, H, W), got shape {images.shape}")
    if masks is not None:
        masks = np.asarray(masks)
        expected = (images.shape[0], *images.shape[2:])
        if masks.shape != expected:
            raise BankError(f"{path}: masks must have shape {expected}, got {masks.shape}")
        masks = masks.astype(np.uint8)
    attrs = _checked_attrs(path, attrs)
    with bank_writer(path, n_items=images.shape[0], item_shape=images.shape[1:],
                     modality=attrs["modality"], coords=coords, with_masks=masks is not None,
                     dtype=images.dtype) as bank:
        bank.write(0, images=images, masks=masks)
        bank.attrs = attrs
    return path


class BankWriter:
    """Fill an image bank a batch at a time (see `bank_writer`), so a slide never sits in memory."""

    def __init__(self, handle: h5py.File, path: Path, n_items: int) -> None:
        self._handle, self._path, self.n_items = handle, path, n_items
        self.attrs: dict[str, Any] = {}
        self.written = np.zeros(n_items, dtype=bool)

    def write(self, start: int, *, images: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Store items start .. start + len(images) (and their masks)."""
        stop = start + len(images)
        if start < 0 or stop > self.n_items:
            raise BankError(f"{self._path}: items {start}..{stop} outside 0..{self.n_items}")
        self._handle["images"][start:stop] = images
        if masks is not None:
            if "masks" not in self._handle:
                raise BankError(f"{self._path}: masks given, but the bank was opened without")
            if masks.size and masks.max() > 1:
                raise BankError(f"{self._path}: masks must hold 0/1, found max {masks.max()}")
            self._handle["masks"][start:stop] = masks
        self.written[start:stop] = True


@contextlib.contextmanager
def bank_writer(
    path: str | os.PathLike[str],
    *,
    n_items: int,
    item_shape: tuple[int, int, int],
    modality: str,
    coords: np.ndarray,
    with_masks: bool = False,
    dtype: np.dtype | type | None = None,
) -> Iterator[BankWriter]:
    """Yield a writer of an `n_items` bank; the file appears at `path` only if all went well.

    Images are stored as `dtype` (default: the modality's, IMAGE_DTYPES). Set `writer.attrs`
    (image_id, case_id, ...; REQUIRED_ATTRS) before the block ends; every item must have been
    written.
    """
    path = Path(path)
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[0] != n_items:
        raise BankError(f"{path}: coords must be (N={n_items}, k), got shape {coords.shape}")
    if modality not in MODALITIES:
        raise BankError(f"{path}: modality must be one of {MODALITIES}, got {modality!r}")
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
        shape = (n_items, *item_shape)
        chunked = {"chunks": (1, *item_shape), "compression": "lzf"} if n_items else {}
        handle.create_dataset("images", shape=shape, dtype=dtype or IMAGE_DTYPES[modality],
                              **chunked)
        if with_masks:
            mask_chunks = {"chunks": (1, *item_shape[1:]), "compression": "lzf"} if n_items else {}
            handle.create_dataset("masks", shape=(n_items, *item_shape[1:]), dtype=np.uint8,
                                  **mask_chunks)
        _create(handle, "coords", coords)
        writer = BankWriter(handle, path, n_items)
        yield writer
        if not writer.written.all():
            raise BankError(f"{path}: {int((~writer.written).sum())} item(s) never written")
        attrs = _checked_attrs(path, {"modality": modality, **writer.attrs})
        for key, value in attrs.items():
            handle.attrs[key] = _attr_value(key, value)
        handle.attrs["n_items"] = n_items


def write_failed_bank(
    path: str | os.PathLike[str], *, image_id: str, case_id: str, modality: str, reason: str
) -> Path:
    """Write an empty bank with status "failed" and the reason; return its path."""
    if modality not in IMAGE_DTYPES:
        raise BankError(f"{path}: modality must be one of {MODALITIES}, got {modality!r}")
    return write_bank(
        path,
        images=np.zeros((0, 0, 0, 0), dtype=IMAGE_DTYPES[modality]),
        coords=np.zeros((0, COORD_COLUMNS[modality]), dtype=np.float64),
        attrs={"image_id": image_id, "case_id": case_id, "modality": modality,
               "status": "failed", "reason": reason},
    )


def _open(path: Path) -> h5py.File:
    """Open a bank for reading; BankError naming the file when it is absent or not HDF5."""
    if not path.is_file():
        raise BankError(f"{path}: image bank not found")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise BankError(f"{path}: not a readable HDF5 image bank ({err})") from err


def _read_attrs(path: Path, handle: h5py.File) -> dict[str, Any]:
    attrs = {key: _python_value(value) for key, value in handle.attrs.items()}
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise BankError(f"{path}: image bank attrs missing {missing}; found {sorted(attrs)}")
    return attrs


def bank_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the attrs of an image bank without reading its pixels."""
    path = Path(path)
    with _open(path) as handle:
        return _read_attrs(path, handle)


@dataclass
class BankHeader:
    """What an image bank holds, without its pixels: item shape and dtype, masks, coords, attrs."""

    path: Path
    n_items: int
    item_shape: tuple[int, int, int]  # (C, H, W)
    dtype: np.dtype
    has_masks: bool
    coords: np.ndarray
    attrs: dict[str, Any]


def _checked_header(path: Path, handle: h5py.File) -> BankHeader:
    """The bank's header, after checking its datasets and their shapes agree."""
    attrs = _read_attrs(path, handle)
    missing = [name for name in REQUIRED_DATASETS if name not in handle]
    if missing:
        raise BankError(f"{path}: image bank missing dataset(s) {missing}; "
                        f"found {sorted(handle.keys())}")
    images, coords = handle["images"], handle["coords"][()]
    if images.ndim != 4 or coords.ndim != 2 or coords.shape[0] != images.shape[0]:
        raise BankError(f"{path}: inconsistent shapes, images {images.shape}, "
                        f"coords {coords.shape}; expected (N, C, H, W) and (N, k)")
    has_masks = "masks" in handle
    if has_masks and handle["masks"].shape != (images.shape[0], *images.shape[2:]):
        raise BankError(f"{path}: masks shape {handle['masks'].shape} does not match images "
                        f"{images.shape}")
    return BankHeader(path=path, n_items=int(images.shape[0]), item_shape=images.shape[1:],
                      dtype=images.dtype, has_masks=has_masks, coords=coords, attrs=attrs)


def read_bank_header(path: str | os.PathLike[str]) -> BankHeader:
    """Check a bank and return its header without reading pixels (for reading items on demand)."""
    path = Path(path)
    with _open(path) as handle:
        return _checked_header(path, handle)


def read_bank(path: str | os.PathLike[str]) -> Bank:
    """Load a whole image bank (pixels, masks, coords, attrs) into memory."""
    path = Path(path)
    with _open(path) as handle:
        header = _checked_header(path, handle)
        images = handle["images"][()]
        masks = handle["masks"][()] if header.has_masks else None
    return Bank(images=images, masks=masks, coords=header.coords, attrs=header.attrs)
