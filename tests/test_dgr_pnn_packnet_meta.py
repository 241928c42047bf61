"""DGR, progressive networks, PackNet, MAML + replay and MER: contracts on tiny tensors, maths by hand, behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import retain
from retain import scenarios
from retain.data import make_synthetic
from retain.errors import ConfigError
from retain.method import create
from retain.models import MLP
from retain.scenarios import Batch
from retain.trainer import Context, TrainConfig, masked, train

from .conftest import tiny_split


def _context(model: nn.Module, scenario, method, build: bool = True, **config) -> Context:
    cfg = TrainConfig(**config)
    ctx = Context(model, scenario.train_view(), cfg, method, torch.device("cpu"), torch.Generator().manual_seed(0),
                  torch.ones(scenario.n_outputs, dtype=torch.bool))
    if build:
        ctx.optimizer = ctx.make_optimizer()
    return ctx


def _record_after_each_task(method, scenario):
    """Wrap ``end_task`` so that, after each task, every finished task's test outputs (its head) are stored."""
    snapshots: list[list[torch.Tensor]] = []
    inner = method.end_task

    def end_task(ctx):
        inner(ctx)
        with torch.no_grad():
            snapshots.append([ctx.forward(scenario.batch(scenario.tasks[j].test_idx, j, "test").x,
                                          torch.full((len(scenario.tasks[j].test_idx),), j))[:, scenario.task_out[j]]
                              for j in range(ctx.task + 1)])

    method.end_task = end_task
    return snapshots


# ------------------------------------------------------------------------------------------ configuration

@pytest.mark.parametrize("name", ["pnn", "packnet"])
@pytest.mark.parametrize("mode", ["class", "domain"])
def test_architecture_methods_refuse_other_modes_before_training(name, mode):
    with pytest.raises(ConfigError, match="task"):
        retain.run(benchmark="split-digits", method=name, mode=mode, iterations=1)


@pytest.mark.parametrize("name, params", [
    ("packnet", {"prune_ratio": 1.0}), ("packnet", {"prune_ratio": 0}), ("packnet", {"retrain_epochs": -1}),
    ("packnet", {"shares": "half"}),
    ("dgr", {"temperature": 0}), ("dgr", {"replay_ratio": 0}), ("dgr", {"z_dim": 0}),
    ("pnn", {"hidden": "4,x"}), ("pnn", {"column": "lstm"}), ("pnn", {"lateral": "dense"}),
    ("pnn", {"init": "xavier"}), ("pnn", {"lateral": "linear", "column": "conv"}),
    ("maml_replay", {"inner_steps": -1}), ("maml_replay", {"inner_lr": 0}),
    ("mer", {"beta": 0}), ("mer", {"gamma": 1.5}), ("mer", {"batches_per_example": 0}),
])
def test_bad_hyper_parameters_are_config_errors(name, params):
    with pytest.raises(ConfigError):
        create(name, params)


def test_task_free_pairings():
    for name in ("dgr", "pnn", "packnet"):  # refused when the run is resolved, before any training
        with pytest.raises(ConfigError, match="boundaries"):
            retain.run(scenario=tiny_split("task", n_tasks=2), method=name, task_free=True, hidden=(8,))
    # the online methods run on a stream with no boundaries: they learn it and their reservoir sees all of it
    for mode in ("task", "domain", "class"):
        sc = tiny_split(mode, n_tasks=2)
        for name, params in (("maml_replay", {"inner_steps": 1, "outer_lr": 0.05}), ("mer", {"alpha": 0.1})):
            torch.manual_seed(0)
            method = create(name, params)
            out = train(sc, method, MLP(8, sc.n_outputs, (8,)), TrainConfig(task_free=True, batch_size=4))
            chance = 1 / (sc.n_outputs if mode == "class" else 2)
            assert out.accuracy_matrix[-1][-1] > chance + 0.3, (name, mode, out.accuracy_matrix)
            n_rows = sum(len(task.train_idx) for task in sc.tasks)
            assert method.buffer.seen == n_rows and method.buffer.tasks() == [0, 1], (name, mode)


def test_oml_is_javed_and_whites_and_the_chapters_learner_is_maml_replay():
    assert "Javed & White" in (type(create("oml")).__doc__ or "")
    assert type(create("maml_replay")).__name__ != type(create("oml")).__name__


# -------------------------------------------------------------------------------------------------- PNN

def _assert_nothing_forgotten(snaps, out) -> torch.Tensor:
    """Every task's test outputs after its own training are bit-identical at the end, and each column of the
    accuracy matrix is constant from the task's own row on (BWT exactly 0); returns the matrix."""
    n = len(snaps)
    for j in range(n):
        assert torch.equal(snaps[j][j], snaps[-1][j]), f"task {j}'s outputs moved"
    R = torch.tensor(out.accuracy_matrix)
    assert all(R[i, j] == R[j, j] for j in range(n) for i in range(j, n))
    return R


def _pnn_run(params: dict):
    """PNN with ``params`` on a 3-task task-IL stream, outputs recorded after each task."""
    sc = tiny_split("task", n_tasks=3)
    pnn = create("pnn", params)
    snaps = _record_after_each_task(pnn, sc)
    torch.manual_seed(0)
    out = train(sc, pnn, MLP(8, sc.n_outputs, (7, 5)), TrainConfig(iterations=30, batch_size=16, lr=0.01))
    return pnn, snaps, out


def test_pnn_earlier_tasks_are_bit_identical_and_bwt_is_zero():
    pnn, snaps, out = _pnn_run({"hidden": "7,5"})
    R = _assert_nothing_forgotten(snaps, out)
    assert R.diagonal().mean() > 0.9
    # old columns frozen, the newest trainable; the optimizer sees only the newest column and its adapters
    assert not any(p.requires_grad for c in pnn.columns[:-1] for p in c.parameters())
    assert {id(p) for p in pnn.parameters(None)} == {id(p) for p in pnn.columns[-1].parameters()}
    # growth: every column adds more than the previous one (more earlier columns feed its adapters)
    growth = torch.diff(torch.tensor([0, *pnn.param_counts]))
    assert len(pnn.param_counts) == 3 and bool((growth[1:] > growth[:-1]).all())


def test_pnn_laterals_come_from_the_layer_below():
    sc = tiny_split("task", n_tasks=3)
    pnn = create("pnn", {"hidden": "7,5"})
    ctx = _context(MLP(8, sc.n_outputs, (7, 5)), sc, pnn, build=False)
    for task in range(3):
        ctx.task = task
        pnn.begin_task(ctx)
    col = pnn.columns[2]
    # layer 1 (7 -> 5) is fed the earlier columns' h_1 (width 7); the output layer (5 -> 2) their h_2 (width 5)
    assert [a.V.in_features for a in col.laterals] == [2 * 7, 2 * 5]
    assert [a.U.out_features for a in col.laterals] == [5, 2]
    # changing an earlier column's first layer changes column 2's output through the lateral into layer 1
    x = torch.randn(4, 8)
    t = torch.full((4,), 2)
    before = pnn.forward(ctx, x, t).clone()
    with torch.no_grad():
        pnn.columns[0].layers[0].weight.add_(1.0)
    assert not torch.allclose(before, pnn.forward(ctx, x, t))


def test_pnn_linear_laterals_as_in_the_agem_code():
    """lateral=linear, init=agem: column k's layer i adds Σ_j (U_j h_{i-1}^(j) + b_j) over the earlier columns,
    the first layer from each column's copy of x; column k has k + 1 times one column's parameters."""
    pnn, snaps, out = _pnn_run({"hidden": "7,5", "lateral": "linear", "init": "agem"})
    _assert_nothing_forgotten(snaps, out)
    one = 8 * 7 + 7 + 7 * 5 + 5 + 5 * 2 + 2
    assert pnn.param_counts == [one, one + 2 * one, one + 2 * one + 3 * one]
    col = pnn.columns[2]
    assert [lat.U.in_features for lat in col.laterals] == [2 * 8, 2 * 7, 2 * 5]
    # the forward pass by hand for column 1 (one earlier column)
    x = torch.randn(4, 8)
    c0, c1 = pnn.columns[0], pnn.columns[1]
    h0 = c0(x, [])
    a = torch.relu(c1.layers[0](x) + c1.laterals[0].U(x) + c1.laterals[0].bias[0])
    b = torch.relu(c1.layers[1](a) + c1.laterals[1].U(h0[0]) + c1.laterals[1].bias[0])
    logits = c1.layers[2](b) + c1.laterals[2].U(h0[1]) + c1.laterals[2].bias[0]
    assert torch.allclose(c1(x, [h0])[-1], logits, atol=1e-5)


def test_pnn_agem_init_draws_truncated_normals_and_biases_of_one_tenth():
    sc = tiny_split("task", n_tasks=2)
    pnn = create("pnn", {"hidden": "300", "lateral": "linear", "init": "agem"})
    ctx = _context(MLP(8, sc.n_outputs, (300,)), sc, pnn, build=False)
    for task in range(2):
        ctx.task = task
        pnn.begin_task(ctx)
    col = pnn.columns[1]
    w = torch.cat([col.layers[0].weight.flatten(), col.laterals[0].U.weight.flatten()]).detach()
    assert float(w.abs().max()) <= 0.2 and 0.07 < float(w.std()) < 0.1  # N(0, 0.1²) cut at 2σ: std 0.088
    assert bool((col.layers[0].bias == 0.1).all()) and bool((col.laterals[0].bias == 0.1).all())


def test_pnn_routes_each_row_through_its_task_column():
    sc = tiny_split("task", n_tasks=3)
    pnn = create("pnn", {"hidden": "6"})
    ctx = _context(MLP(8, sc.n_outputs, (6,)), sc, pnn, build=False)
    for task in range(3):
        ctx.task = task
        pnn.begin_task(ctx)
    x = torch.randn(9, 8)
    t = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    mixed = pnn.forward(ctx, x, t)
    for task in range(3):
        rows = t == task
        alone = pnn.forward(ctx, x[rows], t[rows])
        assert torch.allclose(mixed[rows], alone, atol=1e-6)
        others = ~sc.task_out[task]
        assert bool((mixed[rows][:, others] == 0).all())  # a column fills only its task's outputs


def test_pnn_conv_columns_for_colour_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(4).repeat(12)
    sc = scenarios.from_tensors(x, y, x[:16], y[:16], mode="task", n_tasks=2)
    pnn = create("pnn", {"channels": "4,6"})
    snaps = _record_after_each_task(pnn, sc)
    train(sc, pnn, MLP(3 * 64, sc.n_outputs, (4,)), TrainConfig(iterations=3, batch_size=16))
    assert pnn.columns[0].kind == "conv" and isinstance(pnn.columns[1].laterals[0].V, nn.Conv2d)
    assert torch.equal(snaps[0][0], snaps[1][0])


# ---------------------------------------------------------------------------------------------- PackNet

def _packnet_run(prune_ratio=0.5, n_tasks=3, **params):
    sc = tiny_split("task", n_tasks=n_tasks)
    pk = create("packnet", {"prune_ratio": prune_ratio, "retrain_epochs": 1, **params})
    snaps = _record_after_each_task(pk, sc)
    torch.manual_seed(0)
    model = MLP(8, sc.n_outputs, (16, 16))
    weights = []
    inner = pk.end_task

    def end_task(ctx):
        inner(ctx)
        weights.append({n: p.detach().clone() for n, p in ctx.model.named_parameters()})

    pk.end_task = end_task
    # SGD with momentum and weight decay: both would move frozen weights if they were not masked and restored
    out = train(sc, pk, model, TrainConfig(epochs=3, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.9,
                                           weight_decay=0.01))
    return sc, pk, model, snaps, weights, out


def test_packnet_earlier_tasks_are_bit_identical_and_frozen_weights_do_not_move():
    sc, pk, model, snaps, weights, out = _packnet_run()
    R = _assert_nothing_forgotten(snaps, out)
    assert R.diagonal().mean() > 0.9
    final = dict(model.named_parameters())
    for name, owner in pk.owner.items():
        for j in range(3):
            owned = owner == j
            assert torch.equal(final[name][owned], weights[j][name][owned]), f"{name}: task {j}'s weights moved"
    for name in ("features.1.bias", "features.3.bias"):  # biases: trained with task 0, frozen afterwards
        assert torch.equal(final[name], weights[0][name])
    head = pk.head_owner["head.weight"]
    assert head.tolist() == [0, 0, 1, 1, 2, 2]


def test_packnet_masks_are_disjoint_and_keep_the_ratio():
    sc, pk, model, _, _, _ = _packnet_run(prune_ratio=0.75)
    for name, owner in pk.owner.items():
        n = owner.numel()
        free = n
        for j in range(3):
            expected = round(0.25 * free)
            assert int((owner == j).sum()) == expected == pk.kept[j][name]
            free -= expected
        # one owner per weight: the masks {owner == j} partition the kept weights
        masks = torch.stack([owner == j for j in range(3)])
        assert int(masks.sum(0).max()) <= 1
        assert int((owner == -1).sum()) == free
    # the kept weights are the largest of the candidates: every released one is exactly zero
    assert all(bool((dict(model.named_parameters())[n][o == -1] == 0).all()) for n, o in pk.owner.items())


def test_packnet_equal_shares_give_every_task_a_third_of_each_layer():
    sc, pk, model, snaps, _, _ = _packnet_run(prune_ratio=0.9, shares="equal")  # the ratio is ignored
    for name, owner in pk.owner.items():
        n = owner.numel()
        first = round(n / 3)  # task 0 keeps 1/3 of everything, task 1 half of the rest, task 2 all that is left
        second = round((n - first) / 2)
        assert [pk.kept[j][name] for j in range(3)] == [first, second, n - first - second]
        assert [int((owner == j).sum()) for j in range(3)] == [first, second, n - first - second]
        assert int((owner == -1).sum()) == 0
    assert all(torch.equal(snaps[j][j], snaps[-1][j]) for j in range(3))


def test_packnet_forward_masks_later_weights_without_writing_them():
    sc, pk, model, _, _, _ = _packnet_run()
    ctx = _context(model, sc, pk)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 8)
    got = pk.forward(ctx, x, torch.zeros(5, dtype=torch.long))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in pk.owner:
                p.mul_(pk.owner[name] == 0)
    assert torch.equal(got, reference(x))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # stored weights untouched
    assert not torch.equal(got, model(x))  # later tasks' weights do matter in the full network


# -------------------------------------------------------------------------------------------------- DGR

def test_dgr_generator_samples_reconstruct_better_than_noise():
    res = {}

    def grab(ctx):
        res["ctx"] = ctx

    dgr = create("dgr", {"fc_units": 100, "z_dim": 10})
    dgr.end_task = grab
    retain.run(benchmark="split-digits", method=dgr, mode="class", n_tasks=1, iterations=300)
    gen = dgr.generator
    samples = gen.sample(256, torch.Generator().manual_seed(1))
    noise = torch.rand_like(samples)
    assert gen.reconstruction_error(samples).mean() < 0.75 * gen.reconstruction_error(noise).mean()
    sc = res["ctx"].scenario
    data = sc.batch(sc.tasks[0].train_idx, 0).x.flatten(1)
    nearest = lambda z: torch.cdist(z.flatten(1), data).min(1).values.mean()  # noqa: E731
    assert nearest(samples) < 0.5 * nearest(noise)  # samples look like the training digits


@pytest.mark.parametrize("mode, distill", [("class", False), ("class", True), ("task", False)])
def test_dgr_replayed_labels_come_from_the_frozen_previous_classifier(mode, distill):
    sc = tiny_split(mode, n_tasks=3)
    dgr = create("dgr", {"fc_units": 16, "z_dim": 4, "distill": distill})
    ends: dict[int, dict] = {}
    checked = []
    inner_end = dgr.end_task
    inner_observe = dgr.observe

    def end_task(ctx):
        inner_end(ctx)
        ends[ctx.task] = copy.deepcopy(ctx.model.state_dict())

    def observe(ctx, batch):
        loss = inner_observe(ctx, batch)
        if ctx.task > 0 and len(checked) < 4:
            previous = copy.deepcopy(ctx.model)
            previous.load_state_dict(ends[ctx.task - 1])
            assert all(torch.equal(a, b) for a, b in zip(dgr.old_model.parameters(), previous.parameters()))
            assert not all(torch.equal(a, b) for a, b in zip(dgr.old_model.parameters(), ctx.model.parameters()))
            r = dgr.replay(ctx, 64)
            assert not bool(r.new.any()) and bool((r.t < ctx.task).all())
            logits = previous(r.x)
            if mode == "class":
                old = sc.task_out[:ctx.task].any(0)
                assert bool(old[r.y].all())  # labels only among the classes seen before this task
                mask = old
            else:
                assert bool(sc.task_out[r.t, r.y].all())  # the label is in the sampled old task's head
                mask = sc.task_out[r.t]
            assert torch.equal(r.y, masked(logits, mask).argmax(1))
            if distill:
                expected = torch.softmax(masked(logits, mask) / dgr.temperature, 1)
                assert torch.allclose(r.soft, expected) and bool((r.soft[:, ~old] == 0).all())
            else:
                assert r.soft is None
            checked.append(ctx.task)
        return loss

    dgr.end_task, dgr.observe = end_task, observe
    torch.manual_seed(0)
    train(sc, dgr, MLP(8, sc.n_outputs, (16,)), TrainConfig(iterations=6, batch_size=16))
    assert checked == [1, 1, 1, 1]


def test_dgr_beats_finetuning_in_class_il_on_digits():
    kw = {"benchmark": "split-digits", "mode": "class", "iterations": 300, "seed": 0}
    base = retain.run(method="finetune", **kw).metrics["acc"]
    dgr = retain.run(method="dgr", params={"fc_units": 200, "z_dim": 20}, **kw).metrics["acc"]
    assert base < 0.25 and dgr > base + 0.3, (base, dgr)


# ------------------------------------------------------------------------------------------- OML and MER

def _tiny_linear():
    data = make_synthetic(n_classes=2, n_train=8, n_test=4, dim=3, seed=0)
    sc = scenarios.split(data, "domain", n_tasks=1)
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    b = sc.batch(sc.tasks[0].train_idx[:6], 0)
    return sc, model, Batch(b.x.double(), b.y, b.t, None, 0)


def _ce_grad(W, b, x, y):
    """Hand-computed gradient of the mean cross-entropy of logits x W^T + b: ((p - onehot)^T x / B, mean(p - 1))."""
    p = torch.softmax(x @ W.T + b, 1)
    d = (p - F.one_hot(y, p.shape[1]).double()) / len(y)
    return d.T @ x, d.sum(0)


def test_maml_replay_with_no_inner_steps_is_a_plain_sgd_step():
    sc, model, batch = _tiny_linear()
    maml = create("maml_replay", {"inner_steps": 0, "outer_lr": 0.5})
    ctx = _context(model, sc, maml, optimizer="sgd", lr=123.0)  # the outer lr, not the run's, must be used
    W0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    maml.observe(ctx, batch)
    gW, gb = _ce_grad(W0, b0, batch.x, batch.y)
    assert torch.allclose(model.weight, W0 - 0.5 * gW, atol=1e-12)
    assert torch.allclose(model.bias, b0 - 0.5 * gb, atol=1e-12)
    assert len(maml.buffer) == len(batch)


def test_maml_replay_meta_gradient_flows_through_the_inner_step():
    sc, model, batch = _tiny_linear()
    alpha, eta = 0.7, 0.1
    maml = create("maml_replay", {"inner_steps": 1, "inner_lr": alpha, "outer_lr": eta})
    ctx = _context(model, sc, maml, optimizer="sgd")
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()]).clone()

    def meta_loss(th):  # f(θ) = ℓ(θ − α ∇ℓ(θ)), everything by hand
        W, b = th[:6].view(2, 3), th[6:]
        gW, gb = _ce_grad(W, b, batch.x, batch.y)
        W1, b1 = W - alpha * gW, b - alpha * gb
        return F.cross_entropy(batch.x @ W1.T + b1, batch.y)

    eps = 1e-6
    numeric = torch.stack([(meta_loss(theta + eps * e) - meta_loss(theta - eps * e)) / (2 * eps)
                           for e in torch.eye(len(theta), dtype=torch.float64)])
    maml.observe(ctx, batch)
    after = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    assert torch.allclose((theta - after) / eta, numeric, atol=1e-7)
    # the first-order approximation drops the second-order term and gives a different update
    _, model2, _ = _tiny_linear()
    fo = create("maml_replay", {"inner_steps": 1, "inner_lr": alpha, "outer_lr": eta, "first_order": True})
    fo.observe(_context(model2, sc, fo, optimizer="sgd"), batch)
    after_fo = torch.cat([model2.weight.detach().flatten(), model2.bias.detach()])
    assert not torch.allclose(after_fo, after, atol=1e-6)


def test_mer_with_unit_meta_rates_is_sequential_sgd():
    sc, model, batch = _tiny_linear()
    mer = create("mer", {"beta": 1.0, "gamma": 1.0, "batches_per_example": 1, "buffer_size": 0, "alpha": 0.3})
    ctx = _context(model, sc, mer, optimizer="adam")
    W, b = model.weight.detach().clone(), model.bias.detach().clone()
    mer.observe(ctx, batch)
    for i in range(len(batch)):  # one plain SGD step per example, in order
        gW, gb = _ce_grad(W, b, batch.x[i:i + 1], batch.y[i:i + 1])
        W, b = W - 0.3 * gW, b - 0.3 * gb
    assert torch.allclose(model.weight, W, atol=1e-12) and torch.allclose(model.bias, b, atol=1e-12)


def test_mer_reptile_interpolations_by_hand():
    sc, model, batch = _tiny_linear()
    one = Batch(batch.x[:1], batch.y[:1], batch.t[:1], None, 0)
    # s = 2 batches of one example, within-batch β = 0.5, across-batch γ = 0.25
    mer = create("mer", {"beta": 0.5, "gamma": 0.25, "batches_per_example": 2, "replay_batch": 1, "alpha": 0.3})
    ctx = _context(model, sc, mer)
    W0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    mer.observe(ctx, one)
    W, b = W0, b0
    for _ in range(2):
        gW, gb = _ce_grad(W, b, one.x, one.y)
        W, b = W - 0.5 * 0.3 * gW, b - 0.5 * 0.3 * gb
    W, b = W0 + 0.25 * (W - W0), b0 + 0.25 * (b - b0)
    assert torch.allclose(model.weight, W, atol=1e-12) and torch.allclose(model.bias, b, atol=1e-12)


def test_mer_with_several_examples_per_batch_follows_the_authors_order_by_hand():
    """A batch of 6 examples, k = 3, s = 2: each B_i is the current example first, then distinct memories of the
    examples before it; the weights are Algorithm 1 replayed by hand over exactly those single-example steps."""
    sc, model, batch = _tiny_linear()
    model, batch = model.float(), Batch(batch.x.float(), batch.y, batch.t, None, 0)
    mer = create("mer", {"beta": 0.5, "gamma": 0.6, "batches_per_example": 2, "replay_batch": 3, "alpha": 0.3,
                         "buffer_size": 100})
    ctx = _context(model, sc, mer)
    calls = []
    sgd = mer._sgd

    def spy(ctx, params, row, lr):
        calls.append((row.x.clone(), row.y.clone()))
        return sgd(ctx, params, row, lr)

    mer._sgd = spy
    W0, b0 = model.weight.detach().double().clone(), model.bias.detach().double().clone()
    mer.observe(ctx, batch)
    W, b = W0, b0
    pos = 0
    for i in range(len(batch)):
        W_a, b_a = W, b
        for _ in range(2):
            size = 1 + min(2, i)
            rows = calls[pos:pos + size]
            pos += size
            assert torch.equal(rows[0][0], batch.x[i:i + 1])  # the current example first
            memories = [torch.where((batch.x[:i] == r[0]).all(1))[0].tolist() for r in rows[1:]]
            assert all(len(m) == 1 for m in memories)  # each memory is one of the examples seen before
            assert len({m[0] for m in memories}) == len(memories)  # distinct within the batch
            W_w, b_w = W, b
            for x, y in rows:
                gW, gb = _ce_grad(W, b, x.double(), y)
                W, b = W - 0.3 * gW, b - 0.3 * gb
            W, b = W_w + 0.5 * (W - W_w), b_w + 0.5 * (b - b_w)
        W, b = W_a + 0.6 * (W - W_a), b_a + 0.6 * (b - b_a)
    assert pos == len(calls) == 2 * (1 + 2 + 3 * 4)
    assert torch.allclose(model.weight.double(), W, atol=1e-6) and torch.allclose(model.bias.double(), b, atol=1e-6)
    assert mer.buffer.seen == len(batch)


def test_maml_replay_memory_term_uses_the_unadapted_weights():
    """L(θ) = ℓ(B; θ − α∇ℓ(B; θ)) + ℓ(B_M; θ): the memory batch is scored with θ itself, not the fast weights."""
    sc, model, batch = _tiny_linear()
    model, batch = model.float(), Batch(batch.x.float(), batch.y, batch.t, None, 0)
    alpha, eta = 0.7, 0.1
    method = create("maml_replay", {"inner_steps": 1, "inner_lr": alpha, "outer_lr": eta, "buffer_size": 50})
    ctx = _context(model, sc, method, optimizer="sgd")
    other = sc.batch(sc.tasks[0].train_idx[6:], 0)
    method.buffer.add(other.x, other.y, other.t, generator=torch.Generator().manual_seed(0))
    memory = method.buffer.sample(len(batch), torch.Generator().set_state(ctx.rng.get_state()))
    W0, b0 = model.weight.detach().double().clone(), model.bias.detach().double().clone()
    x, y = batch.x.double(), batch.y
    W = W0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    gW, gb = _ce_grad(W, b, x, y)
    meta = F.cross_entropy(x @ (W - alpha * gW).T + (b - alpha * gb), y)
    replay = F.cross_entropy(memory.x.double() @ W.T + b, memory.y)
    dW, db = torch.autograd.grad(meta + replay, (W, b), retain_graph=True)
    method.observe(ctx, batch)
    assert torch.allclose(model.weight.double(), W0 - eta * dW, atol=1e-6)
    assert torch.allclose(model.bias.double(), b0 - eta * db, atol=1e-6)
    # scoring the memory with the fast weights instead would give another update
    fast = F.cross_entropy(memory.x.double() @ (W - alpha * gW).T + (b - alpha * gb), memory.y)
    dW2, _ = torch.autograd.grad(meta + fast, (W, b))
    assert not torch.allclose(W0 - eta * dW2, W0 - eta * dW, atol=1e-5)


def test_mer_and_maml_replay_keep_a_reservoir_of_everything_seen():
    from retain.buffers import Buffer

    sc, model, batch = _tiny_linear()
    model, batch = model.float(), Batch(batch.x.float(), batch.y, batch.t, None, 0)
    for method in (create("mer", {"buffer_size": 4, "alpha": 0.1}), create("maml_replay", {"buffer_size": 4})):
        assert isinstance(method.buffer, Buffer) and not method.buffer.balanced  # reservoir (algorithm R)
        ctx = _context(model, sc, method)
        for _ in range(3):
            method.observe(ctx, batch)
        assert method.buffer.seen == 3 * len(batch) and len(method.buffer) == 4
    assert create("mer", {"buffer_size": 0}).buffer is None


def test_mer_and_maml_replay_beat_finetuning_on_digits():
    kw = {"benchmark": "split-digits", "mode": "class", "epochs": 1, "batch_size": 10, "seed": 0}
    base = retain.run(method="finetune", **kw).metrics["acc"]
    mer = retain.run(method="mer", params={"alpha": 0.1, "beta": 0.3, "buffer_size": 200}, **kw).metrics["acc"]
    maml = retain.run(method="maml_replay", params={"inner_steps": 1, "buffer_size": 200}, **kw).metrics["acc"]
    assert base < 0.25 and mer > base + 0.4 and maml > base + 0.2, (base, mer, maml)


@pytest.mark.parametrize("name", ["dgr", "pnn", "packnet", "maml_replay", "mer"])
def test_every_method_runs_in_every_mode_it_declares(name):
    """Every declared mode trains: each task is learned well above chance by the end of its own training."""
    cls = retain.method.methods()[name]
    for mode in cls.modes:
        sc = tiny_split(mode, n_tasks=2)
        params = {"dgr": {"fc_units": 8, "z_dim": 2}, "maml_replay": {"inner_steps": 1, "outer_lr": 0.01},
                  "mer": {"alpha": 0.05}}.get(name, {})
        torch.manual_seed(0)
        out = train(sc, create(name, params), MLP(8, sc.n_outputs, (8,)),
                    TrainConfig(iterations=30, batch_size=8, lr=0.01))
        chance = 1 / (sc.n_outputs if mode == "class" else 2)
        R = out.accuracy_matrix
        assert min(R[0][0], R[1][1]) > chance + 0.3, (mode, R)


def test_observe_owners_keep_their_partners_hooks_in_a_compose():
    from dataclasses import dataclass, field

    from retain.method import Compose, Method

    @dataclass
    class Counter(Method):
        calls: list = field(default_factory=list)

        def penalty(self, ctx, batch, out):
            self.calls.append("penalty")
            return out.sum() * 0.0

        def before_update(self, ctx):
            self.calls.append("before")

        def after_update(self, ctx, batch, out):
            self.calls.append("after")

    sc = tiny_split("class", n_tasks=2)
    for owner in (create("dgr", {"fc_units": 8, "z_dim": 2}), create("maml_replay", {"inner_steps": 1})):
        counter = Counter()
        train(sc, Compose(owner, counter), MLP(8, sc.n_outputs, (8,)), TrainConfig(iterations=2, batch_size=8))
        assert counter.calls == ["penalty", "before", "after"] * 4, type(owner).__name__


@pytest.mark.parametrize("name, mode, params", [
    ("pnn", "task", {}), ("pnn", "task", {"lateral": "linear", "init": "agem"}), ("packnet", "task", {}),
    ("dgr", "class", {"fc_units": 8, "z_dim": 2}),
    ("mer", "class", {}), ("maml_replay", "class", {"inner_steps": 1}),
])
def test_resume_from_a_checkpoint_gives_the_same_matrix(tmp_path, name, mode, params):
    """Columns, masks, generators, frozen copies and reservoirs all come back from a checkpoint."""
    import shutil

    from retain.checkpoint import Checkpointer

    class Recording(Checkpointer):
        def __init__(self, path, every=None):
            super().__init__(path, every)
            self.copies = []

        def save(self, state):
            super().save(state)
            self.copies.append(self.path.with_name(f"copy{len(self.copies)}.ckpt"))
            shutil.copy(self.path, self.copies[-1])

    kw = {"scenario": tiny_split(mode, n_tasks=3), "hidden": (8,), "epochs": 2, "batch_size": 16}
    plain = retain.run(method=create(name, params), **kw)
    rec = Recording(tmp_path / "run.ckpt", every=3)
    assert retain.run(method=create(name, params), checkpointer=rec, **kw).accuracy_matrix == plain.accuracy_matrix
    for saved in (rec.copies[2], rec.copies[-3]):  # mid-task in task 0 and in a later task
        ck = Checkpointer(saved, every=3, resume=True, keep=True)
        resumed = retain.run(method=create(name, params), checkpointer=ck, **kw)
        assert resumed.accuracy_matrix == plain.accuracy_matrix, ck.resumed_from
