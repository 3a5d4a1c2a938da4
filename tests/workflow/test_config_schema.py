"""The config schema: defaults filled, typos and wrong types refused with the key named."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from .conftest import REPO, make_workdir, run

SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")


def _schema_properties(node: dict, path: str = ""):
    """Every property of the schema, with its path."""
    for key, sub in node.get("properties", {}).items():
        yield f"{path}{key}", sub
        yield from _schema_properties(sub, f"{path}{key}.")


def test_every_key_has_description_and_default():
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    assert schema["additionalProperties"] is False
    for path, sub in _schema_properties(schema):
        assert sub.get("description"), f"{path} has no description"
        assert "default" in sub, f"{path} has no default"
        if sub.get("type") == "object":
            assert sub.get("additionalProperties") is False, f"{path} accepts unknown keys"


def test_empty_config_gets_every_default():
    config: dict = {}
    validate(config, SCHEMA)
    assert config["cohort"] == "demo" and config["source"] == "synthetic"
    assert config["imaging"]["modality"] == "mri"
    assert config["model"]["gene_encoder"]["kind"] == "mamba"
    assert config["sources"]["gdc"]["api_url"] == "https://api.gdc.cancer.gov"


@pytest.mark.parametrize("config, named", [
    ({"synthetic": {"n_case": 5}}, "n_case"),
    ({"imaging": {"modality": "ct"}}, "ct"),
    ({"pretrain": {"epochs": "ten"}}, "ten"),
    ({"cohrt": "x"}, "cohrt"),
])
def test_bad_config_is_refused_naming_the_key(config, named):
    with pytest.raises(WorkflowError, match=named):
        validate(copy.deepcopy(config), SCHEMA)


def test_shipped_configs_are_valid():
    for path in [REPO / "config.yaml", *sorted((REPO / "cohorts").glob("*.yaml"))]:
        validate(yaml.safe_load(path.read_text()), SCHEMA)


def test_snakemake_stops_at_start_on_a_misspelt_key(tmp_path: Path, tiny_config: dict):
    tiny_config["finetune"]["epochz"] = 3
    work = make_workdir(tmp_path, tiny_config)
    result = run(["snakemake", "--cores", "1", "-n"], work, check=False)
    assert result.returncode != 0
    assert "epochz" in result.stdout + result.stderr


@pytest.mark.parametrize("cohort", ["tcga-lgg", "tcga-gbm", "tcga-brca"])
def test_real_cohort_dag_is_planned_without_network(tmp_path: Path, cohort: str):
    """Each shipped cohort config validates and plans (-n) with no code change and no network."""
    work = make_workdir(tmp_path, yaml.safe_load((REPO / "config.yaml").read_text()))
    shutil_copy = __import__("shutil").copytree
    shutil_copy(REPO / "cohorts", work / "cohorts")
    result = run(["snakemake", "--cores", "1", "-n", "--configfile", f"cohorts/{cohort}.yaml"],
                 work)
    out = result.stdout + result.stderr
    for rule in ("gdc_query", "gdc_download", "image_table", "expression_matrix"):
        assert rule in out
    assert f"results/{cohort}/" in out or f"data/{cohort}/" in out
    assert not (work / "data").exists()
    # every file the plan reads, writes or logs to is in the cohort's own folders
    planned = [path for line in out.splitlines()
               if re.match(r" +(input|output|log): ", line)
               for path in line.split(": ", 1)[1].split(", ") if path != "<TBD>"]
    assert planned
    for path in planned:
        assert path.startswith((f"data/{cohort}/", f"results/{cohort}/", f"logs/{cohort}/")), path
