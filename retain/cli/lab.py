"""The experiment commands: ``compare``, ``orders``, ``sweep``, ``reproduce``, ``report``, ``runs``, ``export``.

:func:`register` adds them to the ``retain`` parser (see :mod:`retain.cli`). Every command takes ``--store``,
``--quiet`` and the data options; bad input is refused before anything runs or is written. Every run is a job
(:mod:`retain.jobs`) resolved before the first one starts, and all go through :func:`retain.experiments.run_jobs`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from typing import Any

from retain.cli.options import (
    add_common_options,
    add_data_options,
    add_run_options,
    check_writable_file,
    note,
    run_values,
    write_json_atomic,
)
from retain.config import RunConfig
from retain.errors import ConfigError

# ------------------------------------------------------------------------------------------------ options

def add_store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default="retain.db", metavar="PATH", help="results store (SQLite; default ./retain.db)")


def add_exec_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, help="local worker processes (default: half the cores; 1 = in this "
                   "process)")
    g.add_argument("--executor", choices=["local", "ray"], default="local", help="where runs execute")
    g.add_argument("--address", metavar="HOST:PORT", help="Ray cluster address (with --executor ray)")
    g.add_argument("--force", action="store_true", help="rerun runs already done in the store")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="checkpoint every N steps too (task boundaries always); unfinished runs resume")


def open_store(args: argparse.Namespace, create: bool = True):
    from retain.store import Store

    return Store(args.store, create=create)


def check_exec_args(args: argparse.Namespace) -> None:
    """Refuse inconsistent execution options before anything is built or written."""
    if args.executor == "ray" and not args.address:
        raise ConfigError("--executor ray needs --address HOST:PORT (the head node, e.g. 127.0.0.1:6379)")
    if args.executor != "ray" and args.address:
        raise ConfigError("--address is for --executor ray")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be at least 1 step, got {args.checkpoint_every}")


def executor_for(args: argparse.Namespace):
    from retain.executors import make_executor

    check_exec_args(args)
    return make_executor(args.executor, args.workers, args.address)


def _list(text: str | None, flag: str) -> list[str]:
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if text is not None and not items:
        raise ConfigError(f"{flag} expects a comma-separated list, got {text!r}")
    return items


def _seeds(n: int | None, default: int) -> list[int]:
    n = default if n is None else n
    if n < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n}")
    return list(range(n))


def _method_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``--param lambda=1`` (every method) and ``--param ewc.lambda=1`` (one method)."""
    common: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        method, dot, name = key.partition(".")
        if dot:
            per.setdefault(method, {})[name] = value
        else:
            common[key] = value
    return common, per


def _failures(records: list[dict[str, Any]]) -> int:
    """One line per distinct error of the failed runs (with the runs it hit), and the exit code: 0 when every run
    finished; otherwise 2 when every failure was bad input (missing data, a refused configuration), else 1 — for a
    partial failure too, after the table of what ran."""
    failed = [r for r in records if r and r["status"] == "failed"]
    if not failed:
        return 0
    by_error: dict[str, list[str]] = {}
    for r in failed:
        c = r["config"]
        label = f"{c.get('method')} {c.get('mode')} s{c.get('seed')}" + (
            f" at global step {r['error_step']}" if r.get("error_step") is not None else "")
        by_error.setdefault(str(r["error"]), []).append(label)
    for error, labels in by_error.items():
        shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
        print(f"failed: {len(labels)} run(s) ({shown}): {error}")
    what = f"all {len(records)}" if len(failed) == len(records) else f"{len(failed)} of {len(records)}"
    print(f"retain: error: {what} run(s) failed (see the lines above; the store keeps each reason)", file=sys.stderr)
    return 2 if all(r.get("exit_code") == 2 for r in failed) else 1


def _check_data(jobs: list) -> None:
    """Refuse, before the first run, a benchmark whose data is nowhere (one line, exit 2), instead of one failed
    run per configuration."""
    from retain import benchmarks, data

    for bench, data_dir, download in sorted({(j.config.benchmark, j.config.data_dir, j.config.download)
                                             for j in jobs}, key=str):
        if bench in benchmarks.BENCHMARKS and not download:
            dataset = benchmarks.get(bench).dataset
            if data.locate(dataset, data_dir) is None:
                data.load(dataset, data_dir)  # raises the DataError that says where it looked and how to get it


def _base(args: argparse.Namespace) -> tuple[RunConfig, dict[str, str], dict[str, dict[str, str]]]:
    """The run options every job of the command shares, and the ``--param`` values: for every method
    (``--param lambda=1``) and for one (``--param ewc.lambda=1``)."""
    values = run_values(args)
    common, per = _method_params(values.pop("params", {}))
    return RunConfig(**values), common, per


def _run(args: argparse.Namespace, jobs: list, store: Any, experiment: str, label: str) -> list[dict[str, Any]]:
    from retain.experiments import run_jobs

    executor = executor_for(args)
    try:
        return run_jobs(jobs, store, executor, force=args.force, experiment=experiment, quiet=args.quiet,
                        checkpoint_every=args.checkpoint_every, label=label, notify=note)
    finally:
        executor.close()


# ------------------------------------------------------------------------------------------------ compare

def cmd_compare(args: argparse.Namespace) -> int:
    from retain import experiments as ex

    check_exec_args(args)
    if args.methods is None:
        methods, missing = ex.available(ex.CLASSIC)
        if missing:
            note(f"not available yet, left out of the classic comparison: {', '.join(missing)}")
    else:
        methods = _list(args.methods, "--methods")
        ex.ensure_methods(methods)
    modes = _list(args.modes, "--modes") if args.modes else [None]
    base, common, per = _base(args)
    unknown = set(per) - set(methods)
    if unknown:
        raise ConfigError(f"--param for {', '.join(sorted(unknown))}, which is not in --methods")
    seeds = _seeds(args.seeds, 3)
    jobs = ex.compare_jobs(base, methods, seeds, modes, note,
                           {m: {**common, **per.get(m, {})} for m in methods})
    _check_data(jobs)
    store = open_store(args)
    bench = jobs[0].config.benchmark if jobs else base.benchmark
    print(f"compare on {bench}: {', '.join(methods)} x {len(seeds)} seed(s) x "
          f"{', '.join(sorted({j.config.mode for j in jobs})) or '-'}-IL; store {store.path}")
    records = _run(args, jobs, store, args.name or f"compare {bench}", "compare ")
    print(ex.compare_table(records, args.interval))
    code = _failures(records)
    print(f"plots and every run's accuracy matrix: retain report --store {store.path}")
    return code


# ------------------------------------------------------------------------------------------------- orders

def cmd_orders(args: argparse.Namespace) -> int:
    from retain import experiments as ex

    check_exec_args(args)
    methods = _list(args.methods, "--methods") if args.methods else ex.available(("finetune", "ewc", "er"))[0]
    ex.ensure_methods(methods)
    if args.random_orders < 0:
        raise ConfigError(f"--random-orders must be >= 0, got {args.random_orders}")
    base, common, per = _base(args)
    seeds = _seeds(args.seeds, 1)
    for m in methods:  # every method's configuration checked before the difficulty runs start
        ex.make_job(base, method=m, params={**common, **per.get(m, {})})
    difficulty = ex.difficulty_jobs(base, seeds)
    _check_data(difficulty)
    store = open_store(args)
    name = args.name or f"orders {base.benchmark}"
    diff = _run(args, difficulty, store, name, "difficulty ")
    n = len(difficulty) // len(seeds)
    ease = []
    for j in range(n):
        vals = [r["accuracy_matrix"][0][0] for r in diff
                if r["status"] == "done" and r["config"].get("alone") == j]
        if not vals:
            raise ConfigError(f"task {j} could not be trained alone ({diff[j * len(seeds)]['error']}); "
                              "fix the configuration")
        ease.append(sum(vals) / len(vals))
    orders = ex.task_orders(ease, args.random_orders, args.order_seed)
    jobs = []
    for m in methods:
        for oname, order in orders.items():
            for s in seeds:
                jobs.append(ex.make_job(base, f"{m} {oname} s{s}", method=m, seed=s, task_order=order,
                                        params={**common, **per.get(m, {})}))
    print(f"orders on {base.benchmark}: {', '.join(methods)} x {len(orders)} orders x {len(seeds)} seed(s); "
          f"store {store.path}")
    records = _run(args, jobs, store, name, "orders ")
    text, _ = ex.orders_report(records, orders, ease)
    print(text)
    return _failures(records)


# -------------------------------------------------------------------------------------------------- sweep

def cmd_sweep(args: argparse.Namespace) -> int:
    from retain import config as config_file
    from retain import experiments as ex

    check_exec_args(args)
    data = config_file.load(args.file)
    base = RunConfig(data_dir=args.data_dir, download=args.download)
    sweep = ex.parse_sweep(data, args.file, base)
    pairs = ex.sweep_jobs(sweep)
    _check_data([j for _, j in pairs])
    store = open_store(args)
    print(f"sweep {sweep.name}: {len(sweep.candidates)} configuration(s) x {len(sweep.modes)} mode(s) x "
          f"{len(sweep.seeds)} seed(s) = {len(pairs)} runs; store {store.path}")
    records = _run(args, [j for _, j in pairs], store, f"sweep {sweep.name}", "sweep ")
    chosen = ex.choose(sweep, pairs, records)
    print(ex.sweep_report(sweep, chosen))
    code = _failures(records)
    if args.json:
        write_json_atomic(args.json, _jsonable(chosen))
    return code


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- reproduce

def cmd_reproduce(args: argparse.Namespace) -> int:
    from retain import experiments as ex
    from retain import reproduce
    from retain.method import methods as registry

    check_exec_args(args)
    proto = reproduce.get(args.name)
    settings = dict(proto.settings)
    n_seeds = proto.seeds
    if args.quick:
        quick = dict(proto.quick)
        n_seeds = quick.pop("seeds", 1)
        settings.update(quick)
    if args.seeds is not None:
        n_seeds = args.seeds
    seeds = _seeds(n_seeds, 1)
    base = RunConfig(benchmark=proto.benchmark, data_dir=args.data_dir, download=args.download, device=args.device)
    reg = registry()
    jobs, plan = [], []
    for row, mode in reproduce.plan(proto, args.quick):  # the cells to run (--quick: the protocol's quick ones)
        if row.method not in reg:
            note(f"{row.label}: method {row.method!r} is not available yet; skipped")
            continue
        if mode not in reg[row.method].modes:
            note(f"{row.label}: {row.method} does not support {mode}-IL; skipped")
            continue
        try:
            row_jobs = [ex.make_job(base, f"{row.label} {mode} s{s}", method=row.method, mode=mode, seed=s,
                                    params=dict(row.params), **{**settings, **row.train}) for s in seeds]
        except ConfigError as e:
            note(f"{row.label}: {e}; skipped")
            continue
        plan.append((row, mode, len(jobs), len(row_jobs)))
        jobs += row_jobs
    _check_data(jobs)
    store = open_store(args)
    reduced = " (QUICK: reduced — " + ", ".join(f"{k}={v}" for k, v in proto.quick.items()) + \
        " — not the paper's protocol)" if args.quick else ""
    print(f"reproduce {proto.name}: {proto.title}{reduced}")
    print(f"source: {proto.source}")
    records = _run(args, jobs, store, f"reproduce {proto.name}" + (" quick" if args.quick else ""), "reproduce ")
    head, body = reproduce.comparison(proto, [(row, mode, records[s:s + c]) for row, mode, s, c in plan])
    print(ex.markdown(head, body))  # the same table as the report's reproduce section
    if proto.metric_tasks:
        print(f"(accuracy over the tasks after the first {proto.metric_tasks}, as the paper reports)")
    if proto.note:
        print(f"note: {proto.note}")
    if args.quick:
        print("QUICK RUN: fewer seeds and steps than the paper; the numbers are not comparable to it.")
    return _failures(records)


# ------------------------------------------------------------------------------------------ report, runs, export

def cmd_report(args: argparse.Namespace) -> int:
    from retain import report

    store = open_store(args, create=False)
    md, html = report.write(store, args.out, experiment=args.experiment, max_heatmaps=args.max_heatmaps)
    print(f"wrote {md} and {html}")
    return 0


def _selected(args: argparse.Namespace) -> list[dict[str, Any]]:
    store = open_store(args, create=False)
    return store.runs(status=args.status, experiment=args.experiment, method=args.method,
                      benchmark=args.benchmark)


def cmd_runs(args: argparse.Namespace) -> int:
    from retain.experiments import _fmt_value as ex_fmt
    from retain.experiments import markdown

    rows = _selected(args)
    if not rows:
        print("no runs in the store" + (" matching the filters" if any(
            (args.status, args.experiment, args.method, args.benchmark)) else ""))
        return 0
    body = []
    for r in rows:
        acc = (r.get("metrics") or {}).get("acc")
        c = r["config"]
        detail = (f"{100 * acc:.2f}" if acc is not None and math.isfinite(acc) else
                  (r.get("error") or "")[:60] if r["status"] == "failed" else "")
        extra = ", ".join(f"{k}={ex_fmt(v)}" for k, v in (c.get("params") or {}).items())  # in full
        if c.get("task_order"):
            extra += (", " if extra else "") + "order " + "-".join(map(str, c["task_order"]))
        if c.get("alone") is not None:
            extra += (", " if extra else "") + f"task {c['alone']} alone"
        body.append([r["hash"][:10], r["status"], str(c.get("benchmark")), str(c.get("mode")),
                     str(c.get("method")), str(c.get("seed")), extra, detail])
    print(markdown(["id", "status", "benchmark", "mode", "method", "seed", "configuration", "ACC % / error"],
                   body))
    print(f"{len(rows)} run(s)")
    return 0


EXPORT_COLUMNS = ("hash", "status", "benchmark", "mode", "method", "seed", "params", "acc", "bwt", "fwt",
                  "forgetting", "learning_acc", "train_s", "eval_s", "peak_memory_mb", "error", "error_task",
                  "error_step", "started", "finished")


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    check_writable_file(args.out, "--out")
    rows = _selected(args)
    if args.format == "json":
        text = json.dumps(_jsonable(rows), indent=1)
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(EXPORT_COLUMNS)
        for r in rows:
            m, t = r.get("metrics") or {}, r.get("timings") or {}
            vals = {**{k: r.get(k) for k in EXPORT_COLUMNS}, **{k: m.get(k) for k in
                                                                ("acc", "bwt", "fwt", "forgetting", "learning_acc")},
                    "train_s": t.get("train_s"), "eval_s": t.get("eval_s"),
                    "params": json.dumps(r["config"].get("params") or {}, sort_keys=True)}
            w.writerow(["" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
                        for v in (vals[k] for k in EXPORT_COLUMNS)])
        text = buf.getvalue()
    if args.out:
        import os
        import tempfile

        path = Path(args.out)
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        print(f"wrote {len(rows)} run(s) to {path}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- registration

def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", choices=["running", "done", "failed"])
    p.add_argument("--experiment", help="only the runs of this experiment (e.g. 'compare split-digits')")
    p.add_argument("--method")
    p.add_argument("--benchmark")


def register(sub: Any) -> None:
    c = sub.add_parser("compare", help="methods x seeds (x modes) on one benchmark: mean ± std of every metric")
    c.add_argument("--methods", help="comma-separated (default: finetune, ewc, er, agem — the classic comparison)")
    c.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    c.add_argument("--modes", "--mode", help="comma-separated scenario modes (default: the benchmark's)")
    c.add_argument("--interval", choices=["std", "ci95"], default="std", help="spread shown: std or 95%% interval")
    c.add_argument("--name", help="experiment name in the store")
    c.add_argument("--config", metavar="FILE", help="options from a TOML/YAML file (flags override it)")
    add_run_options(c, single_method=False)
    add_store_option(c)
    add_exec_options(c)
    c.set_defaults(func=cmd_compare, _parser=c)

    o = sub.add_parser("orders", help="task-order sensitivity: easy-to-hard, hard-to-easy and random orders")
    o.add_argument("--methods", help="comma-separated (default: finetune, ewc, er where available)")
    o.add_argument("--random-orders", type=int, default=3, metavar="K", help="random orders to add (default 3)")
    o.add_argument("--order-seed", type=int, default=0, help="seed of the random orders")
    o.add_argument("--seeds", type=int, help="seeds per order (default 1)")
    o.add_argument("--name", help="experiment name in the store")
    o.add_argument("--config", metavar="FILE", help="options from a TOML/YAML file (flags override it)")
    add_run_options(o, single_method=False)
    add_store_option(o)
    add_exec_options(o)
    o.set_defaults(func=cmd_orders, _parser=o)

    s = sub.add_parser("sweep", help="grid or random search from a TOML/YAML file; chosen on validation")
    s.add_argument("file", help="the sweep file (see docs/experiments.md and examples/)")
    s.add_argument("--json", metavar="PATH", help="write the candidates, choices and Pareto front as JSON")
    add_store_option(s)
    add_exec_options(s)
    add_data_options(s)
    add_common_options(s)
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("reproduce", help="run a published protocol (p1, p1-hsu, p2, p2-agem, p3) beside the "
                       "paper's numbers")
    r.add_argument("name", help="protocol: p1, p1-hsu, p2, p2-agem, p3")
    r.add_argument("--quick", action="store_true", help="a reduced version (fewer seeds and steps), labelled so")
    r.add_argument("--seeds", type=int, help="override the number of seeds")
    r.add_argument("--device", default="auto")
    add_store_option(r)
    add_exec_options(r)
    add_data_options(r)
    add_common_options(r)
    r.set_defaults(func=cmd_reproduce)

    rep = sub.add_parser("report", help="Markdown + self-contained HTML report with plots, from the store")
    rep.add_argument("--out", default="retain-report", metavar="DIR", help="output folder (default retain-report)")
    rep.add_argument("--experiment", help="only this experiment's runs")
    rep.add_argument("--max-heatmaps", type=int, default=200, help="at most this many per-run heatmaps")
    add_store_option(rep)
    add_data_options(rep)
    add_common_options(rep)
    rep.set_defaults(func=cmd_report)

    ru = sub.add_parser("runs", help="list the runs in the store")
    _filters(ru)
    add_store_option(ru)
    add_data_options(ru)
    add_common_options(ru)
    ru.set_defaults(func=cmd_runs)

    e = sub.add_parser("export", help="export the runs as CSV or JSON")
    e.add_argument("--format", choices=["csv", "json"], default="csv")
    e.add_argument("--out", metavar="PATH", help="file to write (default: standard output)")
    _filters(e)
    add_store_option(e)
    add_data_options(e)
    add_common_options(e)
    e.set_defaults(func=cmd_export)
