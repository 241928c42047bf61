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
        elif o.kind == "strs":
            g.add_argument(o.flag, *o.aliases, dest=o.name, action="append", metavar=o.metavar or o.name.upper(),
                           help=help_, default=argparse.SUPPRESS)
        else:
            g.add_argument(o.flag, *o.aliases, dest=o.name, metavar=o.metavar or o.name.upper(), help=help_,
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
    p.add_argument("--quiet", action="store_true", help="no progress (the bar, or the log lines outside a terminal)")
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
        if key == "params" or (key in OPTIONS and key in actions):
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
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            value = ",".join(map(str, value))
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{args.config}: option {key!r} expects a value like its flag {action.option_strings[-1]}"
                              f", got {value!r}")
        try:
            value = (action.type or str)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{args.config}: option {key!r}: invalid value {value!r}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{args.config}: option {key!r} must be one of {', '.join(map(str, action.choices))}, "
                              f"got {value!r}")
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
    """A run's progress on stderr. In a terminal: one line redrawn at most 10 times a second (task, step, loss).
    Elsewhere (a log file, CI): a plain line every ``interval`` seconds with the task, step, loss, the rate in
    steps per second and the run's ETA, so a long run shows it is alive. ``enabled=False`` (``--quiet``) draws
    nothing. ``task_free``: the steps count over one stream of every task (the trainer's task-free reports);
    a stream is also recognised by a task change without the step count restarting. ``clock`` is for tests."""

    LOG_EVERY_S = 30.0  # outside a terminal: often enough to see a run move, rare enough to keep a CI log short

    def __init__(self, n_tasks: int, label: str = "", enabled: bool = True, *, task_free: bool = False,
                 interval: float | None = None, clock: Any = time.monotonic):
        self.n_tasks, self.label, self.clock, self.stream = n_tasks, label, clock, task_free
        self.interval = self.LOG_EVERY_S if interval is None else interval
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.last = 0.0
        self.t0: float | None = None  # the first report: rate and ETA count from there (after data loading)
        self.start_steps = 0  # steps done when the first report came (a resumed run starts past 0)
        self.task, self.step, self.n_steps = 0, 0, 0  # the last report
        self.finished_steps = 0  # the steps of the tasks before the current one

    def __call__(self, task: int, step: int, n_steps: int, loss: float) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not self.tty:
            self._log(now, task, step, n_steps, loss)
            return
        if now - self.last < 0.1 and step != n_steps:
            return
        self.last = now
        width = 24
        filled = int(width * step / max(n_steps, 1))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{self.label}task {task + 1}/{self.n_tasks} [{bar}] {step}/{n_steps} "
                         f"loss {loss:.4f}   ")
        sys.stderr.flush()

    def _log(self, now: float, task: int, step: int, n_steps: int, loss: float) -> None:
        if task != self.task and not self.stream:
            if step < self.step:  # the count restarted: the tasks in between are done, at the last one's length
                self.finished_steps += (task - self.task) * self.n_steps
            else:
                self.stream = True
        self.task, self.step, self.n_steps = task, step, n_steps
        done = self.finished_steps + step
        if self.t0 is None:
            self.t0, self.start_steps, self.last = now, done, now
            return
        if now - self.last < self.interval:
            return
        self.last = now
        rate = (done - self.start_steps) / max(now - self.t0, 1e-9)
        left = n_steps - step + (0 if self.stream else (self.n_tasks - task - 1) * n_steps)  # later tasks as long
        eta = self.duration(left / rate) if rate > 0 else "?"
        sys.stderr.write(f"{self.label}task {task + 1}/{self.n_tasks} step {step}/{n_steps} loss {loss:.4f} "
                         f"{rate:.1f} steps/s ETA {eta}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()

    @staticmethod
    def duration(seconds: float) -> str:
        """``seconds`` for people (:func:`retain.experiments.duration`, imported when a line is written)."""
        from retain.experiments import duration

        return duration(seconds)
