"""The bottom of the CLI: one-line errors, the run flags generated from the schema, config files, output files.

The ``retain run`` flags (and the shared ones of compare / orders) are made from :data:`retain.config.OPTIONS`,
one flag per option, with no default of their own (``argparse.SUPPRESS``): only what the user typed reaches
:func:`run_values`, so a config file's value is overridden by a typed flag and by nothing else, and every value is
coerced and checked by :func:`retain.config.resolve`, the same as the API's and the files'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from retain.config import OPTIONS, from_mapping
from retain.errors import ConfigError, OutputError


def one_line(message: str) -> str:
    """``message`` with line breaks and other control characters escaped (a typed value may hold them), so that
    every error stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(one_line(f"retain: error: {message} (see `{self.prog} --help`)") + "\n")
        sys.exit(2)


# ------------------------------------------------------------------------------------------------ run flags

_SINGLE_RUN = ("method", "mode", "seed")  # compare / orders take --methods, --modes, --seeds instead
_GROUPS = {"run": None, "training": "training (defaults: the benchmark's protocol)", "data": "data"}


def add_run_options(p: argparse.ArgumentParser, single_method: bool = True) -> None:
    """One flag per run option of the schema (``--param NAME=VALUE`` for ``params``), and --quiet / --debug."""
    groups = {key: (p.add_argument_group(title) if title else p) for key, title in _GROUPS.items()}
    for o in OPTIONS.values():
        if not single_method and o.name in _SINGLE_RUN:
            continue
        g = groups[o.group]
        help_ = o.help.replace("%", "%%")
        if o.kind == "params":
            g.add_argument("--param", dest="params", action="append", metavar=o.metavar, help=help_,
                           default=argparse.SUPPRESS)
        elif o.kind == "bool":
            g.add_argument(o.flag, action=argparse.BooleanOptionalAction, help=help_, default=argparse.SUPPRESS)
        else:
            g.add_argument(o.flag, dest=o.name, metavar=o.metavar or o.name.upper(), help=help_,
                           default=argparse.SUPPRESS)
    add_common_options(p)


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    for name in ("data_dir", "download"):
        o = OPTIONS[name]
        if o.kind == "bool":
            g.add_argument(o.flag, action="store_true", help=o.help)
        else:
            g.add_argument(o.flag, dest=o.name, metavar=o.metavar, help=o.help)


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def parse_params(items: list[str] | None) -> dict[str, str]:
    """``["lambda=100", "online=true"]`` -> ``{"lambda": "100", "online": "true"}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param expects name=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def run_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run options given on the command line (typed flags over the config file's), as raw values: the
    schema coerces and checks them in :func:`retain.config.resolve`."""
    values = dict(getattr(args, "_file_run", {}))
    typed = {o.name: getattr(args, o.name) for o in OPTIONS.values() if o.kind != "params" and hasattr(args, o.name)}
    values.update(typed)
    if hasattr(args, "params") or "params" in values:
        values["params"] = {**values.get("params", {}), **parse_params(getattr(args, "params", None))}
    return values


# ---------------------------------------------------------------------------------------------- config files

def with_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Merge ``--config FILE`` into ``args``: its run options go under the typed flags (they win), its other keys
    set the command's own options that were not typed (``methods``, ``seeds`` ...). Unknown keys are an error."""
    from retain import config

    values = config.load(args.config)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    run_part, own = {}, {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        key = "params" if key == "param" else key
        if key in OPTIONS and key in actions or key == "params":
            run_part[key] = value
        elif key in actions and key not in OPTIONS:
            own[key] = value
        else:
            valid = sorted({*(k for k in actions if k not in ("debug", "quiet")), "params"})
            raise ConfigError(f"{args.config}: unknown option {raw_key!r}; valid options: {', '.join(valid)}")
    args._file_run = from_mapping(run_part, args.config)
    for key, value in own.items():
        action = actions[key]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and not isinstance(value, bool):
            raise ConfigError(f"{args.config}: option {key!r} must be true or false, got {value!r}")
        if getattr(args, key, None) != action.default:  # typed on the command line: it wins
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        if action.type is not None and isinstance(value, str):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{args.config}: option {raw_key!r}: invalid value {value!r}") from None
        setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------- output files

def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON through a temporary file in the same folder and rename it: never a half-written file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # a full disk or a file-size limit: one clear line, the old file untouched
        raise OutputError(f"cannot write {path}: {e.strerror or e}; the previous file (if any) is kept; free disk "
                          "space and retry") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def check_writable_file(path: str | None, flag: str) -> None:
    """Fail in the first second, not after training, when an output file cannot be written."""
    if path is None:
        return
    if not path or "\0" in path:
        raise ConfigError(f"{flag} {path!r} is not a usable file name; give a file path")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"{flag} {path}: not writable; choose another path")


# ------------------------------------------------------------------------------------------------- progress

class ProgressBar:
    """One line on stderr, redrawn at most 10 times a second: task, step, loss."""

    def __init__(self, n_tasks: int, label: str = "", enabled: bool = True):
        self.n_tasks, self.label = n_tasks, label
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, task: int, step: int, n_steps: int, loss: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and step != n_steps):
            return
        self.last = now
        width = 24
        filled = int(width * step / max(n_steps, 1))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{self.label}task {task + 1}/{self.n_tasks} [{bar}] {step}/{n_steps} "
                         f"loss {loss:.4f}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()
