"""The results store: every run's record in one SQLite file (``./retain.db`` by default), safe for many writers.

One row per run, keyed by the stable hash of its configuration: status (``running`` / ``done`` / ``failed`` with
the reason and the step), the accuracy matrix, the baseline, metrics, timings, peak memory, versions and
timestamps. Experiments (a ``compare``, an ``orders`` study, a sweep) name the runs they use in a second table,
so one run can serve several experiments and a finished run is never trained twice (unless forced).

Concurrency: WAL journal (readers never block the writer), every write in a ``BEGIN IMMEDIATE`` transaction,
and a busy timeout: a writer that finds the store locked waits (``timeout`` seconds; ``$RETAIN_STORE_TIMEOUT``,
default 60), then fails with a clear :class:`StoreError` instead of a half-written record.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retain.config import hashed
from retain.errors import ConfigError, RetainError

DEFAULT_PATH = "retain.db"
STATUSES = ("running", "done", "failed")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    benchmark TEXT, method TEXT, mode TEXT, seed INTEGER,
    config TEXT NOT NULL,           -- JSON: the resolved run configuration (and the job kind)
    accuracy_matrix TEXT, baseline TEXT, val_matrix TEXT, metrics TEXT, timings TEXT, versions TEXT,
    warnings TEXT,
    peak_memory_mb REAL,
    memory TEXT,                    -- JSON: the method's sample memory {"rows", "bytes"}
    model TEXT,                     -- JSON: {"class", "parameters"} of the model trained
    scenario TEXT,                  -- JSON: the scenario in one line
    task_il_matrix TEXT,            -- JSON: class-IL runs, each task scored within its own classes
    gpu_memory_mb REAL,
    anytime TEXT,                   -- JSON: --eval-every's curve (retain.api.Result.anytime)
    compute TEXT,                   -- JSON: --count-flops's counted FLOPs (retain.api.Result.compute)
    error TEXT, error_task INTEGER, error_step INTEGER,
    host TEXT, pid INTEGER,
    created REAL NOT NULL, started REAL, finished REAL
);
CREATE TABLE IF NOT EXISTS experiment_runs (
    experiment TEXT NOT NULL,
    hash TEXT NOT NULL,
    added REAL NOT NULL,
    PRIMARY KEY (experiment, hash)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""

_JSON_COLUMNS = ("config", "accuracy_matrix", "baseline", "val_matrix", "metrics", "timings", "versions", "warnings",
                 "memory", "model", "scenario", "task_il_matrix", "anytime",
                 "compute")
# Columns added after stores had been written: added to an older store when it is opened for writing.
_ADDED_COLUMNS = {"memory": "TEXT", "model": "TEXT", "scenario": "TEXT", "task_il_matrix": "TEXT",
                  "gpu_memory_mb": "REAL", "anytime": "TEXT",
                  "compute": "TEXT"}


class StoreError(RetainError):
    """The store could not be written (locked too long, disk full, read-only): a fault, exit code 1."""

    exit_code = 1


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN / inf become None (SQLite JSON and browsers reject them), tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _restore_nan(obj: Any) -> Any:
    if obj is None:
        return math.nan
    if isinstance(obj, list):
        return [_restore_nan(v) for v in obj]
    return obj


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a run's configuration: sorted-key JSON, floats by ``repr``, over the options the schema
    hashes (:func:`retain.config.hashed`: the data location is left out, and options added after stores were
    written are left out at their default, so earlier runs keep their hashes).

    Two configurations that train the same thing hash alike whatever the order their keys were given in.
    """
    text = json.dumps(_clean(hashed(config)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def default_timeout() -> float:
    """How long a writer waits for a locked store: ``$RETAIN_STORE_TIMEOUT`` seconds, else 60."""
    text = os.environ.get("RETAIN_STORE_TIMEOUT", "60")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"RETAIN_STORE_TIMEOUT must be a number of seconds >= 0, got {text!r}")
    return value


class Store:
    """A results store at ``path`` (created on first use). Open once per process; cheap to reopen."""

    def __init__(self, path: str | os.PathLike = DEFAULT_PATH, timeout: float | None = None, create: bool = True):
        self.path = Path(path)
        self.timeout = default_timeout() if timeout is None else timeout
        timeout = self.timeout
        if self.path.is_dir():
            raise ConfigError(f"store {self.path} is a directory; give a file path with --store")
        if not self.path.exists():
            if not create:
                raise ConfigError(f"store {self.path} does not exist; run an experiment first or pass --store")
            parent = self.path.parent if str(self.path.parent) else Path(".")
            if not parent.is_dir():
                raise ConfigError(f"store {self.path}: folder {parent} does not exist; create it first")
            if not os.access(parent, os.W_OK):
                raise ConfigError(f"store {self.path}: folder {parent} is not writable; choose another --store")
        elif not os.access(self.path, os.R_OK):
            raise ConfigError(f"store {self.path} is not readable; fix its permissions or choose another --store")
        try:
            self.db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            if not self.path.exists() or os.access(self.path, os.W_OK):
                self.db.execute("PRAGMA journal_mode=WAL").fetchone()
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(_SCHEMA)
                have = {r[1] for r in self.db.execute("PRAGMA table_info(runs)")}
                for col, typ in _ADDED_COLUMNS.items():
                    if col not in have:
                        self.db.execute(f"ALTER TABLE runs ADD COLUMN {col} {typ}")
            self.db.execute("SELECT count(*) FROM runs").fetchone()
        except sqlite3.DatabaseError as e:
            raise self._error(e, "open") from None

    # ------------------------------------------------------------------------------------------------ plumbing
    def _error(self, e: Exception, what: str) -> RetainError:
        msg = str(e)
        if "locked" in msg or "busy" in msg:
            return StoreError(f"store {self.path} is locked by another process (waited {self.timeout:g} s to "
                              f"{what}); retry when it finishes or use another --store")
        if "not a database" in msg or "malformed" in msg or "file is encrypted" in msg:
            return ConfigError(f"store {self.path} is not a retain results store ({msg}); "
                               "move it away or choose another --store")
        if "readonly" in msg or "read-only" in msg:
            return StoreError(f"store {self.path} is read-only; cannot {what} (choose a writable --store)")
        if "disk" in msg or "full" in msg:
            return StoreError(f"store {self.path}: cannot {what}: {msg}; free disk space and retry")
        return StoreError(f"store {self.path}: cannot {what}: {msg}")

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (``BEGIN IMMEDIATE``) so two writers never deadlock."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise self._error(e, what) from None
        try:
            yield self.db
        except BaseException:
            self._rollback()
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            self._rollback()
            raise self._error(e, what) from None

    def _rollback(self) -> None:
        """Undo the open transaction, if SQLite has not already (it rolls back by itself on a full disk)."""
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.DatabaseError:
                pass

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._error(e, "read") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- writes
    def claim(self, hash_: str, config: dict[str, Any], force: bool = False) -> bool:
        """Mark run ``hash_`` as running (this process). False when it is already done (and not ``force``) or
        another live process on this host is running it."""
        now = time.time()
        host, pid = socket.gethostname(), os.getpid()
        with self._write("claim a run") as db:
            row = db.execute("SELECT status, host, pid FROM runs WHERE hash=?", (hash_,)).fetchone()
            if row is not None and not force:
                if row["status"] == "done":
                    return False
                if (row["status"] == "running" and row["host"] == host and row["pid"] != pid
                        and _alive(row["pid"])):
                    return False
            db.execute(
                "INSERT INTO runs(hash, status, benchmark, method, mode, seed, config, host, pid, created, started) "
                "VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(hash) DO UPDATE SET status='running', config=excluded.config, host=excluded.host, "
                "pid=excluded.pid, started=excluded.started, error=NULL, error_task=NULL, error_step=NULL",
                (hash_, config.get("benchmark"), config.get("method"), config.get("mode"), config.get("seed"),
                 json.dumps(_clean(config), sort_keys=True), host, pid, now, now))
        return True

    def finish(self, hash_: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        """Record a finished run (``result``: a :class:`retain.api.Result` as a dict)."""
        self._put(hash_, config, "done", result, None)

    def fail(self, hash_: str, config: dict[str, Any], reason: str, task: int | None = None,
             step: int | None = None) -> None:
        """Record a failed run with the reason (and the task and global step where it stopped, if known)."""
        self._put(hash_, config, "failed", {}, (reason, task, step))

    def _put(self, hash_: str, config: dict[str, Any], status: str, result: dict[str, Any],
             error: tuple[str, int | None, int | None] | None) -> None:
        now = time.time()
        j = lambda k: json.dumps(_clean(result[k])) if result.get(k) is not None else None  # noqa: E731
        row = (status, config.get("benchmark"), config.get("method"), config.get("mode"), config.get("seed"),
               json.dumps(_clean(config), sort_keys=True), j("accuracy_matrix"), j("baseline"), j("val_matrix"),
               j("metrics"), j("timings"), j("versions"), j("warnings"), result.get("peak_memory_mb"), j("memory"),
               j("model"), j("scenario"), j("task_il_matrix"), result.get("gpu_memory_mb"), j("anytime"), j("compute"),
               *(error or (None, None, None)), socket.gethostname(), os.getpid(), now, now)
        with self._write(f"record run {hash_}") as db:
            db.execute(
                "INSERT INTO runs(status, benchmark, method, mode, seed, config, accuracy_matrix, baseline, "
                "val_matrix, metrics, timings, versions, warnings, peak_memory_mb, memory, model, scenario, "
                "task_il_matrix, gpu_memory_mb, anytime, compute, error, error_task, error_step, host, pid, created, "
                f"finished, hash) VALUES ({', '.join('?' * 29)}) "
                "ON CONFLICT(hash) DO UPDATE SET status=excluded.status, benchmark=excluded.benchmark, "
                "method=excluded.method, mode=excluded.mode, seed=excluded.seed, config=excluded.config, "
                "accuracy_matrix=excluded.accuracy_matrix, baseline=excluded.baseline, "
                "val_matrix=excluded.val_matrix, metrics=excluded.metrics, timings=excluded.timings, "
                "versions=excluded.versions, warnings=excluded.warnings, peak_memory_mb=excluded.peak_memory_mb, "
                "memory=excluded.memory, model=excluded.model, scenario=excluded.scenario, "
                "task_il_matrix=excluded.task_il_matrix, gpu_memory_mb=excluded.gpu_memory_mb, "
                "anytime=excluded.anytime, compute=excluded.compute, "
                "error=excluded.error, error_task=excluded.error_task, error_step=excluded.error_step, "
                "host=excluded.host, pid=excluded.pid, finished=excluded.finished",
                (*row, hash_))

    def add_to_experiment(self, experiment: str, hashes: list[str]) -> None:
        now = time.time()
        with self._write(f"record experiment {experiment}") as db:
            db.executemany("INSERT OR IGNORE INTO experiment_runs(experiment, hash, added) VALUES (?, ?, ?)",
                           [(experiment, h, now) for h in hashes])

    # -------------------------------------------------------------------------------------------------- reads
    def get(self, hash_: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM runs WHERE hash=?", (hash_,))
        return _record(rows[0]) if rows else None

    def runs(self, status: str | None = None, experiment: str | None = None, method: str | None = None,
             benchmark: str | None = None) -> list[dict[str, Any]]:
        """Records, oldest first, optionally filtered."""
        sql, args = "SELECT runs.* FROM runs", []
        where = []
        if experiment is not None:
            sql += " JOIN experiment_runs e ON e.hash = runs.hash"
            where.append("e.experiment = ?")
            args.append(experiment)
        for col, val in (("status", status), ("method", method), ("benchmark", benchmark)):
            if val is not None:
                where.append(f"runs.{col} = ?")
                args.append(val)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY runs.created, runs.hash"
        return [_record(r) for r in self._read(sql, tuple(args))]

    def experiments(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self._read("SELECT experiment, hash FROM experiment_runs ORDER BY added, hash"):
            out.setdefault(r["experiment"], []).append(r["hash"])
        return out


def _record(row: sqlite3.Row) -> dict[str, Any]:
    rec = dict(row)
    for k in _JSON_COLUMNS:
        if rec.get(k) is not None:
            rec[k] = json.loads(rec[k])
    for k in ("accuracy_matrix", "val_matrix", "baseline", "task_il_matrix"):
        if rec.get(k) is not None:
            rec[k] = _restore_nan(rec[k])
    if rec.get("metrics"):
        rec["metrics"] = {k: (math.nan if v is None else v) for k, v in rec["metrics"].items()}
    return rec


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
