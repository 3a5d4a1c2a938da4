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
    given_path: Path | None = None,
) -> pd.DataFrame:
    """Splits of the patients that have an expression profile and at least one usable image.

    Patients are shuffled with `seed` and cut by the fractions (each split gets at least one
    patient); patients with only one modality are listed with split `unpaired` so that nobody is
    dropped silently. `given_path` (case_id, split: a local cohort's sample sheet splits), when
    it has rows, fixes every paired patient's split instead (the fractions and seed unused).
    """
    paired, unpaired = paired_patients(expression_path=expression_path, qc_path=qc_path)
    given = read_tsv(given_path, required=["case_id", "split"]) if given_path else None
    if given is not None and not given.empty:
        table = _given_splits(given, paired, given_path)
        return with_unpaired(table, unpaired)
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
    return with_unpaired(table, unpaired)


def paired_patients(*, expression_path: Path, qc_path: Path,
                    minimum: int = 3) -> tuple[list[str], list[str]]:
    """(paired, unpaired) patients, sorted: paired ones have an expression profile and at least
    one usable image; TrainingError when fewer than `minimum` are paired."""
    cases_expr = set(anndata.read_h5ad(expression_path, backed="r").obs_names)
    qc = read_tsv(qc_path, required=["image_id", "case_id", "status", "n_items"])
    usable = qc[(qc["status"] == "ok") & (qc["n_items"].astype(int) > 0)]
    paired = sorted(cases_expr & set(usable["case_id"]))
    unpaired = sorted((cases_expr | set(qc["case_id"])) - set(paired))
    if len(paired) < minimum:
        raise TrainingError(
            f"{qc_path}: only {len(paired)} patient(s) have both an expression profile and a "
            f"usable image; at least {minimum} are needed for train/val/test splits"
        )
    return paired, unpaired


def _given_splits(given: pd.DataFrame, paired: list[str], path: Path) -> pd.DataFrame:
    """The paired patients' given splits; TrainingError if one lacks it or a split is empty."""
    split_of = dict(zip(given["case_id"], given["split"], strict=True))
    unknown = sorted({s for s in split_of.values() if s not in SPLITS})
    if unknown:
        raise TrainingError(f"{path}: unknown split(s) {unknown}; expected {list(SPLITS)}")
    lacking = [c for c in paired if c not in split_of]
    if lacking:
        raise TrainingError(f"{path}: no split for patient(s) {lacking[:10]}; expected one for "
                            "every patient with both modalities")
    table = pd.DataFrame({"case_id": paired, "split": [split_of[c] for c in paired]})
    empty = [s for s in SPLITS if not (table["split"] == s).any()]
    if empty:
        raise TrainingError(f"{path}: no patient with both modalities in split(s) {empty}; "
                            "expected at least one in each of train, val, test")
    log.info("splits fixed by %s: %s", path, table["split"].value_counts().to_dict())
    return table


def with_unpaired(table: pd.DataFrame, unpaired: list[str]) -> pd.DataFrame:
    if unpaired:
        log.warning("%d patient(s) without both modalities: %s", len(unpaired), unpaired[:10])
        table = pd.concat(
            [table, pd.DataFrame({"case_id": unpaired, "split": "unpaired"})], ignore_index=True
        )
    return table.sort_values("case_id", kind="stable").reset_index(drop=True)
