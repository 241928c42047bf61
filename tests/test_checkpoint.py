"""Checkpoint and resume: a run killed mid-task and resumed ends with the same matrix as one never stopped."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import retain
from retain import checkpoint
from retain.checkpoint import Checkpointer, CheckpointError
from retain.store import Store

from .conftest import Recording

FAST = {"benchmark": "split-digits", "epochs": 2, "n_tasks": 3}


def fast(**extra):
    """FAST with ``extra`` over it (a task-free stream makes one pass: no epochs)."""
    kw = {**FAST, **extra}
    if kw.get("task_free"):
        del kw["epochs"]
    return kw



@pytest.mark.parametrize("method,extra", [("er", {}), ("ewc", {}), ("er", {"task_free": True})])
def test_resume_from_any_checkpoint_gives_the_same_matrix(tmp_path, method, extra):
    torch.set_num_threads(1)
    plain = retain.run(method=method, **fast(**extra))
    rec = Recording(tmp_path / "run.ckpt", every=7)
    with_ckpt = retain.run(method=method, checkpointer=rec, **fast(**extra))
    assert with_ckpt.accuracy_matrix == plain.accuracy_matrix  # checkpointing changes nothing
    assert len(rec.copies) >= 4
    picks = {rec.copies[1], rec.copies[len(rec.copies) // 2], rec.copies[-1]}
    positions = set()
    for copy in picks:
        ck = Checkpointer(copy, every=7, resume=True, keep=True)
        resumed = retain.run(method=method, checkpointer=ck, **fast(**extra))
        positions.add((ck.resumed_from["task"], ck.resumed_from["task_step"]))
        assert resumed.accuracy_matrix == plain.accuracy_matrix, ck.resumed_from
        assert resumed.baseline == plain.baseline
    assert len(positions) == len(picks)


@pytest.mark.parametrize("extra", [{}, {"task_free": True}])
def test_checkpoint_carries_the_training_time_of_the_unfinished_task(tmp_path, extra):
    """A mid-task checkpoint holds the training time up to its step, so a resumed run loses none of it."""
    rec = Recording(tmp_path / "run.ckpt", every=7)
    retain.run(method="er", checkpointer=rec, **fast(**extra))
    states = [checkpoint.load(c)["state"] for c in rec.copies]
    first = states[0]
    assert first["position"]["step"] == 7 and first["position"]["task"] == 0  # 7 steps into the first task
    assert first["timings"]["train_s"] > 0
    times = [s["timings"]["train_s"] for s in states]
    steps = [s["position"]["step"] for s in states]
    for a, b, sa, sb in zip(times, times[1:], steps, steps[1:]):
        assert sb == sa or b > a  # every checkpoint after more steps holds more training time
    ck = Checkpointer(rec.copies[len(rec.copies) // 2], every=7, resume=True, keep=True)
    resumed = retain.run(method="er", checkpointer=ck, **fast(**extra))
    assert resumed.timings["train_s"] > times[len(rec.copies) // 2]


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, {"format": 1, "x": torch.arange(5)})
    assert checkpoint.load(path)["x"].tolist() == [0, 1, 2, 3, 4]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a retain checkpoint"):
        checkpoint.load(path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    checkpoint.save(path, {"v": 1})

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(CheckpointError, match="previous checkpoint is kept"):
        checkpoint.save(path, {"v": 2})
    monkeypatch.undo()
    assert checkpoint.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temporary left behind


def test_checkpoint_of_another_config_is_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    Checkpointer(path, fingerprint="aaa").save({"position": {"task": 0, "task_step": 0, "step": 0}})
    with pytest.raises(CheckpointError, match="another configuration"):
        Checkpointer(path, resume=True, fingerprint="bbb").load()


def test_run_path_is_stable_and_an_unwritable_folder_is_refused_up_front(tmp_path):
    key = json.dumps(["agem", "gem", 0])
    assert checkpoint.run_path(tmp_path, key) == checkpoint.run_path(str(tmp_path), key)
    assert checkpoint.run_path(tmp_path, key) != checkpoint.run_path(tmp_path, key + " ")
    checkpoint.check_folder(tmp_path / "new" / "folder")  # created
    assert (tmp_path / "new" / "folder").is_dir() and not any((tmp_path / "new" / "folder").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to .*file.*choose a writable folder"):
        checkpoint.check_folder(tmp_path / "file")


def _retain(*args: str) -> list[str]:
    return [sys.executable, "-m", "retain.cli", *args]


def test_sigkill_mid_task_then_resume_equals_uninterrupted(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    common = ["run", "--benchmark", "split-digits", "--method", "er", "--epochs", "12", "--seed", "1", "--quiet"]
    db = tmp_path / "k.db"
    ckdir = tmp_path / "k.db.checkpoints"
    proc = subprocess.Popen(_retain(*common, "--store", str(db), "--checkpoint-every", "3",
                                    "--json", str(tmp_path / "killed.json")), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (ckdir.exists() and any(ckdir.glob("*.ckpt"))):
        assert proc.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.json").exists()
    with Store(db) as s:
        (rec,) = s.runs()
        assert rec["status"] == "running"  # killed, never finished
    (ck,) = ckdir.glob("*.ckpt")
    position = checkpoint.load(ck)["state"]["position"]
    assert position["step"] > 0

    out = subprocess.run(_retain(*common, "--store", str(db), "--resume", "--json", str(tmp_path / "resumed.json")),
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"resumed from (its|the) checkpoint at task \d+, step \d+", out.stderr), out.stderr
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    plain = retain.run(benchmark="split-digits", method="er", epochs=12, seed=1).to_dict()
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["accuracy_matrix"] == plain["accuracy_matrix"]
    assert resumed["baseline"] == plain["baseline"]
    with Store(db) as s:
        (rec,) = s.runs()
        assert rec["status"] == "done" and rec["accuracy_matrix"] == plain["accuracy_matrix"]
    assert not any(ckdir.glob("*.ckpt"))  # finished: the checkpoint is gone


def test_experiments_resume_unfinished_runs_automatically(tmp_path, monkeypatch):
    from retain.api import RunConfig
    from retain.experiments import checkpoint_dir, make_job, run_jobs

    job = make_job(RunConfig(benchmark="split-digits", epochs=2, n_tasks=3), method="er")
    save, load = Checkpointer.save, Checkpointer.load

    def dies(self, state):  # the process "dies" right after a mid-task checkpoint
        save(self, state)
        if state["position"]["task"] == 1 and state["position"]["task_step"] > 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", dies)
    with Store(tmp_path / "s.db") as s:
        with pytest.raises(KeyboardInterrupt):
            run_jobs([job], s, quiet=True, checkpoint_every=5)
        assert s.get(job.hash)["status"] != "done"  # interrupted, not finished
        assert (checkpoint_dir(s) / f"{job.hash}.ckpt").exists()
        monkeypatch.setattr(Checkpointer, "save", save)
        resumed_from = []

        def spy(self, map_location="cpu"):
            state = load(self, map_location)
            resumed_from.append(state["position"] if state is not None else None)
            return state

        monkeypatch.setattr(Checkpointer, "load", spy)
        (rec,) = run_jobs([job], s, quiet=True, checkpoint_every=5)  # started again: continues
    assert resumed_from and resumed_from[0]["task"] == 1
    torch.set_num_threads(1)
    plain = retain.run(job.config)
    assert rec["status"] == "done" and rec["accuracy_matrix"] == plain.accuracy_matrix


@pytest.mark.parametrize("method,extra", [("ewc", {}), ("er", {"reset_optimizer": True}),
                                          ("er", {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01})])
def test_resume_at_a_task_boundary_gives_the_same_matrix(tmp_path, method, extra):
    """At a boundary the optimizer is not saved (``begin_task`` may change the parameters) but its state by
    parameter name is, for the next task's optimizer to carry (Adam's moments, SGD's momentum), unless reset."""
    torch.set_num_threads(1)
    plain = retain.run(method=method, **FAST, **extra)
    rec = Recording(tmp_path / "run.ckpt")  # no `every`: the boundaries only
    assert retain.run(method=method, checkpointer=rec, **FAST, **extra).accuracy_matrix == plain.accuracy_matrix
    states = [checkpoint.load(c)["state"] for c in rec.copies]
    assert [s["position"]["task"] for s in states] == [1, 2] and all(s["data"] is None for s in states)
    assert all(s["optimizer"] is None for s in states)
    assert all((s["optimizer_carry"] is None) == ("reset_optimizer" in extra) for s in states)
    for copy in rec.copies:
        ck = Checkpointer(copy, resume=True, keep=True)
        assert retain.run(method=method, checkpointer=ck, **FAST, **extra).accuracy_matrix == plain.accuracy_matrix
        assert ck.resumed_from["task_step"] == 0


def test_a_checkpoint_of_an_older_format_is_refused_with_a_clear_error(tmp_path):
    """Format 1 kept the trainer's keys beside the envelope's; such a file is refused, never half-read."""
    path = tmp_path / "old.ckpt"
    checkpoint.save(path, {"format": 1, "fingerprint": "", "position": {"task": 1, "task_step": 0, "step": 9}})
    with pytest.raises(CheckpointError, match="has format 1, but this version of retain reads format 2; delete it"):
        retain.run(method="er", checkpointer=Checkpointer(path, resume=True), **FAST)
    Checkpointer(path).save({"format": 1, "position": {}})  # today's envelope around an older trainer state
    with pytest.raises(CheckpointError, match="trainer state of format 1.*delete it"):
        retain.run(method="er", checkpointer=Checkpointer(path, resume=True), **FAST)


def test_trainer_state_round_trips():
    """``load_state_dict(state_dict())`` into a fresh trainer gives back the same state, key by key."""
    from retain.method import create
    from retain.models import MLP
    from retain.trainer import TrainConfig, Trainer

    from .conftest import tiny_split

    sc, config = tiny_split("class", n_tasks=2), TrainConfig(iterations=3, batch_size=8)

    def trainer():
        torch.manual_seed(0)
        return Trainer(sc, create("er", {"buffer_size": 8}), MLP(8, sc.n_outputs, (4,)), config)

    first = trainer()
    first.run()
    first.data = first.view.task_data(1)  # as if inside task 1: the optimizer itself is kept
    state = first.state_dict()
    second = trainer()
    second.load_state_dict(state)
    again = second.state_dict()
    assert set(again) == set(state)
    for key in ("format", "position", "R", "baseline", "timings", "warnings", "optimizer_carry"):
        assert again[key] == state[key], key
    assert torch.equal(again["seen"], state["seen"]) and torch.equal(again["data"].idx, state["data"].idx)
    assert again["optimizer"]["state"].keys() == state["optimizer"]["state"].keys()
    for k, s in state["optimizer"]["state"].items():
        assert all(torch.equal(s[n], again["optimizer"]["state"][k][n]) for n in s)
    assert all(torch.equal(a, b) for a, b in zip(again["model"].parameters(), state["model"].parameters()))
    assert torch.equal(again["method"]["buffer"].x, state["method"]["buffer"].x)
    assert all(torch.equal(torch.as_tensor(again["rng"][k]), torch.as_tensor(state["rng"][k]))
               for k in ("torch", "ctx"))
