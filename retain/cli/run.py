"""``retain run``, ``retain methods`` and ``retain benchmarks``.

``retain run`` resolves its options once (:func:`retain.config.resolve`); without a store it trains in this
process through :func:`retain.api.run`; with ``--store`` / ``--checkpoint-every`` / ``--resume`` it goes through
the same job path as compare and sweep (:func:`retain.experiments.run_jobs`): a configuration already done is
shown from the store, an unfinished one continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from retain.cli.options import (
    ProgressBar,
    add_common_options,
    add_data_options,
    add_run_options,
    check_writable_file,
    note,
    run_values,
    write_json_atomic,
)
from retain.config import Run, resolve
from retain.errors import ConfigError, RetainError

RESULT_KEYS = ("config", "accuracy_matrix", "baseline", "metrics", "timings", "versions", "warnings", "val_matrix",
               "peak_memory_mb", "gpu_memory_mb", "memory", "model", "scenario", "task_il_matrix", "anytime",
               "compute")


class RunFailed(RetainError):
    """A run through the store failed; its exit code is the failure's own (2 bad input, 1 a fault)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def check_run(args: argparse.Namespace) -> Run:
    """Everything ``retain run`` can check before loading data or training: output paths, the store path,
    checkpoint options and the resolved run (method, parameters, mode, training options, scenario shape)."""
    check_writable_file(args.json, "--json")
    check_writable_file(args.store, "--store")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be at least 1 step, got {args.checkpoint_every}")
    return resolve(**run_values(args))


def cmd_run(args: argparse.Namespace) -> int:
    from retain import api

    run = check_run(args)
    if args.dry_run:
        print(json.dumps(run.spec(), sort_keys=True))
        return 0
    if args.store or args.resume or args.checkpoint_every:
        from retain import distributed

        if distributed.launched():
            raise ConfigError("under torchrun every process would write the store: run without --store / --resume "
                              "/ --checkpoint-every there, or use --devices N, which keeps one record")
        result = _run_in_store(args, run)
    else:
        bar = ProgressBar(run.config.n_tasks, enabled=not args.quiet, task_free=run.config.task_free)
        try:
            result = api.run(run, progress=bar)
        finally:
            bar.close()
        if result is None:  # a process other than rank 0 of a torchrun launch: rank 0 reports
            return 0
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    c = run.config
    print(f"{c.method} on {c.benchmark} ({c.mode}-IL), seed {c.seed}: "
          f"{', '.join(f'{k}={v}' for k, v in result.config['params'].items()) or 'no hyper-parameters'}")
    print(result.table())
    if args.json:
        write_json_atomic(args.json, result.to_dict())
    return 0


def _run_in_store(args: argparse.Namespace, run: Run) -> Any:
    """The run as a one-job experiment in the store (the job path compare and sweep use)."""
    from retain import api
    from retain.executors import InProcess
    from retain.experiments import run_jobs
    from retain.jobs import Job, checkpoint_dir
    from retain.store import Store

    store = Store(args.store or "retain.db")
    job = Job(run, label=f"{run.config.method} s{run.config.seed}")
    previous = store.get(job.hash)
    if previous is not None and previous["status"] == "done" and not args.force:
        note(f"already done in the store {store.path} (run {job.hash[:10]}); showing the stored result "
             "(--force reruns it)")
        return api.Result(**{k: previous.get(k) for k in RESULT_KEYS})
    if args.resume and not (checkpoint_dir(store) / f"{job.hash}.ckpt").exists():
        note(f"no checkpoint of this configuration in {checkpoint_dir(store)}; starting from the beginning")
    bar = _OneRun(ProgressBar(run.config.n_tasks, enabled=not args.quiet, task_free=run.config.task_free))
    (rec,) = run_jobs([job], store, InProcess(), force=args.force, quiet=args.quiet,
                      checkpoint_every=args.checkpoint_every, notify=note, threads=run.threads,
                      progress=bar, notify_failures=False)
    if rec["status"] != "done":
        raise RunFailed(f"{rec['error']}; recorded as failed in {store.path}", rec.get("exit_code", 1))
    return api.Result(**{k: rec.get(k) for k in RESULT_KEYS})


class _OneRun:
    """The single run's progress bar, as the progress object :func:`run_jobs` reports to."""

    def __init__(self, bar: ProgressBar):
        self.bar, self.labels = bar, {}

    def report(self, index: int, task: int, step: int, n: int, loss: float) -> None:
        self.bar(task, step, n, loss)

    def finished(self, index: int, ok: bool) -> None:
        pass

    def close(self) -> None:
        self.bar.close()


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
    print("\nAny methods joined with + run together as one hybrid (e.g. --method ewc+er, si+der). A class of your "
          "own: --method module:Class (docs/design.md, Adding a method).")
    return 0


def cmd_benchmarks(args: argparse.Namespace) -> int:
    from retain.benchmarks import BENCHMARKS, where

    for b in BENCHMARKS.values():
        print(f"{b.name:<20} {b.n_tasks:>2} tasks, default mode {b.mode:<6} {b.about}")
        print(f"{'':<20} data: {where(b.name, args.data_dir)}")
    return 0


def register(sub: Any) -> None:
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
    s.add_argument("--resume", action="store_true", help="continue this configuration from its checkpoint (a run "
                   "in a store does so by itself when its checkpoint is there)")
    s.add_argument("--force", action="store_true", help="rerun even if the store holds this run as done")
    r.set_defaults(func=cmd_run, _parser=r)

    m = sub.add_parser("methods", help="list the methods, their hyper-parameters, defaults and modes")
    add_common_options(m)
    m.set_defaults(func=cmd_methods)

    b = sub.add_parser("benchmarks", help="list the benchmarks and where their data was found")
    add_data_options(b)
    add_common_options(b)
    b.set_defaults(func=cmd_benchmarks)
