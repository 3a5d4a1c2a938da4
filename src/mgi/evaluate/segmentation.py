"""Evaluate one fine-tuned variant on the held-out test patients."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from mgi.evaluate.metrics import slice_metrics, volume_metrics
from mgi.io import atomic_path, write_tsv
from mgi.train.build import pick_device, seed_everything
from mgi.train.data import load_cohort
from mgi.train.finetune import VARIANTS, build_variant, predict

log = logging.getLogger(__name__)


def evaluate_variant(
    *,
    model_path: Path,
    sequences_path: Path,
    splits_path: Path,
    qc_path: Path,
    settings: dict,
    patients_path: Path,
    slices_path: Path,
    predictions_path: Path,
    threads: int = 1,
) -> pd.DataFrame:
    """Per-slice and per-patient Dice/IoU/HD95 on the test split; predictions kept in HDF5."""
    checkpoint = torch.load(model_path, map_location="cpu", weights_only=False)
    seed_everything(0, threads=threads)
    variant = checkpoint["variant"]
    model = build_variant(variant, checkpoint["settings"], vocab_size=checkpoint["vocab_size"],
                          in_chans=checkpoint["in_chans"])
    model.load_state_dict(checkpoint["state_dict"])
    device = pick_device(checkpoint["settings"]["finetune"]["device"])
    model.to(device)
    data = load_cohort(sequences_path=sequences_path, splits_path=splits_path, qc_path=qc_path)
    threshold = settings["evaluate"]["threshold"]
    items = data.items("test", labelled=True)
    probs = predict(model, data, items, with_genes=VARIANTS[variant][1], device=device)
    pred = probs >= threshold
    truth = data.masks[items].astype(bool)
    per_slice = slice_metrics(pred, truth)
    slices = pd.DataFrame({
        "case_id": data.item_case[items],
        "coord": data.item_coord[items],
        "truth_pixels": truth.reshape(len(items), -1).sum(1),
        "pred_pixels": pred.reshape(len(items), -1).sum(1),
        **per_slice,
    })
    patients = []
    for case in sorted(set(data.item_case[items])):
        sel = data.item_case[items] == case
        order = np.argsort(data.item_coord[items][sel], kind="stable")
        volume = volume_metrics(pred[sel][order], truth[sel][order])
        patients.append({"case_id": case, "variant": variant, "n_slices": int(sel.sum()),
                         "truth_pixels": int(truth[sel].sum()),
                         "pred_pixels": int(pred[sel].sum()), **volume})
    patients = pd.DataFrame(patients)
    write_tsv(slices.assign(variant=variant), slices_path)
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
    log.info("%s: test patient Dice %.4f over %d patients", variant,
             patients["dice"].mean(), len(patients))
    return patients
