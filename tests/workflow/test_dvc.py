"""`dvc repro` runs the same stages as Snakemake and, run twice, has nothing left to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, TINY_CONFIG, make_workdir, run

pytestmark = pytest.mark.slow


def _stage_targets(dvc_yaml: dict) -> set[str]:
    """The Snakemake target each DVC stage asks for (last word of its command)."""
    targets = set()
    for stage in dvc_yaml["stages"].values():
        body = stage.get("do", stage)
        targets.add(body["cmd"].split()[-1])
    return targets


def test_dvc_stages_ask_snakemake_for_pipeline_outputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())
    targets = _stage_targets(stages)
    assert all(t.startswith(("data/${cohort}/", "results/${cohort}/")) for t in targets)
    for name, stage in stages["stages"].items():
        body = stage.get("do", stage)
        assert body["cmd"].startswith("snakemake --cores all "), name
        assert body.get("outs") or body.get("metrics"), f"stage {name} declares no outputs"


def test_dvc_repro_runs_the_demo_and_then_is_up_to_date(tmp_path: Path):
    work = make_workdir(tmp_path, TINY_CONFIG)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__",
                                                                               "*.egg-info"))
    (work / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc/config", work / ".dvc/config")
    shutil.copy(REPO / ".dvc/.gitignore", work / ".dvc/.gitignore")
    run(["git", "init", "-q"], work)
    run(["git", "add", "-A"], work)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], work)

    first = run(["dvc", "repro"], work)
    assert "Running stage 'report'" in first.stdout
    metrics = json.loads((work / "results/tiny/report/metrics.json").read_text())
    assert set(metrics["segmentation"]) == set(TINY_CONFIG["finetune"]["variants"])

    second = run(["dvc", "repro"], work)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    status = run(["dvc", "status"], work)
    assert "up to date" in status.stdout
    # Snakemake agrees that nothing is left to do after DVC's run
    dry = run(["snakemake", "--cores", "1", "-n"], work)
    assert "Nothing to be done" in dry.stdout + dry.stderr
