"""One owner per fact: the variant registry, the image table's columns and the results layout
live in the package; the schema, the workflow's rules, dvc.yaml and registry.json agree."""

from __future__ import annotations

import re

import yaml

from mgi import registry
from mgi.layout import RESULTS
from mgi.variants import GENE_ENCODER_KINDS, VARIANTS, pretraining_of
from tests.train.conftest import REPO

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["properties"]


def layout_pattern(template: str) -> re.Pattern:
    """A results path template ({variant} etc.) as a regex of the same paths."""
    return re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)) + "$")


def test_registry_json_is_current():
    assert registry.main(["--check"]) == 0, "run `python -m mgi.registry`"


def test_schema_enums_are_the_registry():
    variants = SCHEMA["finetune"]["properties"]["variants"]["items"]["enum"]
    assert variants == list(VARIANTS)
    assert SCHEMA["predict"]["properties"]["variant"]["enum"] == list(VARIANTS)
    kinds = SCHEMA["model"]["properties"]["gene_encoder"]["properties"]["kind"]["enum"]
    assert kinds == list(GENE_ENCODER_KINDS)


def test_every_results_path_of_the_rules_and_dvc_is_in_the_layout():
    patterns = [layout_pattern(t) for t in RESULTS.values()]
    rules = "\n".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk"))
    named = set(re.findall(r'results\(f?"([^"]+)"\)', rules)) - {"finetune/{variant}/{name}"}
    named |= {f"finetune/{{variant}}/{name}"  # common.smk's variant_files(name)
              for name in re.findall(r'(?<![a-z_])variant_files\("([^"]+)"\)', rules)}
    dvc = (REPO / "dvc.yaml").read_text()
    named |= set(re.findall(r"results/\$\{cohort\}/([^\s:]+)", dvc))
    named = {re.sub(r"\$\{item\}", "{variant}", p).rstrip("/") for p in named}
    assert len(named) > 20
    unknown = sorted(p for p in named if not any(pat.match(p) for pat in patterns))
    assert not unknown, f"paths not in mgi.layout.RESULTS: {unknown}"
    # common.smk's layout(name): the path of RESULTS[name] itself (crossval.smk, report.smk)
    names = set(re.findall(r'layout\(f?"([a-z_{}]+)"', rules))
    names = {n for n in names if "{" not in n}
    assert {"folds", "fold_splits", "run_model", "pooled_test_patients"} <= names
    assert names <= set(RESULTS), f"layout names not in mgi.layout.RESULTS: {names - set(RESULTS)}"


def test_pretraining_of_each_variant():
    assert pretraining_of("mgi", configured_kind="mamba") == "pretrain"
    assert pretraining_of("mgi_mamba", configured_kind="mamba") == "pretrain"
    assert pretraining_of("mgi_mlp", configured_kind="mamba") == "pretrain/ablation/mlp"
    assert pretraining_of("vit_scratch_genes", configured_kind="mamba") is None
