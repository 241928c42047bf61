"""Anytime evaluation (``--eval-every N``): the curve, its place in the record and the store, resume, and that
evaluating changes nothing about the training."""

from __future__ import annotations

import json

import pytest
import torch

import retain
from retain.checkpoint import Checkpointer
from retain.cli import main
from retain.store import Store

from .conftest import Recording

FAST = {"benchmark": "split-digits", "mode": "class", "n_tasks": 3, "hidden": (32,), "threads": 1}



@pytest.mark.parametrize("extra", [{"epochs": 2}, {"task_free": True}, {"task_free": True, "blurry": 0.3}])
def test_the_curve_changes_no_training_and_its_task_ends_are_the_rows_of_R(extra):
    plain = retain.run(method="er", **FAST, **extra)
    run = retain.run(method="er", eval_every=60, **FAST, **extra)
    assert run.accuracy_matrix == plain.accuracy_matrix  # evaluating in between trains nothing differently
    a = run.anytime
    points = a["points"]
    assert a["every"] == 60 and a["test_sizes"] == [len(t.test_idx) for t in
                                                    retain.config.resolve(**FAST).build_scenario().tasks]
    samples = [p["samples"] for p in points]
    assert samples == sorted(samples) and samples[0] >= 60
    periodic = [p for p in points if not p["end"]]
    assert len(periodic) >= 10
    for p, q in zip(periodic, periodic[1:]):
        assert q["samples"] // 60 > p["samples"] // 60  # one point per further 60 samples, never two
    ends = [p for p in points if p["end"]]
    assert [p["task"] for p in ends] == [0, 1, 2]
    assert [p["acc"] for p in ends] == run.accuracy_matrix  # the curve's task ends are R's rows
    assert points[-1]["acc"] == run.accuracy_matrix[-1]
    assert all(len(p["acc"]) == 3 for p in points)  # every task's test set, the unseen ones too
    m = run.metrics
    for key in ("aaa", "a_auc", "stability_gap", "min_acc", "wc_acc", "avg_incremental_acc", "old_acc",
                "new_acc", "top5_acc", "anytime_eval_fraction"):
        assert key in m, key
    assert m["top5_acc"] >= m["acc"] and 0 < m["anytime_eval_fraction"] < 5
    assert 0 < a["eval_s"] <= run.timings["eval_s"] + 1e-9  # the periodic points' share of the evaluation time


def test_without_eval_every_there_is_no_curve_and_the_hash_is_unchanged():
    from retain.config import hashed, resolve

    r = retain.run(method="finetune", epochs=1, **FAST)
    assert r.anytime is None and "aaa" not in r.metrics and "avg_incremental_acc" in r.metrics
    assert "eval_every" not in hashed(resolve(method="finetune", **FAST).spec())
    assert hashed(resolve(method="finetune", eval_every=50, **FAST).spec())["eval_every"] == 50


@pytest.mark.parametrize("extra", [{"epochs": 2}, {"task_free": True}, {"online": True, "si_blurry": [50, 10]}])
def test_resume_mid_stream_gives_the_identical_curve(tmp_path, extra):
    torch.set_num_threads(1)
    rec = Recording(tmp_path / "run.ckpt", every=5)
    whole = retain.run(method="er", eval_every=45, checkpointer=rec, **FAST, **extra)
    assert len(rec.copies) >= 4
    for copy in (rec.copies[1], rec.copies[len(rec.copies) // 2]):
        ck = Checkpointer(copy, every=5, resume=True, keep=True)
        resumed = retain.run(method="er", eval_every=45, checkpointer=ck, **FAST, **extra)
        assert ck.resumed_from["step"] > 0
        assert resumed.anytime["points"] == whole.anytime["points"], ck.resumed_from
        assert resumed.accuracy_matrix == whole.accuracy_matrix


def test_cli_json_and_store_keep_the_curve_and_config_files_take_the_option(tmp_path, capsys):
    out, db = tmp_path / "r.json", tmp_path / "r.db"
    args = ["run", "--benchmark", "split-digits", "--mode", "class", "--method", "er", "--n-tasks", "2",
            "--epochs", "1", "--hidden", "16", "--eval-every", "100", "--quiet"]
    assert main([*args, "--json", str(out), "--store", str(db)]) == 0
    rec = json.loads(out.read_text())
    assert rec["anytime"]["every"] == 100 and rec["anytime"]["points"][-1]["end"] is True
    assert {"aaa", "a_auc", "stability_gap"} <= set(rec["metrics"])
    stored = Store(db).runs()
    assert len(stored) == 1 and stored[0]["anytime"]["points"] == rec["anytime"]["points"]
    rep = tmp_path / "report"
    assert main(["report", "--store", str(db), "--out", str(rep), "--quiet"]) == 0
    md = (rep / "report.md").read_text()
    assert "Anytime evaluation" in md and "AAA %" in md
    (png,) = (rep / "images").glob("*-anytime.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    f = tmp_path / "run.toml"
    f.write_text('benchmark = "split-digits"\nmode = "class"\nmethod = "finetune"\nn_tasks = 2\nepochs = 1\n'
                 'hidden = [16]\neval_every = 150\n')
    assert main(["run", "--config", str(f), "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["anytime"]["every"] == 150
    capsys.readouterr()
    assert main([*args[:-3], "--eval-every", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-every" in err[0] and "at least 1" in err[0]
