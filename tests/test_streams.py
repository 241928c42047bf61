"""Online streams: ``--online`` (one pass, small batches, boundaries only for the methods that need them) and
Si-Blurry (Moon et al. 2023), its statistics drawn from the seed."""

from __future__ import annotations

import pytest
import torch

import retain
from retain.cli import main
from retain.config import hashed, resolve
from retain.errors import ConfigError
from retain.scenarios import si_blurry


def test_online_is_one_pass_in_batches_of_ten_hiding_boundaries_unless_the_method_needs_them():
    er = resolve(benchmark="split-mnist", method="er", online=True).config
    assert (er.online, er.task_free, er.epochs, er.iterations, er.batch_size) == (True, True, 1, None, 10)
    ewc = resolve(benchmark="split-mnist", method="ewc", online=True).config  # EWC needs its task ends
    assert (ewc.task_free, ewc.epochs, ewc.iterations, ewc.batch_size) == (False, 1, None, 10)
    assert resolve(benchmark="split-mnist", method="er", online=True, batch_size=32).config.batch_size == 32
    assert hashed(resolve(benchmark="split-mnist", method="er", online=True).spec())["online"] is True
    assert "online" not in hashed(resolve(benchmark="split-mnist", method="er").spec())
    with pytest.raises(ConfigError, match="single pass"):
        resolve(benchmark="split-mnist", method="er", online=True, epochs=3)
    with pytest.raises(ConfigError, match="needs task boundaries"):
        resolve(benchmark="split-mnist", method="ewc", online=True, blurry=0.2)
    assert resolve(benchmark="split-mnist", method="er", online=True, blurry=0.2).config.blurry == 0.2


def test_online_runs_see_every_training_row_once():
    r = retain.run(benchmark="split-digits", mode="class", method="er", online=True, hidden=(16,), threads=1,
                   eval_every=100)
    sc = resolve(benchmark="split-digits", mode="class").build_scenario()
    assert r.anytime["points"][-1]["samples"] == sum(len(t.train_idx) for t in sc.tasks)  # one pass, no more
    lwf = retain.run(benchmark="split-digits", mode="class", method="lwf", online=True, hidden=(16,), threads=1,
                     eval_every=100)
    assert lwf.config["task_free"] is False and lwf.anytime["points"][-1]["samples"] == r.anytime["points"][-1][
        "samples"]


def _digits():
    return resolve(benchmark="split-digits", mode="class").build_scenario()


@pytest.mark.parametrize("method", ["er", "scr"])
def test_the_task_free_stream_trains_as_the_task_loop_given_the_same_batches(monkeypatch, method):
    """--online and --epochs 1 differ only in the order of the rows: fed the task loop's batches (Context.batches'
    order, task by task), the stream gives the same accuracy matrix to the last digit, so a difference between the
    two paths' numbers is the draw of the order and nothing else (SCR's check against its authors, docs/online.md)."""
    from retain import scenarios

    seed = 1

    def task_loop_order(self, batch_size, generator, blurry=0.0, passes=1):
        for k in range(self.n_tasks):
            data = self.task_data(k)
            perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1_000_003 + k * 7919))
            for b in range(0, len(data), batch_size):
                sel = perm[b:b + batch_size]
                yield data.idx[sel], data.t[sel], k + (b + batch_size >= len(data))

    params = {"buffer_size": 50} | ({"review": False} if method == "scr" else {})
    run = dict(benchmark="split-digits", mode="class", method=method, optimizer="sgd", lr=0.1, seed=seed,
               params=params, train_per_class=40)
    tasks = retain.run(epochs=1, batch_size=10, **run)
    monkeypatch.setattr(scenarios.Scenario, "stream", task_loop_order)
    stream = retain.run(online=True, **run)
    assert stream.config["task_free"] and not tasks.config["task_free"]
    assert stream.accuracy_matrix == tasks.accuracy_matrix


def test_si_blurry_statistics_come_from_the_seed():
    base = _digits()
    sc = si_blurry(base, disjoint=50, blurred=10, seed=3)
    info = sc.info["si_blurry"]
    dis = [c for cs in info["disjoint_classes"] for c in cs]
    blur = [c for cs in info["blurry_classes"] for c in cs]
    assert len(dis) == 5 and sorted(dis + blur) == list(range(10))  # 50 % of the 10 classes are disjoint
    assert all(t.classes for t in sc.tasks)  # every task has classes of its own
    rows = torch.cat([t.train_idx for t in sc.tasks])
    assert torch.equal(rows.sort().values, torch.cat([t.train_idx for t in base.tasks]).sort().values)  # a re-deal
    home = {c: i for i, t in enumerate(sc.tasks) for c in t.classes}
    away = 0
    for i, t in enumerate(sc.tasks):
        y = sc.y_train[t.train_idx]
        for c in dis:  # a disjoint class's rows are all in its own task
            assert (y == c).sum() == 0 or home[c] == i
        away += sum(int((y == c).sum()) for c in blur if home[c] != i)
        assert set(torch.unique(sc.y_test[t.test_idx]).tolist()) == set(t.classes)  # its own classes' test rows
        assert sc.task_out[i].sum() == len(torch.unique(y))  # the outputs of the classes present
    n_blur_rows = sum(int((base.y_train[rows] == c).sum()) for c in blur)
    assert info["blurred_rows"] == n_blur_rows * 10 // 100
    assert 0 < away <= info["blurred_rows"]  # moved rows may land back in their own task
    sizes = [len(t.train_idx) for t in sc.tasks]
    assert max(sizes) > 1.5 * min(sizes)  # tasks of random sizes: imbalanced
    assert sc.info["si_blurry"] == si_blurry(base, 50, 10, seed=3).info["si_blurry"]  # the seed fixes it
    assert [t.train_idx.tolist() for t in sc.tasks] == [t.train_idx.tolist() for t in si_blurry(base, 50, 10,
                                                                                                  seed=3).tasks]
    assert si_blurry(base, 50, 10, seed=4).info["si_blurry"] != info
    none = si_blurry(base, 100, 0, seed=3)  # all disjoint, nothing blurred: a split with random task sizes
    assert none.info["si_blurry"]["blurred_rows"] == 0
    for t in none.tasks:
        assert set(torch.unique(none.y_train[t.train_idx]).tolist()) == set(t.classes)


def test_si_blurry_through_the_one_path_and_its_errors(tmp_path, capsys):
    r = retain.run(benchmark="split-digits", mode="class", method="er", online=True, si_blurry=[50, 10],
                   hidden=(16,), threads=1, seed=1)
    assert r.config["si_blurry"] == [50, 10] and "si-blurry" in r.scenario
    assert resolve(benchmark="split-digits", si_blurry=[50, 10], seed=1).build_scenario().info["si_blurry"][
        "seed"] == 1
    assert main(["run", "--benchmark", "split-digits", "--mode", "task", "--si-blurry", "50,10", "--quiet"]) == 2
    assert "use --mode class" in capsys.readouterr().err
    assert main(["run", "--benchmark", "split-digits", "--si-blurry", "50,120", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two percentages" in err[0]
    assert main(["run", "--benchmark", "permuted-mnist", "--mode", "class", "--si-blurry", "50,10", "--quiet"]) == 2
    assert "split benchmark" in capsys.readouterr().err
