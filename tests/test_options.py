"""The typed options mirror the schema: every key is a field, every field a key, same defaults."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from mgi import options
from mgi.errors import ConfigError
from tests.train.conftest import REPO


def schema_keys(node: dict, prefix: str = "") -> dict[str, object]:
    """Every leaf key of the schema (dotted path) and its default."""
    keys = {}
    for name, child in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        if child.get("type") == "object" and "properties" in child:
            keys.update(schema_keys(child, f"{path}."))
        else:
            keys[path] = child.get("default")
    return keys


def option_keys(cls: type, prefix: str = "") -> dict[str, object]:
    """Every leaf field of an options dataclass (dotted path) and its default."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            keys.update(option_keys(hints[field.name], f"{path}."))
        elif field.default is dataclasses.MISSING:  # a mapping of rules: its plain values
            keys[path] = options.as_dict(field.default_factory())
        else:
            keys[path] = field.default
    return keys


def test_every_schema_key_is_a_field_and_every_field_a_schema_key_with_its_default():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    in_schema = schema_keys(schema)
    in_options = option_keys(options.Config)
    assert sorted(in_schema) == sorted(in_options)
    for key, default in in_schema.items():
        expected = tuple(default) if isinstance(default, list) else default
        assert in_options[key] == expected, key


def test_the_package_reads_the_workflow_schema_itself():
    assert options.SCHEMA_PATH.resolve() == (REPO / "workflow/schemas/config.schema.yaml")


def test_each_stage_settings_holds_config_sections_only():
    top = {f.name for f in dataclasses.fields(options.Config)}
    stages = [cls for name, cls in vars(options).items()
              if name.endswith("Settings") and dataclasses.is_dataclass(cls)]
    assert len(stages) >= 10
    for cls in stages:
        assert {f.name for f in dataclasses.fields(cls)} <= top, cls.__name__


def test_build_fills_defaults_converts_lists_and_names_bad_keys():
    config = options.build(options.Config, {"pretrain": {"epochs": 3},
                                            "finetune": {"variants": ["mgi"]}})
    assert config.pretrain.epochs == 3
    assert config.pretrain.batch_size == options.schema_node("pretrain.batch_size")["default"]
    assert config.finetune.variants == ("mgi",)
    with pytest.raises(ConfigError, match=r"pretrain\.epoch: unknown key; did you mean 'epochs'"):
        options.build(options.Config, {"pretrain": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"pretrain\.epochs: 0 is less than the minimum"):
        options.build(options.Config, {"pretrain": {"epochs": 0}})
    with pytest.raises(ConfigError, match=r"imaging\.modality: 'ct' is not one of"):
        options.build(options.Config, {"imaging": {"modality": "ct"}})


def test_stage_settings_need_every_section_their_stage_reads():
    text = '{"model": {}, "pretrain": {}, "imaging": {}, "expression": {}}'
    with pytest.raises(ConfigError, match=r"no \['seed'\] section; PretrainSettings reads"):
        options.stage_settings(options.PretrainSettings, text)
    settings = options.stage_settings(options.SplitSettings,
                                      '{"splits": {"val_fraction": 0.3}, "seed": 4, "model": {}}')
    assert settings == options.SplitSettings(options.SplitsOptions(val_fraction=0.3), seed=4)
    with pytest.raises(ConfigError, match="not valid JSON"):
        options.stage_settings(options.SplitSettings, "{bad")


def test_options_round_trip_through_plain_values():
    settings = options.build(options.FinetuneSettings, {
        "seed": 3, "model": {}, "finetune": {"epochs": 2}, "imaging": {}, "expression": {}})
    assert options.build(options.FinetuneSettings, options.as_dict(settings)) == settings
