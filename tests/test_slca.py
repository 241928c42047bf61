"""SLCA: the class statistics, the sampling from them, the logit normalisation, the two learning rates, alignment
touching only the head, the local head, and SLCA beating fine-tuning on split-digits class-IL."""

from __future__ import annotations

import math

import pytest
import torch

import retain
from retain.method import create
from retain.methods.slca import class_statistics, normalised_logits, sample_features
from retain.models import MLP
from retain.trainer import Context, TrainConfig
from tests.conftest import tiny_split


def _ctx(method, n_tasks: int = 3, **config) -> Context:
    sc = tiny_split("class", n_tasks=n_tasks)  # 2 classes per task, 8 inputs
    torch.manual_seed(0)
    model = MLP(8, sc.n_outputs, (16,))
    cfg = TrainConfig(**{"lr": 0.1, "optimizer": "sgd", **config})
    return Context(model, sc.train_view(), cfg, method, torch.device("cpu"), torch.Generator().manual_seed(0),
                   torch.zeros(sc.n_outputs, dtype=torch.bool))


def _train_task(ctx: Context, task: int, steps: int = 5) -> None:
    """What the trainer does for one task: enter it, begin_task, a fresh optimizer, a few steps, end_task."""
    ctx.task = task
    ctx.seen |= ctx.scenario.task_out[task]
    ctx.method.begin_task(ctx)
    ctx.optimizer = ctx.make_optimizer()
    data = ctx.scenario.task_data(task)
    for _ in range(steps):
        ctx.method.observe(ctx, ctx.scenario.batch(data.idx, task))
    ctx.method.end_task(ctx)


def _backbone(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.features.parameters()]


# ------------------------------------------------------------------------------------------ statistics

def test_class_statistics_by_hand():
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mean, cov = class_statistics(f, ridge=1e-4)
    # each coordinate is 0, 2, 0, 2: mean 1, unbiased variance (4 · 1) / 3; the two coordinates are uncorrelated
    assert mean.tolist() == [1.0, 1.0]
    torch.testing.assert_close(cov, torch.tensor([[4 / 3 + 1e-4, 0.0], [0.0, 4 / 3 + 1e-4]], dtype=torch.float64))


def test_sampling_draws_from_the_stored_gaussians():
    means = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 4.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-0.3, 0.4, 0.7]], dtype=torch.float64)
    covs = torch.stack([a @ a.T, torch.diag(torch.tensor([0.25, 4.0, 1.0], dtype=torch.float64))])
    n = 40_000
    x, labels = sample_features(means, covs, n, torch.Generator().manual_seed(0))
    assert x.shape == (2 * n, 3) and x.dtype == torch.float32
    assert torch.equal(labels, torch.tensor([0, 1]).repeat_interleave(n))
    for c in range(2):
        rows = x[labels == c].double()
        # standard errors at n = 40000: about 0.01 for the means, 0.03 for the largest covariance entries
        torch.testing.assert_close(rows.mean(0), means[c], atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(rows.T), covs[c], atol=0.1, rtol=0.03)
    again, _ = sample_features(means, covs, n, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)  # the same generator, the same features


def test_logit_normalisation_by_hand():
    logits = torch.tensor([[3.0, 4.0, 0.0, 0.0, 12.0],
                           [0.0, 1.0, 0.0, 0.0, 0.0]])
    groups = [torch.tensor([0, 1]), torch.tensor([2, 3, 4])]  # task 0: columns 0-1, task 1: columns 2-4
    out = normalised_logits(logits, groups, tau=0.1)
    # row 0: task norms 5 and 12, mean 8.5; row 1: 1 and 0 (+1e-7 each), mean ~0.5
    torch.testing.assert_close(out[0], logits[0] / (8.5 + 1e-7) / 0.1)
    torch.testing.assert_close(out[1], logits[1] / ((1 + 2e-7) / 2) / 0.1)


# ------------------------------------------------------------------------------------------ slow learner

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_parameter_groups_carry_the_two_learning_rates(optimizer):
    slca = create("slca", {"backbone_lr_scale": 0.01, "weight_decay": 5e-4})
    ctx = _ctx(slca, optimizer=optimizer, lr=0.1)
    ctx.task, ctx.seen = 0, ctx.scenario.task_out[0].clone()
    slca.begin_task(ctx)
    opt = ctx.make_optimizer()
    backbone, head = opt.param_groups
    assert backbone["lr"] == pytest.approx(0.001) and head["lr"] == pytest.approx(0.1)
    assert backbone["weight_decay"] == head["weight_decay"] == 5e-4  # the authors' decay, per group
    assert {id(p) for p in backbone["params"]} == {id(p) for p in ctx.model.features.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in ctx.model.head.parameters()}


def test_a_zero_scale_leaves_the_backbone_out_of_the_optimizer():
    slca = create("slca", {"backbone_lr_scale": 0.0})
    ctx = _ctx(slca)
    before = _backbone(ctx.model)
    _train_task(ctx, 0)
    (group,) = ctx.optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in ctx.model.head.parameters()}
    assert all(torch.equal(a, b) for a, b in zip(before, _backbone(ctx.model)))


def test_the_backbone_step_is_the_slow_rate_times_its_gradient():
    slca = create("slca", {"backbone_lr_scale": 0.01, "weight_decay": 0.0})
    ctx = _ctx(slca, lr=0.5)  # plain SGD: no momentum, no weight decay
    ctx.task, ctx.seen = 0, ctx.scenario.task_out[0].clone()
    slca.begin_task(ctx)
    ctx.optimizer = ctx.make_optimizer()
    b = ctx.scenario.batch(ctx.scenario.task_data(0).idx, 0)
    w, v = ctx.model.features[1].weight, ctx.model.head.weight
    w0, v0 = w.detach().clone(), v.detach().clone()
    ctx.loss(slca.forward(ctx, b.x, b.t), b).backward()
    gw, gv = w.grad.clone(), v.grad.clone()
    ctx.model.zero_grad()
    slca.observe(ctx, b)
    torch.testing.assert_close(w.detach(), w0 - 0.005 * gw)
    torch.testing.assert_close(v.detach(), v0 - 0.5 * gv)


# ------------------------------------------------------------------------------------------ local head

def test_a_task_trains_only_its_own_rows_of_the_head():
    slca = create("slca", {"ca_epochs": 0, "weight_decay": 0.01})
    ctx = _ctx(slca, momentum=0.9)  # momentum and decay would move rows without a gradient
    _train_task(ctx, 0)
    head0 = {k: v.clone() for k, v in ctx.model.head.state_dict().items()}
    backbone0 = _backbone(ctx.model)
    _train_task(ctx, 1)
    head1 = ctx.model.head.state_dict()
    rows = ctx.scenario.task_out[1]
    for k in ("weight", "bias"):
        assert torch.equal(head1[k][~rows], head0[k][~rows])  # task 0's rows and the unseen task 2's
        assert not torch.equal(head1[k][rows], head0[k][rows])
    assert not all(torch.equal(a, b) for a, b in zip(backbone0, _backbone(ctx.model)))  # slow, but it learns


def test_training_logits_are_the_tasks_and_evaluation_masks_unseen_classes():
    slca = create("slca")
    ctx = _ctx(slca)
    _train_task(ctx, 0, steps=1)
    ctx.task, ctx.seen = 1, ctx.seen | ctx.scenario.task_out[1]
    slca.begin_task(ctx)
    x = torch.randn(4, 8)
    ctx.model.train()
    out = slca.forward(ctx, x, torch.ones(4, dtype=torch.long))
    rows = ctx.scenario.task_out[1]
    assert torch.isinf(out[:, ~rows]).all() and torch.isfinite(out[:, rows]).all()
    ctx.model.eval()
    out = slca.forward(ctx, x, torch.ones(4, dtype=torch.long))
    assert torch.isfinite(out[:, ctx.seen]).all() and torch.isinf(out[:, ~ctx.seen]).all()


# ------------------------------------------------------------------------------------------ alignment

def test_alignment_changes_only_the_head_and_is_undone_for_the_next_task():
    slca = create("slca", {"ca_epochs": 3, "ca_samples": 64})
    ctx = _ctx(slca)
    _train_task(ctx, 0)
    assert set(slca.means) == {0, 1} and slca.covs[0].shape == (16, 16)
    mean0 = slca.means[0].clone()
    ctx.task, ctx.seen = 1, ctx.seen | ctx.scenario.task_out[1]
    slca.begin_task(ctx)
    ctx.optimizer = ctx.make_optimizer()
    data = ctx.scenario.task_data(1)
    for _ in range(5):
        slca.observe(ctx, ctx.scenario.batch(data.idx, 1))
    backbone = _backbone(ctx.model)
    before = {k: v.clone() for k, v in ctx.model.head.state_dict().items()}
    calls = []
    hook = ctx.model.features.register_forward_hook(lambda *a: calls.append(1))
    slca.align(ctx)
    hook.remove()
    assert not calls  # the backbone is not even called
    assert all(torch.equal(a, b) for a, b in zip(backbone, _backbone(ctx.model)))
    after = ctx.model.head.state_dict()
    seen = ctx.seen
    for k in ("weight", "bias"):
        assert not torch.equal(after[k][seen], before[k][seen])  # every seen class's row is aligned
        assert torch.equal(after[k][~seen], before[k][~seen])  # the unseen task's rows are not
    # the full end_task: statistics of the new classes only (the old ones stay as stored), the un-aligned head saved
    ctx.model.head.load_state_dict(before)
    slca.end_task(ctx)
    assert set(slca.means) == {0, 1, 2, 3} and torch.equal(slca.means[0], mean0)
    assert all(torch.equal(slca.head_state[k], before[k]) for k in before)
    ctx.task, ctx.seen = 2, ctx.seen | ctx.scenario.task_out[2]
    slca.begin_task(ctx)  # as the authors' after_task: training goes on from the un-aligned head
    assert all(torch.equal(ctx.model.head.state_dict()[k], before[k]) for k in before)


def test_alignment_fixes_a_head_biased_to_the_last_task():
    # two well-separated Gaussian classes learnt in different tasks; the head starts biased to class 1
    slca = create("slca", {"ca_epochs": 5, "ca_samples": 256, "ca_mean_decay": 0.0})
    ctx = _ctx(slca, n_tasks=2)
    d = 16
    slca.means = {0: torch.full((d,), 1.0, dtype=torch.float64), 1: torch.full((d,), -1.0, dtype=torch.float64)}
    slca.covs = {0: 0.1 * torch.eye(d), 1: 0.1 * torch.eye(d)}
    slca.learnt = {0: 0, 1: 1}
    ctx.task, ctx.seen = 1, torch.tensor([True, True, False, False])
    with torch.no_grad():
        ctx.model.head.weight.zero_()
        ctx.model.head.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    x = torch.cat([torch.full((10, d), 1.0), torch.full((10, d), -1.0)])
    y = torch.tensor([0] * 10 + [1] * 10)
    masked = ctx.model.head(x)[:, :2]
    assert (masked.argmax(1) == y).float().mean() == 0.5
    slca.align(ctx)
    assert (ctx.model.head(x)[:, :2].argmax(1) == y).all()


def test_mean_decay_scales_older_classes_as_the_authors_code(monkeypatch):
    slca = create("slca", {"ca_epochs": 1, "ca_samples": 20_000, "ca_mean_decay": 0.1, "ca_lr": 1e-12})
    ctx = _ctx(slca, n_tasks=2)
    d = 16
    slca.means = {0: torch.full((d,), 2.0, dtype=torch.float64), 2: torch.full((d,), 2.0, dtype=torch.float64)}
    slca.covs = {0: 1e-6 * torch.eye(d), 2: 1e-6 * torch.eye(d)}
    slca.learnt = {0: 0, 2: 1}
    ctx.task = 1
    drawn = []
    real = sample_features

    def spy(means, covs, n, rng):
        drawn.append(means.clone())
        return real(means, covs, n, rng)

    monkeypatch.setattr("retain.methods.slca.sample_features", spy)
    slca.align(ctx)
    # T = 1: class 0 (task 0) x (0.9 + 0.1 · 1/2) = 0.95, class 2 (task 1) x 1.0
    torch.testing.assert_close(drawn[0][:, 0], torch.tensor([1.9, 2.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------------ behaviour

@pytest.fixture(scope="module")
def digits():
    run = {"benchmark": "split-digits", "mode": "class", "seed": 0}
    return {name: retain.run(method=m, params=p, **run).metrics["acc"]
            for name, m, p in (("finetune", "finetune", {}), ("slca", "slca", {}),
                               ("sl", "slca", {"ca_epochs": 0}))}


def test_beats_finetuning_on_split_digits_class_il(digits):
    assert digits["slca"] >= digits["finetune"] + 0.3, digits
    assert digits["slca"] > digits["sl"] + 0.1, digits  # the alignment is what lifts the slow learner
    assert not math.isnan(digits["slca"])



def test_on_a_pretrained_vit_the_backbone_is_the_slow_group_and_is_never_cached(tmp_path):
    from retain.backbones import Pretrained, save_weights
    from retain.vit import ViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2)
    model = Pretrained(ViT(cfg), 10)
    slca = create("slca")
    slca.lr = 0.01
    backbone, head = slca.parameters(model)
    assert backbone["lr"] == pytest.approx(1e-4) and head["lr"] == pytest.approx(0.01)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.features.backbone.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    # the user's path: weights file -> timm: model -> slca; the backbone trains, so no feature cache
    arch = "timm:vit_tiny_patch16_224,img_size=8,patch_size=4,in_chans=1,embed_dim=16,depth=2,num_heads=2"
    save_weights(model.features.backbone, tmp_path / "tiny.safetensors", arch, (0.5,), (0.5,))
    r = retain.run(benchmark="split-digits", mode="class", arch=arch, weights=str(tmp_path / "tiny.safetensors"),
                   method="slca", epochs=1, params={"ca_epochs": 1}).to_dict()
    assert r["model"]["freeze"] == "none" and r["model"]["frozen_parameters"] == 0
    assert r["model"]["feature_cache"]["used"] is False
    assert r["model"]["trainable"] == r["model"]["parameters"]
