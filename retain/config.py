"""Configuration files: TOML or YAML mappings read into plain dicts, and ``--config FILE`` for the CLI.

A config file for ``retain run`` (or ``compare`` / ``orders``) holds the command's options by name, dashes or
underscores alike, with the method's hyper-parameters under ``params``::

    benchmark = "split-digits"
    method = "ewc"
    epochs = 3
    hidden = [100, 100]
    [params]
    lambda = 100

The file's values are turned into the command's own flags and placed *before* the ones typed, so the same
parser checks them (types, choices) and a flag on the command line overrides the file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from retain.errors import ConfigError


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml`` / ``.yml``) file whose top level is a mapping."""
    if not str(path) or "\0" in str(path):
        raise ConfigError(f"config file {str(path)!r} is not a usable file name")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a .toml or .yaml file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read ({e}); check its permissions and encoding") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        data = _toml(text, path)
    elif suffix in (".yaml", ".yml"):
        data = _yaml(text, path)
    else:
        raise ConfigError(f"config file {path}: unknown type {suffix or '(no suffix)'!r}; name it .toml or .yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of option names to values")
    return data


def _toml(text: str, path: Path) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading YAML needs PyYAML: pip install pyyaml (or use a .toml file)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, (dict, set)):
        raise ConfigError(f"config option {key!r} must be a single value or a list, got a mapping")
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, dict, tuple)) for v in value):
            raise ConfigError(f"config option {key!r}: a list of plain values expected, got {value!r}")
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def to_argv(values: dict[str, Any], parser: argparse.ArgumentParser, path: str = "config") -> list[str]:
    """The flags of ``parser`` that say what ``values`` say. Unknown names are an error listing the valid ones."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    argv: list[str] = []
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key in ("params", "param") and "param" in actions:
            if isinstance(value, dict):
                items = [f"{k}={_scalar(f'params.{k}', v)}" for k, v in value.items()]
            elif isinstance(value, list):
                items = [str(v) for v in value]
            else:
                raise ConfigError(f"{path}: params must be a mapping of hyper-parameter names to values")
            argv += [f"--param={item}" for item in items]
            continue
        action = actions.get(key)
        if action is None:
            valid = ", ".join(sorted(d for d in actions if d not in ("debug",)))
            raise ConfigError(f"{path}: unknown option {raw_key!r}; valid options: {valid}")
        flag = action.option_strings[-1]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: option {raw_key!r} must be true or false, got {value!r}")
            if value == isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)
            continue
        if value is None:
            continue
        argv.append(f"{flag}={_scalar(raw_key, value)}")  # one token: values like -1 are not taken for flags
    return argv
