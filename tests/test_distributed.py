"""Data-parallel training (retain.distributed): 2 processes on gloo give 1 process's run at the same global batch.

Every test here starts real processes on this machine (gloo over localhost); each takes a few seconds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import retain
from retain import distributed
from retain.errors import ConfigError
from retain.method import create
from retain.models import MLP
from retain.scenarios import from_tensors
from retain.trainer import TrainConfig, TrainingError, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    """A collective that waits a minute here has hung (a broken test, not a slow one): fail instead of waiting."""
    monkeypatch.setattr(distributed, "TIMEOUT", timedelta(seconds=60))


def scenario(n_per_class: int = 25):
    """6 classes of 8-feature Gaussian blobs in 3 class-IL tasks: 50 training rows per task."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 8, generator=g) * 2
    y = torch.arange(6).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), 8, generator=g)
    y_test = torch.arange(6).repeat_interleave(10)
    x_test = centres[y_test] + torch.randn(len(y_test), 8, generator=g)
    return from_tensors(x, y, x_test, y_test, mode="class", n_tasks=3)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(8, 6, (16,))


# ---------------------------------------------------------------------------------------------- no processes

def test_shard_covers_rows_in_order_with_sizes_one_apart():
    for n in (0, 1, 5, 7, 10):
        for size in (1, 2, 3, 4):
            parts = [distributed.shard(n, distributed.World(r, size, torch.device("cpu"))) for r in range(size)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            lengths = [len(range(n)[p]) for p in parts]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_methods_with_their_own_step_are_refused_on_several_devices():
    for name in ("mer", "maml_replay"):
        with pytest.raises(ConfigError, match=name) as e:
            distributed.check_data_parallel(create(name), 2)
        assert "--devices 1" in str(e.value) and "\n" not in str(e.value)
        distributed.check_data_parallel(create(name), 1)  # alone it trains as always
    for name in ("finetune", "er", "ewc+er"):
        distributed.check_data_parallel(create(name), 2)


def test_world_size_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert distributed.launched() and distributed.world_size(1) == 2 and distributed.world_size(2) == 2
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.world_size(3)
    monkeypatch.delenv("RANK")
    assert not distributed.launched() and distributed.world_size(3) == 3


# ------------------------------------------------------------------------------------------- the primitives

def _primitives() -> dict:
    """On each of 2 processes: gradients over unequal shares (3 and 2 rows, then 1 and 0), a parameter with a
    gradient on one process only, rows gathered in order, rank 0's buffers everywhere."""
    w = distributed.current()
    a, b, c = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    rows = torch.arange(5.0).reshape(5, 1) * torch.ones(5, 3)  # row i = [i, i, i]
    mine = rows[distributed.shard(5, w)]
    loss = (a * mine).sum(1).mean()  # d/da = mean of my rows
    if w.rank == 0:
        loss = loss + b.sum()  # b: a gradient on rank 0 only
    loss.backward()
    reduced = distributed.all_reduce_gradients([a, b, c], w, len(mine), loss)
    out = {"a": a.grad.tolist(), "b": b.grad.tolist(), "c": c.grad, "loss": float(reduced)}
    # the last batch of an epoch: 1 row, so rank 1 has none and its mean is NaN
    a.grad = None
    one = rows[4:5][distributed.shard(1, w)]
    empty_loss = (a * one).sum(1).mean()
    empty_loss.backward()
    reduced = distributed.all_reduce_gradients([a], w, len(one), empty_loss)
    out["a_last"], out["loss_last"] = a.grad.tolist(), float(reduced)
    out["gathered"] = distributed.all_gather_rows(rows[distributed.shard(5, w)] * 10, w).tolist()
    out["gathered_n"] = distributed.all_gather_rows(rows[distributed.shard(5, w)], w, 5).tolist()
    out["gathered_bf16"] = distributed.all_gather_rows(mine.bfloat16(), w).float().tolist()
    bn = torch.nn.BatchNorm1d(3)
    bn.train()
    bn(rows[distributed.shard(5, w)] + w.rank)  # different running statistics on each process
    distributed.broadcast_buffers(bn, w)
    stats = [None, None]
    dist.all_gather_object(stats, (bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked)))
    out["bn_same"] = stats[0] == stats[1]
    everyone = [None, None]
    dist.all_gather_object(everyone, {k: v for k, v in out.items() if k != "c"})
    out["ranks_agree"] = everyone[0] == everyone[1]
    return out


def test_primitives_on_two_processes():
    out = distributed.spawn(2, _primitives, device="cpu", threads=1)
    assert out["a"] == pytest.approx([2.0] * 3)  # mean of 0..4, as one process over all 5 rows
    assert out["b"] == pytest.approx([0.6] * 3)  # rank 0's 3 of 5 rows carry it: weighted 3/5
    assert out["c"] is None  # no process had a gradient: stays None, as alone
    assert out["loss"] == pytest.approx(6.0)  # (3 rows x mean 3 + 2 rows x mean 10.5) / 5: the mean over all 5
    assert out["a_last"] == pytest.approx([4.0] * 3) and out["loss_last"] == pytest.approx(12.0)  # not NaN
    assert out["gathered"] == [[10.0 * i] * 3 for i in range(5)]
    assert out["gathered_n"] == [[float(i)] * 3 for i in range(5)]
    assert out["gathered_bf16"] == [[float(i)] * 3 for i in range(5)]
    assert out["bn_same"] and out["ranks_agree"]


def _threads() -> int:
    return torch.get_num_threads()


def test_each_process_gets_its_share_of_the_threads():
    before = torch.get_num_threads()
    try:
        for mine, theirs in ((4, 2), (3, 1), (1, 1)):
            torch.set_num_threads(mine)
            assert distributed.spawn(2, _threads) == theirs
    finally:
        torch.set_num_threads(before)


def _fails(kind: str) -> None:
    if distributed.current().rank == 1:
        if kind == "config":
            raise ConfigError("rank 1 refused this")
        raise TrainingError("loss became nan at task 1, step 5", 1, 5)
    dist.barrier()  # rank 0 waits for a peer that is gone: the launcher ends it


def test_a_failing_process_raises_its_own_error_here():
    with pytest.raises(ConfigError, match="rank 1 refused this"):
        distributed.spawn(2, _fails, ("config",), threads=1)
    with pytest.raises(TrainingError) as e:
        distributed.spawn(2, _fails, ("training",), threads=1)
    assert (e.value.task, e.value.step) == (1, 5)


# ------------------------------------------------------------------------------------- whole runs: 2 vs 1

def _train(method_name: str, batch_size: int) -> dict:
    """One run (on every process of the world, or alone); the matrix, the final parameters, and on several
    processes whether every process ended with the same parameters and method state."""
    method = create(method_name, {"buffer_size": 50} if method_name == "er" else {})
    w = distributed.current()
    config = TrainConfig(epochs=2, batch_size=batch_size, optimizer="sgd", lr=0.1, momentum=0.9, seed=0,
                         device="cpu", devices=1 if w is None else w.size)
    m = model()
    rows = [0]  # rows this process's model trained on (its share of each step)
    m.register_forward_hook(lambda mod, args, _: rows.__setitem__(0, rows[0] + len(args[0])) if mod.training else None)
    trained = train(scenario(), method, m, config)
    params = [p.detach().clone() for p in m.parameters()]
    out = {"R": trained.accuracy_matrix, "params": params, "rows": rows[0]}
    if w is not None:
        state = method.state_dict()
        digest = [p.double().sum().item() for p in params]
        if method_name == "er":
            buffer = state["buffer"]
            digest += [float(buffer.x[:len(buffer)].double().sum()), buffer.y[:len(buffer)].tolist()]
        everyone = [None] * w.size
        dist.all_gather_object(everyone, digest)
        out["ranks_agree"] = all(d == everyone[0] for d in everyone)
        dist.all_gather_object(everyone, rows[0])
        out["rows"] = everyone
    return out


@pytest.mark.parametrize("method_name, batch_size", [("finetune", 10), ("finetune", 7), ("er", 10), ("er", 7)])
def test_two_processes_give_one_process_run(method_name, batch_size):
    # batch 7 on 50 rows per task: 4 + 3 rows per step, and the last step's single row leaves process 1 none
    alone = _train(method_name, batch_size)
    both = distributed.spawn(2, _train, (method_name, batch_size), device="cpu", threads=1)
    assert both["ranks_agree"]
    assert sum(both["rows"]) == alone["rows"] and max(both["rows"]) < alone["rows"]  # each trained on its share
    print(f"\n{method_name} batch {batch_size}\n1 process:   {alone['R']}\n2 processes: {both['R']}")
    for row1, row2 in zip(alone["R"], both["R"]):
        assert row1 == pytest.approx(row2, abs=1e-6)
    for p1, p2 in zip(alone["params"], both["params"]):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    print("largest parameter difference:", max(float((p1 - p2).abs().max()) for p1, p2 in zip(alone["params"],
                                                                                              both["params"])))
    assert alone["R"][0][0] >= 0.6  # the task was learned: the comparison is not between two untrained nets


def test_run_with_devices_two_returns_rank_zeros_record():
    kw = dict(scenario=scenario(), model=model(), method="er", params={"buffer_size": 50}, epochs=1, batch_size=10,
              optimizer="sgd", lr=0.1, threads=2)
    one = retain.run(**kw)
    two = retain.run(devices=2, **{**kw, "model": model()})
    assert isinstance(two, retain.api.Result) and two.config["devices"] == 2
    for row1, row2 in zip(one.accuracy_matrix, two.accuracy_matrix):
        assert row1 == pytest.approx(row2, abs=1e-6)
    with pytest.raises(ConfigError, match="mer"):
        retain.run(devices=2, **{**kw, "method": "mer", "params": {}})


def _torchrun_process(rank: int, port: int, folder: str) -> None:
    """What a process torchrun starts sees: its place in the environment, and the user's script calling run()."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    r = retain.run(scenario=scenario(), model=model(), method="finetune", epochs=1, batch_size=10, optimizer="sgd",
                   lr=0.1, threads=1)
    record = None if r is None else {"R": r.accuracy_matrix, "devices": r.config["devices"]}
    Path(folder, f"{rank}.json").write_text(json.dumps(record))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_launched_by_torchrun_environment(tmp_path):
    """Processes started with torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
    join one group from it; rank 0 returns the record, the other None. (Forked here rather than started by
    torchrun: the same environment, without two more interpreters importing torch on two cores.)"""
    port = distributed.free_port()
    procs = [multiprocessing.get_context("fork").Process(target=_torchrun_process, args=(rank, port, str(tmp_path)))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    rank0, rank1 = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2))
    assert rank1 is None and rank0["devices"] == 2
    alone = retain.run(scenario=scenario(), model=model(), method="finetune", epochs=1, batch_size=10,
                       optimizer="sgd", lr=0.1, threads=1)
    for row1, row2 in zip(alone.accuracy_matrix, rank0["R"]):
        assert row1 == pytest.approx(row2, abs=1e-6)
