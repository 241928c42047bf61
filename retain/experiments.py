"""Experiments over many runs: compare methods, task-order sensitivity, hyper-parameter sweeps.

Each experiment is a list of *jobs* (resolved run configurations), run through :func:`run_jobs`: a job whose
configuration hash is already ``done`` in the store is not trained again, the others run on an executor
(:mod:`retain.executors`) with checkpoints next to the store, so an interrupted experiment picks up where it
stopped when started again. The functions here return plain tables (lists of dicts) and their text rendering;
:mod:`retain.experiments_cli` wires them to the command line.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retain.config import OPTIONS, coerce
from retain.errors import ConfigError
from retain.executors import Executor, InProcess
from retain.jobs import Job, checkpoint_dir, make_job
from retain.store import Store

__all__ = ["Job", "make_job", "checkpoint_dir", "run_jobs", "compare_jobs", "difficulty_jobs", "parse_sweep",
           "sweep_jobs", "choose"]

CLASSIC = ("finetune", "ewc", "er", "agem")  # the README's first comparison
# peak_mb (the whole process's high-water mark, mostly torch itself) stays in the records and exports; the tables
# show the method's own memory instead.
METRICS = ("acc", "bwt", "fwt", "forgetting", "memory_rows", "memory_mb", "train_s")
HIGHER_IS_BETTER = {"acc": True, "bwt": True, "fwt": True, "forgetting": False, "train_s": False,
                    "peak_mb": False, "val_acc": True, "memory_rows": False, "memory_mb": False, "gflops": False,
                    "avg_inc": True, "trainable": False}
LABELS = {"acc": "ACC %", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting", "train_s": "train s",
          "peak_mb": "peak MB", "val_acc": "val ACC %", "memory_rows": "memory rows", "memory_mb": "memory MB",
          "gflops": "train GFLOPs", "avg_inc": "Ā %", "trainable": "trainable params"}
PERCENT = ("acc", "bwt", "fwt", "forgetting", "val_acc", "avg_inc")


# ------------------------------------------------------------------------------------------------ methods

def ensure_methods(names: Sequence[str]) -> None:
    """Check every name is a registered method or a hybrid ``a+b`` of them (the registry parses it)."""
    from retain.method import method_class

    for name in names:
        method_class(name)


def available(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``names`` into the registered ones and the missing ones (for defaults that may not exist yet)."""
    from retain.method import methods

    registry = methods()
    return [n for n in names if n in registry], [n for n in names if n not in registry]


# ---------------------------------------------------------------------------------------------- progress

def duration(seconds: float) -> str:
    """``seconds`` for people: ``42s``, ``3m05s``, ``1h02m`` (progress lines and ETAs, here and in the CLI)."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Overall:
    """The progress of many runs on stderr: the runs done of all, with the current run's label, task, step and
    loss. In a terminal one line redrawn in place; elsewhere (a log, CI) a plain line every ``interval`` seconds
    that adds the steps per second of the runs in flight and the experiment's ETA (from the time the finished
    runs took). ``enabled=False`` (``--quiet``) draws nothing; ``clock`` is for tests."""

    LOG_EVERY_S = 30.0  # as retain.cli.options.ProgressBar's: a line often enough to see it move, a short CI log

    def __init__(self, total: int, label: str = "", enabled: bool = True, *, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.label, self.done, self.failed, self.skipped = total, label, 0, 0, 0
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.interval, self.clock = self.LOG_EVERY_S if interval is None else interval, clock
        self.current: dict[int, tuple[int, int, int, float]] = {}
        self.labels: dict[int, str] = {}
        self.last = 0.0
        self.t0 = clock()
        self.logged = self.t0  # outside a terminal: when the last line was written
        self.steps = 0  # steps trained in all runs since the start (for the rate)

    def report(self, index: int, task: int, step: int, n: int, loss: float) -> None:
        before = self.current.get(index)
        if before is None:  # a run's first report
            self.steps += step
        elif task != before[0]:  # the rest of its last task, then this one's so far
            self.steps += before[2] - before[1] + step
        else:
            self.steps += step - before[1]
        self.current[index] = (task, step, n, loss)
        self.draw()

    def finished(self, index: int, ok: bool) -> None:
        self.current.pop(index, None)
        self.done += 1
        self.failed += not ok
        self.draw(force=True)

    def draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not self.tty:
            self._log(now)
            return
        if not force and now - self.last < 0.1:
            return
        self.last = now
        width = 20
        filled = int(width * self.done / max(self.total, 1))
        line = f"\r{self.label}[{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total} runs"
        if self.failed:
            line += f" ({self.failed} failed)"
        if self.current:
            i, (task, step, n, loss) = max(self.current.items())
            line += f" | {self.labels.get(i, '')} task {task + 1} {step}/{n} loss {loss:.3f}"
        sys.stderr.write(line[:119].ljust(119))
        sys.stderr.flush()

    def _log(self, now: float) -> None:
        if now - self.logged < self.interval:
            return
        self.logged = now
        elapsed = max(now - self.t0, 1e-9)
        line = f"{self.label}{self.done}/{self.total} runs"
        if self.failed:
            line += f" ({self.failed} failed)"
        if self.current:
            i, (task, step, n, loss) = max(self.current.items())
            line += f" | {self.labels.get(i, '')} task {task + 1} step {step}/{n} loss {loss:.4f}"
        eta = self.duration(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        sys.stderr.write(f"{line} | {self.steps / elapsed:.1f} steps/s | ETA {eta}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * 119 + "\r")
            sys.stderr.flush()

    duration = staticmethod(duration)  # the module function, for the lines below


# ------------------------------------------------------------------------------------------------- running

def run_jobs(jobs: Sequence[Job], store: Store, executor: Executor | None = None, *, force: bool = False,
             experiment: str | None = None, quiet: bool = False, checkpoint_every: int | None = None,
             label: str = "", notify: Callable[[str], None] | None = None, threads: int = 1,
             progress: Any = None, notify_failures: bool = True) -> list[dict[str, Any]]:
    """Run every job not already done (by config hash) and return their store records, in job order.

    Failed runs are recorded with their reason and do not stop the others. Jobs with the same hash run once.
    Unfinished runs continue from their checkpoints (beside the store); ``force`` reruns everything from scratch.
    ``threads``: torch threads per run (1 in pools; the CLI's single ``retain run --store`` uses the machine's).
    ``progress``: an object with ``report(index, task, step, n, loss)``, ``finished(index, ok)``, ``close()``
    and ``labels`` (default: the overall bar on stderr).
    """
    executor = executor or InProcess()
    hashes = [j.hash for j in jobs]
    if experiment:
        store.add_to_experiment(experiment, list(dict.fromkeys(hashes)))
    todo: dict[str, tuple[int, Job]] = {}
    for i, (h, job) in enumerate(zip(hashes, jobs)):
        if h in todo:
            continue
        if store.claim(h, job.spec, force=force):
            todo[h] = (i, job)
    skipped = len(set(hashes)) - len(todo)
    if skipped and notify:
        notify(f"{skipped} run(s) already in the store {store.path} are reused (use --force to rerun)")
    bar = progress or Overall(len(todo), label, enabled=not quiet)
    for i, job in todo.values():
        bar.labels[i] = job.label
    # Unfinished runs continue from their checkpoints; --force means from scratch.
    options = {"checkpoint_dir": str(checkpoint_dir(store)), "checkpoint_every": checkpoint_every,
               "resume": not force, "threads": threads}
    by_index = {i: (h, job) for h, (i, job) in todo.items()}
    exit_codes: dict[str, int] = {}  # of the runs that failed now: 2 bad input (missing data...), 1 a fault
    told: set[str] = set()
    try:
        for index, outcome in executor.map([(i, job.spec) for i, (h, job) in sorted(by_index.items())], options,
                                           bar.report):
            h, job = by_index[index]
            if outcome.get("resumed_from") and notify:
                p = outcome["resumed_from"]
                notify(f"run {job.label} resumed from its checkpoint at task {p['task']}, step {p['task_step']}")
            if outcome["status"] == "done":
                store.finish(h, job.spec, outcome["result"])
            else:
                store.fail(h, job.spec, outcome["reason"], outcome.get("task"), outcome.get("step"))
                exit_codes[h] = outcome.get("exit_code", 1)
                if notify and notify_failures and outcome["reason"] not in told:  # each distinct reason once
                    told.add(outcome["reason"])
                    notify(f"run {job.label} failed: {outcome['reason']}")
            bar.finished(index, outcome["status"] == "done")
    except KeyboardInterrupt:
        for h, (_, job) in todo.items():  # the ones still running: a checkpoint holds their progress
            rec = store.get(h)
            if rec is not None and rec["status"] == "running":
                store.fail(h, job.spec, "interrupted; start the same command again to continue from its checkpoint")
        raise
    finally:
        bar.close()
    records = {h: store.get(h) for h in dict.fromkeys(hashes)}
    for h, code in exit_codes.items():
        records[h]["exit_code"] = code
    return [records[h] for h in hashes]


# ------------------------------------------------------------------------------------------------ statistics

_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    """Student's t quantile for a two-sided 95% interval with ``df`` degrees of freedom (table, then 1.96)."""
    if df <= 0:
        return math.nan
    keys = [k for k in _T95 if k <= df]
    return _T95[max(keys)] if df <= 30 else 1.96


def record_values(rec: dict[str, Any]) -> dict[str, float]:
    """The numbers a table shows for one finished run."""
    m = rec.get("metrics") or {}
    out = {k: m.get(k, math.nan) for k in ("acc", "bwt", "fwt", "forgetting")}
    out["train_s"] = (rec.get("timings") or {}).get("train_s", math.nan)
    out["peak_mb"] = rec.get("peak_memory_mb") or math.nan
    memory = rec.get("memory") or {}
    out["memory_rows"] = float(memory.get("rows", math.nan))
    out["memory_mb"] = memory.get("bytes", math.nan) / 2**20
    compute = rec.get("compute") or {}
    out["gflops"] = compute.get("train_flops", math.nan) / 1e9  # --count-flops runs
    out["avg_inc"] = m.get("avg_incremental_acc", math.nan)
    out["trainable"] = float((rec.get("model") or {}).get("trainable", math.nan))
    if rec.get("val_matrix"):
        V = np.asarray(rec["val_matrix"], dtype=float)
        out["val_acc"] = float(np.nanmean(V[-1]))
    return out


def aggregate(values: list[float], interval: str = "std") -> tuple[float, float, int]:
    """(mean, spread, n) over the finite values; spread = sample std, or the half-width of a 95% t-interval."""
    xs = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(xs) == 0:
        return math.nan, math.nan, 0
    sd = float(xs.std(ddof=1)) if len(xs) > 1 else 0.0
    spread = sd if interval == "std" else (t95(len(xs) - 1) * sd / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)
    return float(xs.mean()), spread, len(xs)


def summarize(records: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str] = METRICS,
              interval: str = "std") -> list[dict[str, Any]]:
    """Group finished runs by config ``keys`` (e.g. mode, method): per metric (mean, spread, n); counts failed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        cfg = rec["config"]
        groups.setdefault(tuple(_key(cfg, k) for k in keys), []).append(rec)
    rows = []
    for key, recs in groups.items():
        done = [r for r in recs if r["status"] == "done"]
        vals = [record_values(r) for r in done]
        row: dict[str, Any] = dict(zip(keys, key))
        row["runs"], row["failed"] = len(done), len(recs) - len(done)
        for m in metrics:
            row[m] = aggregate([v.get(m, math.nan) for v in vals], interval)
        rows.append(row)
    return rows


def _key(cfg: dict[str, Any], k: str) -> Any:
    v = cfg.get(k)
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, dict):
        return tuple(sorted(v.items()))
    return v


def format_table(rows: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str] = METRICS,
                 interval: str = "std", mark_best: bool = True, within: str | None = None) -> str:
    """A Markdown table: ``mean ± spread`` per metric, the best of each column marked ``*`` (per ``within``
    group, e.g. per mode, when given)."""
    best: dict[tuple[Any, str], float] = {}
    if mark_best:
        for m in metrics:
            if m in ("memory_rows", "memory_mb"):  # sizes, not scores
                continue
            for row in rows:
                g = row.get(within) if within else None
                v = row[m][0]
                if not math.isfinite(v):
                    continue
                cur = best.get((g, m))
                if cur is None or (v > cur if HIGHER_IS_BETTER.get(m, True) else v < cur):
                    best[(g, m)] = v
    pm = "±" if interval == "std" else "± 95% CI half-width"
    head = [*keys, "runs", *[f"{LABELS.get(m, m)}" for m in metrics]]
    body = []
    for row in rows:
        cells = [_fmt_key(row[k]) for k in keys]
        cells.append(str(row["runs"]) + (f" ({row['failed']} failed)" if row.get("failed") else ""))
        for m in metrics:
            mean, spread, n = row[m]
            if n == 0:
                cells.append("—")
                continue
            scale = 100 if m in PERCENT else 1
            digits = 2 if m in PERCENT else {"peak_mb": 1, "memory_rows": 0, "memory_mb": 2, "trainable": 0}.get(m, 2)
            text = f"{mean * scale:.{digits}f}" + (f" {pm.split()[0]} {spread * scale:.{digits}f}" if n > 1 else "")
            g = row.get(within) if within else None
            if mark_best and best.get((g, m)) == mean and len(rows) > 1:
                text += " *"
            cells.append(text)
        body.append(cells)
    spread = "± std" if interval == "std" else "± 95% t-interval half-width"
    return markdown(head, body) + (f"\nmean {spread} over seeds; * best of the column" +
                                   (f" within each {within}" if within else "") if mark_best else "")


def _fmt_key(v: Any) -> str:
    if isinstance(v, tuple):
        return "-".join(map(str, v))
    return str(v)


def markdown(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


# ------------------------------------------------------------------------------------------------- compare

def compare_jobs(base: Any, methods: Sequence[str], seeds: Sequence[int], modes: Sequence[str | None],
                 notify: Callable[[str], None] | None = None,
                 params: dict[str, dict[str, Any]] | None = None) -> list[Job]:
    """methods × modes × seeds. A method that does not support a mode is left out of that mode with a note.
    ``params``: extra hyper-parameters per method name (over ``base.params``, which every method gets)."""
    from retain.method import method_class

    jobs = []
    for mode in modes:
        for name in methods:
            cls = method_class(name)
            resolved_mode = mode or _benchmark_mode(base)
            if resolved_mode not in cls.modes:
                if notify:
                    notify(f"{name} does not support {resolved_mode}-IL; left out of that mode")
                continue
            for seed in seeds:
                p = {**base.params, **(params or {}).get(name, {})}
                jobs.append(make_job(base, f"{name} {resolved_mode} s{seed}", method=name, mode=mode, seed=seed,
                                     params=p))
    return jobs


def _benchmark_mode(base: Any) -> str:
    """The mode a run of ``base`` gets when it names none: the benchmark's."""
    from retain import benchmarks

    return base.mode or benchmarks.get(base.benchmark).mode


def compare_table(records: list[dict[str, Any]], interval: str = "std") -> str:
    """The comparison table, then each method's hyper-parameters as they ran (presets included)."""
    metrics = METRICS + (("gflops",) if any(r.get("compute") for r in records) else ())
    if any((r.get("model") or {}).get("weights") for r in records):  # pre-trained backbones: what each trains
        metrics += ("avg_inc", "trainable")
    rows = summarize(records, ("mode", "method"), metrics, interval=interval)
    table = format_table(rows, ("mode", "method"), metrics, interval=interval, within="mode")
    params: dict[str, dict[str, Any]] = {}
    for rec in records:
        params.setdefault(rec["config"]["method"], rec["config"].get("params") or {})
    lines = [f"  {m}: " + (", ".join(f"{k}={_fmt_value(v)}" for k, v in p.items()) or "no hyper-parameters")
             for m, p in params.items()]
    return table + "\nhyper-parameters as they ran:\n" + "\n".join(lines)


def _fmt_value(v: Any) -> str:
    """A hyper-parameter for people: 1e+09 rather than 1000000000.0, 0.001 as it is."""
    if isinstance(v, float) and v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:g}"
    return str(v)


# -------------------------------------------------------------------------------------------------- orders

def difficulty_jobs(base: Any, seeds: Sequence[int]) -> list[Job]:
    """Each task trained alone (fine-tuning, the same budget) on a fresh model: its accuracy = its ease."""
    n = make_job(base, method="finetune", params={}).config.n_tasks
    return [make_job(base, f"task {j} alone s{s}", alone=j, method="finetune", params={}, seed=s, task_order=None)
            for j in range(n) for s in seeds]


def task_orders(ease: list[float], k: int, seed: int = 0) -> dict[str, list[int]]:
    """The orders to test: the given one, easy-to-hard, hard-to-easy (by ``ease``, the accuracy of each task
    trained alone) and ``k`` random distinct orders (seeded)."""
    n = len(ease)
    orders = {"given": list(range(n)),
              "easy-to-hard": sorted(range(n), key=lambda j: (-ease[j], j)),
              "hard-to-easy": sorted(range(n), key=lambda j: (ease[j], -j))}
    rng = np.random.default_rng(seed)
    seen = {tuple(o) for o in orders.values()}
    max_distinct = math.factorial(n)
    tries = 0
    i = 0
    while i < k and len(seen) < max_distinct and tries < 1000:
        tries += 1
        perm = [int(x) for x in rng.permutation(n)]
        if tuple(perm) in seen:
            continue
        seen.add(tuple(perm))
        orders[f"random-{i + 1}"] = perm
        i += 1
    return orders


def orders_report(records: list[dict[str, Any]], orders: dict[str, list[int]], ease: list[float]
                  ) -> tuple[str, list[dict[str, Any]]]:
    """Per method and order: ACC and forgetting (mean over seeds); per method the spread across orders."""
    name_of = {tuple(v): k for k, v in orders.items()}
    per: dict[tuple[str, str], list[dict[str, float]]] = {}
    failed: dict[tuple[str, str], int] = {}
    for rec in records:
        cfg = rec["config"]
        key = (cfg["method"], name_of.get(tuple(cfg.get("task_order") or range(len(ease))), "?"))
        if rec["status"] == "done":
            per.setdefault(key, []).append(record_values(rec))
        else:
            failed[key] = failed.get(key, 0) + 1
    methods = list(dict.fromkeys(k[0] for k in per))
    lines = ["Task difficulty (accuracy of each task trained alone, fine-tuning, same budget):", ""]
    lines.append(markdown(["task", *[str(j) for j in range(len(ease))]],
                          [["ACC %", *[f"{100 * a:.2f}" for a in ease]]]))
    lines += ["", "ACC % (forgetting %) per task order:", ""]
    head = ["order", "tasks", *methods]
    body = []
    for oname, order in orders.items():
        cells = [oname, "-".join(map(str, order))]
        for m in methods:
            vals = per.get((m, oname), [])
            if not vals:
                cells.append("failed" if failed.get((m, oname)) else "—")
                continue
            acc = np.mean([v["acc"] for v in vals])
            fg = np.mean([v["forgetting"] for v in vals])
            cells.append(f"{100 * acc:.2f} ({100 * fg:.2f})")
        body.append(cells)
    lines.append(markdown(head, body))
    summary = []
    for m in methods:
        accs = [float(np.mean([v["acc"] for v in per[(m, o)]])) for o in orders if per.get((m, o))]
        if not accs:
            continue
        summary.append({"method": m, "orders": len(accs), "mean": float(np.mean(accs)),
                        "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                        "range": max(accs) - min(accs), "min": min(accs), "max": max(accs)})
    lines += ["", "Spread of ACC across orders per method:", ""]
    lines.append(markdown(["method", "orders", "mean ACC %", "std", "range (max-min)", "worst", "best"],
                          [[s["method"], str(s["orders"]), f"{100 * s['mean']:.2f}", f"{100 * s['std']:.2f}",
                            f"{100 * s['range']:.2f}", f"{100 * s['min']:.2f}", f"{100 * s['max']:.2f}"]
                           for s in summary]))
    if summary:
        worst = max(summary, key=lambda s: s["range"])
        lines += ["", f"Most order-sensitive: {worst['method']} (ACC ranges over {100 * worst['range']:.2f} points "
                      f"across {worst['orders']} orders)"]
    return "\n".join(lines), summary


# -------------------------------------------------------------------------------------------------- sweeps

# Run options a sweep file may set or grid over: every option of the schema but the ones a sweep names itself.
RUN_FIELDS = tuple(k for k in OPTIONS if k not in ("method", "params", "seed", "val_fraction"))
SWEEP_KEYS = ("name", "seeds", "val_fraction", "select", "search", "samples", "random_seed", "methods", "modes",
              *RUN_FIELDS)


@dataclass
class Sweep:
    """A parsed sweep file: the candidates (method, params, training overrides) and how to choose among them."""

    name: str
    base: Any  # RunConfig with the fixed options
    candidates: list[tuple[str, dict[str, Any], dict[str, Any]]]  # (method, params, run-field overrides)
    seeds: list[int]
    modes: list[str | None]
    select: str = "acc"
    search: str = "grid"


def _grid_values(where: str, key: str, value: Any) -> list[Any] | dict[str, Any]:
    if isinstance(value, dict):
        allowed = {"low", "high", "log", "int"}
        if (not {"low", "high"} <= set(value) or set(value) - allowed
                or not all(isinstance(value[b], (int, float)) and not isinstance(value[b], bool)
                           and math.isfinite(value[b]) for b in ("low", "high"))):
            raise ConfigError(f"{where}: {key} must be a list of values or {{low, high[, log, int]}} with numbers "
                              f"low and high, got {value}")
        if not value["low"] <= value["high"] or (value.get("log") and value["low"] <= 0):
            raise ConfigError(f"{where}: {key}: need 0 < low <= high for log ranges, low <= high otherwise")
        return value
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{where}: {key} has an empty list of values")
    return values


def _check_field(where: str, key: str, values: list[Any] | dict[str, Any]) -> list[Any] | dict[str, Any]:
    """Each value of run option ``key`` as the schema's type (a range only for numeric options)."""
    if isinstance(values, dict):
        if OPTIONS[key].kind not in ("int", "float"):
            raise ConfigError(f"{where}: {key} takes a list of values, not a range")
        return values
    return [coerce(key, v, where) for v in values]


def parse_sweep(data: dict[str, Any], path: str, base: Any) -> Sweep:
    """Check and expand a sweep file (see docs/experiments.md). Every problem is a :class:`ConfigError`."""
    unknown = set(data) - set(SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid keys: {', '.join(SWEEP_KEYS)}")
    search = data.get("search", "grid")
    if search not in ("grid", "random"):
        raise ConfigError(f"{path}: search must be grid or random, got {search!r}")
    select = data.get("select", "acc")
    if select not in ("acc", "forgetting", "bwt", "learning_acc"):
        raise ConfigError(f"{path}: select must be acc, forgetting, bwt or learning_acc, got {select!r}")
    seeds = data.get("seeds", [0])
    seeds = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise ConfigError(f"{path}: seeds must be a number of seeds or a list of integers, got {seeds!r}")
    val = data.get("val_fraction", 0.2)
    if not isinstance(val, (int, float)) or not 0 < val < 1:
        raise ConfigError(f"{path}: val_fraction must be in (0, 1) — hyper-parameters are chosen on the "
                          f"validation split, never on test; got {val!r}")
    fixed, grid_run = {}, {}
    for k in RUN_FIELDS:
        if k not in data:
            continue
        listy = OPTIONS[k].kind in ("ints", "floats2")  # a flat list of numbers is one value here
        if (listy and _flat_numbers(data[k])) or (not listy and not isinstance(data[k], (list, dict))):
            fixed[k] = _check_field(path, k, [data[k]])[0]
        else:
            grid_run[k] = _check_field(path, k, _grid_values(path, k, data[k]))
    if "mode" in grid_run:
        raise ConfigError(f"{path}: give several modes as modes = [...], not a list under mode")
    modes = data.get("modes", [fixed.pop("mode", None)])
    if not isinstance(modes, list) or not modes:
        raise ConfigError(f"{path}: modes must be a list like [\"task\", \"class\"]")
    base = dataclasses.replace(base, val_fraction=float(val), **fixed)
    methods = data.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{path}: methods must be a list of tables, e.g. [[methods]] name = \"ewc\" "
                          "[methods.params] lambda = [1, 10]")
    random_seed = data.get("random_seed", 0)
    if not isinstance(random_seed, int) or isinstance(random_seed, bool) or random_seed < 0:
        raise ConfigError(f"{path}: random_seed must be an integer >= 0, got {random_seed!r}")
    rng = np.random.default_rng(random_seed)
    samples = data.get("samples", 10)
    if search == "random" and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise ConfigError(f"{path}: samples must be a positive integer, got {samples!r}")
    candidates = []
    for i, m in enumerate(methods):
        where = f"{path}: methods[{i}]"
        if not isinstance(m, dict) or "name" not in m:
            raise ConfigError(f"{where} needs a name (e.g. name = \"ewc\")")
        bad = set(m) - {"name", "params", "train"}
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; use name, params, train")
        params = {k: _grid_values(where, k, v) for k, v in (m.get("params") or {}).items()}
        train = dict(grid_run)
        for k, v in (m.get("train") or {}).items():
            if k not in RUN_FIELDS or k == "mode":
                raise ConfigError(f"{where}: unknown training option {k!r}; valid: {', '.join(RUN_FIELDS)}")
            train[k] = _check_field(where, k, _grid_values(where, k, v))
        space = {**{("p", k): v for k, v in params.items()}, **{("t", k): v for k, v in train.items()}}
        keys = list(space)
        if search == "grid":
            if any(isinstance(v, dict) for v in space.values()):
                raise ConfigError(f"{where}: ranges {{low, high}} need search = \"random\"; give lists for a grid")
            combos = [dict(zip(keys, vals)) for vals in itertools.product(*(space[k] for k in keys))]
        else:
            combos = [{k: _draw(space[k], rng) for k in keys} for _ in range(samples)]
        for c in combos:
            candidates.append((m["name"], {k[1]: v for k, v in c.items() if k[0] == "p"},
                               {k[1]: v for k, v in c.items() if k[0] == "t"}))
    name = data.get("name") or Path(path).stem
    return Sweep(str(name), base, candidates, seeds, modes, select, search)


def _flat_numbers(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _draw(space: list[Any] | dict[str, Any], rng: np.random.Generator) -> Any:
    if isinstance(space, list):
        return space[int(rng.integers(len(space)))]
    lo, hi = float(space["low"]), float(space["high"])
    x = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if space.get("log") else float(rng.uniform(lo, hi))
    return int(round(x)) if space.get("int") else float(f"{x:.4g}")


def sweep_jobs(sweep: Sweep) -> list[tuple[int, Job]]:
    """(candidate index, job) for every candidate × mode × seed; every configuration is resolved (checked) now."""
    ensure_methods(list(dict.fromkeys(c[0] for c in sweep.candidates)))
    out = []
    for ci, (method, params, train) in enumerate(sweep.candidates):
        for mode in sweep.modes:
            for seed in sweep.seeds:
                fields = dict(train)
                label = f"{method} {_describe(params, train)} s{seed}"
                out.append((ci, make_job(sweep.base, label, method=method, params=params, mode=mode, seed=seed,
                                         **fields)))
    return out


def _describe(params: dict[str, Any], train: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in {**params, **train}.items()) or "defaults"


def memory_of(record: dict[str, Any], peak_mb: float | None = None) -> tuple[float, str]:
    """The memory axis of the accuracy-vs-memory front: the rows of samples the method reported keeping
    (``Method.memory``, stored in the record); the peak MB (``peak_mb``, else the record's) for records without
    it (older stores) or for methods without a sample memory."""
    rows = (record.get("memory") or {}).get("rows")
    if rows:
        return float(rows), "rows"
    return (peak_mb if peak_mb is not None else record.get("peak_memory_mb")) or math.nan, "peak MB"


def choose(sweep: Sweep, pairs: list[tuple[int, Job]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per candidate: validation and test means over seeds; per (method, mode) the candidate with the best
    validation score (test numbers are reported, never used to choose); the accuracy-vs-memory Pareto front."""
    sign = -1.0 if sweep.select == "forgetting" else 1.0
    cands: dict[tuple[int, str | None], dict[str, Any]] = {}
    for (ci, job), rec in zip(pairs, records):
        key = (ci, job.config.mode)
        c = cands.setdefault(key, {"index": ci, "method": sweep.candidates[ci][0], "mode": job.config.mode,
                                   "params": sweep.candidates[ci][1], "train": sweep.candidates[ci][2],
                                   "val": [], "test": [], "failed": 0, "hashes": []})
        c["hashes"].append(rec["hash"])
        c.setdefault("records", []).append(rec)
        if rec["status"] != "done":
            c["failed"] += 1
            continue
        from retain.metrics import all_metrics

        V = rec.get("val_matrix")
        vm = all_metrics(V, [0.0] * len(V)) if V else {}
        c["val"].append(vm.get(sweep.select, math.nan))
        c["test"].append(record_values(rec))
    rows = []
    for c in cands.values():
        ok = not c["failed"] and c["test"]
        c["val_score"] = float(np.mean(c["val"])) if ok else math.nan
        for m in ("acc", "forgetting", "bwt", "train_s", "peak_mb"):
            c[m] = aggregate([v[m] for v in c["test"]]) if c["test"] else (math.nan, math.nan, 0)
        done = [r for r in c.pop("records") if r["status"] == "done"]
        c["memory"], c["memory_kind"] = memory_of(done[0], c["peak_mb"][0]) if done else (math.nan, "peak MB")
        rows.append(c)
    best: dict[tuple[str, Any], dict[str, Any]] = {}
    for c in rows:
        if not math.isfinite(c["val_score"]):
            continue
        k = (c["method"], c["mode"])
        if k not in best or sign * c["val_score"] > sign * best[k]["val_score"]:
            best[k] = c
    for c in rows:
        c["chosen"] = best.get((c["method"], c["mode"])) is c
    front = pareto(rows)
    return {"candidates": rows, "best": list(best.values()), "pareto": front}


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates no other candidate beats on both validation accuracy (higher) and memory (lower), per mode."""
    out = []
    ok = [c for c in rows if math.isfinite(c["val_score"]) and math.isfinite(c["memory"])]
    for c in ok:
        dominated = any(o is not c and o["mode"] == c["mode"] and o["memory_kind"] == c["memory_kind"]
                        and o["val_score"] >= c["val_score"] and o["memory"] <= c["memory"]
                        and (o["val_score"] > c["val_score"] or o["memory"] < c["memory"]) for o in ok)
        if not dominated:
            out.append(c)
    return sorted(out, key=lambda c: (str(c["mode"]), c["memory"]))


def sweep_report(sweep: Sweep, chosen: dict[str, Any]) -> str:
    pct = lambda t: f"{100 * t[0]:.2f} ± {100 * t[1]:.2f}" if t[2] > 1 else (  # noqa: E731
        f"{100 * t[0]:.2f}" if t[2] else "—")
    sel = LABELS.get(sweep.select, sweep.select)
    lines = [f"Sweep {sweep.name}: {len(chosen['candidates'])} configurations × {len(sweep.seeds)} seed(s), "
             f"{sweep.search} search; chosen by validation {sweep.select} (mean over seeds), test reported.", ""]
    head = ["", "mode", "method", "configuration", f"val {sweep.select} %", "test ACC %", "test forgetting %",
            "memory"]
    body = []
    for c in sorted(chosen["candidates"], key=lambda c: (str(c["mode"]), c["method"], c["index"])):
        body.append(["→" if c["chosen"] else "", str(c["mode"]), c["method"], _describe(c["params"], c["train"]),
                     f"{100 * c['val_score']:.2f}" if math.isfinite(c["val_score"]) else
                     f"failed ({c['failed']})", pct(c["acc"]), pct(c["forgetting"]),
                     f"{c['memory']:.0f} ({c['memory_kind']})" if math.isfinite(c["memory"]) else "—"])
    lines.append(markdown(head, body))
    lines += ["", "Chosen (best validation " + sel + "), with its test numbers:", ""]
    lines.append(markdown(["mode", "method", "configuration", f"val {sweep.select} %", "test ACC %",
                           "test forgetting %"],
                          [[str(c["mode"]), c["method"], _describe(c["params"], c["train"]),
                            f"{100 * c['val_score']:.2f}", pct(c["acc"]), pct(c["forgetting"])]
                           for c in chosen["best"]]))
    if chosen["pareto"]:
        lines += ["", "Accuracy-vs-memory Pareto front (validation ACC; nothing else is both more accurate and "
                      "smaller):", ""]
        lines.append(markdown(["mode", "method", "configuration", "memory", "val %", "test ACC %"],
                              [[str(c["mode"]), c["method"], _describe(c["params"], c["train"]),
                                f"{c['memory']:.0f} ({c['memory_kind']})", f"{100 * c['val_score']:.2f}",
                                pct(c["acc"])] for c in chosen["pareto"]]))
    return "\n".join(lines)
