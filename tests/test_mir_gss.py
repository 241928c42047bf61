"""MIR's retrieval and GSS-Greedy's selection, hand-computed on tiny tensors; both beat fine-tuning on split-digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import retain
from retain.method import create
from retain.scenarios import Batch
from retain.trainer import Context, TrainConfig
from tests.conftest import tiny_split

LR = 0.5


def _ctx(method, model: torch.nn.Module, all_outputs: bool = True) -> Context:
    sc = tiny_split("class", n_tasks=2)  # 4 classes, 8 inputs, 2 tasks
    ctx = Context(model, sc.train_view(), TrainConfig(lr=LR, optimizer="sgd", all_outputs=all_outputs), method,
                  torch.device("cpu"), torch.Generator().manual_seed(0), torch.ones(sc.n_outputs, dtype=torch.bool))
    ctx.optimizer = ctx.make_optimizer()
    return ctx


def _rows(ctx: Context, task: int, n: int, offset: int = 0) -> Batch:
    data = ctx.scenario.task_data(task)
    return ctx.scenario.batch(data.idx[offset:offset + n], task)


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.normal_(0, 1.0)
        model.bias.normal_(0, 0.5)
    return model


def _ce(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of a linear softmax model, written out."""
    z = x @ W.T + b
    return torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]


def _virtual(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float):
    """The closed-form SGD step on the mean CE of (x, y): dL/dz = (softmax(z) - onehot(y)) / B."""
    z = x @ W.T + b
    d = (torch.softmax(z, 1) - F.one_hot(y, W.shape[0]).float()) / len(y)
    return W - lr * d.T @ x, b - lr * d.sum(0)


# ------------------------------------------------------------------------------------------------------- MIR

def _mir_case(**params):
    mir = create("mir", {"buffer_size": 12, "subsample": 12, "mem_batch_size": 3, **params})
    model = _linear()
    ctx = _ctx(mir, model)
    old = _rows(ctx, 0, 12)
    mir.buffer.add(old.x, old.y, old.t, generator=ctx.rng,
                   logits=torch.zeros(12, 4) if mir.compare_to_old_logits else None)
    incoming = _rows(ctx, 1, 5)
    return mir, model, ctx, old, incoming


def test_mir_retrieves_exactly_the_candidates_whose_loss_the_virtual_step_raises_most():
    mir, model, ctx, old, incoming = _mir_case()
    W, b = model.weight.detach().clone(), model.bias.detach().clone()
    Wv, bv = _virtual(W, b, incoming.x, incoming.y, LR)
    expected = _ce(Wv, bv, old.x, old.y) - _ce(W, b, old.x, old.y)  # interference of every stored row, by hand
    top = set(torch.topk(expected, 3).indices.tolist())

    rows = mir.candidates(ctx, incoming)
    assert len(rows) == 12  # subsample >= stored: every stored row is a candidate
    loss = ctx.loss(ctx.forward(incoming.x, incoming.t), incoming)
    score, _ = mir.scores(ctx, loss, rows)
    torch.testing.assert_close(score, expected[rows.idx], atol=1e-5, rtol=1e-5)
    chosen = mir.retrieve(ctx, loss, rows)
    assert set(chosen.idx.tolist()) == top
    # the top by interference is not the top by current loss: retrieval is not "replay the hardest"
    assert top != set(torch.topk(_ce(W, b, old.x, old.y), 3).indices.tolist())
    # the model itself is untouched by the virtual step
    assert torch.equal(model.weight, W) and torch.equal(model.bias, b)

    # penalty(): the replayed term is the mean CE of exactly those rows, at the current parameters
    out = ctx.forward(incoming.x, incoming.t)
    ctx.rng.manual_seed(0)
    extra = mir.penalty(ctx, incoming, out)
    idx = torch.tensor(sorted(top))
    torch.testing.assert_close(extra, _ce(W, b, old.x[idx], old.y[idx]).mean())


def test_mir_compare_to_old_logits_scores_from_the_lowest_loss_and_stores_better_logits():
    mir, model, ctx, old, incoming = _mir_case(compare_to_old_logits=True)
    # rows 0..5 keep the zero logits they were stored with (old loss log 4, the uniform prediction's); rows 6..11
    # are given logits confidently wrong (-40 on their class): their old loss is log(1 + 3 e^40) ≈ 41.0986
    wrong = -40 * F.one_hot(old.y[6:], 4).float()
    mir.buffer.logits[6:] = wrong
    W, b = model.weight.detach().clone(), model.bias.detach().clone()
    Wv, bv = _virtual(W, b, incoming.x, incoming.y, LR)
    pre, post = _ce(W, b, old.x, old.y), _ce(Wv, bv, old.x, old.y)
    old_loss = torch.cat([torch.full((6,), math.log(4)), torch.full((6,), math.log(1 + 3 * math.exp(40)))])
    better = pre < old_loss
    assert better.tolist() == [False] * 6 + [True] * 6  # this random model: log 4 < pre < 41 on every row
    expected = post - torch.minimum(pre, old_loss)
    rows = mir.candidates(ctx, incoming)
    score, _ = mir.scores(ctx, ctx.loss(ctx.forward(incoming.x, incoming.t), incoming), rows)
    torch.testing.assert_close(score, expected[rows.idx], atol=1e-5, rtol=1e-5)
    # the rows whose current loss beat the stored one now hold their current logits; the others are unchanged
    torch.testing.assert_close(mir.buffer.logits[6:], (old.x @ W.T + b)[6:])
    assert torch.equal(mir.buffer.logits[:6], torch.zeros(6, 4))
    # scored again, every row measures from min(pre, old) = its best loss so far
    score2, _ = mir.scores(ctx, ctx.loss(ctx.forward(incoming.x, incoming.t), incoming), rows)
    best = torch.cat([torch.full((6,), math.log(4)), pre[6:]])
    torch.testing.assert_close(score2, (post - best)[rows.idx], atol=1e-5, rtol=1e-5)


def test_mir_exclude_task_draws_candidates_from_other_tasks_only():
    mir = create("mir", {"buffer_size": 20, "subsample": 20, "mem_batch_size": 3, "exclude_task": True})
    ctx = _ctx(mir, _linear())
    first = _rows(ctx, 0, 6)
    mir.buffer.add(first.x, first.y, first.t, generator=ctx.rng)
    assert mir.candidates(ctx, _rows(ctx, 0, 4, offset=6)) is None  # only the current task stored: no replay
    out = ctx.forward(first.x[:4], first.t[:4])
    assert mir.penalty(ctx, _rows(ctx, 0, 4, offset=6), out) is None
    second = _rows(ctx, 1, 6)
    mir.buffer.add(second.x, second.y, second.t, generator=ctx.rng)
    rows = mir.candidates(ctx, _rows(ctx, 1, 4, offset=6))
    assert len(rows) == 6 and set(rows.t.tolist()) == {0}


def test_mir_rejects_fewer_candidates_than_replayed_rows():
    with pytest.raises(retain.errors.ConfigError, match="subsample"):
        create("mir", {"subsample": 5, "mem_batch_size": 10})


# ------------------------------------------------------------------------------------------------------- GSS

def _gss_ctx(**params):
    gss = create("gss", {"buffer_size": 2, "n_compare": 10, **params})
    model = torch.nn.Linear(8, 4)
    with torch.no_grad():  # a zero model: every row predicts uniformly, its gradient is (1/4 - onehot(y)) ⊗ [x, 1]
        model.weight.zero_()
        model.bias.zero_()
    return gss, _ctx(gss, model)


def test_gss_keeps_the_gradient_diverse_rows_and_drops_duplicates():
    gss, ctx = _gss_ctx()
    a = _rows(ctx, 0, 1)
    x, t = a.x.repeat(2, 1), a.t.repeat(2)
    # the same input with labels 0 and 1: gradients (1/4 - e_0) ⊗ [x, 1] and (1/4 - e_1) ⊗ [x, 1], whose cosine is
    # <1/4 - e_0, 1/4 - e_1> / |1/4 - e_0|^2 = (-1/4) / (3/4) = -1/3
    dup = Batch(x, torch.tensor([0, 0]), t)
    gss.select(ctx, dup.x, dup.y, dup.t)  # an empty memory: both stored, score 0.1
    assert gss.buffer.y.tolist() == [0, 0]
    torch.testing.assert_close(gss.buffer.prio, torch.tensor([0.1, 0.1]))
    # more copies of the stored one (c = 1 + 1 = 2) and one distinct row (c = 1 - 1/3 < 1)
    stream = Batch(x[:1].repeat(4, 1), torch.tensor([0, 1, 0, 0]), t[:1].repeat(4))
    c = gss.scores(ctx, stream.x, stream.y, stream.t)
    torch.testing.assert_close(c, torch.tensor([2.0, 1 - 1 / 3, 2.0, 2.0]))
    gss.select(ctx, stream.x, stream.y, stream.t)
    # the distinct row replaced a duplicate with probability 0.1 / (0.1 + 2/3) ... unless drawn: check both outcomes
    held = sorted(gss.buffer.y.tolist())
    assert held in ([0, 0], [0, 1])
    # repeat until it is in: once held, further copies of either (c = 2) are never stored
    for _ in range(200):
        if held == [0, 1]:
            break
        gss.select(ctx, stream.x[1:2], stream.y[1:2], stream.t[1:2])
        held = sorted(gss.buffer.y.tolist())
    assert held == [0, 1]
    for _ in range(50):
        gss.select(ctx, stream.x, stream.y, stream.t)
    assert sorted(gss.buffer.y.tolist()) == [0, 1]


def test_gss_memory_ends_holding_the_distinct_gradients_of_a_redundant_stream():
    from retain.buffers import Buffer

    gss, ctx = _gss_ctx(buffer_size=3)
    a = _rows(ctx, 0, 1)
    # one input under labels 0..3: every pair of distinct labels has gradient cosine -1/3, equal labels 1
    g = gss.gradients(ctx, a.x.repeat(4, 1), torch.arange(4), a.t.repeat(4))
    cos = F.cosine_similarity(g.unsqueeze(1), g.unsqueeze(0), dim=2)
    torch.testing.assert_close(cos, torch.full((4, 4), -1 / 3) + torch.eye(4) * (4 / 3))
    # a stream of 3000 rows, nine in ten a copy of label 0, the tenth cycling through labels 1, 2, 3
    labels = torch.tensor([0 if i % 10 else 1 + (i // 10) % 3 for i in range(3000)])
    reservoir = Buffer(3)
    distinct_from = None
    for i in range(0, 3000, 10):
        y = labels[i:i + 10]
        gss.select(ctx, a.x.repeat(10, 1), y, a.t.repeat(10))
        reservoir.add(a.x.repeat(10, 1), y, a.t.repeat(10), generator=ctx.rng)
        distinct = len(set(gss.buffer.y.tolist())) == 3
        if distinct and distinct_from is None:
            distinct_from = i
        # once the three rows are distinct they stay so: a copy of a held label scores 2 and never enters, and a
        # missing label (score 2/3) can only take a slot
        assert distinct or distinct_from is None, i
    assert len(gss.buffer) == 3 and distinct_from is not None and distinct_from < 2000
    assert len(set(reservoir.y.tolist())) < 3  # a uniform sample of the stream keeps duplicates of label 0


def test_gss_replacement_probability_is_algorithm_2s():
    gss, ctx = _gss_ctx()
    a = _rows(ctx, 0, 1)
    trials, hits = 4000, torch.zeros(3)
    for _ in range(trials):
        gss.buffer = type(gss.buffer)(2)
        gss.insert(ctx, a.x.repeat(2, 1), torch.tensor([0, 1]), a.t.repeat(2), torch.tensor([0.2, 1.8]))
        gss.insert(ctx, a.x, torch.tensor([2]), a.t, torch.tensor([0.5]))
        y = gss.buffer.y.tolist()
        hits[0 if y[0] == 2 else 1 if y[1] == 2 else 2] += 1
    # slot i drawn with C_i / ΣC, then replaced with C_i / (C_i + c)
    p0, p1 = 0.1 * 0.2 / 0.7, 0.9 * 1.8 / 2.3
    expected = torch.tensor([p0, p1, 1 - p0 - p1])
    assert torch.allclose(hits / trials, expected, atol=0.025), (hits / trials, expected)
    # a score >= 1 (similar to a stored gradient) is never a candidate
    gss.buffer = type(gss.buffer)(2)
    gss.insert(ctx, a.x.repeat(2, 1), torch.tensor([0, 1]), a.t.repeat(2), torch.tensor([0.2, 1.8]))
    for _ in range(100):
        gss.insert(ctx, a.x, torch.tensor([2]), a.t, torch.tensor([1.0]))
    assert gss.buffer.y.tolist() == [0, 1]


def test_gss_batch_gate_scores_and_gates_the_whole_batch_on_its_mean_gradient():
    # the zero model of _gss_ctx, one input: row gradients are u_y ⊗ [x, 1], u_y = 1/4 - e_y, |u_y|² = 3/4 and
    # <u_a, u_b> = -1/4 (a != b). A batch with label frequencies p has mean gradient ū ⊗ [x, 1], ū = 1/4 - p:
    # <ū, u_j> = p_j - 1/4 and |ū|² = |p|² - 1/4, so c_B = 1 + max_j (p_j - 1/4) / (|ū| √3/2) over the stored j.
    with pytest.raises(retain.errors.ConfigError, match="gate must be one of row, batch, got 'mean'"):
        create("gss", {"gate": "mean"})
    a = _rows(_gss_ctx()[1], 0, 1)
    rows = lambda *y: (a.x.repeat(len(y), 1), torch.tensor(y), a.t.repeat(len(y)))  # noqa: E731
    s3 = math.sqrt(3)
    for gate, fill in (("row", [0.1, 0.1, 2.0, 2 / 3]), ("batch", [0.1, 0.1, 1 + 1 / s3, 1 + 1 / s3])):
        gss, ctx = _gss_ctx(buffer_size=4, gate=gate)
        gss.select(ctx, *rows(0, 0))  # an empty memory: 0.1 both ways
        # [0, 1] against two stored 0s: p = (1/2, 1/2), |ū| = 1/2, cos(ū, u_0) = (1/4) / (1/2 · √3/2) = 1/√3
        torch.testing.assert_close(gss.batch_scores(ctx, *rows(0, 1)),
                                   (torch.tensor([2.0, 2 / 3]), torch.tensor(1 + 1 / s3)))
        gss.select(ctx, *rows(0, 1))  # room for both: row stores each with its own score, batch with c_B
        assert gss.buffer.y.tolist() == [0, 0, 0, 1]
        torch.testing.assert_close(gss.buffer.prio, torch.tensor(fill))
    # a full memory (0, 0, 0, 1): [0, 2] has c_B = 1 + 1/√3 >= 1, so its row 2 (c = 2/3) never enters under batch
    torch.testing.assert_close(gss.batch_scores(ctx, *rows(0, 2)),
                               (torch.tensor([2.0, 2 / 3]), torch.tensor(1 + 1 / s3)))
    for _ in range(100):
        gss.select(ctx, *rows(0, 2))
    assert gss.buffer.y.tolist() == [0, 0, 0, 1]
    # a batch filling the last slot: its first row takes c_B, the rest are gated on c_B (here closed)
    gss, ctx = _gss_ctx(buffer_size=3, gate="batch")
    gss.select(ctx, *rows(0, 0))
    for _ in range(50):
        gss.select(ctx, *rows(0, 1))
    assert gss.buffer.y.tolist() == [0, 0, 0]
    torch.testing.assert_close(gss.buffer.prio, torch.tensor([0.1, 0.1, 1 + 1 / s3]))
    # [2, 2, 3, 3, 0] against (0, 0, 0, 1): p = (1/5, 0, 2/5, 2/5), |ū| = √11/10, c_B = 1 - 1/√33 < 1: every row is a
    # candidate drawn against its own score, the 0 (c = 2, which the row gate never lets in) too
    entered = set()
    for seed in range(300):
        gss, ctx = _gss_ctx(buffer_size=4, gate="batch")
        ctx.rng.manual_seed(seed)
        gss.select(ctx, *rows(0, 0))
        gss.select(ctx, *rows(0, 1))
        before = list(zip(gss.buffer.y.tolist(), gss.buffer.prio.tolist()))
        if seed == 0:
            c, c_b = gss.batch_scores(ctx, *rows(2, 2, 3, 3, 0))
            torch.testing.assert_close(c, torch.tensor([2 / 3] * 4 + [2.0]))
            torch.testing.assert_close(c_b, torch.tensor(1 - 1 / math.sqrt(33)))
        gss.select(ctx, *rows(2, 2, 3, 3, 0))
        for old, new in zip(before, zip(gss.buffer.y.tolist(), gss.buffer.prio.tolist())):
            if new != old:
                assert new in ((2, pytest.approx(2 / 3)), (3, pytest.approx(2 / 3)), (0, pytest.approx(2.0))), new
                entered.add(new[0])
    assert entered == {0, 2, 3}


# -------------------------------------------------------------------------------------------------- behaviour

@pytest.mark.parametrize("name", ["mir", "gss"])
def test_online_method_beats_online_finetuning_on_task_free_split_digits(name):
    kw = dict(benchmark="split-digits", mode="class", task_free=True, batch_size=10, optimizer="sgd", lr=0.1,
              seed=0, threads=1)
    base = retain.run(method="finetune", **kw).metrics["acc"]
    got = retain.run(method=name, **kw).metrics["acc"]
    assert got > base + 0.12, (name, got, base)


def test_gss_gradient_inner_products_without_forming_the_gradients_are_exact():
    from retain.models import MLP

    gss = create("gss", {})
    torch.manual_seed(1)
    ctx = _ctx(gss, MLP(8, 4, (16, 16)), all_outputs=False)
    rows = _rows(ctx, 0, 6)
    ctx.seen[2:] = False  # class-IL training mask: the first task's two outputs
    g = gss.gradients(ctx, rows.x, rows.y, rows.t)
    torch.testing.assert_close(gss.gram(ctx, rows.x, rows.y, rows.t), g @ g.T, atol=1e-5, rtol=1e-4)
