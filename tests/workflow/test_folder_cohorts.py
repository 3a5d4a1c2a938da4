"""The shipped folder-provider cohorts (LGG segmentation set, BraTS NIfTI) through the workflow.

`tcga-lgg-buda.yaml` and `tcga-gbm-brats.yaml` read their images in place from a local folder
(sources.tcia.provider folder). The plans need no network; with a manifest in place (as the GDC
stages leave it) the image table and the banks are made for real from small patient folders,
whose absolute paths the rules take as inputs.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import tifffile
import yaml
from pydicom.uid import generate_uid

from mgi.acquire.gdc import EXPRESSION_DATA_TYPE, MANIFEST_COLUMNS
from mgi.imaging.bank import read_bank
from tests.imaging.conftest import write_mr_slice

from .conftest import REPO, make_workdir, run

pytestmark = pytest.mark.slow

COHORTS = {"tcga-lgg-buda": "lgg_tif", "tcga-gbm-brats": "nifti"}


def _workdir(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    work = make_workdir(tmp_path / "work", yaml.safe_load((REPO / "config.yaml").read_text()))
    shutil.copytree(REPO / "cohorts", work / "cohorts")
    return work


def _gdc_done(work: Path, cohort: str, case_ids: list[str]) -> None:
    """What gdc_query and gdc_download leave: the manifest (expression rows), the failures."""
    raw = work / "data" / cohort / "raw"
    raw.mkdir(parents=True)
    rows = [{"id": f"e{i}", "filename": f"e{i}.tsv", "md5": "0" * 32, "size": 1,
             "state": "released", "case_id": case, "data_type": EXPRESSION_DATA_TYPE,
             "sample_type": "Primary Tumor", "path": f"expression/e{i}/e{i}.tsv",
             "sample_barcode": f"{case}-01A"} for i, case in enumerate(case_ids)]
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(raw / "manifest.tsv", sep="\t",
                                                         index=False)
    (raw / "clinical.tsv").write_text("case_id\n" + "\n".join(case_ids) + "\n")
    (raw / "download_failures.tsv").write_text("id\tfilename\treason\n")


def _lgg_patient(root: Path, name: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:32, :32]
    brain = (yy - 16) ** 2 + (xx - 16) ** 2 < 121
    for n in range(1, 5):
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        image[brain] = (60 + n, 120 + n, 90 + n)
        tifffile.imwrite(folder / f"{name}_{n}.tif", image, photometric="rgb")
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[12:18, 12:18] = 255 * (n == 2)
        tifffile.imwrite(folder / f"{name}_{n}_mask.tif", mask)


def _brats_patient(root: Path, name: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for k, suffix in enumerate(("flair", "t1", "t1Gd", "t2", "GlistrBoost",
                                "GlistrBoost_ManuallyCorrected")):
        volume = np.zeros((6, 24, 24), dtype=np.int16)
        if "Glistr" in suffix:
            volume[2, 8:14, 8:14] = 2  # a label map: tumour on one slice
        else:
            volume[1:5, 4:20, 4:20] = 100 + 20 * k
            volume[2, 8:14, 8:14] = 400
        sitk.WriteImage(sitk.GetImageFromArray(volume),
                        str(folder / f"{name}_1996.08.23_{suffix}.nii.gz"))


def _planned_shell(output: str, rule: str) -> list[str]:
    """Shell words of the first planned job of `rule` in a `-n -p` output."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(rf"(?:local)?(?:rule|checkpoint) {rule}:", line):
            shell = next(x for x in lines[i:] if x.startswith("Shell command: "))
            return shlex.split(shell.removeprefix("Shell command: "))
    raise AssertionError(f"no {rule} job planned:\n{output[-3000:]}")


@pytest.mark.parametrize("cohort", list(COHORTS))
def test_folder_cohorts_are_planned_without_network(tmp_path: Path, cohort: str):
    work = _workdir(tmp_path)
    result = run(["snakemake", "--cores", "1", "-n", "-p", "--configfile",
                  f"cohorts/{cohort}.yaml"], work)
    out = result.stdout + result.stderr
    words = _planned_shell(out, "image_table")
    settings = json.loads(words[words.index("--settings") + 1])
    tcia = settings["sources"]["tcia"]
    assert (tcia["provider"], tcia["layout"]) == ("folder", COHORTS[cohort])
    config = yaml.safe_load((REPO / f"cohorts/{cohort}.yaml").read_text())
    assert tcia["folder"] == config["sources"]["tcia"]["folder"]
    assert settings["imaging"]["mri"]["sequences"] == config["imaging"]["mri"]["sequences"]
    assert f"data/{cohort}/raw/images.tsv" in out
    assert not (work / "data").exists()


@pytest.mark.parametrize("cohort", list(COHORTS))
def test_folder_cohorts_bank_patient_folders_read_in_place(tmp_path: Path, cohort: str):
    work = _workdir(tmp_path)
    source = tmp_path / "images"
    if COHORTS[cohort] == "lgg_tif":
        names = {"TCGA-CS-4941": "TCGA_CS_4941_19960909", "TCGA-HT-7692": "TCGA_HT_7692_19960724"}
        for name in names.values():
            _lgg_patient(source, name)
    else:
        names = {"TCGA-02-0006": "TCGA-02-0006", "TCGA-08-0355": "TCGA-08-0355"}
        for name in names.values():
            _brats_patient(source, name)
    _gdc_done(work, cohort, [*names, "TCGA-ZZ-0000"])  # a case without images: left out
    (work / "local.yaml").write_text(yaml.safe_dump({
        "sources": {"tcia": {"folder": str(source)}}, "imaging": {"mri": {"image_px": 16}}}))
    args = ["snakemake", f"results/{cohort}/images/qc.tsv", "--cores", "1", "--configfile",
            f"cohorts/{cohort}.yaml", "local.yaml"]
    run(args, work)

    images = pd.read_csv(work / f"data/{cohort}/raw/images.tsv", sep="\t", dtype=str)
    assert images["case_id"].tolist() == sorted(names)
    assert images["path"].tolist() == [
        str((source / names[c]).resolve()) for c in sorted(names)]
    assert images["mask_path"].str.len().gt(0).all()
    qc = pd.read_csv(work / f"results/{cohort}/images/qc.tsv", sep="\t")
    assert (qc["status"] == "ok").all(), qc["reason"].tolist()
    for case_id in names:
        bank = read_bank(work / f"results/{cohort}/images/{case_id}.h5")
        assert bank.attrs["source_layout"] == COHORTS[cohort]
        assert bank.masks.reshape(len(bank), -1).any(axis=1).sum() == 1
    again = run([*args, "-n"], work)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_a_spect_file_in_a_dicom_layout_patient_folder_is_refused(tmp_path: Path, test_data):
    spect = test_data / "dicom/libvips_dicom_test_image.dcm"
    if not spect.is_file():
        pytest.skip(f"{spect} not found")
    work = _workdir(tmp_path)
    source = tmp_path / "tcia"
    for role in ("T1 pre", "FLAIR", "T1 post"):
        uid = generate_uid()
        for n in (1, 2, 3):
            write_mr_slice(source / "TCGA-CS-0001" / uid / f"{n}.dcm",
                           np.full((8, 8), 80 + n), position=(0.0, 0.0, 2.0 * n), instance=n,
                           series_uid=uid, description=role, patient_id="TCGA-CS-0001")
    copy = source / "TCGA-CS-0002" / "study" / "series" / "1.dcm"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(spect, copy)
    cohort = "tcga-lgg-buda"
    _gdc_done(work, cohort, ["TCGA-CS-0001", "TCGA-CS-0002"])
    (work / "local.yaml").write_text(yaml.safe_dump({
        "sources": {"tcia": {"folder": str(source), "layout": "dicom"}},
        "imaging": {"mri": {"min_slices": 2}}}))
    run(["snakemake", f"data/{cohort}/raw/images.tsv", "--cores", "1", "--configfile",
         f"cohorts/{cohort}.yaml", "local.yaml"], work)

    raw = work / f"data/{cohort}/raw"
    failures = pd.read_csv(raw / "image_failures.tsv", sep="\t", dtype=str)
    assert failures["case_id"].tolist() == ["TCGA-CS-0002"]
    assert f"{copy}: not an MR image: Modality 'NM'" in failures.loc[0, "reason"]
    log = (work / f"logs/{cohort}/image_table.log").read_text()
    assert f"{copy}: not an MR image" in log
