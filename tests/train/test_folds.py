"""k-fold cross-validation: every patient tested exactly once, no fold's test patient trained on,
strata kept across folds, seeded, and `folds: 1` the fixed split itself."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from mgi.cli import main
from mgi.errors import TrainingError
from mgi.train.folds import assign_folds, make_folds, read_strata

CASES = [f"TCGA-FG-{i:04d}" for i in range(40)]
# a clinical column as the GDC writes it: uneven grades, some empty, one grade on two patients
GRADES = (["G2"] * 22 + ["G3"] * 13 + [""] * 3 + ["G4"] * 2)


def _grades() -> pd.Series:
    return pd.Series(GRADES, index=CASES).replace("", "unknown")


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_every_patient_is_tested_exactly_once_and_never_trained_on_in_its_fold(folds: int):
    assignment, splits = make_folds(paired=CASES[:37], unpaired=CASES[37:], folds=folds,
                                    val_fraction=0.2, seed=0)
    tested = pd.concat([s[s["split"] == "test"] for s in splits])
    assert sorted(tested["case_id"]) == sorted(CASES[:37])  # each once, none missing
    for k, table in enumerate(splits):
        assert table["case_id"].is_unique and sorted(table["case_id"]) == sorted(CASES)
        test = set(table.loc[table["split"] == "test", "case_id"])
        fit = set(table.loc[table["split"].isin(["train", "val"]), "case_id"])
        assert test and not test & fit  # pre-training and fine-tuning see only train and val
        assert test == set(assignment.loc[assignment["fold"] == str(k), "case_id"])
        assert (table["split"] == "val").sum() == round(37 * 0.2)
        assert set(table.loc[table["split"] == "unpaired", "case_id"]) == set(CASES[37:])
    sizes = assignment["fold"].value_counts().drop("unpaired")
    assert sizes.max() - sizes.min() <= 1


def test_folds_are_seeded():
    a = make_folds(paired=CASES, unpaired=[], folds=5, val_fraction=0.2, seed=1)
    b = make_folds(paired=CASES, unpaired=[], folds=5, val_fraction=0.2, seed=1)
    c = make_folds(paired=CASES, unpaired=[], folds=5, val_fraction=0.2, seed=2)
    pd.testing.assert_frame_equal(a[0], b[0])
    assert all(x.equals(y) for x, y in zip(a[1], b[1], strict=True))
    assert not a[0]["fold"].equals(c[0]["fold"])


def test_strata_are_spread_over_folds_and_rare_ones_pooled():
    assignment = assign_folds(CASES, folds=4, seed=0, strata=_grades())
    # G4 (2 patients) and unknown (3) are fewer than 4 folds: pooled into one stratum of 5
    assert set(assignment["stratum"]) == {"G2", "G3", "rare"}
    counts = pd.crosstab(assignment["fold"], assignment["stratum"])
    for stratum, total in {"G2": 22, "G3": 13, "rare": 5}.items():
        assert counts[stratum].max() - counts[stratum].min() <= 1, (stratum, counts)
        assert counts[stratum].sum() == total
    unstratified = assign_folds(CASES, folds=4, seed=0)
    spread = pd.crosstab(unstratified["fold"], _grades().reindex(CASES).to_numpy())
    assert (spread.max() - spread.min()).max() >= (counts.max() - counts.min()).max()


def test_a_rare_pool_smaller_than_the_folds_joins_the_largest_stratum():
    # 5 folds, grades G2 22, G3 16, G4 2: G4 alone is too small a pool for 5 folds
    strata = _grades().mask(_grades() == "unknown", "G3")
    assignment = assign_folds(CASES, folds=5, seed=0, strata=strata)
    assert set(assignment["stratum"]) == {"G2", "G3"}  # G4's 2 patients joined G2 (22)
    assert (assignment.set_index("case_id").loc[strata[strata == "G4"].index, "stratum"]
            == "G2").all()
    counts = pd.crosstab(assignment["fold"], assignment["stratum"])
    assert (counts.max() - counts.min()).max() <= 1


def test_one_fold_is_the_fixed_split():
    fixed = pd.DataFrame({"case_id": CASES[:6], "split": ["train", "train", "val", "test",
                                                          "test", "unpaired"]})
    assignment, splits = make_folds(paired=CASES[:5], unpaired=CASES[5:6], folds=1,
                                    val_fraction=0.2, seed=0, fixed_split=fixed)
    assert len(splits) == 1 and splits[0].equals(fixed)
    assert list(assignment["fold"]) == ["", "", "", "0", "0", "unpaired"]


def test_impossible_designs_are_clear_errors(tmp_path: Path):
    with pytest.raises(TrainingError, match="6 folds for 5 paired patients"):
        make_folds(paired=CASES[:5], unpaired=[], folds=6, val_fraction=0.2, seed=0)
    with pytest.raises(TrainingError, match="too few"):
        make_folds(paired=CASES[:4], unpaired=[], folds=2, val_fraction=0.5, seed=0)
    clinical = tmp_path / "clinical.tsv"
    pd.DataFrame({"case_id": CASES, "tumor_grade": GRADES}).to_csv(clinical, sep="\t",
                                                                   index=False)
    with pytest.raises(TrainingError, match=r"clinical.tsv: splits.stratify names column "
                                            r"'grade', which it lacks; expected one of "
                                            r"\['tumor_grade'\]"):
        read_strata(clinical, "grade", CASES)
    strata = read_strata(clinical, "tumor_grade", [*CASES, "TCGA-FG-9999"])
    assert strata["TCGA-FG-0036"] == "unknown" and strata["TCGA-FG-9999"] == "unknown"


def _stage_inputs(tmp_path: Path, given: bool) -> list[str]:
    anndata.AnnData(np.ones((len(CASES), 2), np.float32),
                    obs=pd.DataFrame(index=CASES)).write_h5ad(tmp_path / "e.h5ad")
    pd.DataFrame({"image_id": [f"I{i}" for i in range(40)], "case_id": CASES,
                  "status": ["ok"] * 38 + ["failed"] * 2,
                  "n_items": [4] * 38 + [0] * 2}).to_csv(tmp_path / "qc.tsv", sep="\t",
                                                         index=False)
    pd.DataFrame({"case_id": CASES, "tumor_grade": GRADES}).to_csv(
        tmp_path / "clinical.tsv", sep="\t", index=False)
    pd.DataFrame({"case_id": CASES, "split": "train"}).to_csv(tmp_path / "splits.tsv",
                                                             sep="\t", index=False)
    pd.DataFrame({"case_id": CASES[:3] if given else [], "split": ["test"] * (3 if given else 0)}
                 ).to_csv(tmp_path / "given.tsv", sep="\t", index=False)
    settings = {"splits": {"val_fraction": 0.2, "test_fraction": 0.25, "folds": 3,
                           "stratify": "tumor_grade"}, "seed": 0}
    return ["folds", "--expression", str(tmp_path / "e.h5ad"), "--qc", str(tmp_path / "qc.tsv"),
            "--clinical", str(tmp_path / "clinical.tsv"), "--fixed-splits",
            str(tmp_path / "splits.tsv"), "--settings", json.dumps(settings), "--given",
            str(tmp_path / "given.tsv"), "--folds", str(tmp_path / "folds.tsv"), "--out",
            *(str(tmp_path / f"fold{k}.tsv") for k in range(3))]


def test_mgi_folds_writes_the_assignment_and_one_splits_table_per_fold(tmp_path: Path):
    assert main(_stage_inputs(tmp_path, given=False)) == 0
    folds = pd.read_csv(tmp_path / "folds.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(folds.columns) == ["case_id", "fold", "stratum"]
    assert set(folds.loc[folds["fold"] == "unpaired", "case_id"]) == set(CASES[38:])
    tested = []
    for k in range(3):
        table = pd.read_csv(tmp_path / f"fold{k}.tsv", sep="\t", dtype=str)
        tested += list(table.loc[table["split"] == "test", "case_id"])
    assert sorted(tested) == CASES[:38]


def test_a_sample_sheet_with_fixed_splits_refuses_folds(tmp_path: Path, capsys):
    assert main(_stage_inputs(tmp_path, given=True)) == 1
    assert "given.tsv: the sample sheet fixes the splits" in capsys.readouterr().err
    assert not (tmp_path / "folds.tsv").exists()
