"""Two cohorts in one working copy, run at the same time: each finishes, and nothing collides.

Each cohort is a config file given after config.yaml (`--configfile`), as the shipped cohorts are.
Two Snakemake processes share the folder and its .snakemake/; Snakemake locks the files a run
reads and writes, so a path the two cohorts had in common would stop the second run as well.

Snakemake (9.27) keeps every run's locks in one folder and handles it with check-then-act steps:
two runs that take their locks in the same instant can both pick lock number 0, and the run that
ends second can fail its final unlock (`shutil.rmtree(".snakemake/locks")`) with
FileNotFoundError because the other has just removed the folder, after all its jobs finished.
The second cohort therefore starts once the first holds its locks, as a user starts one cohort
after another, and a run whose only failure is that unlock, with every step done, counts as done.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_CONFIG, env, make_workdir, run

pytestmark = pytest.mark.slow

# Small and different: another seed, another slice count, another fine-tuning variant; one
# variant and one epoch each (every training job is a torch and MONAI start of its own).
# MRI only (no slides to tile): the collisions to catch are between cohorts, not modalities.
COHORTS = {
    "cohort-one": {"seed": 1, "synthetic": {"n_slides": 0}, "pretrain": {"epochs": 1},
                   "finetune": {"variants": ["mgi"], "epochs": 1}},
    "cohort-two": {"seed": 2, "synthetic": {"slices": 4, "n_slides": 0},
                   "finetune": {"variants": ["vit_scratch"], "epochs": 1}},
}
FOLDERS = ("data", "results", "logs")


def _tree(root: Path) -> set[str]:
    """Every file under `root`, Snakemake's own bookkeeping left out."""
    return {str(path.relative_to(root)) for path in root.rglob("*")
            if path.is_file() and ".snakemake" not in path.relative_to(root).parts}


def _start(work: Path, cohort: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["snakemake", "--cores", "1", "--configfile", f"cohorts/{cohort}.yaml"], cwd=work,
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_locks(work: Path, proc: subprocess.Popen, *, timeout: float = 300) -> None:
    """Until the run holds its output lock (or has ended): it has chosen its lock number."""
    deadline = time.monotonic() + timeout
    while not list((work / ".snakemake/locks").glob("*.output.lock")):
        if proc.poll() is not None or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def _finished(returncode: int, output: str) -> bool:
    """Exit 0, or every step done and then only Snakemake's race on removing its lock folder."""
    if returncode == 0:
        return True
    last_error = output.strip().splitlines()[-1] if output.strip() else ""
    unlock_race = (last_error.startswith("FileNotFoundError")
                   and last_error.rstrip("'").endswith(".snakemake/locks")
                   and "_delete_locks" in output)
    return unlock_race and "steps (100%) done" in output


def test_unlock_race_is_the_only_failure_counted_as_done():
    race = ("19 of 19 steps (100%) done\nTraceback (most recent call last):\n"
            "  in _delete_locks\n    shutil.rmtree(self._lockdir)\n"
            "FileNotFoundError: [Errno 2] No such file or directory: '/w/.snakemake/locks'\n")
    assert _finished(0, "")
    assert _finished(1, race)
    assert not _finished(1, race.replace("19 of 19 steps (100%)", "18 of 19 steps (95%)"))
    assert not _finished(1, "FileNotFoundError: [Errno 2] No such file: 'data/x.h5'")
    assert not _finished(1, race + "MissingOutputException: results/x\n")


def test_two_cohorts_run_side_by_side_without_colliding(tmp_path: Path):
    work = make_workdir(tmp_path, TINY_CONFIG)
    (work / "cohorts").mkdir()
    for cohort, overrides in COHORTS.items():
        (work / f"cohorts/{cohort}.yaml").write_text(
            yaml.safe_dump({"cohort": cohort, **overrides}))
    before = _tree(work)

    first, second = COHORTS
    procs = {first: _start(work, first)}
    _wait_for_locks(work, procs[first])
    procs[second] = _start(work, second)
    outputs = {cohort: proc.communicate(timeout=1200)[0] for cohort, proc in procs.items()}
    for cohort, proc in procs.items():
        assert _finished(proc.returncode, outputs[cohort]), \
            f"{cohort} failed:\n{outputs[cohort][-6000:]}"

    # every new file lies in one cohort's own folders, and each cohort has its three
    for folder in FOLDERS:
        assert {p.name for p in (work / folder).iterdir()} == set(COHORTS), folder
    for path in _tree(work) - before:
        assert path.split("/")[0] in FOLDERS and path.split("/")[1] in COHORTS, path
    for cohort, other in zip(COHORTS, reversed(list(COHORTS)), strict=True):
        report = work / "results" / cohort / "report"
        metrics = json.loads((report / "metrics.json").read_text())
        assert metrics["cohort"] == cohort
        assert set(metrics["segmentation"]) == set(COHORTS[cohort]["finetune"]["variants"])
        html = (report / "report.html").read_text()
        assert cohort in html and other not in html
        # each cohort's raw data is its own (another seed), not the other's copied over
        manifest = (work / "data" / cohort / "raw/manifest.tsv").read_text()
        assert manifest != (work / "data" / other / "raw/manifest.tsv").read_text()
    # neither run made the other's results stale
    for cohort in COHORTS:
        dry = run(["snakemake", "--cores", "1", "-n", "--configfile", f"cohorts/{cohort}.yaml"],
                  work)
        assert "Nothing to be done" in dry.stdout + dry.stderr, cohort
