"""Patient-level k-fold cross-validation: every paired patient tested in exactly one fold.

`splits.folds: k` (k >= 2) deals the patients with both modalities into k folds (stratified by a
clinical column where `splits.stratify` names one); fold f tests its own patients, draws its
validation patients from the others and trains on the rest. Each fold's assignment is written as
a splits table of the same form as splits.tsv (case_id, split), so every downstream stage runs on
a fold exactly as it runs on the fixed split. With `folds: 1` the one "fold" is the fixed split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedKFold

from mgi.errors import TrainingError
from mgi.io import read_tsv
from mgi.train.splits import SPLITS, with_unpaired

log = logging.getLogger(__name__)

FOLDS_COLUMNS = ["case_id", "fold", "stratum"]
UNKNOWN = "unknown"  # stratum of a patient whose clinical value is empty or missing
RARE = "rare"  # strata with fewer patients than folds, pooled so that every fold can get some


def read_strata(clinical_path: Path, column: str, cases: list[str]) -> pd.Series:
    """The clinical column `column` for `cases` (empty or absent values as 'unknown')."""
    clinical = read_tsv(clinical_path, required=["case_id"])
    if column not in clinical.columns:
        raise TrainingError(
            f"{clinical_path}: splits.stratify names column {column!r}, which it lacks; "
            f"expected one of {[c for c in clinical.columns if c != 'case_id']}"
        )
    values = clinical.drop_duplicates("case_id").set_index("case_id")[column]
    strata = values.reindex(cases).fillna("").astype(str).str.strip()
    return strata.mask(strata == "", UNKNOWN)


def assign_folds(cases: list[str], *, folds: int, seed: int,
                 strata: pd.Series | None = None) -> pd.DataFrame:
    """case_id, fold (0..folds-1), stratum: `folds` near-equal folds, shuffled with `seed`.

    With `strata` (indexed by case_id), scikit-learn's StratifiedKFold keeps each stratum's
    share about equal across folds; strata with fewer patients than folds are pooled first.
    """
    if folds < 2:
        raise TrainingError(f"splits.folds: {folds}; k-fold assignment needs at least 2 folds")
    if len(cases) < folds:
        raise TrainingError(f"splits.folds: {folds} folds for {len(cases)} paired patients; "
                            "expected at most one fold per patient")
    cases = sorted(cases)
    labels = np.array([""] * len(cases), dtype=object)
    if strata is not None:
        labels = strata.reindex(cases).fillna(UNKNOWN).to_numpy(dtype=object)
        counts = pd.Series(labels).value_counts()
        rare = set(counts[counts < folds].index)
        if rare:
            # a pool still smaller than the folds joins the largest stratum
            enough = counts[list(rare)].sum() >= folds or len(rare) == len(counts)
            pool = RARE if enough else counts.drop(list(rare)).index[0]
            log.warning("strata with fewer than %d patients pooled into %r: %s", folds, pool,
                        sorted(rare))
            labels = np.array([pool if label in rare else label for label in labels],
                              dtype=object)
    fold = np.empty(len(cases), dtype=int)
    counts = pd.Series(labels).value_counts()
    if strata is not None and len(counts) > 1 and counts.min() >= folds:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(cases)), labels)
    else:
        if strata is not None:
            log.warning("splits.stratify: one stratum only (%s); folds drawn without strata",
                        counts.index[0])
        parts = KFold(n_splits=folds, shuffle=True, random_state=seed).split(cases)
    for k, (_, test) in enumerate(parts):
        fold[test] = k
    return pd.DataFrame({"case_id": cases, "fold": fold.astype(str), "stratum": labels})


def fold_split(assignment: pd.DataFrame, fold: int, *, val_fraction: float,
               seed: int) -> pd.DataFrame:
    """case_id, split of one fold: its own patients test, `val_fraction` of all paired patients
    (at least one, drawn with `seed` and the fold from the other folds) val, the rest train."""
    paired = assignment[assignment["fold"] != "unpaired"]
    in_fold = (paired["fold"] == str(fold)).to_numpy()
    others = np.flatnonzero(~in_fold)
    n_val = max(1, round(len(paired) * val_fraction))
    if len(others) - n_val < 1:
        raise TrainingError(f"fold {fold}: {len(others)} patients outside the fold are too few "
                            f"for {n_val} validation patient(s) and at least one to train on")
    rng = np.random.default_rng([seed, fold])
    split = np.array(["train"] * len(paired), dtype=object)
    split[in_fold] = "test"
    split[rng.choice(others, size=n_val, replace=False)] = "val"
    return pd.DataFrame({"case_id": paired["case_id"].to_numpy(), "split": split})


def make_folds(*, paired: list[str], unpaired: list[str], folds: int, val_fraction: float,
               seed: int, strata: pd.Series | None = None,
               fixed_split: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """The fold assignment (FOLDS_COLUMNS; unpaired patients with fold 'unpaired') and each
    fold's splits table (unpaired patients listed as in splits.tsv).

    `folds: 1` takes `fixed_split` (splits.tsv) as the one fold: its test patients have fold 0
    and the others none ('').
    """
    if folds == 1:
        if fixed_split is None:
            raise TrainingError("splits.folds: 1 uses the fixed split; none was given")
        tested = fixed_split["split"] == "test"
        assignment = pd.DataFrame({
            "case_id": fixed_split["case_id"],
            "fold": np.where(tested, "0", np.where(fixed_split["split"] == "unpaired",
                                                   "unpaired", "")),
            "stratum": ""})
        return assignment, [fixed_split.reset_index(drop=True)]
    assignment = assign_folds(paired, folds=folds, seed=seed, strata=strata)
    splits = [with_unpaired(fold_split(assignment, k, val_fraction=val_fraction, seed=seed),
                            unpaired) for k in range(folds)]
    if unpaired:
        assignment = pd.concat([assignment, pd.DataFrame(
            {"case_id": unpaired, "fold": "unpaired", "stratum": ""})], ignore_index=True)
    assignment = assignment.sort_values("case_id", kind="stable").reset_index(drop=True)
    _log_folds(assignment, splits)
    return assignment, splits


def _log_folds(assignment: pd.DataFrame, splits: list[pd.DataFrame]) -> None:
    for k, table in enumerate(splits):
        counts = table["split"].value_counts()
        strata = assignment[assignment["fold"] == str(k)]["stratum"].value_counts().to_dict()
        log.info("fold %d: %s; test strata %s", k,
                 {s: int(counts.get(s, 0)) for s in SPLITS}, strata)
