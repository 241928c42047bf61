"""ER-ACE's masks and X-DER's logit updates, hand-computed on tiny tensors; both beat fine-tuning on split-digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import retain
from retain.method import create
from retain.methods.er_ace import cosine_logits
from retain.methods.xder import XDER, supcon
from retain.models import MLP
from retain.scenarios import Batch
from retain.trainer import Context, TrainConfig
from tests.conftest import tiny_split


def _ctx(method, n_tasks: int = 3, all_outputs: bool = False) -> Context:
    sc = tiny_split("class", n_tasks=n_tasks)
    torch.manual_seed(0)
    model = MLP(8, sc.n_outputs, (16,))
    ctx = Context(model, sc.train_view(), TrainConfig(lr=0.1, optimizer="sgd", all_outputs=all_outputs), method,
                  torch.device("cpu"), torch.Generator().manual_seed(0), torch.zeros(sc.n_outputs, dtype=torch.bool))
    ctx.optimizer = ctx.make_optimizer()
    return ctx


def _enter(ctx: Context, task: int) -> None:
    ctx.task = task
    ctx.seen |= ctx.scenario.task_out[task]


def _batch(ctx: Context, task: int, labels: list[int]) -> Batch:
    """Rows of ``task`` whose class-IL targets are ``labels`` (one row per entry)."""
    b = ctx.scenario.batch(ctx.scenario.task_data(task).idx, task)
    rows = torch.cat([(b.y == c).nonzero().flatten()[:1] for c in labels])
    return Batch(b.x[rows], b.y[rows], b.t[rows], None, task)


# ------------------------------------------------------------------------------------------------------ ER-ACE

def test_er_ace_incoming_loss_has_zero_gradient_on_absent_classes():
    ace = create("er_ace", {"cosine_head": False})
    ctx = _ctx(ace)
    _enter(ctx, 0)
    _enter(ctx, 1)  # seen: outputs 0..3; task 1 holds outputs 2, 3
    ace.incoming_mask(ctx, _batch(ctx, 1, [2, 3]))  # the largest output met is now 3
    batch = _batch(ctx, 1, [2, 2, 2])  # class 3 absent from this batch, classes 0, 1 (past) absent
    out = torch.tensor([[1.0, 2.0, 0.5, -1.0, 7.0, 3.0]] * 3, requires_grad=True)
    # the trainer's CE plus the penalty: the penalty swaps the former for the asymmetric one (buffer empty)
    loss = ctx.loss(out, batch) + ace.penalty(ctx, batch, out)
    loss.backward()
    g = out.grad
    assert torch.equal(g[:, :2], torch.zeros(3, 2))  # past classes absent from the batch: exactly no gradient
    assert torch.equal(g[:, 4:], torch.zeros(3, 2))  # not yet seen (class-IL mask)
    # kept: the present class 2 and class 3 (>= the largest met, the references' "unseen" rule), by hand:
    # CE over [0.5, -1.0] with target 0 -> -log(e^0.5 / (e^0.5 + e^-1)); d/dz2 = (p2 - 1) / 3, d/dz3 = p3 / 3
    p3 = math.exp(-1.0) / (math.exp(0.5) + math.exp(-1.0))
    torch.testing.assert_close(float(loss.detach()), -math.log(1 - p3))
    torch.testing.assert_close(g[:, 2], torch.full((3,), -p3 / 3))
    torch.testing.assert_close(g[:, 3], torch.full((3,), p3 / 3))


def test_er_ace_mask_with_all_outputs_is_the_references_rule():
    ace = create("er_ace", {"cosine_head": False})
    ctx = _ctx(ace, all_outputs=True)
    _enter(ctx, 0)
    _enter(ctx, 1)
    mask = ace.incoming_mask(ctx, _batch(ctx, 1, [2, 2]))
    # present {2} plus every output from the largest met (2) on: classes not met yet stay in the softmax
    assert mask[0].tolist() == [False, False, True, True, True, True]
    mask = ace.incoming_mask(ctx, _batch(ctx, 0, [0]))  # an old class arrives again: 0 and >= 2 active
    assert mask[0].tolist() == [True, False, True, True, True, True]


def test_er_ace_replay_loss_spans_every_seen_class():
    ace = create("er_ace", {"cosine_head": False, "buffer_size": 4, "replay_batch": 4})
    ctx = _ctx(ace)
    _enter(ctx, 0)
    old = _batch(ctx, 0, [0, 1, 0, 1])
    ace.after_update(ctx, old, torch.zeros(4, 6))  # the buffer holds exactly these four rows
    _enter(ctx, 1)
    batch = _batch(ctx, 1, [2, 3])
    out = ctx.model(batch.x)
    incoming = ace.incoming_loss(ctx, out, batch) - ctx.loss(out, batch)
    ace.max_seen = -1  # incoming_loss moved it; the penalty recomputes the same mask
    replay = ace.penalty(ctx, batch, out) - incoming
    # the replayed rows' plain CE over the seen classes 0..3 (the order of the sample does not matter)
    expected = F.cross_entropy(ctx.model(old.x)[:, :4], old.y)
    torch.testing.assert_close(replay, expected)
    # and its gradient reaches every seen class's logits of the replayed rows
    z = ctx.model(old.x).detach().requires_grad_(True)
    ctx.loss(z, Batch(old.x, old.y, old.t)).backward()
    assert bool((z.grad[:, :4] != 0).all()) and torch.equal(z.grad[:, 4:], torch.zeros(4, 2))


def test_er_ace_cosine_head_by_hand():
    f = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    expected = 10 * torch.tensor([[3 / 5, 4 / 5, -7 / (5 * math.sqrt(2))]])
    torch.testing.assert_close(cosine_logits(f, w, 10.0), expected, atol=1e-4, rtol=0)
    ace = create("er_ace")
    ctx = _ctx(ace)
    x = torch.randn(5, 8)
    out = ace.forward(ctx, x, torch.zeros(5, dtype=torch.long))
    assert out.abs().max() <= 10 + 1e-4  # bounded by the scale
    torch.testing.assert_close(out, cosine_logits(ctx.model.features(x), ctx.model.head.weight, 10.0))


# -------------------------------------------------------------------------------------------------------- X-DER

def test_xder_update_logits_by_hand():
    xder = XDER(gamma=0.85)
    old = torch.tensor([[2.0, 1.0, 0.5, 0.3, 0.0, 0.0],
                        [5.0, 1.0, 0.5, 0.3, 0.0, 0.0]])
    new = torch.tensor([[9.0, 9.0, 3.0, 1.0, 4.0, 2.0],
                        [9.0, 9.0, 3.0, 1.0, 4.0, 2.0]])
    slice_ = torch.tensor([False, False, True, True, True, True])
    got = xder.update_logits(old, new, torch.tensor([0, 0]), slice_)
    # row 0: max of the new slice 4 > gt 2 -> scaled by 0.85 * 2 / 4 = 0.425; row 1: 4 < 5 -> copied as it is
    expected = torch.tensor([[2.0, 1.0, 1.275, 0.425, 1.7, 0.85],
                             [5.0, 1.0, 3.0, 1.0, 4.0, 2.0]])
    torch.testing.assert_close(got, expected)
    assert torch.equal(old[:, :2], got[:, :2])  # outside the slice: untouched


def _xder_ctx(**params):
    xder = create("xder", {"buffer_size": 12, "replay_batch": 4, "lambda": 0.0, **params})
    return xder, _ctx(xder)


def test_xder_end_task_stores_and_revises_logits_only_where_the_method_says():
    xder, ctx = _xder_ctx()
    _enter(ctx, 0)
    xder.end_task(ctx)
    rows = xder.buffer.rows()
    assert sorted(xder.buffer.counts().values()) == [6, 6] and bool((rows.t == 0).all())
    # task 0's rows: the network's outputs on every output (no rescaling at the first task)
    with torch.no_grad():
        torch.testing.assert_close(rows.logits, ctx.model(rows.x))
    confident = rows.idx[::2]  # half the rows: a stored ground-truth logit above anything the network outputs
    xder.buffer.logits[confident, xder.buffer.y[confident]] = 100.0
    before = xder.buffer.logits.clone()
    with torch.no_grad():  # the network changes during task 1
        for p in ctx.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    _enter(ctx, 1)
    xder.end_task(ctx)
    rows = xder.buffer.rows()
    assert sorted(xder.buffer.counts().values()) == [3, 3, 3, 3]  # 12 rows shared by the 4 seen classes
    with torch.no_grad():
        now = ctx.model(rows.x)
    old, new = rows.t == 0, rows.t == 1
    head0 = torch.tensor([True, True, False, False, False, False])
    # old rows: the past head (their own class included) keeps the stored logits ...
    torch.testing.assert_close(rows.logits[old][:, head0], before[rows.idx[old]][:, head0])
    # ... task 1's head and the future head get the current outputs, rescaled by gamma * z_y / max where max > z_y
    z, o, y = before[rows.idx[old]], now[old][:, ~head0], rows.y[old]
    gt, top = z[torch.arange(len(y)), y], o.max(1).values
    scale = torch.where(top > gt, 0.85 * gt / top, torch.ones_like(top))
    assert bool((top > gt).any()) and bool((top <= gt).any())  # both branches of the rule are exercised
    torch.testing.assert_close(rows.logits[old][:, ~head0], o * scale[:, None])
    # new rows: the current outputs, the past head rescaled against their own ground-truth logit
    torch.testing.assert_close(rows.logits[new][:, ~head0], now[new][:, ~head0])
    o, y = now[new][:, head0], rows.y[new]
    gt, top = now[new][torch.arange(len(y)), y], o.max(1).values
    scale = torch.where(top > gt, 0.85 * gt / top, torch.ones_like(top))
    torch.testing.assert_close(rows.logits[new][:, head0], o * scale[:, None])
    assert bool((rows.logits[new][:, head0].max(1).values <= torch.maximum(0.85 * gt, top) + 1e-6).all())


def test_xder_online_update_revises_only_the_current_and_future_heads_of_replayed_rows():
    xder, ctx = _xder_ctx()
    _enter(ctx, 0)
    xder.end_task(ctx)
    before = xder.buffer.logits.clone()
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    _enter(ctx, 1)
    batch = _batch(ctx, 1, [2, 3, 2, 3])
    ctx.batch = batch
    out = ctx.model(batch.x)
    xder.penalty(ctx, batch, out)
    drawn = (xder.counter > 0).nonzero().flatten()
    assert len(drawn) > 0 and bool((xder.counter <= 1).all())  # first draw in the task: updated with p = 1
    after = xder.buffer.logits
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[drawn] = False
    assert torch.equal(after[untouched], before[untouched])
    assert torch.equal(after[drawn][:, :2], before[drawn][:, :2])  # the past head: never revised
    with torch.no_grad():
        now = ctx.model(xder.buffer.x[drawn])
    expected = xder.update_logits(before[drawn], now, xder.buffer.y[drawn], XDER.heads(ctx, 1))
    torch.testing.assert_close(after[drawn], expected)


def test_xder_current_head_cross_entropy_and_constraint():
    xder, ctx = _xder_ctx(alpha=0.0, beta=0.0, m=0.3, eta=0.1)
    _enter(ctx, 0)
    batch = Batch(torch.zeros(1, 8), torch.tensor([1]), torch.tensor([0]), None, 0)
    ctx.batch = batch
    out = torch.tensor([[1.0, 2.0, 5.0, 0.0, 1.0, 1.5]])
    loss = ctx.loss(out, batch) + xder.penalty(ctx, batch, out)
    # CE over the current head [1, 2] with target 1, plus eta * (max future 5 + m - max own 2)
    expected = -math.log(math.exp(2) / (math.exp(1) + math.exp(2))) + 0.1 * (5 + 0.3 - 2)
    torch.testing.assert_close(float(loss.detach()), expected)


def test_supcon_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(3, 2, 4, generator=g), dim=2)
    y = torch.tensor([0, 1, 0])
    temp = 0.5
    views = [(i, v) for v in range(2) for i in range(3)]
    total = []
    for i, v in views:
        others = [(j, u) for (j, u) in views if (j, u) != (i, v)]
        denom = sum(math.exp(float(f[i, v] @ f[j, u]) / temp) for j, u in others)
        pos = [(j, u) for j, u in others if y[j] == y[i]]
        total.append(-sum(float(f[i, v] @ f[j, u]) / temp - math.log(denom) for j, u in pos) / len(pos))
    torch.testing.assert_close(float(supcon(f, y, temp)), sum(total) / len(total), rtol=1e-5, atol=1e-6)


def test_memory_reports_the_buffers():
    sc = tiny_split("class", n_tasks=2)
    assert create("er_ace", {"buffer_size": 7}).memory(sc).rows == 7
    assert create("xder", {"buffer_size": 9}).memory(sc).rows == 9


# ---------------------------------------------------------------------------------------------------- behaviour

@pytest.fixture(scope="module")
def finetune_acc():
    return retain.run(benchmark="split-digits", mode="class", method="finetune", seed=0).metrics["acc"]


@pytest.mark.parametrize("name", ["er_ace", "xder"])
def test_beats_finetune_on_split_digits(name, finetune_acc):
    acc = retain.run(benchmark="split-digits", mode="class", method=name, seed=0).metrics["acc"]
    assert acc >= finetune_acc + 0.15, (name, acc, finetune_acc)


def test_xder_consistency_term_on_rgb_images_runs_and_leaves_bn_statistics_to_the_mixed_pass():
    from retain.scenarios import from_tensors

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(6).repeat(8)
    sc = from_tensors(x, y, x[:12], y[:12], n_tasks=3)
    xder = create("xder", {"buffer_size": 12, "replay_batch": 4, "lambda": 0.05, "simclr_num_aug": 2,
                           "simclr_batch_size": 4})
    torch.manual_seed(0)
    model = retain.models.build_model("resnet18-reduced", sc.input_shape, sc.n_outputs)
    ctx = Context(model, sc.train_view(), TrainConfig(lr=0.01, optimizer="sgd"), xder, torch.device("cpu"),
                  torch.Generator().manual_seed(0), torch.zeros(sc.n_outputs, dtype=torch.bool))
    ctx.optimizer = ctx.make_optimizer()
    _enter(ctx, 0)
    batch = ctx.scenario.batch(ctx.scenario.task_data(0).idx[:6], 0)
    loss = xder.observe(ctx, batch)
    assert math.isfinite(float(loss))
    xder.end_task(ctx)
    _enter(ctx, 1)
    bn = model.bn1
    stats = bn.running_mean.clone()
    z = xder.consistency(ctx, ctx.view(ctx.scenario.batch(ctx.scenario.task_data(1).idx[:6], 1)))
    z = float(z.detach())
    assert math.isfinite(z) and z > 0
    assert torch.equal(bn.running_mean, stats)  # the augmented views leave the statistics alone (align_bn)
    loss = xder.observe(ctx, ctx.scenario.batch(ctx.scenario.task_data(1).idx[:6], 1))
    assert math.isfinite(float(loss)) and not torch.equal(bn.running_mean, stats)  # the mixed buffer pass did
