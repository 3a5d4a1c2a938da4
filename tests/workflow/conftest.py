"""Helpers to run the workflow on a tiny config in a temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# The smallest config that still runs every stage for real (a few seconds of training).
TINY_CONFIG = {
    "cohort": "tiny",
    "source": "synthetic",
    "seed": 0,
    "synthetic": {"n_cases": 8, "n_genes": 80, "n_linked_genes": 5, "slices": 6,
                  "image_px": 32, "n_slides": 2, "slide_px": 1024},
    "imaging": {"modality": "mri", "mri": {"image_px": 32},
                "wsi": {"tile_px": 32, "mpp": 2.0, "max_tiles": 12, "tissue_min": 0.3}},
    "splits": {"val_fraction": 0.25, "test_fraction": 0.25},
    "expression": {"seq_len": 32, "min_fraction_expressed": 0.0, "normalize": "log1p_cpm",
                   "duplicate_profiles": "choose"},
    "model": {"embed_dim": 16,
              "gene_encoder": {"d_model": 16, "n_layers": 1, "d_state": 4},
              "image_encoder": {"patch_size": 8, "width": 32, "depth": 3, "num_heads": 2}},
    "pretrain": {"epochs": 2, "batch_size": 8},
    "finetune": {"variants": ["mgi", "mgi_image_only"], "epochs": 2, "batch_size": 8,
                 "decoder_channels": 8},
    "evaluate": {"bootstrap": 100},
}


def env() -> dict[str, str]:
    """The environment of a workflow run: this interpreter's bin first on PATH (for `mgi`)."""
    result = dict(os.environ)
    result["PATH"] = f"{BIN}{os.pathsep}{result.get('PATH', '')}"
    return result


def run(args: list[str], cwd: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command of the environment (snakemake, dvc, git) in cwd, output captured."""
    exe = shutil.which(args[0], path=env()["PATH"]) or args[0]
    result = subprocess.run([exe, *args[1:]], cwd=cwd, env=env(), capture_output=True,
                            text=True, timeout=1200, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def make_workdir(tmp: Path, config: dict) -> Path:
    """A copy of the workflow (Snakefile, rules, schema, envs, dvc.yaml) with `config` in it."""
    for name in ("Snakefile", "dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp / name)
    for name in ("workflow", "envs"):
        shutil.copytree(REPO / name, tmp / name)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp


@pytest.fixture
def tiny_config() -> dict:
    """A deep copy of the tiny config, free to edit."""
    return yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
