"""The config schema: defaults filled, typos and wrong types refused with the key named."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config, validate

from .conftest import REPO, make_workdir, run

SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")
SHIPPED = [REPO / "config.yaml", *sorted((REPO / "cohorts").glob("*.yaml"))]


def _load_config_check():
    """workflow/rules/config_check.py, which common.smk checks the config with."""
    spec = importlib.util.spec_from_file_location(
        "config_check", REPO / "workflow/rules/config_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


config_check = _load_config_check()


def _schema_properties(node: dict, path: str = ""):
    """Every property of the schema, with its path and whether its parent requires it; the
    entries of a mapping section (imaging.mri.roles) appear as `<name>`."""
    required = set(node.get("required", ()))
    for key, sub in node.get("properties", {}).items():
        yield f"{path}{key}", sub, key in required
        yield from _schema_properties(sub, f"{path}{key}.")
    entry = node.get("additionalProperties")
    if isinstance(entry, dict):
        yield from _schema_properties(entry, f"{path}<name>.")


def test_every_key_has_description_and_default():
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    assert schema["additionalProperties"] is False
    for path, sub, required in _schema_properties(schema):
        assert sub.get("description"), f"{path} has no description"
        assert "default" in sub or required, f"{path} has no default"
        if sub.get("type") == "object":
            # closed, or a mapping whose every entry is closed
            entries = sub.get("additionalProperties")
            closed = entries is False or (isinstance(entries, dict)
                                          and entries.get("additionalProperties") is False)
            assert closed, f"{path} accepts unknown keys"


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
    with pytest.raises(config_check.ConfigError, match=named):
        config_check.validate_config(copy.deepcopy(config), SCHEMA)


def test_shipped_configs_are_valid():
    for path in SHIPPED:
        validate(yaml.safe_load(path.read_text()), SCHEMA)
        config_check.validate_config(yaml.safe_load(path.read_text()), SCHEMA)


def _configs_to_fill():
    """Configs as the workflow sees them: each shipped file alone, config.yaml under each cohort,
    and partial sections whose other keys and nested `default: {}` sections must be filled."""
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    yield "empty", {}
    for path in SHIPPED:
        yield path.name, yaml.safe_load(path.read_text())
    for path in SHIPPED[1:]:
        merged = copy.deepcopy(base)
        update_config(merged, yaml.safe_load(path.read_text()))
        yield f"config.yaml+{path.name}", merged
    yield "partial", {"sources": {"gdc": {"parallel": 2}}, "imaging": {"wsi": {}},
                      "model": {"gene_encoder": {"kind": "mlp"}}}


@pytest.mark.parametrize("config", [pytest.param(config, id=name)
                                    for name, config in _configs_to_fill()])
def test_config_check_fills_defaults_exactly_as_snakemake_validate(config):
    """Later rules read the defaulted keys: same keys, values and order as validate() gave."""
    expected = copy.deepcopy(config)
    validate(expected, SCHEMA, set_default=True)
    ours = copy.deepcopy(config)
    assert config_check.validate_config(ours, SCHEMA) is ours
    assert json.dumps(ours) == json.dumps(expected)


def test_every_problem_is_reported_and_the_list_capped():
    config = {f"bogus_{i}": i for i in range(7)}
    config["seed"] = -1
    problems = config_check.fill_and_check(config, yaml.safe_load(Path(SCHEMA).read_text()))
    assert [config_check.format_path(p.path) for p in problems] == [
        *(f"bogus_{i}" for i in range(7)), "seed"]
    message = config_check.format_problems(problems, SCHEMA).splitlines()
    shown = config_check.MAX_SHOWN
    # header, the problems shown, the valid keys once, and one line naming the rest
    assert len(message) == 1 + shown + 1 + 1
    assert message[-1] == f"  and {8 - shown} more: bogus_5, bogus_6, seed"


def _snakemake_n(work: Path, *args: str):
    """`snakemake -n ARGS` in work: the exit code and its output lines (stdout and stderr)."""
    result = run(["snakemake", "--cores", "1", "-n", *args], work, check=False)
    return result.returncode, (result.stdout + result.stderr).splitlines()


def _problem_line(lines: list[str], key: str) -> str:
    """The output line of the problem at key path `key`."""
    matches = [line for line in lines if line.startswith(f"  {key}: ")]
    assert len(matches) == 1, "\n".join(lines)
    return matches[0]


@pytest.fixture
def demo_work(tmp_path: Path) -> Path:
    """A workflow copy with the shipped config.yaml and cohorts/."""
    work = make_workdir(tmp_path, yaml.safe_load((REPO / "config.yaml").read_text()))
    shutil.copytree(REPO / "cohorts", work / "cohorts")
    return work


def test_snakemake_names_an_unknown_command_line_key_in_a_few_lines(demo_work: Path):
    code, lines = _snakemake_n(demo_work, "--config", "bogus_key=1")
    assert code != 0
    assert len(lines) <= 10, "\n".join(lines)
    line = _problem_line(lines, "bogus_key")
    assert "unknown key" in line and "(set by --config on the command line)" in line
    assert any("valid keys at the top level: cohort, source, seed" in line for line in lines)
    output = "\n".join(lines)
    assert "Traceback" not in output and 'File "' not in output and "$schema" not in output


def test_snakemake_names_a_misspelt_nested_key_its_file_and_the_nearest_key(demo_work: Path):
    (demo_work / "mine.yaml").write_text("pretrain: {epoch: 3}\n")
    code, lines = _snakemake_n(demo_work, "--configfile", "cohorts/tcga-lgg.yaml", "mine.yaml")
    assert code != 0
    assert len(lines) <= 10, "\n".join(lines)
    line = _problem_line(lines, "pretrain.epoch")
    assert "unknown key; did you mean 'epochs'? (set in mine.yaml)" in line
    assert any(line.startswith("    valid keys in pretrain: epochs, ") for line in lines)


def test_snakemake_reports_every_wrong_value_with_what_was_expected_and_who_set_it(
        demo_work: Path):
    # imaging.modality is also set by the cohort file and config.yaml: the last file given wins;
    # seed is set by every file, and --config overrides them all
    (demo_work / "mine.yaml").write_text("imaging: {modality: mir}\nsplits: {fold: 3}\n")
    code, lines = _snakemake_n(demo_work, "--configfile", "cohorts/tcga-lgg.yaml", "mine.yaml",
                               "--config", "seed=abc")
    assert code != 0
    assert len(lines) <= 10, "\n".join(lines)
    assert "3 problems" in lines[1]
    assert _problem_line(lines, "seed").endswith(
        "expected an integer >= 0; got 'abc' (set by --config on the command line)")
    assert _problem_line(lines, "imaging.modality").endswith(
        "expected one of 'mri', 'wsi'; got 'mir'; did you mean 'mri'? (set in mine.yaml)")
    assert "did you mean 'folds'? (set in mine.yaml)" in _problem_line(lines, "splits.fold")


def test_snakemake_stops_at_start_on_a_misspelt_key(tmp_path: Path, tiny_config: dict):
    tiny_config["finetune"]["epochz"] = 3
    work = make_workdir(tmp_path, tiny_config)
    code, lines = _snakemake_n(work)
    assert code != 0
    assert "did you mean 'epochs'? (set in config.yaml)" in _problem_line(lines, "finetune.epochz")


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
