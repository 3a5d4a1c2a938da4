"""Evaluate one fine-tuned variant on the held-out test patients.

Besides the metric tables and test_predictions.h5 (probabilities of every test item), each test
patient's predicted masks are written where a user can open them (`predictions/`):

- MRI: `{case_id}.nii.gz`, a uint8 0/1 volume; voxel [i, j, k] is row i, column j of the
  patient's k-th slice in slice order (the order of the 3D metrics), with the voxel spacing in mm
  (row, column, slice gap) in the header where the image bank records it;
- slides: `{case_id}/{image_id}_x{x}_y{y}.png`, a 1-bit mask per tile at level-0 (x, y).

`status.json` says whether the variant trained: {"variant", "status": "ok", "best_epoch",
"val_dice"}, or {"variant", "status": "failed", "stage": "finetune", "error"} for a model.pt that
fine-tuning recorded as failed, whose tables then hold a header only and whose predictions are
empty.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from mgi.checkpoint import Finetuned, load_finetuned
from mgi.imaging.bank import BankHeader
from mgi.io import atomic_dir, atomic_path, write_tsv
from mgi.models.metrics import slice_metrics, volume_metrics
from mgi.options import EvaluateSettings
from mgi.train.build import pick_device, seed_everything
from mgi.train.data import CohortData, load_cohort
from mgi.train.finetune import build_variant, predict
from mgi.variants import variant_spec

log = logging.getLogger(__name__)

PATIENT_COLUMNS = ["case_id", "variant", "n_slices", "truth_pixels", "pred_pixels", "dice", "iou",
                   "hd95"]
SLICE_COLUMNS = ["case_id", "coord", "truth_pixels", "pred_pixels", "dice", "iou", "hd95",
                 "variant"]


def evaluate_variant(
    *,
    model_path: Path,
    sequences_path: Path,
    splits_path: Path,
    qc_path: Path,
    settings: EvaluateSettings,
    patients_path: Path,
    slices_path: Path,
    predictions_path: Path,
    predictions_dir: Path | None = None,
    status_path: Path | None = None,
    threads: int = 1,
) -> pd.DataFrame:
    """Per-slice and per-patient Dice/IoU/HD95 on the test split (the per-patient table comes
    back); probabilities in HDF5, masks per patient in `predictions_dir`, and `status_path`.

    `predictions_dir` and `status_path` default to predictions/ and status.json beside
    `patients_path`.
    """
    predictions_dir = predictions_dir or patients_path.parent / "predictions"
    status_path = status_path or patients_path.parent / "status.json"
    checkpoint = load_finetuned(model_path)
    variant = checkpoint.variant
    threshold = settings.evaluate.threshold
    if checkpoint.failed:
        log.warning("%s: fine-tuning failed (%s); writing empty results", variant,
                    checkpoint.error)
        return _write_failed(variant, checkpoint.error, threshold=threshold,
                             patients_path=patients_path, slices_path=slices_path,
                             predictions_path=predictions_path, predictions_dir=predictions_dir,
                             status_path=status_path)

    seed_everything(0, threads=threads)
    data = load_cohort(sequences_path=sequences_path, splits_path=splits_path, qc_path=qc_path)
    items = data.items("test", labelled=True)
    probs = predict_items(checkpoint, data, items)
    pred = probs >= threshold
    truth = data.masks[items].astype(bool)
    per_slice = slice_metrics(pred, truth)
    slices = pd.DataFrame({
        "case_id": data.item_case[items],
        "coord": data.item_coord[items],
        "truth_pixels": truth.reshape(len(items), -1).sum(1),
        "pred_pixels": pred.reshape(len(items), -1).sum(1),
        **per_slice,
    }).assign(variant=variant)
    patients = []
    for case in sorted(set(data.item_case[items])):
        sel = data.item_case[items] == case
        order = np.argsort(data.item_coord[items][sel], kind="stable")
        volume = volume_metrics(pred[sel][order], truth[sel][order])
        patients.append({"case_id": case, "variant": variant, "n_slices": int(sel.sum()),
                         "truth_pixels": int(truth[sel].sum()),
                         "pred_pixels": int(pred[sel].sum()), **volume})
    patients = pd.DataFrame(patients, columns=PATIENT_COLUMNS)
    write_tsv(slices[SLICE_COLUMNS], slices_path)
    write_tsv(patients, patients_path)
    with atomic_path(predictions_path, suffix=".h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("probabilities", data=(probs * 255).round().astype(np.uint8),
                          compression="lzf")
        h5.create_dataset("case_id", data=data.item_case[items].astype("S"))
        h5.create_dataset("coord", data=data.item_coord[items])
        h5.create_dataset("image_id", data=data.item_image[items].astype("S"))
        h5.create_dataset("index", data=data.item_index[items])
        h5.attrs["variant"] = variant
        h5.attrs["threshold"] = threshold
    write_patient_masks(data, items, pred, out_dir=predictions_dir, variant=variant)
    _write_status(status_path, {"variant": variant, "status": "ok",
                                "best_epoch": checkpoint.best_epoch,
                                "val_dice": _finite(checkpoint.val_dice)})
    log.info("%s: test patient Dice %.4f over %d patients", variant,
             patients["dice"].mean(), len(patients))
    return patients


def predict_items(checkpoint: Finetuned, data: CohortData, items: np.ndarray) -> np.ndarray:
    """Tumour probabilities (N, H, W) of `items` by the fine-tuned network of `checkpoint`:
    what evaluate scores and `mgi predict` writes for new patients."""
    assert checkpoint.settings is not None and not checkpoint.failed
    model = build_variant(checkpoint.variant, checkpoint.settings,
                          vocab_size=checkpoint.vocab_size,
                          seq_len=data.sequences.token_ids.shape[1],
                          in_chans=checkpoint.in_chans)
    model.load_state_dict(checkpoint.state_dict)
    device = pick_device(checkpoint.settings.finetune.device)
    model.to(device)
    return predict(model, data, items, with_genes=variant_spec(checkpoint.variant).genes,
                   device=device)


def write_patient_masks(data: CohortData, items: np.ndarray, pred: np.ndarray, *, out_dir: Path,
                        variant: str) -> Path:
    """Each patient's predicted masks (pred: (N, H, W) bool, one per item) into `out_dir`,
    replacing it: a NIfTI volume per MR patient, a PNG per slide tile."""
    headers = {header.path.stem: header for header in data.images.headers}
    with atomic_dir(out_dir) as tmp:
        for case in sorted(set(data.item_case[items])):
            sel = np.flatnonzero(data.item_case[items] == case)
            sel = sel[np.argsort(data.item_coord[items][sel], kind="stable")]
            first = headers[data.item_image[items][sel[0]]]
            if first.attrs.get("modality") == "wsi":
                _write_tiles(tmp / case, data, items[sel], pred[sel], headers)
            else:
                _write_volume(tmp / f"{case}.nii.gz", pred[sel], first, variant=variant)
    return out_dir


def _write_volume(path: Path, masks: np.ndarray, header: BankHeader, *, variant: str) -> None:
    """One patient's slices (Z, H, W) as a NIfTI volume (H, W, Z), spacing from the bank."""
    import nibabel as nib

    volume = np.ascontiguousarray(masks.transpose(1, 2, 0), dtype=np.uint8)
    spacing = voxel_spacing(header.attrs)
    image = nib.Nifti1Image(volume, np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0]))
    image.header.set_data_dtype(np.uint8)
    if spacing:
        image.header.set_xyzt_units(xyz="mm")
    image.header["descrip"] = f"mgi evaluate: {variant} tumour mask"[:79].encode()
    nib.save(image, path)


def voxel_spacing(attrs: dict) -> tuple[float, float, float] | None:
    """(row, column, slice gap) in mm of a bank's model-resolution slices, or None if unknown."""
    pixel, series = attrs.get("pixel_spacing"), attrs.get("spacing")
    try:
        values = (float(pixel[0]), float(pixel[1]), float(series[0]))
    except (TypeError, IndexError, ValueError):
        return None
    return values if all(math.isfinite(v) and v > 0 for v in values) else None


def _write_tiles(folder: Path, data: CohortData, items: np.ndarray, masks: np.ndarray,
                 headers: dict[str, BankHeader]) -> None:
    """One patient's tile masks as 1-bit PNGs named by image and level-0 (x, y)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for item, mask in zip(items, masks, strict=True):
        image_id = data.item_image[item]
        x, y = (round(float(v)) for v in headers[image_id].coords[data.item_index[item]][:2])
        Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(
            folder / f"{image_id}_x{x}_y{y}.png", optimize=True)


def _write_failed(variant: str, error: str, *, threshold: float, patients_path: Path,
                  slices_path: Path, predictions_path: Path, predictions_dir: Path,
                  status_path: Path) -> pd.DataFrame:
    """Header-only tables, empty predictions and a failed status for a variant that did not
    train."""
    patients = pd.DataFrame(columns=PATIENT_COLUMNS)
    write_tsv(pd.DataFrame(columns=SLICE_COLUMNS), slices_path)
    write_tsv(patients, patients_path)
    with atomic_path(predictions_path, suffix=".h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("probabilities", data=np.zeros((0, 0, 0), np.uint8))
        for name, dtype in (("case_id", "S1"), ("coord", np.float64), ("image_id", "S1"),
                            ("index", np.int64)):
            h5.create_dataset(name, data=np.zeros(0, dtype))
        h5.attrs["variant"] = variant
        h5.attrs["threshold"] = threshold
        h5.attrs["failed"] = True
        h5.attrs["error"] = error
    with atomic_dir(predictions_dir):
        pass
    _write_status(status_path, {"variant": variant, "status": "failed", "stage": "finetune",
                                "error": error})
    return patients


def _finite(value: float) -> float | None:
    """A float for JSON, None where it is NaN or infinite."""
    value = float(value)
    return value if math.isfinite(value) else None


def _write_status(path: Path, status: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(status, indent=2) + "\n")
