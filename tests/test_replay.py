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
    mem = method.buffer.rows(0)
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
    assert method.buffer.counts() == {0: 10, 1: 10, 2: 10}


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
        retain.run(benchmark="split-digits", method="er", params={"selection": "herding"}, task_free=True)


# ------------------------------------------------------------------------------------------------- smoke

def _chance(sc) -> float:
    return 1 / (sc.n_outputs if sc.mode == "class" else len(sc.tasks[-1].classes))


@pytest.mark.parametrize("name", ["er", "gem", "agem", "der", "derpp", "ewc_er"])
@pytest.mark.parametrize("mode", ["task", "domain", "class"])
def test_every_replay_method_runs_in_every_mode(name, mode):
    """Each mode trains (the last task well above chance) and the memory holds rows of every task; the methods
    that need no boundaries do the same on a task-free stream."""
    params = {"buffer_size": 16} if name in ("er", "der", "derpp", "ewc_er") else {"memory_per_task": 8}
    if name == "ewc_er":
        params["lambda"] = 1.0
    runs = [{"iterations": 40}] + ([{"task_free": True}] if name in ("er", "agem", "der", "derpp") else [])
    for how in runs:
        sc = tiny_split(mode, n_tasks=3)
        method = create(name, params)
        r = retain.run(scenario=sc, method=method, batch_size=8, hidden=(16,), lr=0.01 if "iterations" in how
                       else 0.02, **how)
        assert r.accuracy_matrix[-1][-1] > _chance(sc) + 0.3, (how, r.accuracy_matrix)
        buffer = method.methods[0].buffer if name == "ewc_er" else method.buffer
        assert buffer.tasks() == [0, 1, 2], how


def test_ewc_er_one_step_has_the_replayed_rows_and_the_ewc_penalty():
    """One ewc_er step at task 1 is SGD on the masked loss of the current + replayed rows plus EWC's penalty."""
    m = create("ewc_er", {"buffer_size": 30, "lambda": 50.0})
    er, ewc = m.methods
    ctx = _ctx(m, "task")
    _steps(ctx, m, 0, 10)
    m.end_task(ctx)
    assert len(ewc.penalties) == 1 and len(er.buffer) == 30
    _steps(ctx, m, 1, 3)  # move away from the anchor, so the penalty is not 0
    batch = next(ctx.batches(ctx.scenario.task_data(1), batch_size=8, seed=3))
    twin = copy.deepcopy(ctx.model)
    rng = torch.Generator().set_state(ctx.rng.get_state())
    rows = er.buffer.sample(8, rng)  # the rows the step will replay (same generator state)
    x, y, t = torch.cat([batch.x, rows.x]), torch.cat([batch.y, rows.y]), torch.cat([batch.t, rows.t])
    anchor_f, anchor = ewc.penalties[0]
    params = dict(twin.named_parameters())
    penalty = 0.5 * 50.0 * sum((anchor_f[n] * (params[n] - anchor[n]) ** 2).sum() for n in params)
    assert float(penalty.detach()) > 1e-4
    logits = twin(x).masked_fill(~ctx.scenario.task_out[t], float("-inf"))
    loss = torch.nn.functional.cross_entropy(logits, y) + penalty
    grads = torch.autograd.grad(loss, list(params.values()))
    m.observe(ctx, batch)
    for (n, p), g in zip(params.items(), grads):
        torch.testing.assert_close(dict(ctx.model.named_parameters())[n], p - 0.1 * g)
    assert bool((t[8:] == 0).any())  # replayed rows of task 0 among them, each scored on its own head


def test_ewc_er_is_the_composition_of_its_parts():
    m = create("ewc_er", {"buffer_size": 30, "lambda": 5.0, "selection": "herding"})
    er, ewc = m.methods
    assert (er.buffer_size, er.selection, ewc.lambda_) == (30, "herding", 5.0)
    assert {"buffer_size", "per_class", "lambda", "fisher", "online"} <= set(m.params())
    with pytest.raises(ConfigError):
        create("ewc_er", {"buffer_size": -1})


# ------------------------------------------------------------------------------------------------ DER / DER++

def _filled(method, mode: str = "task"):
    ctx = _ctx(method, mode)
    _steps(ctx, method, 0, 6)
    ctx.task = 1
    ctx.seen |= ctx.scenario.task_out[1]
    return ctx, next(ctx.batches(ctx.scenario.task_data(1), batch_size=8, seed=1))


def _twin_rng(ctx) -> torch.Generator:
    return torch.Generator().set_state(ctx.rng.get_state())


def test_der_penalty_is_alpha_times_the_mse_to_the_stored_logits():
    der = create("der", {"buffer_size": 24, "alpha": 0.7, "replay_batch": 5})
    assert der.penalty(_ctx(der), None, None) is None  # empty buffer: no term
    ctx, batch = _filled(der)
    rows = der.buffer.sample(5, _twin_rng(ctx))
    with torch.no_grad():
        want = 0.7 * ((ctx.model(rows.x) - rows.logits) ** 2).mean()
        got = der.penalty(ctx, batch, ctx.model(batch.x))
    assert float(got) == pytest.approx(float(want), rel=1e-6) and float(want) > 0
    assert len(der.buffer) == 24 and der.buffer.rows().logits.shape == (24, ctx.scenario.n_outputs)


@pytest.mark.parametrize("mode", ["task", "class"])
def test_derpp_beta_term_is_the_masked_cross_entropy_on_a_second_sample(mode):
    derpp = create("derpp", {"buffer_size": 24, "alpha": 0.0, "beta": 0.6, "replay_batch": 6})
    ctx, batch = _filled(derpp, mode)
    rng = _twin_rng(ctx)
    a, b = derpp.buffer.sample(6, rng), derpp.buffer.sample(6, rng)
    assert not torch.equal(a.idx, b.idx)  # two independent draws
    with torch.no_grad():
        out = ctx.model(b.x)
        mask = ctx.scenario.task_out[b.t] if mode == "task" else ctx.seen
        want = 0.6 * torch.nn.functional.cross_entropy(out.masked_fill(~mask, float("-inf")), b.y)
        got = derpp.penalty(ctx, batch, ctx.model(batch.x))
    assert float(got) == pytest.approx(float(want), rel=1e-6) and float(want) > 0
    # with β = 0 only the logit term on the first sample is left
    derpp.alpha, derpp.beta = 0.4, 0.0
    rng = _twin_rng(ctx)
    a = derpp.buffer.sample(6, rng)
    with torch.no_grad():
        want_a = 0.4 * ((ctx.model(a.x) - a.logits) ** 2).mean()
        got_a = derpp.penalty(ctx, batch, ctx.model(batch.x))
    assert float(got_a) == pytest.approx(float(want_a), rel=1e-6)


def test_derpp_runs_the_two_samples_through_batch_norm_in_two_passes():
    """Mammoth's derpp: one forward pass per buffer sample, so batch norm normalises each with its own batch
    statistics (a joint pass would mix them and change the outputs)."""
    sc = tiny_split("class", n_tasks=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, sc.n_outputs))
    derpp = create("derpp", {"buffer_size": 24, "alpha": 1.0, "beta": 1.0, "replay_batch": 6})
    ctx = Context(model, sc.train_view(), TrainConfig(lr=0.1, optimizer="sgd"), derpp, torch.device("cpu"),
                  torch.Generator().manual_seed(0), torch.zeros(sc.n_outputs, dtype=torch.bool))
    ctx.optimizer = ctx.make_optimizer()
    _steps(ctx, derpp, 0, 6)
    seen = []
    hook = model[1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    rng = _twin_rng(ctx)
    a, b = derpp.buffer.sample(6, rng), derpp.buffer.sample(6, rng)
    model.train()
    batch = next(ctx.batches(ctx.scenario.task_data(0), batch_size=8, seed=2))
    derpp.penalty(ctx, batch, None)
    hook.remove()
    assert [len(s) for s in seen] == [6, 6]  # two passes, one per sample, each normalised on its own
    with torch.no_grad():
        torch.testing.assert_close(seen[0], model[0](a.x))
        torch.testing.assert_close(seen[1], model[0](b.x))
        # the point of it: under batch norm a joint pass gives the first sample different outputs
        model.eval()  # freeze the running statistics while comparing the training-mode outputs below
        model[1].train()
        apart = model(a.x)
        joint = model(torch.cat([a.x, b.x]))[:6]
    assert (apart - joint).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ ER weighting

def test_er_task_weighting_is_van_de_vens_normalised_average():
    """weighting=task at task t (1-based): (1/t) L_current + (1 − 1/t) L_replay, weights summing to 1, so the
    loss (and with it Adam's step, whose moments carry over the boundary) keeps its scale from task to task."""
    er = create("er", {"buffer_size": 24, "weighting": "task", "replay_batch": 8})
    ctx = _ctx(er, "task")
    _steps(ctx, er, 0, 6)
    for task in (1, 2):  # t = 2 and t = 3 (the scenario has 2 tasks; the weight reads only ctx.task)
        ctx.task = 1
        batch = next(ctx.batches(ctx.scenario.task_data(1), batch_size=8, seed=task))
        ctx.task = task
        rows = er.buffer.sample(8, _twin_rng(ctx))
        with torch.no_grad():
            out = ctx.model(batch.x)
            cur = ctx.loss(out, batch)
            rep = ctx.loss(ctx.model(rows.x), Batch(rows.x, rows.y, rows.t))
            total = cur + er.penalty(ctx, batch, out)  # what the trainer's step minimises
        t = task + 1
        assert float(total) == pytest.approx(float(cur / t + (1 - 1 / t) * rep), rel=1e-6)
        assert abs(float(cur) - float(rep)) > 1e-3  # the two terms differ, so the weights are pinned down
    ctx.task = 0
    assert er.penalty(ctx, batch, out) is None  # the first task: the current loss alone


# ------------------------------------------------------------------------------------------------ memory report

MEMORY_CASES = [
    ("er", {"buffer_size": 20}, "class", 20),
    ("er", {"per_class": 5}, "class", 5 * 6),
    ("er", {"per_class": 5}, "domain", 5 * 2 * 3),  # one key per (task, class): 3 tasks x 2 classes
    ("er", {"selection": "herding", "per_class": 4}, "task", 4 * 6),
    ("der", {"buffer_size": 20}, "class", 20),
    ("derpp", {"buffer_size": 20}, "task", 20),
    ("gem", {"memory_per_task": 6}, "task", 6 * 3),
    ("gem", {"memory_size": 12}, "class", 12),
    ("agem", {"memory_per_task": 6}, "domain", 6 * 3),
    ("mer", {"buffer_size": 10}, "class", 10),
    ("maml_replay", {"buffer_size": 10, "inner_steps": 1}, "class", 10),
    ("ewc_er", {"buffer_size": 20}, "task", 20),
]


@pytest.mark.parametrize("name, params, mode, rows", MEMORY_CASES)
def test_memory_report_equals_the_rows_held_after_a_run_that_fills_it(name, params, mode, rows):
    from retain.method import Memory, row_bytes

    sc = tiny_split(mode, n_tasks=3)
    method = create(name, params)
    report = method.memory(sc)
    assert report.rows == rows and report.to_dict() == {"rows": rows, "bytes": report.bytes}
    retain.run(scenario=sc, method=method, epochs=1, batch_size=8, hidden=(8,))
    buffer = method.methods[0].buffer if name == "ewc_er" else method.buffer
    assert len(buffer) == report.rows  # full: the report is what is held, not a guess
    held = sum(v.numel() * v.element_size() for v in (buffer.x, buffer.y, buffer.t, buffer.key, buffer.prio,
                                                       buffer.logits) if v is not None)
    assert report.bytes == held == rows * row_bytes(sc, logits=name in ("der", "derpp"))
    assert create("ewc", {}).memory(sc) == Memory(0, 0) and create("lwf").memory(sc) == Memory(0, 0)


def test_report_plots_accuracy_against_the_reported_rows_or_labels_the_fallback():
    from retain.report import memory_axis

    rec = lambda rows, mb: {"memory": {"rows": rows, "bytes": 8 * rows}, "peak_memory_mb": mb}  # noqa: E731
    label, x = memory_axis({"er": [rec(1100, 300.0), rec(1100, 310.0)], "ewc": [rec(0, 200.0)]})
    assert "stored samples" in label and x["er"] == (1100.0, 0.0) and x["ewc"] == (0.0, 0.0)
    old = {k: v for k, v in rec(0, 250.0).items() if k != "memory"}  # a record from an older store
    label, x = memory_axis({"er": [rec(1100, 300.0)], "old": [old]})
    assert "peak resident memory" in label and "predate" in label and x["old"] == (250.0, 0.0)
