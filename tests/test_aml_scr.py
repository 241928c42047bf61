"""ER-AML's loss and its positive/negative draw, SCR's SupCon loss and nearest-class-mean rule, by hand; both beat
online fine-tuning on task-free split-digits."""

from __future__ import annotations

import math

import pytest
import torch

import retain
from retain.method import create
from retain.methods.er_aml import aml_loss, positives_negatives
from retain.models import MLP
from retain.ops.contrastive import supcon
from retain.trainer import Context, TrainConfig
from tests.conftest import tiny_split


def _ctx(method, hidden: tuple[int, ...] = (16,)) -> Context:
    sc = tiny_split("class", n_tasks=3)
    torch.manual_seed(0)
    model = MLP(8, sc.n_outputs, hidden)
    ctx = Context(model, sc.train_view(), TrainConfig(lr=0.1, optimizer="sgd"), method, torch.device("cpu"),
                  torch.Generator().manual_seed(0), torch.ones(sc.n_outputs, dtype=torch.bool))
    ctx.optimizer = ctx.make_optimizer()
    return ctx


# ------------------------------------------------------------------------------------------------------ ER-AML

def test_aml_loss_by_hand():
    tau, tau_b = 0.2, 0.07
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # labels 0, 1
    # contrast: the positives (labels 0, 1) then the negatives (labels 1, 0)
    contrast = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    loss = aml_loss(anchors, contrast, torch.tensor([0, 1]), torch.tensor([0, 1, 1, 0]), tau, tau_b)
    # anchor 0: dots [1, 0, 0, -1]/τ, positives at 0 and 3: -(1/2)[(1/τ - lse0) + (-1/τ - lse0)] = lse0
    lse0 = math.log(math.exp(1 / tau) + 2 + math.exp(-1 / tau))
    # anchor 1: dots [0, 1, 1, 0]/τ, positives at 1 and 2: lse1 - 1/τ
    lse1 = math.log(2 + 2 * math.exp(1 / tau))
    expected = tau / tau_b * (lse0 + (lse1 - 1 / tau)) / 2
    torch.testing.assert_close(float(loss), expected)


def test_aml_positives_share_the_label_and_negatives_come_from_the_batch_classes():
    buffer_y = torch.tensor([0, 1, 2, 0])
    y = torch.tensor([0, 1, 3])  # pool: buffer rows 0..3, then the incoming rows at 4, 5, 6
    seen_pos, seen_neg = [set(), set(), set()], [set(), set(), set()]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        pos, neg, valid = positives_negatives(buffer_y, y, g)
        for i in range(3):
            seen_pos[i].add(int(pos[i]))
            seen_neg[i].add(int(neg[i]))
    assert valid.tolist() == [True, True, False]  # label 3 has no other row: no positive
    assert seen_pos[0] == {0, 3} and seen_pos[1] == {1}  # same label, never the row itself (4, 5)
    # label ≠ own and among the batch's labels {0, 1, 3}: class 2 (buffer row 2) is never a negative
    assert seen_neg[0] == {1, 5, 6} and seen_neg[1] == {0, 3, 4, 6}


def test_er_aml_first_step_is_plain_cross_entropy_then_the_aml_loss_replaces_it():
    aml = create("er_aml", {"buffer_size": 20})
    ctx = _ctx(aml)
    b = ctx.scenario.batch(ctx.scenario.task_data(0).idx[:6], 0)
    ctx.batch = b
    out = aml.forward(ctx, b.x, b.t)
    assert float(aml.penalty(ctx, b, out).detach()) == 0.0  # empty buffer: the trainer's CE alone
    aml.after_update(ctx, b, out)
    out = aml.forward(ctx, b.x, b.t)
    penalty = aml.penalty(ctx, b, out)
    total = ctx.loss(out, b) + penalty
    assert torch.isfinite(total) and float(total.detach()) > 0
    assert aml._hidden is None  # the cached features were used once and dropped


# --------------------------------------------------------------------------------------------------------- SCR

def test_supcon_by_hand():
    tau = 0.5
    # two rows (labels 0, 1), two views each, both views of a row equal: every anchor's one positive is its other
    # view (dot 1), the two views of the other row are orthogonal to it (dot 0)
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    expected = -(1 / tau - math.log(math.exp(1 / tau) + 2))
    torch.testing.assert_close(float(supcon(f, torch.tensor([0, 1]), tau)), expected)
    # same label for both rows: three positives per anchor, dots 1, 0, 0 among the same three others
    lse = math.log(math.exp(1 / tau) + 2)
    expected = -((1 / tau - lse) + 2 * (0 - lse)) / 3
    torch.testing.assert_close(float(supcon(f, torch.tensor([0, 0]), tau)), expected)


def test_scr_nearest_class_mean_by_hand():
    scr = create("scr", {"buffer_size": 10})
    ctx = _ctx(scr, hidden=())  # MLP without hidden layers: features(x) = x
    e = torch.eye(8)
    scr.buffer.add(torch.stack([2 * e[0], e[1], 3 * e[2]]), torch.tensor([0, 0, 1]), torch.zeros(3, dtype=torch.long),
                   generator=ctx.rng)
    ctx.model.eval()
    x = torch.stack([2 * e[0] + e[1], e[2] + 0.1 * e[3]])
    scores = scr.forward(ctx, x, torch.zeros(2, dtype=torch.long))
    # μ0 = normalised mean of e0 and e1 = (e0 + e1)/√2, μ1 = e2; a normalised f scores -(|f|² + 1 - 2 f·μ)
    f0 = (2 * e[0] + e[1]) / math.sqrt(5)
    f1 = (e[2] + 0.1 * e[3]) / math.sqrt(1.01)
    mu0 = (e[0] + e[1]) / math.sqrt(2)
    want = torch.tensor([[-(2 - 2 * float(f0 @ mu0)), -2.0], [-2.0, -(2 - 2 * float(f1 @ e[2]))]])
    torch.testing.assert_close(scores[:, :2], want)
    assert torch.isinf(scores[:, 2:]).all()  # classes without stored rows
    assert scores.argmax(1).tolist() == [0, 1]


def test_scr_first_step_does_not_update_and_later_steps_train_the_projection():
    scr = create("scr", {"buffer_size": 20, "mem_batch": 4})
    ctx = _ctx(scr)
    ctx.optimizer = ctx.make_optimizer()  # now over the model and the projection head
    b = ctx.scenario.batch(ctx.scenario.task_data(0).idx[:6], 0)
    before = [p.detach().clone() for p in scr.parameters(ctx.model)]
    assert float(scr.observe(ctx, b)) == 0.0 and len(scr.buffer) == 6
    assert all(torch.equal(p, q) for p, q in zip(before, scr.parameters(ctx.model)))
    loss = scr.observe(ctx, b)
    assert float(loss) > 0
    assert not torch.equal(before[-1], scr.parameters(ctx.model)[-1])  # the projection's last layer moved
    assert torch.equal(before[len(list(ctx.model.parameters())) - 1], ctx.model.head.bias)  # head never trained


# -------------------------------------------------------------------------------------------------- behaviour

@pytest.fixture(scope="module")
def finetune_acc():
    return retain.run(benchmark="split-digits", mode="class", task_free=True, method="finetune", seed=0,
                      threads=1).metrics["acc"]


@pytest.mark.parametrize("name", ["er_aml", "scr"])
def test_beats_online_finetune_on_task_free_split_digits(name, finetune_acc):
    acc = retain.run(benchmark="split-digits", mode="class", task_free=True, method=name, seed=0,
                     threads=1).metrics["acc"]
    assert acc >= finetune_acc + 0.2, (name, acc, finetune_acc)
