"""Patient-level train/validation/test splits: every slice or tile of a patient in one split."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from mgi.errors import TrainingError
from mgi.io import read_tsv

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def make_splits(
    *,
    expression_path: Path,
    qc_path: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> pd.DataFrame:
    """Splits of the patients that have an expression profile and at least one usable image.

    Patients are shuffled with `seed` and cut by the fractions (each split gets at least one
    patient); patients with only one modality are listed with split `unpaired` so that nobody is
    dropped silently.
    """
    cases_expr = set(anndata.read_h5ad(expression_path, backed="r").obs_names)
    qc = read_tsv(qc_path, required=["image_id", "case_id", "status", "n_items"])
    usable = qc[(qc["status"] == "ok") & (qc["n_items"].astype(int) > 0)]
    cases_img = set(usable["case_id"])
    paired = sorted(cases_expr & cases_img)
    unpaired = sorted((cases_expr | set(qc["case_id"])) - set(paired))
    if len(paired) < 3:
        raise TrainingError(
            f"{qc_path}: only {len(paired)} patient(s) have both an expression profile and a "
            f"usable image; at least 3 are needed for train/val/test splits"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paired))
    n = len(paired)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n - n_test - n_val < 1:
        raise TrainingError(f"{n} paired patients are too few for val {val_fraction} and "
                            f"test {test_fraction}")
    split = np.array(["train"] * n, dtype=object)
    split[order[:n_test]] = "test"
    split[order[n_test:n_test + n_val]] = "val"
    table = pd.DataFrame({"case_id": paired, "split": split})
    if unpaired:
        log.warning("%d patient(s) without both modalities: %s", len(unpaired), unpaired[:10])
        table = pd.concat(
            [table, pd.DataFrame({"case_id": unpaired, "split": "unpaired"})], ignore_index=True
        )
    return table.sort_values("case_id", kind="stable").reset_index(drop=True)
