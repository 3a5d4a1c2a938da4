"""Config validation that fills the schema's defaults and names each problem in a few lines.

Snakemake's `snakemake.utils.validate` stops at the first error and prints the whole schema and
config after it (two thousand lines). `check_config` fills the defaults exactly as
`validate(config, schema, set_default=True)` does, and on errors prints every problem (up to
`MAX_SHOWN`) as its key path, what the schema expects, the nearest valid key and the config
file that set it, then exits with status 1, with no traceback.

Snakemake runs the workflow in its own environment (no `mgi` package there), so this module uses
only jsonschema and yaml. common.smk imports it: Snakemake puts the folder of an included file on
sys.path.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import yaml
from jsonschema import validators

MAX_SHOWN = 5
"""Problems printed; the rest are counted."""

VALUE_CHECKS = frozenset({
    "type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "pattern", "minLength", "maxLength", "minItems", "maxItems", "uniqueItems",
})
"""Keywords that judge a value alone: their error says what the schema expects there."""

TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}

KeyPath = tuple[str | int, ...]
Source = tuple[str, Any]  # (where, e.g. "set in cohorts/x.yaml"; the config it holds)


class ConfigError(Exception):
    """The config does not match the schema; the message lists the problems in a few lines."""


@dataclass(frozen=True)
class Problem:
    """One config problem: its key path and a one-line message, plus an optional hint line."""

    path: KeyPath
    message: str
    hint: str = ""


def load_schema(schema_path: str | os.PathLike) -> dict:
    """The schema file, parsed (YAML or JSON)."""
    with open(schema_path) as handle:
        return yaml.safe_load(handle)


def _validator_class(schema: dict):
    """The schema's validator class, extended to fill defaults as snakemake.utils.validate does."""
    base = validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        # As snakemake.utils.validate (the jsonschema FAQ recipe): defaults are set before the
        # properties are validated, so a default `{}` is then filled with its own defaults.
        if validator.is_type(instance, "object"):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(base, {"properties": set_defaults})


def fill_and_check(config: dict, schema: dict, sources: Sequence[Source] = ()) -> list[Problem]:
    """Fill the schema's defaults into `config` (in place); the problems found, in schema order.

    `sources` are the configs merged into `config`, highest precedence first, each with where
    it came from; they only serve to say which of them set a key that is wrong.
    """
    validator = _validator_class(schema)(schema)
    problems: list[Problem] = []
    seen: set[KeyPath] = set()
    listed: set[KeyPath] = set()
    for error in validator.iter_errors(config):
        for problem in _problems(error, schema, sources, listed):
            if problem.path not in seen:
                seen.add(problem.path)
                problems.append(problem)
    return problems


def check_config(config: dict, schema_path: str | os.PathLike, workflow: Any = None) -> None:
    """Fill the schema's defaults into the workflow's config; on problems print them and exit 1."""
    if workflow is not None and getattr(workflow.modifier, "skip_validation", False):
        return  # used as a module with skip_validation, as snakemake.utils.validate honours
    schema = load_schema(schema_path)
    sources = config_sources(workflow) if workflow is not None else []
    problems = fill_and_check(config, schema, sources)
    if not problems:
        return
    # workflow.source_path gives the source cache's copy; the flag keeps the path as written
    shown = getattr(schema_path, "flags", {}).get("sourcecache_entry", schema_path)
    message = format_problems(problems, shown)
    try:
        from snakemake.logging import logger
    except ImportError:
        print(message, file=sys.stderr)
    else:
        logger.error(message)  # where Snakemake's own messages go (stdout, log handlers)
    sys.exit(1)


def validate_config(config: dict, schema_path: str | os.PathLike) -> dict:
    """`config` with the schema's defaults filled in (in place); ConfigError if it is invalid."""
    problems = fill_and_check(config, load_schema(schema_path))
    if problems:
        raise ConfigError(format_problems(problems, schema_path))
    return config


def format_problems(problems: Sequence[Problem], schema_path: str | os.PathLike) -> str:
    """The problems as a few lines: a header, then each path and message, and its hint."""
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    lines = [f"Invalid config, {count} (every key, its type and default: {_shown(schema_path)}):"]
    for problem in problems[:MAX_SHOWN]:
        lines.append(f"  {format_path(problem.path)}: {problem.message}")
        if problem.hint:
            lines.append(f"    {problem.hint}")
    if len(problems) > MAX_SHOWN:
        rest = [format_path(problem.path) for problem in problems[MAX_SHOWN:]]
        lines.append(f"  and {len(rest)} more: {_truncate(', '.join(rest), 160)}")
    return "\n".join(lines)


def format_path(path: KeyPath) -> str:
    """A key path as written in the docs: pretrain.epochs, finetune.variants[2]."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(the config)"


def config_sources(workflow: Any) -> list[Source]:
    """The configs Snakemake merged, highest precedence first, each with where it came from.

    `--config` overrides every file; a later `--configfile` overrides an earlier one; both
    override the Snakefile's `configfile:` (config.yaml), unless --replace-workflow-config.
    """
    settings = workflow.config_settings
    cli_files = [os.path.abspath(path) for path in settings.configfiles]
    workflow_files = [
        path for path in workflow.configfiles if os.path.abspath(path) not in cli_files
    ]
    if settings.replace_workflow_config and settings.overwrite_config:
        workflow_files = []
    sources: list[Source] = []
    if settings.config:
        sources.append(("set by --config on the command line", settings.config))
    for path in [*reversed(cli_files), *reversed(workflow_files)]:
        try:
            with open(path) as handle:
                sources.append((f"set in {_shown(path)}", yaml.safe_load(handle)))
        except (OSError, yaml.YAMLError):
            continue
    return sources


def _problems(
    error: jsonschema.ValidationError,
    schema: dict,
    sources: Sequence[Source],
    listed: set[KeyPath],
) -> Iterator[Problem]:
    """The problems of one validation error (one per unknown key of an additionalProperties)."""
    path: KeyPath = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = list(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        for key in error.instance:
            if key in known or any(re.search(pattern, str(key)) for pattern in patterns):
                continue
            key_path = (*path, key)
            message = f"unknown key{_did_you_mean(str(key), known, schema)}"
            hint = ""
            if path not in listed:  # the valid keys once per mapping
                listed.add(path)
                where = f"in {format_path(path)}" if path else "at the top level"
                hint = f"valid keys {where}: {', '.join(known)}"
            yield Problem(key_path, message + _origin(key_path, sources), hint)
    elif error.validator in VALUE_CHECKS:
        message = f"expected {describe(error.schema)}; got {_short(error.instance)}"
        if error.validator == "enum" and isinstance(error.instance, str):
            choices = [value for value in error.validator_value if isinstance(value, str)]
            message += _did_you_mean(error.instance, choices)
        yield Problem(path, message + _origin(path, sources))
    else:
        yield Problem(path, _truncate(error.message, 160) + _origin(path, sources))


def describe(schema: Mapping) -> str:
    """What a schema node accepts, in words: 'an integer >= 0', "one of 'mri', 'wsi'"."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    nullable = "null" in types or None in schema.get("enum", ())
    if "enum" in schema:
        values = [_short(value) for value in schema["enum"] if value is not None]
        text = "one of " + ", ".join(values)
    elif "const" in schema:
        text = _short(schema["const"])
    else:
        names = [TYPE_NAMES.get(name, name) for name in types if name != "null"]
        text = " or ".join(names) or ("null" if nullable else "a value")
    bounds = [
        f"{sign} {schema[keyword]}"
        for keyword, sign in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
            ("multipleOf", "a multiple of"),
        )
        if keyword in schema
    ]
    if bounds:
        text += " " + " and ".join(bounds)
    details = []
    if "pattern" in schema:
        details.append(f"matching {schema['pattern']}")
    if "minLength" in schema or "maxLength" in schema:
        details.append(_count(schema.get("minLength"), schema.get("maxLength"), "character"))
    if isinstance(schema.get("items"), Mapping):
        details.append(f"each {describe(schema['items'])}")
    if "minItems" in schema or "maxItems" in schema:
        details.append(_count(schema.get("minItems"), schema.get("maxItems"), "item"))
    if schema.get("uniqueItems"):
        details.append("no repeats")
    if details:
        text += f" ({'; '.join(details)})"
    return f"{text} or null" if nullable and text != "null" else text


def _count(least: int | None, most: int | None, noun: str) -> str:
    """'exactly 2 items', 'at least 1 item', '1 to 3 items'."""
    if least is not None and least == most:
        return f"exactly {least} {noun}{'s' * (least != 1)}"
    if most is None:
        return f"at least {least} {noun}{'s' * (least != 1)}"
    if least is None:
        return f"at most {most} {noun}{'s' * (most != 1)}"
    return f"{least} to {most} {noun}s"


def _did_you_mean(word: str, choices: Sequence[str], schema: Mapping | None = None) -> str:
    """The suffix "; did you mean 'epochs'?" naming the nearest choice (or where else a key is)."""
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1)
    if close:
        return f"; did you mean {lowered[close[0]]!r}?"
    if schema is not None:
        elsewhere = [format_path(path) for path in _key_paths(schema) if path[-1] == word]
        if elsewhere:
            return f"; did you mean {' or '.join(repr(path) for path in elsewhere[:3])}?"
    return ""


def _key_paths(schema: Mapping, path: KeyPath = ()) -> Iterator[KeyPath]:
    """Every key path of the schema."""
    for key, sub in schema.get("properties", {}).items():
        yield (*path, key)
        if isinstance(sub, Mapping):
            yield from _key_paths(sub, (*path, key))


def _origin(path: KeyPath, sources: Sequence[Source]) -> str:
    """' (set in cohorts/x.yaml)': the first (highest-precedence) source that holds the key."""
    for where, data in sources:
        node = data
        for part in path:
            if isinstance(part, int):
                found = isinstance(node, list) and part < len(node)
            else:
                found = isinstance(node, Mapping) and part in node
            if not found:
                break
            node = node[part]
        else:
            return f" ({where})" if path else ""
    return ""


def _shown(path: str | os.PathLike) -> str:
    """A path relative to the working directory where it lies below it, else absolute."""
    path = os.path.abspath(path)
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _short(value: Any) -> str:
    """repr of a value, cut to one short line."""
    return _truncate(repr(value), 60)


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
