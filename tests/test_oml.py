"""OML (Javed & White 2019): the meta-gradient against finite differences, which data meta-trains, the frozen
representation in the online phase, and its errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import retain
from retain.errors import ConfigError
from retain.methods.oml import OML, _turned, meta_loss
from retain.models import build_model


def test_the_meta_gradient_matches_finite_differences_through_the_inner_steps():
    """d L_meta / d θ for a representation weight and for the prediction network's initial weights, where L_meta is
    the loss after three one-sample SGD steps on fast weights (second order), against central differences in
    float64."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).double()
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x_t, y_t = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 1])
    x_q, y_q = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    pln = nn.Linear(5, 3).double()
    loss = meta_loss(body, pln, {"weight": w, "bias": b}, x_t, y_t, x_q, y_q, alpha=0.5)
    gw0, gb, gw = torch.autograd.grad(loss, (body[0].weight, b, w))
    eps = 1e-6

    def at(p: torch.Tensor, idx: tuple[int, ...], h: float) -> float:
        with torch.no_grad():
            p[idx] += h
        v = meta_loss(body, pln, {"weight": w, "bias": b}, x_t, y_t, x_q, y_q, alpha=0.5).item()
        with torch.no_grad():
            p[idx] -= h
        return v

    for p, g in ((body[0].weight, gw0), (b, gb), (w, gw)):
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            numeric = (at(p, idx, eps) - at(p, idx, -eps)) / (2 * eps)
            assert g[idx].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    # the second-order terms matter: a first-order meta-gradient (inner gradients detached) differs
    fw, fb = w, b
    for i in range(3):
        step = torch.nn.functional.cross_entropy(torch.nn.functional.linear(body(x_t[i:i + 1]), fw, fb), y_t[i:i + 1])
        g1, g2 = torch.autograd.grad(step, (fw, fb))
        fw, fb = fw - 0.5 * g1.detach(), fb - 0.5 * g2.detach()
    first = torch.nn.functional.cross_entropy(torch.nn.functional.linear(body(x_q), fw, fb), y_q)
    (gw0_first,) = torch.autograd.grad(first, (body[0].weight,))
    assert not torch.allclose(gw0_first, gw0)


def _digits(**kw):
    return {"benchmark": "split-digits", "mode": "class", "class_order": [5, 6, 7, 8, 9], "n_tasks": 5,
            "hidden": (32,), "threads": 1, **kw}


def test_meta_trains_on_the_classes_no_task_uses_then_freezes_the_representation():
    m = OML(meta_steps=20, trajectory=4, random_samples=6, class_samples=2)
    r = retain.run(method=m, online=True, all_outputs=True, **_digits())
    assert m.meta_classes == [0, 1, 2, 3, 4]  # what meta-trained, and the record says so
    assert any("meta-trained 20 steps on the dataset's classes [0, 1, 2, 3, 4]" in w for w in r.warnings)
    assert len(m.meta_curve) == 1


def test_the_online_phase_trains_only_the_prediction_network():
    """MLP 64-32-32-5 with the authors' two-layer PLN: the first hidden layer is the representation (frozen after
    meta-training), the second and the head the prediction network (trained)."""
    seen = {}

    class Watch(OML):
        def end_task(self, ctx):
            rln = list(ctx.model.features[:-2].parameters())
            pln = [*ctx.model.features[-2:].parameters(), *ctx.model.head.parameters()]
            for key, ps in (("rln", rln), ("pln", pln)):
                seen.setdefault(key, [p.detach().clone() for p in ps])
                seen["last_" + key] = [p.detach().clone() for p in ps]

    m = Watch(meta_steps=5, trajectory=3, random_samples=4, pln_layers=2)
    retain.run(method=m, epochs=1, batch_size=5, **_digits(hidden=(32, 32)))
    assert len(seen["rln"]) == 2 and len(seen["pln"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen["rln"], seen["last_rln"]))  # frozen after meta-training
    assert not any(torch.equal(a, b) for a, b in zip(seen["pln"], seen["last_pln"]))  # the PLN learns


def test_the_meta_loss_is_the_same_one_sample_at_a_time_and_batched():
    """Without batch norm the features are computed in one pass: the loss and its gradients equal those of the
    inner steps' definition (each trajectory sample's features on their own), written out here; with batch norm in
    the body the one-sample-at-a-time path is taken."""
    torch.manual_seed(0)
    net = build_model("convnet", (1, 19, 19), 3).double()
    x_t, y_t = torch.randn(3, 1, 19, 19, dtype=torch.float64), torch.tensor([2, 2, 2])
    x_q, y_q = torch.randn(4, 1, 19, 19, dtype=torch.float64), torch.tensor([0, 1, 2, 2])
    params = dict(net.head.named_parameters())
    loss = meta_loss(net.features, net.head, params, x_t, y_t, x_q, y_q, alpha=0.3)
    w, b = params["weight"], params["bias"]
    for i in range(3):
        step = torch.nn.functional.cross_entropy(torch.nn.functional.linear(net.features(x_t[i:i + 1]), w, b),
                                                 y_t[i:i + 1])
        gw, gb = torch.autograd.grad(step, (w, b), create_graph=True)
        w, b = w - 0.3 * gw, b - 0.3 * gb
    by_hand = torch.nn.functional.cross_entropy(torch.nn.functional.linear(net.features(x_q), w, b), y_q)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-12)
    conv = net.features[0].weight
    assert torch.allclose(torch.autograd.grad(loss, conv)[0], torch.autograd.grad(by_hand, conv)[0], rtol=1e-10)
    # a body with batch norm: in training mode a one-row batch is normalised on its own (batched, it would not be)
    bn = nn.Sequential(nn.Flatten(), nn.Linear(19 * 19, 6), nn.BatchNorm1d(6, affine=False), nn.ReLU()).double()
    head = nn.Linear(6, 3).double()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        meta_loss(bn, head, dict(head.named_parameters()), x_t, y_t, x_q, y_q, alpha=0.3)


def test_a_run_that_uses_every_class_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="--class-order 5,6,7,8,9"):
        retain.run(benchmark="split-digits", mode="class", method="oml", hidden=(16,), epochs=1, threads=1)
    with pytest.raises(ConfigError, match="meta_steps must be >= 0"):
        OML(meta_steps=-1)


def test_meta_steps_zero_freezes_the_initial_representation():
    """The ablation: no meta-training (so no held-out classes needed), the model's initial features frozen for the
    whole run, the output layer re-drawn and trained; the record says so."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, (16,))
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    r = retain.run(benchmark="split-digits", mode="class", model=model, method=OML(meta_steps=0), epochs=1,
                   batch_size=10, lr=0.01, threads=1)
    assert all(torch.equal(before[k], v) for k, v in model.features.state_dict().items())
    assert not any(p.requires_grad for p in model.features.parameters())
    assert not torch.equal(head_before, model.head.weight)
    assert any("meta_steps=0, no meta-training" in w for w in r.warnings)


def test_the_online_phase_steps_the_runs_optimizer_once_per_sample_from_a_reset_head():
    """Phase 2 as the authors' evaluation: the output layer re-drawn (zero bias), then one step of the run's optimizer
    (here SGD 0.1) per sample in stream order, on the frozen features: replayed by hand on the first batch."""
    seen = {}

    class Watch(OML):
        def observe(self, ctx, batch):
            if "head" not in seen and self.meta_classes is not None:
                h = ctx.model.head
                seen.update(head=(h.weight.detach().clone(), h.bias.detach().clone()), batch=batch,
                            f=ctx.model.features(batch.x).detach())
                out = super().observe(ctx, batch)
                seen["after"] = (h.weight.detach().clone(), h.bias.detach().clone())
                return out
            return super().observe(ctx, batch)

    m = Watch(meta_steps=5, trajectory=3, random_samples=4)
    retain.run(method=m, epochs=1, batch_size=4, optimizer="sgd", lr=0.1, momentum=0.0, all_outputs=True, **_digits())
    w, b = seen["head"]
    assert torch.count_nonzero(b) == 0  # reset: zero bias (and a fresh Kaiming-normal weight)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    for i in range(len(seen["batch"])):  # one SGD step per row, in order
        loss = torch.nn.functional.cross_entropy(seen["f"][i:i + 1] @ w.T + b, seen["batch"].y[i:i + 1])
        gw, gb = torch.autograd.grad(loss, (w, b))
        w, b = (w - 0.1 * gw).detach().requires_grad_(), (b - 0.1 * gb).detach().requires_grad_()
    assert torch.allclose(seen["after"][0], w, atol=1e-6) and torch.allclose(seen["after"][1], b, atol=1e-6)


def test_rotations_turn_each_held_out_class_into_four_classes():
    x = torch.arange(8.0).reshape(2, 1, 2, 2)
    turned = _turned(x, [0, 1])
    assert torch.equal(turned[0], x[0]) and torch.equal(turned[1], torch.rot90(x[1], 1, dims=(-2, -1)))
    assert torch.equal(turned[1, 0], torch.tensor([[5.0, 7.0], [4.0, 6.0]]))  # a quarter-turn, counter-clockwise
    m = OML(meta_steps=10, trajectory=3, random_samples=4, rotations=4)
    r = retain.run(method=m, epochs=1, batch_size=5, **_digits())
    assert any("[0, 1, 2, 3, 4], each in 4 quarter-turns" in w for w in r.warnings)
    # the first meta-loss, of a fresh head: near ln 20 over the 5 x 4 turned classes, near ln 5 without turns
    assert m.meta_curve[0] > math.log(12)
    plain = OML(meta_steps=10, trajectory=3, random_samples=4)
    retain.run(method=plain, epochs=1, batch_size=5, **_digits())
    assert plain.meta_curve[0] < math.log(12)
    with pytest.raises(ConfigError, match="rotations must be 1, 2 or 4"):
        OML(rotations=3)


def test_rotations_of_flat_inputs_are_refused_with_the_fix():
    from retain import scenarios
    from retain.data import make_synthetic

    sc = scenarios.split(make_synthetic(n_classes=6, n_train=16, n_test=8, dim=8), "class", n_tasks=2,
                         class_order=[2, 3, 4, 5])
    with pytest.raises(ConfigError, match="turns square images.*shape \\[8\\]; use rotations=1"):
        retain.run(scenario=sc, method=OML(meta_steps=2, rotations=4), epochs=1, threads=1)
