"""Run configuration files: ``modegpt compress --config run.yaml`` and the resolved ``run_config.yaml`` it saves.

A configuration file is a YAML mapping whose keys are a command's long option names (``calib-samples`` or
``calib_samples``). Its values replace the command's defaults; options given on the command line win over both.
Every compress run saves the resolved configuration, with the versions of the libraries that produced it, in its
output directory, and that file is itself a valid ``--config``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import yaml

from modegpt_jax.errors import UserError

# Keys a saved run_config.yaml carries that are records, not options.
RECORD_KEYS = ("versions",)
VERSIONED_PACKAGES = ("modegpt-jax", "jax", "jaxlib", "flax", "transformers", "numpy", "orbax-checkpoint")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on (``None`` for one not installed)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--config {path}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A YAML value as the command line would have parsed it; a clear error for a value of the wrong kind."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"--config {path}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(value, (dict, list)):
        raise UserError(f"--config {path}: {key} must be a single value, got {type(value).__name__}")
    if action.type is not None:
        try:
            value = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError):
            kind = getattr(action.type, "__name__", "value")
            raise UserError(f"--config {path}: {key} must be {kind}, got {value!r}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The file's values as defaults for ``parser``, keyed by destination, checked against its options."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    out = {}
    for raw_key, value in read_config_file(path).items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key in RECORD_KEYS:
            continue
        if key not in actions:
            known = ", ".join(sorted(k.replace("_", "-") for k in actions))
            raise UserError(f"--config {path}: unknown option {raw_key!r}; options: {known}")
        out[key] = _convert(actions[key], str(raw_key), value, path)
    return out


def resolved_config(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options a run used, as a mapping that ``--config`` reads back, plus the library versions."""
    skip = {"func", "command", "config", *exclude}
    options = {k.replace("_", "-"): v for k, v in vars(args).items() if k not in skip}
    return {**options, "versions": versions()}


def settings_config(values: dict[str, Any]) -> dict[str, Any]:
    """A ``run_config.yaml`` mapping for a run started from Python: the given values (``model``, ``output`` and
    the fields of the compression and run settings) under ``modegpt compress``'s option names, those the command
    has, plus the library versions; so the saved file reproduces the run from the command line."""
    from modegpt_jax.cli import build_parser

    parser = build_parser()
    compress = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["compress"]
    dests = {a.dest for a in compress._actions if a.option_strings} - {"help", "config"}
    values = dict(values)
    if "activations_on_host" in values:  # the command spells None/True/False as auto/on/off
        values["activations_on_host"] = {None: "auto", True: "on", False: "off"}[values["activations_on_host"]]
    options = {k.replace("_", "-"): v for k, v in values.items() if k in dests}
    return {**options, "versions": versions()}


def dump(config: dict[str, Any]) -> str:
    header = "# Resolved configuration of this run; `modegpt compress --config <this file>` reads it back.\n"
    return header + yaml.safe_dump(config, sort_keys=False)
