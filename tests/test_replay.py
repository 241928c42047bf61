"""Replay and gradient-constraint methods: GEM / A-GEM projections, DER's stored logits, behaviour on split-digits."""

from __future__ import annotations

import copy
import io
import itertools
import sys

import pytest
import torch

import retain
from retain.errors import ConfigError
from retain.method import create
from retain.models import MLP
from retain.ops.qp import project_agem, project_gem
from retain.scenarios import Batch
from retain.trainer import Context, TrainConfig
from tests.conftest import tiny_split

# ------------------------------------------------------------------------------------------- the projections

def test_gem_projection_satisfies_every_constraint():
    g0 = torch.Generator().manual_seed(0)
    for trial in range(20):
        G = torch.randn(4, 30, generator=g0)
        g = -G.sum(0) + 0.3 * torch.randn(30, generator=g0)  # conflicts with (most) rows
        for margin in (0.0, 0.5):
            gt = project_gem(g, G, margin)
            assert bool((G @ gt >= -1e-6).all()), (trial, margin, G @ gt)


def _closest_feasible_2d(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Brute force: the closest point to g of the cone {v : G v >= 0} in 2-D is g itself, its projection onto one
    of the boundary lines, or the origin; take the closest feasible candidate."""
    cands = [g, torch.zeros_like(g)]
    for row in G:
        normal = row / row.norm()
        cands.append(g - (g @ normal) * normal)
    feasible = [c for c in cands if bool((G @ c >= -1e-9).all())]
    return min(feasible, key=lambda c: float((c - g).norm()))


def test_gem_projection_is_the_closest_feasible_vector_in_2d():
    g0 = torch.Generator().manual_seed(1)
    checked = 0
    for _ in range(200):
        G = torch.randn(2, 2, generator=g0, dtype=torch.float64)
        g = torch.randn(2, generator=g0, dtype=torch.float64)
        if bool((G @ g >= 0).all()):
            assert torch.equal(project_gem(g, G, 0.0), g)  # no conflict: untouched
            continue
        checked += 1
        torch.testing.assert_close(project_gem(g, G, 0.0), _closest_feasible_2d(g, G), atol=1e-6, rtol=0)
    assert checked > 50
    # and a fine grid search agrees on one case
    G = torch.tensor([[1.0, 0.2], [-0.3, 1.0]], dtype=torch.float64)
    g = torch.tensor([-1.0, -0.4], dtype=torch.float64)
    axis = torch.linspace(-2, 2, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    ok = grid[(grid @ G.T >= 0).all(1)]
    best = ok[((ok - g) ** 2).sum(1).argmin()]
    torch.testing.assert_close(project_gem(g, G, 0.0), best, atol=1e-2, rtol=0)


def test_agem_projection():
    g0 = torch.Generator().manual_seed(2)
    for _ in range(50):
        g, ref = torch.randn(20, generator=g0), torch.randn(20, generator=g0)
        gt = project_agem(g, ref)
        if g @ ref >= 0:
            assert torch.equal(gt, g)
        else:
            assert float(gt @ ref) >= -1e-5
            torch.testing.assert_close(gt, g - (g @ ref) / (ref @ ref) * ref)


# ---------------------------------------------------------------------------------- the hooks, step by step

def _ctx(method, mode: str = "class"):
    sc = tiny_split(mode, n_tasks=2)
    torch.manual_seed(0)
    model = MLP(8, sc.n_outputs, (16,))
    view = sc.train_view()
    ctx = Context(model, view, TrainConfig(lr=0.1, optimizer="sgd"), method, torch.device("cpu"),
                  torch.Generator().manual_seed(0), torch.zeros(sc.n_outputs, dtype=torch.bool))
    ctx.optimizer = ctx.make_optimizer()
    return ctx


def _steps(ctx, method, task: int, n: int):
    ctx.task = task
    ctx.seen |= ctx.scenario.task_out[task]
    for batch in itertools.islice(ctx.batches(ctx.scenario.task_data(task), epochs=50, batch_size=8), n):
        method.observe(ctx, batch)


@pytest.mark.parametrize("name", ["gem", "agem"])
@pytest.mark.parametrize("mode", ["class", "task"])
def test_projected_gradient_in_p_grad_respects_the_memory(name, mode):
    method = create(name, {"margin": 0.0} if name == "gem" else {"sample_size": 1000})
    ctx = _ctx(method, mode)
    _steps(ctx, method, 0, 20)
    ctx.task = 1
    ctx.seen |= ctx.scenario.task_out[1]
    params = [p for p in ctx.model.parameters()]
    mem = method.memory.rows(0)
    for batch in itertools.islice(ctx.batches(ctx.scenario.task_data(1), epochs=20, batch_size=8), 20):
        ctx.optimizer.zero_grad()
        ctx.loss(ctx.forward(batch.x, batch.t), batch).backward()
        method.before_update(ctx)
        g = torch.cat([p.grad.flatten() for p in params])
        ref = torch.autograd.grad(ctx.loss(ctx.forward(mem.x, mem.t), Batch(mem.x, mem.y, mem.t, None, 0)), params)
        assert float(g @ torch.cat([r.flatten() for r in ref])) >= -1e-5
        ctx.optimizer.step()
    assert method.projections > 0  # the constraint was active at least once, so the check had teeth


def test_gem_shared_memory_is_split_equally_over_finished_tasks():
    method = create("gem", {"memory_size": 30})
    r = retain.run(scenario=tiny_split("class", n_tasks=3), method=method, epochs=1, batch_size=8, hidden=(8,))
    assert len(r.accuracy_matrix) == 3
    assert method.memory.counts() == {0: 10, 1: 10, 2: 10}


def test_der_stores_the_logits_of_insertion_time():
    method = create("der", {"buffer_size": 100, "alpha": 0.5})
    ctx = _ctx(method)
    ctx.seen |= ctx.scenario.task_out[0]
    batch = next(ctx.batches(ctx.scenario.task_data(0), batch_size=8))
    before = copy.deepcopy(ctx.model)
    method.observe(ctx, batch)
    rows = method.buffer.rows()
    order = torch.argsort(rows.idx)
    with torch.no_grad():
        torch.testing.assert_close(rows.logits[order], before(batch.x))  # the step's forward, before the update
        assert not torch.allclose(rows.logits[order], ctx.model(batch.x))  # not the model after the step
    # later steps insert with their own outputs; rows already stored keep theirs
    stored = dict(zip(rows.idx.tolist(), rows.logits))
    model_then = copy.deepcopy(ctx.model)
    batch2 = next(ctx.batches(ctx.scenario.task_data(0), batch_size=8, seed=5))
    method.observe(ctx, batch2)
    rows2 = method.buffer.rows()
    for i, lg in zip(rows2.idx.tolist(), rows2.logits):
        if i in stored:
            assert torch.equal(lg, stored[i])
        else:
            with torch.no_grad():
                expect = model_then(batch2.x)
            assert any(torch.allclose(lg, e) for e in expect)


def test_er_state_dict_round_trip_and_replay_rows():
    method = create("er", {"buffer_size": 16})
    ctx = _ctx(method, "task")
    _steps(ctx, method, 0, 5)
    assert len(method.buffer) == 16 and set(method.buffer.tasks()) == {0}
    f = io.BytesIO()
    torch.save(method.state_dict(), f)
    f.seek(0)
    twin = create("er", {"buffer_size": 16})
    twin.load_state_dict(torch.load(f, weights_only=False))
    assert torch.equal(twin.buffer.rows().x, method.buffer.rows().x)
    ctx.task = 1
    batch = next(ctx.batches(ctx.scenario.task_data(1), batch_size=8))
    aug = method.augment(ctx, batch)
    assert len(aug) == 16 and aug.new.sum() == 8 and bool((aug.t[~aug.new] == 0).all())  # replay keeps task ids


# ---------------------------------------------------------------------------------------------- behaviour

def test_replay_beats_finetuning_on_split_digits_class_il():
    kw = {"benchmark": "split-digits", "mode": "class", "epochs": 5}
    base = retain.run(method="finetune", **kw).metrics["acc"]
    assert base < 0.3
    for name in ("er", "derpp", "gem"):
        acc = retain.run(method=name, **kw).metrics["acc"]
        assert acc > base + 0.4, (name, acc, base)


def test_selection_variants_run_and_beat_finetuning():
    kw = {"benchmark": "split-digits", "mode": "class", "epochs": 3}
    for params in ({"selection": "herding"}, {"selection": "kcenter", "per_class": 15},
                   {"storage": "class_balanced", "weighting": "task"}):
        assert retain.run(method="er", params=params, **kw).metrics["acc"] > 0.5, params


# ------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,params", [
    ("er", {"buffer_size": -1}), ("er", {"buffer_size": 0}), ("er", {"per_class": -3}),
    ("er", {"selection": "best"}), ("er", {"storage": "fifo"}), ("er", {"replay_batch": -1}),
    ("er", {"weighting": "half"}), ("gem", {"memory_per_task": 0}), ("gem", {"margin": -0.1}),
    ("gem", {"memory_size": -1}),
    ("agem", {"sample_size": 0}), ("agem", {"memory_per_task": -1}), ("der", {"alpha": -1}),
    ("der", {"buffer_size": 0}), ("derpp", {"beta": -0.5}), ("derpp", {"replay_batch": -2}),
])
def test_bad_parameters_are_config_errors(name, params):
    with pytest.raises(ConfigError):
        create(name, params)


def test_gem_without_quadprog_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "quadprog", None)  # import quadprog -> ImportError
    with pytest.raises(ConfigError, match="pip install quadprog"):
        create("gem")


def test_selection_at_task_end_refuses_a_task_free_stream():
    with pytest.raises(ConfigError, match="task boundaries"):
        retain.run(benchmark="split-digits", method="er", params={"selection": "herding"}, task_free=True,
                   epochs=1)


# ------------------------------------------------------------------------------------------------- smoke

@pytest.mark.parametrize("name", ["er", "gem", "agem", "der", "derpp", "ewc_er"])
@pytest.mark.parametrize("mode", ["task", "domain", "class"])
def test_every_replay_method_runs_in_every_mode(name, mode):
    params = {"buffer_size": 16} if name in ("er", "der", "derpp", "ewc_er") else {"memory_per_task": 8}
    r = retain.run(scenario=tiny_split(mode, n_tasks=3), method=name, params=params, epochs=1, batch_size=8,
                   hidden=(8,))
    assert len(r.accuracy_matrix) == 3
    if name in ("er", "agem", "der", "derpp"):  # no task boundaries needed
        retain.run(scenario=tiny_split(mode, n_tasks=3), method=name, params=params, epochs=1, batch_size=8,
                   hidden=(8,), task_free=True)


def test_ewc_er_is_the_composition_of_its_parts():
    m = create("ewc_er", {"buffer_size": 30, "lambda": 5.0, "selection": "herding"})
    er, ewc = m.methods
    assert (er.buffer_size, er.selection, ewc.lambda_) == (30, "herding", 5.0)
    assert {"buffer_size", "per_class", "lambda", "fisher", "online"} <= set(m.params())
    with pytest.raises(ConfigError):
        create("ewc_er", {"buffer_size": -1})
