"""Segmentation metrics (MONAI) per slice and per patient volume."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou


def _as_batch(masks: np.ndarray) -> torch.Tensor:
    """(N, ...) boolean masks as MONAI's (N, 1, ...) float tensor."""
    return torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]


def _metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Dice, IoU and HD95 of each item of a batch (first axis).

    An empty truth with an empty prediction scores Dice 1 and IoU 1, an empty truth with any
    predicted pixel 0 (MONAI's ignore_empty=False); HD95 is undefined (NaN) when either is empty.
    """
    p, t = _as_batch(pred), _as_batch(truth)
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)[:, 0].numpy()
    iou = compute_iou(p, t, include_background=True, ignore_empty=False)[:, 0].numpy()
    with warnings.catch_warnings():  # MONAI warns for every empty mask; NaN says it already
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95)[:, 0]
    hd95 = hd95.numpy().astype(np.float64)
    empty = (pred.reshape(len(pred), -1).sum(1) == 0) | (truth.reshape(len(truth), -1).sum(1) == 0)
    hd95[empty | ~np.isfinite(hd95)] = np.nan
    return {"dice": dice.astype(np.float64), "iou": iou.astype(np.float64), "hd95": hd95}


def slice_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice Dice, IoU and HD95 (pixels) of (N, H, W) boolean predictions and truths."""
    return _metrics(pred, truth)


def volume_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """3D Dice, IoU and HD95 (pixels) of one patient's stacked slices (Z, H, W)."""
    values = _metrics(pred[None], truth[None])
    return {key: float(v[0]) for key, v in values.items()}
