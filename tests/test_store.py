"""The results store: round trip, many writers at once, skip-by-hash, failed runs, locks and bad files."""

from __future__ import annotations

import math
import multiprocessing as mp
import sqlite3

import pytest

from retain.api import RunConfig
from retain.errors import ConfigError
from retain.experiments import make_job, run_jobs
from retain.store import Store, StoreError, config_hash

CONFIG = {"benchmark": "split-digits", "method": "ewc", "mode": "class", "seed": 3, "params": {"lambda": 10.0}}
RESULT = {"accuracy_matrix": [[0.9, math.nan], [0.5, 0.8]], "baseline": [0.1, 0.2],
          "metrics": {"acc": 0.65, "bwt": -0.4, "fwt": math.nan, "forgetting": 0.4},
          "timings": {"train_s": 1.5, "eval_s": 0.1}, "versions": {"retain": "0.1.0"}, "warnings": ["w"],
          "val_matrix": None, "peak_memory_mb": 123.0}


def test_round_trip(tmp_path):
    with Store(tmp_path / "r.db") as s:
        h = config_hash(CONFIG)
        assert s.claim(h, CONFIG)
        assert s.get(h)["status"] == "running"
        s.finish(h, CONFIG, RESULT)
    with Store(tmp_path / "r.db") as s:  # reopened: everything came back
        rec = s.get(h)
        assert rec["status"] == "done" and rec["config"] == CONFIG
        assert rec["accuracy_matrix"][0][0] == 0.9 and math.isnan(rec["accuracy_matrix"][0][1])
        assert rec["metrics"]["acc"] == 0.65 and math.isnan(rec["metrics"]["fwt"])
        assert rec["timings"] == RESULT["timings"] and rec["peak_memory_mb"] == 123.0
        assert rec["warnings"] == ["w"] and rec["started"] and rec["finished"]
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert not s.claim(h, CONFIG)  # done: skipped
        assert s.claim(h, CONFIG, force=True)  # unless forced


def test_hash_is_stable_and_ignores_data_location():
    a = dict(CONFIG, data_dir="/x")
    b = {k: CONFIG[k] for k in reversed(list(CONFIG))}
    assert config_hash(a) == config_hash(b) == config_hash(CONFIG)
    assert config_hash(dict(CONFIG, seed=4)) != config_hash(CONFIG)
    assert config_hash(dict(CONFIG, params={"lambda": 10.5})) != config_hash(CONFIG)
    # a field added later hashes alike at its default (earlier stores still match), and apart when set
    assert config_hash(dict(CONFIG, all_outputs=False)) == config_hash(CONFIG)
    assert config_hash(dict(CONFIG, all_outputs=True)) != config_hash(CONFIG)


def _writer(path: str, worker: int, n: int) -> None:
    s = Store(path, timeout=60)
    for i in range(n):
        cfg = dict(CONFIG, seed=worker * 1000 + i)
        h = config_hash(cfg)
        s.claim(h, cfg)
        s.finish(h, cfg, dict(RESULT, peak_memory_mb=float(worker * 1000 + i)))
        s.add_to_experiment("many", [h])


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "c.db")
    Store(path).close()
    ctx = mp.get_context("fork")  # the writers only use sqlite: forking is safe and fast
    procs = [ctx.Process(target=_writer, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Store(path) as s:
        runs = s.runs()
        assert len(runs) == 100
        assert all(r["status"] == "done" and r["peak_memory_mb"] == r["config"]["seed"] for r in runs)
        assert len(s.experiments()["many"]) == 100
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_locked_store_waits_then_clear_error(tmp_path):
    path = tmp_path / "l.db"
    Store(path).close()
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        s = Store(path, timeout=0.3)
        with pytest.raises(StoreError, match="locked by another process"):
            s.claim("abc", CONFIG)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert s.claim("abc", CONFIG)  # free again: works


def test_unreadable_store_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ConfigError, match="not a retain results store"):
        Store(bad)
    with pytest.raises(ConfigError, match="directory"):
        Store(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        Store(tmp_path / "none" / "x.db")


def test_skip_by_hash_and_failed_runs_recorded(tmp_path):
    base = RunConfig(benchmark="split-digits", epochs=1, n_tasks=2)
    ok = make_job(base, method="finetune")
    bad = make_job(base, method="finetune", optimizer="sgd", lr=1e30)  # diverges: NaN loss
    with Store(tmp_path / "s.db") as s:
        recs = run_jobs([ok, bad], s, quiet=True, experiment="t")
        assert recs[0]["status"] == "done" and len(recs[0]["accuracy_matrix"]) == 2
        assert recs[1]["status"] == "failed" and "nan" in recs[1]["error"]
        assert recs[1]["error_step"] is not None and recs[1]["error_task"] == 0
        first = recs[0]["finished"]
        again = run_jobs([ok], s, quiet=True)  # already done: not trained again
        assert again[0]["finished"] == first
        forced = run_jobs([ok], s, quiet=True, force=True)
        assert forced[0]["finished"] > first
        assert forced[0]["accuracy_matrix"] == recs[0]["accuracy_matrix"]
