"""The ``retain`` command line: ``run``, ``methods``, ``benchmarks`` (and the experiment commands).

Every error is one line on stderr naming the problem and the fix: exit code 2 for bad input, 1 for a fault,
no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from retain.errors import ConfigError, OutputError, RetainError


def one_line(message: str) -> str:
    """``message`` with line breaks and other control characters escaped (a typed value may hold them), so that
    every error stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(one_line(f"retain: error: {message} (see `{self.prog} --help`)") + "\n")
        sys.exit(2)


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


# ------------------------------------------------------------------------------------------------ arguments

def parse_params(items: list[str] | None) -> dict[str, str]:
    """``["lambda=100", "online=true"]`` -> ``{"lambda": "100", "online": "true"}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param expects name=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers like 0,1,2, got {text!r}") from None


def parse_pair(text: str | None, flag: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        a, b = (float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} expects two comma-separated numbers like 0.1,0.2752, got {text!r}") from None
    return a, b


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="folder with the dataset files (else $RETAIN_DATA, ~/.cache/retain, ...)")
    g.add_argument("--download", action="store_true", help="fetch missing data from the canonical mirrors")


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_run_options(p: argparse.ArgumentParser, single_method: bool = True) -> None:
    """The options that define a run (shared by run, compare, orders...)."""
    p.add_argument("--benchmark", default="split-digits", help="see `retain benchmarks` (default split-digits)")
    if single_method:
        p.add_argument("--method", default="finetune", help="see `retain methods` (default finetune)")
        p.add_argument("--mode", help="task, domain or class (default: the benchmark's)")
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="method hyper-parameter (repeatable), e.g. --param lambda=100")
    t = p.add_argument_group("training (defaults: the benchmark's protocol)")
    t.add_argument("--n-tasks", type=int)
    t.add_argument("--arch", choices=["mlp", "resnet18"])
    t.add_argument("--hidden", help="MLP hidden sizes, e.g. 400,400")
    t.add_argument("--epochs", type=int, help="passes over each task's data")
    t.add_argument("--iterations", type=int, help="steps per task (instead of --epochs)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--optimizer", choices=["adam", "sgd"])
    t.add_argument("--lr", type=float)
    t.add_argument("--momentum", type=float)
    t.add_argument("--normalize", metavar="MEAN,STD", help="inputs (x - MEAN) / STD on [0, 1] pixels, e.g. "
                   "0.1,0.2752 as Hsu et al.'s MNIST loader (default: the dataset's own)")
    t.add_argument("--pad", type=int, metavar="PIXELS", help="zero pixels added on each side of every image before "
                   "the tasks' transforms (default: the benchmark's; permuted-mnist pads to 32x32 as van de Ven's "
                   "loader)")
    t.add_argument("--reset-optimizer", action="store_true", help="a fresh optimizer at each task (default: its "
                   "state carries over, as in the reference code of the P1/P2 papers)")
    t.add_argument("--all-outputs", action="store_true", help="class-IL: the training loss spans every output from "
                   "the first task, as Mammoth's code (the DER protocol) does (default: the classes seen so far)")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    t.add_argument("--val-fraction", type=float, default=0.0, help="hold out this share of each task's training "
                   "data as a validation split")
    t.add_argument("--task-free", action="store_true", help="one stream of batches, no task boundaries")
    t.add_argument("--blurry", type=float, default=0.0, help="task-free: blur width of task transitions in [0,1)")
    t.add_argument("--task-order", help="permutation of the tasks, e.g. 4,3,2,1,0")
    t.add_argument("--class-order", help="order of the classes before they are cut into tasks")
    add_data_options(p)
    add_common_options(p)


def run_config(args: argparse.Namespace, **over: Any):
    from retain.api import RunConfig
    from retain.models import parse_hidden

    if args.epochs is not None and args.iterations is not None:
        raise ConfigError("give --epochs or --iterations, not both")
    cfg = RunConfig(
        benchmark=args.benchmark, method=getattr(args, "method", "finetune"), mode=getattr(args, "mode", None),
        params=parse_params(args.param), n_tasks=args.n_tasks, arch=args.arch,
        hidden=parse_hidden(args.hidden) if args.hidden else None, epochs=args.epochs, iterations=args.iterations,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        reset_optimizer=args.reset_optimizer, all_outputs=args.all_outputs,
        normalize=parse_pair(args.normalize, "--normalize"), pad=args.pad,
        seed=getattr(args, "seed", 0), device=args.device,
        val_fraction=args.val_fraction,
        task_free=args.task_free, blurry=args.blurry, class_order=parse_int_list(args.class_order, "--class-order"),
        task_order=parse_int_list(args.task_order, "--task-order"), data_dir=args.data_dir, download=args.download,
    )
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


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


# ------------------------------------------------------------------------------------------------- commands

def check_run(args: argparse.Namespace) -> Any:
    """Everything ``retain run`` can check before loading data or training: output paths, the store path,
    checkpoint options, the device, and the resolved configuration (method, parameters, mode, training
    options, scenario shape). Returns the resolved :class:`retain.api.RunConfig`."""
    from retain.trainer import resolve_device

    check_writable_file(args.json, "--json")
    check_writable_file(args.store, "--store")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be at least 1 step, got {args.checkpoint_every}")
    cfg = run_config(args).resolved()
    resolve_device(cfg.device)
    return cfg


def parse_run(argv: list[str]) -> Any:
    """The resolved :class:`retain.api.RunConfig` that ``retain run ARGV`` would train, without training or
    loading data; bad input raises :class:`RetainError` (or exits 2 from the argument parser)."""
    parser = build_parser()
    args = parser.parse_args(["run", *argv])
    if args.config:
        args = _with_config(parser, ["run", *argv], args)
    return check_run(args)


def cmd_run(args: argparse.Namespace) -> int:
    from retain import api

    cfg = check_run(args)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), sort_keys=True))
        return 0
    scenario = cfg.scenario()
    recorder = _Recorder(args, cfg)  # the store and the checkpoint, when asked for
    if recorder.stored is not None:
        result = api.Result(**{k: recorder.stored[k] for k in ("config", "accuracy_matrix", "baseline", "metrics",
                                                                "timings", "versions", "warnings", "val_matrix",
                                                                "peak_memory_mb")})
        print(f"already done in the store {args.store} (run {recorder.hash[:10]}); showing the stored result "
              "(--force reruns it)", file=sys.stderr)
    else:
        bar = ProgressBar(scenario.n_tasks, enabled=not args.quiet)
        try:
            result = api.run(cfg, scenario=scenario, progress=bar, checkpointer=recorder.checkpointer)
        except BaseException as e:
            recorder.failed(e)
            raise
        finally:
            bar.close()
        recorder.done(result)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{cfg.method} on {cfg.benchmark} ({cfg.mode}-IL), seed {cfg.seed}: "
          f"{', '.join(f'{k}={v}' for k, v in result.config['params'].items()) or 'no hyper-parameters'}")
    print(result.table())
    if args.json:
        write_json_atomic(args.json, result.to_dict())
    return 0


class _Recorder:
    """``retain run``'s link to the results store and its checkpoint (only with --store / --resume /
    --checkpoint-every): skip a configuration already done, record the outcome, resume from a checkpoint."""

    def __init__(self, args: argparse.Namespace, cfg: Any):
        self.store = self.checkpointer = self.stored = None
        self.hash = ""
        if not (args.store or args.resume or args.checkpoint_every):
            return
        from retain.checkpoint import Checkpointer
        from retain.experiments import checkpoint_dir
        from retain.store import Store, config_hash

        args.store = args.store or "retain.db"
        self.store = Store(args.store)
        self.spec = cfg.to_dict()
        self.hash = config_hash(self.spec)
        previous = self.store.get(self.hash)
        if previous is not None and previous["status"] == "done" and not args.force:
            self.stored = previous
            return
        self.checkpointer = Checkpointer(checkpoint_dir(self.store) / f"{self.hash}.ckpt", args.checkpoint_every,
                                         resume=args.resume, fingerprint=self.hash)
        if args.resume and not self.checkpointer.path.exists():
            print(f"note: no checkpoint of this configuration in {self.checkpointer.path.parent}; "
                  "starting from the beginning", file=sys.stderr)
        self.store.claim(self.hash, self.spec, force=True)

    def done(self, result: Any) -> None:
        if self.store is None:
            return
        if self.checkpointer.resumed_from:
            p = self.checkpointer.resumed_from
            print(f"resumed from the checkpoint at task {p['task']}, step {p['task_step']} of the task",
                  file=sys.stderr)
        self.store.finish(self.hash, self.spec, result.to_dict())
        self.checkpointer.finished()

    def failed(self, e: BaseException) -> None:
        if self.store is None:
            return
        from retain.trainer import TrainingError

        if isinstance(e, TrainingError):
            self.store.fail(self.hash, self.spec, str(e), e.task, e.step)
        elif isinstance(e, KeyboardInterrupt):
            self.store.fail(self.hash, self.spec, "interrupted; continue with `retain run ... --resume`")
        elif isinstance(e, Exception):
            self.store.fail(self.hash, self.spec, f"{type(e).__name__}: {e}")


def cmd_methods(args: argparse.Namespace) -> int:
    from retain.method import hyperparameters, methods

    for name, cls in methods().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        bounds = "needs task boundaries" if cls.needs_boundaries else "task-free ok"
        print(f"{name:<12} {doc}")
        print(f"{'':<12} modes: {', '.join(cls.modes)}; {bounds}")
        for pname, typ, default, help_ in hyperparameters(cls):
            tname = getattr(typ, "__name__", str(typ).replace("typing.", ""))
            print(f"{'':<14}{pname} ({tname}, default {default!r}): {help_}")
        if cls.presets:
            print(f"{'':<12} presets for: {', '.join(sorted(cls.presets))}")
    return 0


def cmd_benchmarks(args: argparse.Namespace) -> int:
    from retain.benchmarks import BENCHMARKS, where

    for b in BENCHMARKS.values():
        print(f"{b.name:<20} {b.n_tasks:>2} tasks, default mode {b.mode:<6} {b.about}")
        print(f"{'':<20} data: {where(b.name, args.data_dir)}")
    return 0


def build_parser() -> Parser:
    import retain

    p = Parser(prog="retain", description="Continual learning: train on a sequence of tasks, measure forgetting.")
    p.add_argument("--version", action="version", version=f"retain {retain.__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="train one method on one benchmark, print the accuracy matrix and metrics")
    add_run_options(r)
    r.add_argument("--json", metavar="PATH", help="write the result record as JSON")
    r.add_argument("--config", metavar="FILE", help="options from a TOML/YAML file (flags on the command line win)")
    r.add_argument("--dry-run", action="store_true", help="check the options and print the resolved "
                   "configuration as JSON, without loading data or training")
    s = r.add_argument_group("results store and checkpoints")
    s.add_argument("--store", metavar="PATH", help="record the run in this results store (SQLite)")
    s.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="checkpoint every N steps (and at every "
                   "task boundary) beside the store (default store ./retain.db)")
    s.add_argument("--resume", action="store_true", help="continue this configuration from its checkpoint")
    s.add_argument("--force", action="store_true", help="rerun even if the store holds this run as done")
    r.set_defaults(func=cmd_run, _parser=r)

    m = sub.add_parser("methods", help="list the methods, their hyper-parameters, defaults and modes")
    add_common_options(m)
    m.set_defaults(func=cmd_methods)

    b = sub.add_parser("benchmarks", help="list the benchmarks and where their data was found")
    add_data_options(b)
    add_common_options(b)
    b.set_defaults(func=cmd_benchmarks)

    try:  # the experiment commands live in their own module
        from retain import experiments_cli
    except ImportError:
        pass
    else:
        experiments_cli.register(sub)
    return p


def _with_config(parser: Parser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse with the config file's options placed before the typed ones (so the typed ones win)."""
    from retain import config

    values = config.load(args.config)
    file_argv = config.to_argv(values, args._parser, args.config)
    at = argv.index(args.command)
    return parser.parse_args(argv[:at + 1] + file_argv + argv[at + 1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            args = _with_config(parser, argv, args)
        return int(args.func(args) or 0)
    except RetainError as e:
        print(one_line(f"retain: error: {e}"), file=sys.stderr)
        if getattr(args, "debug", False):
            traceback.print_exc()
        return e.exit_code
    except KeyboardInterrupt:
        resumable = args.command == "run" and (args.store or args.checkpoint_every or args.resume)
        print("retain: interrupted" + ("; the checkpoint is saved: rerun the same command with --resume to "
                                       "continue" if resumable else ""), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(one_line(f"retain: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)"),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
