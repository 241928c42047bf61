"""Compute accounting (``--count-flops``): the counted FLOPs of a step by hand, boundary work, the record, resume,
and compare's column."""

from __future__ import annotations

import pytest
import torch

import retain
from retain.checkpoint import Checkpointer
from retain.cli import main
from retain.config import hashed, resolve
from retain.errors import ConfigError
from retain.scenarios import from_tensors

from .conftest import Recording


def _tiny(n=40, d=4, classes=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.arange(n) % classes
    return from_tensors(x, y, x[:8], y[:8], "class", n_tasks=2)


def test_a_steps_flops_are_the_matrix_products_of_forward_and_backward_by_hand():
    """MLP 4-3-4 (one hidden layer of 3), batches of 10: forward 2·B·(D·H + H·C) for the two products; backward the
    weight gradients of both layers, 2·B·(D·H + H·C), and the input gradient of the second only (the data needs
    none), 2·B·H·C: 2·10·(2·12 + 3·12) = 1200 per step, 2 tasks × 2 steps."""
    r = retain.run(scenario=_tiny(), method="finetune", hidden=(3,), batch_size=10, epochs=1, optimizer="sgd",
                   lr=0.1, count_flops=True, threads=1)
    c = r.compute
    assert c["steps"] == 4 and c["flops_per_step"] == 1200 and c["train_flops"] == 4800
    assert c["boundary_flops"] == 0 and "flop_counter" in c["counter"]
    plain = retain.run(scenario=_tiny(), method="finetune", hidden=(3,), batch_size=10, epochs=1, optimizer="sgd",
                       lr=0.1, threads=1)
    assert plain.compute is None and plain.accuracy_matrix == r.accuracy_matrix  # counting changes nothing


def test_boundary_work_is_counted_apart_from_the_steps():
    # iCaRL's end of task: herding and the class means, forward passes over the task's rows and the exemplars
    r = retain.run(scenario=_tiny(), method="icarl", params={"buffer_size": 8}, hidden=(3,), batch_size=10,
                   epochs=1, count_flops=True, threads=1)
    assert r.compute["boundary_flops"] > 0
    assert r.compute["train_flops"] == r.compute["step_flops"] + r.compute["boundary_flops"]
    # replay doubles the rows of a step once the buffer has them: ER's later steps count more than its first
    er = retain.run(scenario=_tiny(), method="er", params={"buffer_size": 20}, hidden=(3,), batch_size=10,
                    epochs=1, count_flops=True, threads=1)
    assert er.compute["flops_per_step"] > 1200



def test_a_resumed_run_counts_the_same_flops(tmp_path):
    kw = {"benchmark": "split-digits", "mode": "class", "method": "er", "hidden": (16,), "epochs": 1,
          "n_tasks": 3, "count_flops": True, "threads": 1}
    rec = Recording(tmp_path / "run.ckpt", every=4)
    whole = retain.run(checkpointer=rec, **kw)
    ck = Checkpointer(rec.copies[len(rec.copies) // 2], every=4, resume=True, keep=True)
    resumed = retain.run(checkpointer=ck, **kw)
    assert ck.resumed_from["step"] > 0 and resumed.compute == whole.compute


def test_the_option_is_hashed_refused_data_parallel_and_compare_shows_the_column(tmp_path, capsys):
    assert hashed(resolve(benchmark="split-digits", count_flops=True).spec())["count_flops"] is True
    assert "count_flops" not in hashed(resolve(benchmark="split-digits").spec())
    with pytest.raises(ConfigError, match="--count-flops"):
        resolve(benchmark="split-digits", count_flops=True, devices=2)
    db = tmp_path / "c.db"
    assert main(["compare", "--benchmark", "split-digits", "--methods", "finetune,er", "--seeds", "1", "--modes",
                 "class", "--epochs", "1", "--hidden", "16", "--count-flops", "--store", str(db), "--workers", "1",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if "ACC %" in line)
    assert "train GFLOPs" in head
    row = next(line for line in out.splitlines() if "| er " in line)
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    names = [c.strip() for c in head.strip().strip("|").split("|")]
    assert float(cells[names.index("train GFLOPs")].split()[0]) > 0
