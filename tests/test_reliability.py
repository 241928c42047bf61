"""Reliability (issue 6): bad input refused in the first second with one line and exit 2; faults (a diverged run,
a locked store, a full disk, Ctrl-C, a corrupt checkpoint) answered with one line and exit 1 (130 for Ctrl-C),
nothing finished lost. docs/reliability.md lists every fault with the test that shows it (many live in
test_data.py, test_cli.py, test_store.py, test_checkpoint.py and test_experiments.py; this file fills the gaps).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import retain
from retain import checkpoint
from retain.cli import main, parse_run
from retain.errors import ConfigError, OutputError
from retain.method import create
from retain.store import Store, config_hash
from tests.test_data import idx_bytes, write_mnist_like

TINY = ["--epochs", "1", "--n-tasks", "2", "--quiet"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # the argument parser exits 2 itself
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("retain: "), err
    return lines[0]


def _retain(*args: str) -> list[str]:
    return [sys.executable, "-m", "retain.cli", *args]


# ------------------------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("args, message", [
    (["--method", "er", "--param", "buffer_size=-1"], "er: buffer_size must be at least 1"),
    (["--method", "packnet", "--mode", "task", "--param", "prune_ratio=1"], "prune_ratio must be in (0, 1)"),
    (["--method", "packnet", "--mode", "task", "--param", "prune_ratio=1.5"], "prune_ratio must be in (0, 1)"),
    (["--method", "ewc", "--param", "lambda=-1"], "lambda must be a finite number >= 0"),
    (["--method", "ewc", "--param", "lambda=inf"], "must be a finite number"),
    (["--method", "er", "--param", "buffer_size=many"], "er: parameter buffer_size must be int"),
    (["--method", "pnn", "--mode", "class"], "pnn does not support class-IL; it supports task"),
    (["--method", "er", "--param", "selection=herding", "--task-free"], "needs task boundaries"),
    (["--momentum", "nan"], "momentum (--momentum) expects a finite number"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--seed", "-1"], "seed must be in 0.."),
    (["--val-fraction", "1"], "val_fraction must be in [0, 1)"),
    (["--blurry", "1.5"], "blurry must be in [0, 1)"),
    (["--class-order", "1,1,2"], "class_order must list distinct classes"),
    (["--task-order", "0,0"], "task_order must be a permutation of 0..1"),
    (["--device", "meta"], "cannot train"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    (["--seed", "two"], "seed (--seed) expects a whole number"),
])
def test_out_of_range_and_unsupported_values_exit_2_before_training(args, message, capsys, monkeypatch):
    from retain import api

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(api, "run", no_training)
    code, _, err = cli(capsys, "run", *args, *TINY)
    assert code == 2 and message in one_line(err), err


@pytest.mark.parametrize("name, text, message", [
    ("bad.toml", "epochs = [", "is not valid TOML"),
    ("bad.yaml", "epochs: [1, 2\nmethod: er", "is not valid YAML"),
    ("bad.yaml", "- 1\n- 2\n", "the top level must be a mapping"),
    ("bad.toml", "epochz = 1", "unknown option 'epochz'"),
    ("bad.toml", 'epochs = "many"', "epochs (--epochs) expects a whole number"),
    ("bad.toml", "quiet = 3", "must be true or false"),
    ("bad.toml", "params = 5", "params must be a mapping"),
    ("bad.toml", "hidden = [[1, 2]]", "hidden (--hidden) expects comma-separated positive integers"),
    ("bad.toml", "[params]\nlambda = 1", "finetune: unknown parameter 'lambda'"),
    ("bad.toml", 'method = "pnn"\nmode = "class"', "pnn does not support class-IL"),
    ("bad.ini", "epochs = 1", "unknown type '.ini'"),
])
def test_malformed_run_config_file_is_one_line_exit_2(tmp_path, capsys, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    code, _, err = cli(capsys, "run", "--config", str(f), *TINY)
    assert code == 2 and message in one_line(err), err


def test_missing_config_file_and_malformed_sweep_files(tmp_path, capsys):
    code, _, err = cli(capsys, "run", "--config", str(tmp_path / "none.toml"))
    assert code == 2 and "does not exist" in one_line(err)
    db = tmp_path / "s.db"
    for name, text, message in (("s.yaml", "methods: [\n", "is not valid YAML"),
                                ("s.toml", 'seeds = "x"\n[[methods]]\nname = "er"', "seeds must be"),
                                ("s.toml", '[[methods]]\nname = "er"\n[methods.params]\nbuffer_size = [-1]',
                                 "buffer_size must be at least 1"),
                                ("s.toml", '[[methods]]\nname = "nosuch"', "unknown method 'nosuch'")):
        (tmp_path / name).write_text(text)
        code, _, err = cli(capsys, "sweep", str(tmp_path / name), "--store", str(db), "--quiet")
        assert code == 2 and message in one_line(err), (text, err)
    assert not db.exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------------- data

def test_corrupt_data_through_the_cli_is_one_line_exit_2(tmp_path, capsys):
    bad = idx_bytes(np.zeros((20, 28, 28)), 1234)
    write_mnist_like(tmp_path / "m", corrupt=lambda files: ("train-images-idx3-ubyte", bad))
    code, _, err = cli(capsys, "run", "--benchmark", "split-mnist", "--data-dir", str(tmp_path / "m"), *TINY)
    assert code == 2 and "wrong magic number 1234" in one_line(err)


def test_unreadable_data_file_even_as_root(tmp_path, monkeypatch):
    """test_data.py::test_unreadable_file uses chmod, which root ignores; this one simulates the denial."""
    from retain import data

    folder = write_mnist_like(tmp_path / "m")
    denied = folder / "train-images-idx3-ubyte.gz"
    real_open = gzip.open

    def guarded(path, *a, **k):
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(gzip, "open", guarded)
    with pytest.raises(data.DataError, match="permission denied; make the file readable"):
        data.load("mnist", folder)


# ------------------------------------------------------------------------------------------ during training

def test_nan_loss_in_a_stored_run_is_recorded_failed_with_reason_and_step(tmp_path, capsys):
    db = tmp_path / "n.db"
    code, _, err = cli(capsys, "run", "--optimizer", "sgd", "--lr", "1e30", "--store", str(db), *TINY)
    line = one_line(err)
    assert code == 1 and "loss became nan at task 0" in line and "lower --lr" in line
    with Store(db) as s:
        (rec,) = s.runs()
    assert rec["status"] == "failed" and "loss became nan" in rec["error"]
    assert rec["error_task"] == 0 and rec["error_step"] >= 1


def test_memory_report_counts_buffers_and_compose_sums_its_parts():
    from retain.method import Memory
    from retain.scenarios import from_tensors

    sc = from_tensors(torch.zeros(8, 3, 4), torch.arange(8) % 4, torch.zeros(4, 3, 4),
                                       torch.arange(4), mode="class", n_tasks=2)
    row = 4 * 12 + 3 * 8 + 4  # float32 input, int64 target / task / key, float32 priority
    assert create("finetune").memory(sc) == Memory(0, 0) and create("ewc").memory(sc) == Memory(0, 0)
    assert create("er", {"buffer_size": 10}).memory(sc) == Memory(10, 10 * row)
    assert create("der", {"buffer_size": 10}).memory(sc) == Memory(10, 10 * (row + 4 * sc.n_outputs))
    assert create("agem", {"memory_per_task": 5}).memory(sc) == Memory(10, 5 * 2 * row)
    assert create("mer", {"buffer_size": 7}).memory(sc) == Memory(7, 7 * row)
    assert create("ewc_er", {"buffer_size": 10}).memory(sc) == Memory(10, 10 * row)  # ER's buffer + EWC's 0
    assert create("ewc+er", {"buffer_size": 10}).memory(sc) == Memory(10, 10 * row)
    rec = retain.run(method="er", params={"buffer_size": 30}, iterations=2, n_tasks=2, hidden=(8,))
    assert rec.memory["rows"] == 30  # the record carries the method's own report


def test_buffer_larger_than_memory_is_refused_before_training_with_the_estimate(capsys, monkeypatch):
    from retain import trainer

    evaluated = []
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: evaluated.append(1) or [0.0, 0.0])
    code, _, err = cli(capsys, "run", "--method", "er", "--param", "buffer_size=1000000000000", *TINY)
    line = one_line(err)
    assert code == 2 and "er would need about" in line and "TiB" in line and "(1000000000000 stored rows)" in line
    assert not evaluated  # refused before even the baseline evaluation
    # the same check whatever the machine: a small buffer against a machine with 1 MiB free
    monkeypatch.setattr(trainer, "available_memory", lambda device: 2**20)
    code, _, err = cli(capsys, "run", "--method", "ewc_er", "--param", "buffer_size=20000", *TINY)
    assert code == 2 and "ewc_er would need about 5.4 MiB" in one_line(err) and "only 1.0 MiB" in err


def test_unexpected_exception_is_one_line_exit_1_and_debug_shows_the_traceback(capsys, monkeypatch):
    from retain import api

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(api, "run", boom)
    code, _, err = cli(capsys, "run", *TINY)
    assert code == 1 and "internal error: RuntimeError: kaboom (rerun with --debug" in one_line(err)
    code, _, err = cli(capsys, "run", *TINY, "--debug")
    assert code == 1 and "Traceback (most recent call last)" in err and "kaboom" in err
    code, _, err = cli(capsys, "run", "--method", "nope", "--debug")
    assert code == 2 and "Traceback" in err and "unknown method 'nope'" in err


# ----------------------------------------------------------------------------------------------------- storage

def test_locked_store_waits_then_one_line_exit_1(tmp_path, capsys, monkeypatch):
    db = tmp_path / "l.db"
    Store(db).close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys
        db = sqlite3.connect({str(db)!r}, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        sys.stdin.read()
        db.execute("ROLLBACK")
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("RETAIN_STORE_TIMEOUT", "0.5")
        t0 = time.monotonic()
        code, _, err = cli(capsys, "run", "--store", str(db), *TINY)
        waited = time.monotonic() - t0
    finally:
        holder.communicate("", timeout=30)
    line = one_line(err)
    assert code == 1 and "is locked by another process (waited 0.5 s" in line and "retry" in line
    assert waited >= 0.5
    monkeypatch.setenv("RETAIN_STORE_TIMEOUT", "soon")
    code, _, err = cli(capsys, "run", "--store", str(db), *TINY)
    assert code == 2 and "RETAIN_STORE_TIMEOUT must be a number" in one_line(err)


def test_read_only_store_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """Simulated with os.access (the tests may run as root, whom chmod does not stop)."""
    db = tmp_path / "ro.db"
    Store(db).close()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if (Path(p) == db and mode == os.W_OK)
                        else real_access(p, mode, **k))
    code, _, err = cli(capsys, "run", "--store", str(db), *TINY)
    assert code == 2 and f"--store {db}: not writable; choose another path" in one_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes files regardless of permissions")
def test_read_only_store_file_permissions(tmp_path, capsys):
    db = tmp_path / "ro.db"
    Store(db).close()
    db.chmod(0o444)
    code, _, err = cli(capsys, "run", "--store", str(db), *TINY)
    assert code == 2 and "not writable" in one_line(err)


def _limited(script: str, limit: int) -> subprocess.CompletedProcess:
    """Run ``script`` in a Python whose files may not grow past ``limit`` bytes (a full disk), SIGXFSZ ignored
    so that a write fails with EFBIG instead of killing the process."""
    prelude = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "run.ckpt"
    checkpoint.save(path, {"v": 1})
    before = path.read_bytes()
    out = _limited(f"""
        import torch
        from retain import checkpoint
        try:
            checkpoint.save({str(path)!r}, {{"v": 2, "big": torch.zeros(100_000)}})
        except checkpoint.CheckpointError as e:
            print(e)
    """, 50_000)
    assert out.returncode == 0, out.stderr
    assert "cannot write checkpoint" in out.stdout and "previous checkpoint is kept" in out.stdout
    assert len(out.stdout.strip().splitlines()) == 1
    assert path.read_bytes() == before and checkpoint.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary left behind


def test_full_disk_while_writing_a_result_loses_nothing(tmp_path):
    db, js = tmp_path / "r.db", tmp_path / "r.json"
    cfg = {"benchmark": "split-digits", "method": "er", "mode": "class", "seed": 0}
    h = config_hash(cfg)
    with Store(db) as s:
        s.claim(h, cfg)
    js.write_text('{"old": true}')
    out = _limited(f"""
        from retain.cli import write_json_atomic
        from retain.errors import RetainError
        from retain.store import Store
        big = {{"accuracy_matrix": [[0.5]], "warnings": ["x" * 2_000_000]}}
        s = Store({str(db)!r})
        for what, write in (("store", lambda: s.finish({h!r}, {cfg!r}, big)),
                            ("json", lambda: write_json_atomic({str(js)!r}, big))):
            try:
                write()
                print(what, "written")
            except RetainError as e:
                print(what, e.exit_code, e)
    """, 1_000_000)
    assert out.returncode == 0, out.stderr
    store_line, json_line = out.stdout.strip().splitlines()
    assert store_line.startswith("store 1 ") and "free disk space" in store_line, store_line
    assert json_line.startswith("json 1 cannot write") and "previous file (if any) is kept" in json_line
    assert json.loads(js.read_text()) == {"old": True}
    with Store(db) as s:  # the store is intact and still says the run is unfinished
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert s.get(h)["status"] == "running"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_output_error_is_a_fault():
    assert OutputError.exit_code == 1 and not issubclass(OutputError, ConfigError)


def test_corrupt_checkpoint_is_refused_by_the_cli_never_loaded(tmp_path, capsys, monkeypatch):
    argv = ["--method", "er", *TINY]
    db = tmp_path / "c.db"
    h = config_hash(parse_run(argv).to_dict())
    ck = tmp_path / "c.db.checkpoints" / f"{h}.ckpt"
    checkpoint.save(ck, {"format": 1, "fingerprint": h, "position": {"task": 1, "task_step": 0, "step": 9}})
    raw = bytearray(ck.read_bytes())
    raw[-5] ^= 0xFF
    ck.write_bytes(bytes(raw))
    loaded = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    code, _, err = cli(capsys, "run", *argv, "--store", str(db), "--resume")
    line = one_line(err)
    assert code == 1 and "is corrupt (checksum mismatch); delete it" in line
    assert not loaded  # refused by its checksum, never unpickled
    with Store(db) as s:
        rec = s.get(h)
    assert rec["status"] == "failed" and "checksum mismatch" in rec["error"]


# ------------------------------------------------------------------------- Ctrl-C, full disk, resume (end to end)

def test_sigint_checkpoints_and_exits_130_then_resume_under_a_full_disk_then_resume_completes(tmp_path):
    """Ctrl-C mid-run: a checkpoint, one line, exit 130. Resumed with a full disk: the first checkpoint write
    fails with one line, exit 1, and the Ctrl-C checkpoint is untouched. Resumed again: the final matrix equals
    an uninterrupted run's (same seed, CPU)."""
    common = ["run", "--method", "er", "--hidden", "400,400", "--epochs", "8", "--n-tasks", "3", "--seed", "2",
              "--quiet", "--store", str(tmp_path / "i.db")]
    ckdir = tmp_path / "i.db.checkpoints"
    proc = subprocess.Popen(_retain(*common, "--checkpoint-every", "5"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (ckdir.exists() and any(ckdir.glob("*.ckpt"))):
        assert proc.poll() is None, f"the run ended before writing a checkpoint: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "interrupted; the checkpoint is saved: rerun the same command to continue" in one_line(err)
    (ck,) = ckdir.glob("*.ckpt")
    saved = checkpoint.load(ck)["state"]["position"]
    assert saved["step"] > 0
    digest = hashlib.sha256(ck.read_bytes()).hexdigest()
    with Store(tmp_path / "i.db") as s:
        (rec,) = s.runs()
        assert rec["status"] == "failed" and "interrupted; start the same command again" in rec["error"]

    # a full disk (files limited to 1 MB; a checkpoint of this model with Adam's state is about 2.5 MB)
    full = subprocess.run(_retain(*common, "--checkpoint-every", "5", "--resume"), env=ENV, capture_output=True,
                          text=True, timeout=300, preexec_fn=_file_size_limit(1_000_000))
    assert full.returncode == 1, full.stderr
    assert "cannot write checkpoint" in one_line(full.stderr) and "previous checkpoint is kept" in full.stderr
    assert hashlib.sha256(ck.read_bytes()).hexdigest() == digest  # still the Ctrl-C checkpoint, still valid
    assert checkpoint.load(ck)["state"]["position"] == saved
    assert not [p for p in ckdir.iterdir() if p.name.endswith(".tmp")]

    done = subprocess.run(_retain(*common, "--resume", "--json", str(tmp_path / "r.json")), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from its checkpoint at task {saved['task']}, step {saved['task_step']}" in done.stderr
    torch.set_num_threads(1)  # as the subprocesses
    plain = retain.run(benchmark="split-digits", method="er", hidden=(400, 400), epochs=8, n_tasks=3, seed=2)
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert resumed["accuracy_matrix"] == plain.accuracy_matrix and resumed["baseline"] == plain.baseline
    with Store(tmp_path / "i.db") as s:
        (rec,) = s.runs()
        assert rec["status"] == "done" and rec["accuracy_matrix"] == plain.accuracy_matrix
    assert not any(ckdir.glob("*.ckpt"))


def _file_size_limit(limit: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ignored dispositions survive exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("script, args", [
    ("reproduce_replay.py", ["--table-only", "--out", "none.jsonl"]),
    ("reproduce_generative_architecture.py", ["--group", "rotated", "--seeds", "0", "--out", "none.jsonl"]),
])
def test_reproduction_scripts_refuse_an_unwritable_checkpoint_dir_before_training(tmp_path, script, args):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args, "--checkpoint-dir", str(blocker)],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert f"error: cannot write checkpoints to {blocker}: " in last and last.endswith("choose a writable folder")
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize("lr", ["0", "-0.1", "nan", "inf"])
def test_reproduce_replay_refuses_a_learning_rate_that_is_not_positive(tmp_path, lr):
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "reproduce_replay.py"), "--protocols", "agem",
                        "--only", "gem", "--lr", lr, "--out", "none.jsonl"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.endswith(f"--lr must be a positive number, got {float(lr)}; e.g. --lr 0.03")
    assert not (tmp_path / "none.jsonl").exists()


def test_gem_probe_reports_the_memory_losses_after_one_step(tmp_path):
    """benchmarks/gem_probe.py on a GEM checkpoint at task 1 (MNIST-like files, an untrained network): one table
    row per batch, with a mean / max memory loss per learning rate; and its bad inputs exit 2."""
    from retain.models import MLP

    root = Path(__file__).resolve().parents[1]
    data = write_mnist_like(tmp_path / "m", n_train=60, n_test=20)
    spec = importlib.util.spec_from_file_location("rr", root / "benchmarks" / "reproduce_replay.py")
    rr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rr)
    a = argparse.Namespace(protocols="agem", only="gem", epochs=None, train_per_task=None, tasks=None, init="torch")
    (c,) = rr.configs(a)
    sc = rr.build_scenario(c, 0, str(data), None)
    gem = create("gem", c["params"])
    rows = sc.batch(sc.tasks[0].train_idx[:30], 0)
    gem.buffer.add(rows.x, rows.y, rows.t, key=rows.t, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    state = {"position": {"task": 1, "task_step": 0, "step": 3}, "model": MLP(784, 10, (256, 256)),
             "method": gem.state_dict()}
    checkpoint.save(tmp_path / "g.ckpt", {"format": checkpoint.FORMAT, "fingerprint": "probe", "state": state})

    def probe(*extra):
        return subprocess.run([sys.executable, str(root / "benchmarks" / "gem_probe.py"), "--data-dir", str(data),
                               "--seed", "0", *extra], env=ENV, capture_output=True, text=True, timeout=120)

    p = probe("--checkpoint", str(tmp_path / "g.ckpt"), "--lrs", "0.1,0.01", "--batches", "2")
    assert p.returncode == 0, p.stderr
    assert "position {'task': 1, 'task_step': 0, 'step': 3}" in p.stdout and "memory loss of tasks 0–0" in p.stdout
    table = [line for line in p.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 2
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 5 and all("/" in cell for cell in cells[3:])
        assert all(math.isfinite(float(v)) for cell in cells[3:] for v in cell.split("/"))
    for extra, message in ((("--checkpoint", str(tmp_path / "none.ckpt")), "no such file"),
                           (("--checkpoint", str(tmp_path / "g.ckpt"), "--lrs", "0.1,inf"), "must be positive")):
        p = probe(*extra)
        assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1]
