"""Regularisation methods (issue 3): EWC / online EWC, SI, MAS, LwF and the shared maths in retain.ops.

Hand-computed cases for the maths (seconds), then behaviour on split-digits task-IL.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import retain
from retain.errors import ConfigError
from retain.method import Compose, Method, create
from retain.methods.ewc import EWC, OnlineEWC
from retain.methods.lwf import LwF, distillation
from retain.methods.mas import MAS
from retain.methods.si import SI
from retain.ops import fisher_diagonal, output_sensitivity, per_sample_grad_stat, quadratic_penalty, snapshot
from retain.scenarios import from_tensors
from retain.trainer import Context, TrainConfig


def toy_context(model: nn.Module, method, mode: str = "task", n: int = 200, seed: int = 0) -> Context:
    """A real Context over a 2-task, 4-class float-feature scenario (task 0 = classes {0, 1})."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    sc = from_tensors(x, y, x[:20], y[:20], mode=mode, name="toy", n_tasks=2)
    seen = sc.task_out[0].clone() if mode == "class" else torch.zeros(sc.n_outputs, dtype=torch.bool)
    return Context(model, sc.train_view(), TrainConfig(), method, torch.device("cpu"),
                   torch.Generator().manual_seed(seed + 1), seen)


def val(t: torch.Tensor) -> float:
    return float(t.detach())


def stub(model: nn.Module, mode: str = "task") -> SimpleNamespace:
    warnings: list[str] = []
    return SimpleNamespace(model=model, scenario=SimpleNamespace(mode=mode), warn=warnings.append, warnings=warnings)


# ------------------------------------------------------------------------------------------------------------ EWC

def test_ewc_penalty_zero_at_anchor_and_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ewc = EWC(lambda_=4.0)
    ctx = stub(model)
    assert ewc.penalty(ctx, None, None) is None  # nothing consolidated yet
    F1 = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    ewc.penalties = [(F1, snapshot(model))]
    assert val(ewc.penalty(ctx, None, None)) == pytest.approx(0.0, abs=1e-12)

    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p += delta[n]
    expected = 0.5 * 4.0 * sum(float((F1[n] * delta[n] ** 2).sum()) for n in F1)
    assert val(ewc.penalty(ctx, None, None)) == pytest.approx(expected, rel=1e-5)

    # separate penalties per task: each task's Fisher only against its own anchor (seed defect 2)
    F2 = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    anchor2 = {n: p.detach() - 1.0 for n, p in model.named_parameters()}
    ewc.penalties.append((F2, anchor2))
    expected += 0.5 * 4.0 * sum(float(F2[n].sum()) for n in F2)  # (θ − θ*_2)² = 1 everywhere
    assert val(ewc.penalty(ctx, None, None)) == pytest.approx(expected, rel=1e-5)


def test_ewc_separate_penalties_are_summed_exactly_at_the_cost_of_one():
    """The combined form A (θ − m)² + c equals the sum of the per-task penalties, value and gradient."""
    torch.manual_seed(1)
    model = nn.Linear(5, 3)
    ewc = EWC(lambda_=3.0)
    ctx = stub(model)
    for _ in range(4):
        F = {n: torch.rand_like(p) * (torch.rand_like(p) > 0.3) for n, p in model.named_parameters()}  # some 0
        ewc.penalties.append((F, {n: p.detach() + torch.randn_like(p) for n, p in model.named_parameters()}))
    combined = ewc.penalty(ctx, None, None)
    (g_combined,) = torch.autograd.grad(combined, model.weight)
    params = dict(model.named_parameters())
    separate = 1.5 * sum(quadratic_penalty(params, f, a) for f, a in ewc.penalties)
    (g_separate,) = torch.autograd.grad(separate, model.weight)
    assert val(combined) == pytest.approx(val(separate), rel=1e-5)
    assert torch.allclose(g_combined, g_separate, rtol=1e-5, atol=1e-6)


def test_ewc_consolidation_separate_vs_online():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    ewc = EWC(lambda_=1.0, fisher="empirical")
    online = EWC(lambda_=1.0, fisher="empirical", online=True, gamma=0.5)
    ctx = toy_context(model, ewc)
    ewc.end_task(ctx)
    online.end_task(ctx)
    f0 = {n: v.clone() for n, v in ewc.penalties[0][0].items()}
    with torch.no_grad():
        model.weight += 0.3
    ctx.task = 1
    ewc.end_task(ctx)
    online.end_task(ctx)
    f1 = ewc.penalties[1][0]
    assert len(ewc.penalties) == 2 and len(online.penalties) == 1  # online: one Fisher, one anchor
    for n in f0:
        assert torch.allclose(online.penalties[0][0][n], 0.5 * f0[n] + f1[n])
        assert torch.equal(online.penalties[0][1][n], dict(model.named_parameters())[n].detach())
    assert OnlineEWC().online and create("online_ewc").online and not create("ewc").online


def logistic_fisher(model: nn.Linear, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Analytic diagonal Fisher of softmax regression: ∂ log p(y|x) / ∂W_k = (1[y=k] − p_k) x.

    With y the true label (empirical) or, in expectation over y ~ p (true Fisher), E(1[y=k] − p_k)² = p_k(1 − p_k).
    """
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        if y is None:
            r2 = p * (1 - p)
        else:
            r2 = (F.one_hot(y, p.shape[1]).float() - p) ** 2
        return {"weight": (r2.T @ x**2) / len(x), "bias": r2.mean(0)}


def test_fisher_of_logistic_regression_matches_analytic():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4000, 3)
    y = torch.randint(0, 2, (4000,))
    t = torch.zeros(4000, dtype=torch.long)
    batches = [(x[i:i + 500], t[i:i + 500], y[i:i + 500], None) for i in range(0, 4000, 500)]

    def fisher(labels, gen=None, rows=batches):
        return fisher_diagonal(model, rows, labels, gen)

    emp = fisher("empirical")
    want = logistic_fisher(model, x, y)
    for n in want:
        assert torch.allclose(emp[n], want[n], rtol=1e-4, atol=1e-7)

    # true Fisher: exactly the empirical formula at the labels drawn from the model ...
    true = fisher("true", torch.Generator().manual_seed(7))
    from retain.ops import sample_predictive
    g = torch.Generator().manual_seed(7)
    drawn = torch.cat([sample_predictive(model(b[0]).detach(), None, g) for b in batches])
    at_drawn = logistic_fisher(model, x, drawn)
    for n in want:
        assert torch.allclose(true[n], at_drawn[n], rtol=1e-4, atol=1e-7)
    # ... and, in expectation, p(1 − p) x² (Monte-Carlo error over 4000 samples ~ 2-3 %)
    expected = logistic_fisher(model, x, None)
    for n in want:
        assert torch.allclose(true[n], expected[n], rtol=0.08)
    # not the squared batch-mean gradient (seed defect 2): that is far smaller
    loss = F.cross_entropy(model(x), y)
    gw = torch.autograd.grad(loss, model.weight)[0]
    assert float(emp["weight"].sum()) > 10 * float((gw**2).sum())


@pytest.mark.parametrize("labels", ["true", "empirical", "predicted"])
@pytest.mark.parametrize("body", ["linear", "layernorm"])
def test_fisher_diagonal_equals_a_per_sample_loop_with_the_same_labels(labels, body):
    """fisher_diagonal itself, on the linear engine (only nn.Linear parameters) and on the vmap engine (a LayerNorm
    makes ``auto`` fall back to it), against one backward per sample, with the labels drawn here by hand from the
    model's softmax over the active outputs with the same generator, and one batch with masked outputs."""
    torch.manual_seed(0)
    mid = nn.Tanh() if body == "linear" else nn.LayerNorm(6)
    model = nn.Sequential(nn.Linear(5, 6), mid, nn.Linear(6, 4))
    x = torch.randn(30, 5)
    t = torch.zeros(30, dtype=torch.long)
    y = torch.randint(0, 2, (30,))
    head = torch.tensor([True, True, False, False])
    batches = [(x[:12], t[:12], y[:12], head), (x[12:], t[12:], y[12:], None)]
    got = fisher_diagonal(model, batches, labels, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xb, _, yb, mask in batches:
        with torch.no_grad():
            logits = model(xb)
        active = logits if mask is None else logits.masked_fill(~mask, float("-inf"))
        if labels == "true":
            yb = torch.multinomial(torch.softmax(active, 1), 1, generator=g).squeeze(1)
        elif labels == "predicted":
            yb = active.argmax(1)
        for i in range(len(xb)):
            out = model(xb[i:i + 1])[0]
            out = out if mask is None else out.masked_fill(~mask, float("-inf"))
            grads = torch.autograd.grad(-torch.log_softmax(out, 0)[yb[i]], list(model.parameters()))
            for (n, _), gr in zip(model.named_parameters(), grads):
                want[n] += gr ** 2 / len(x)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7), (labels, body, n)


def test_predicted_label_fisher_is_the_empirical_formula_at_the_argmax():
    """fisher=predicted (van de Ven's code): the squared gradients at the model's most likely class."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(1000, 3)
    t = torch.zeros(1000, dtype=torch.long)
    batches = [(x[i:i + 250], t[i:i + 250], torch.zeros(250, dtype=torch.long), None) for i in range(0, 1000, 250)]
    got = fisher_diagonal(model, batches, "predicted")
    want = logistic_fisher(model, x, model(x).detach().argmax(1))
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7)


def test_fisher_uses_only_active_outputs():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x = torch.randn(300, 3)
    t = torch.zeros(300, dtype=torch.long)
    mask = torch.tensor([True, True, False, False])
    f = fisher_diagonal(model, [(x, t, torch.zeros(300, dtype=torch.long), mask)], "true",
                        torch.Generator().manual_seed(0))
    assert torch.all(f["weight"][2:] == 0) and torch.all(f["bias"][2:] == 0)
    assert torch.all(f["weight"][:2] > 0)


def test_engines_agree_with_a_per_sample_loop():
    """Both engines equal the naive one-backward-per-sample computation, square and abs, on a deep model;
    a model with non-Linear parameters (LayerNorm) falls back to vmap under engine='auto'."""
    torch.manual_seed(0)
    x = torch.randn(40, 5)
    t = torch.zeros(40, dtype=torch.long)
    y = torch.randint(0, 3, (40,))

    def loss(out, y):
        return F.cross_entropy(out[None], y[None])

    for model, engines in ((nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), ("vmap", "linear", "auto")),
                           (nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)), ("vmap", "auto"))):
        for stat, fn in (("square", torch.square), ("abs", torch.abs)):
            want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
            for i in range(40):
                grads = torch.autograd.grad(loss(model(x[i:i + 1])[0], y[i]), list(model.parameters()))
                for (n, _), g in zip(model.named_parameters(), grads):
                    want[n] += fn(g) / 40
            for engine in engines:
                got = per_sample_grad_stat(model, loss, [(x[:25], t[:25], y[:25]), (x[25:], t[25:], y[25:])],
                                           stat, engine=engine)
                for n in want:
                    assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6), (engine, stat, n)


# ------------------------------------------------------------------------------------------------------------- SI

@pytest.mark.parametrize("gradient", ["task", "total"])
def test_si_omega_is_the_path_integral_of_the_task_loss(gradient):
    """Quadratic loss L(θ) = ½ Σ a (θ − target)², plain SGD: ω must be Σ_steps −g · Δθ with the *step's own* Δθ
    (seed defect 3) and g the task-loss gradient (without SI's surrogate; with it for gradient=total)."""
    torch.manual_seed(0)
    a = torch.tensor([1.0, 3.0, 0.5])
    lr, c, xi = 0.1, 0.7, 0.1

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    model = Quad()
    si = SI(c=c, xi=xi, gradient=gradient)
    ctx = stub(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def train(target, steps):
        si.begin_task(ctx)
        for _ in range(steps):
            loss = 0.5 * (a * (model.theta - target) ** 2).sum()
            extra = si.penalty(ctx, None, None)
            if extra is not None:
                loss = loss + extra
            opt.zero_grad()
            loss.backward()
            si.before_update(ctx)
            opt.step()
            si.after_update(ctx, None, None)

    # task 1 by hand
    target1, target2 = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([-1.0, 2.0, 0.0])
    th = model.theta.detach().clone()
    start = th.clone()
    omega1 = torch.zeros(3)
    for _ in range(5):
        g = a * (th - target1)
        new = th - lr * g
        omega1 += -g * (new - th)
        th = new
    train(target1, 5)
    assert torch.allclose(si.w["theta"], omega1, rtol=1e-5)
    si.end_task(ctx)
    Omega = omega1 / ((th - start) ** 2 + xi)
    assert torch.allclose(si.omega["theta"], Omega, rtol=1e-5)
    anchor = th.clone()

    # task 2: the step includes the surrogate's pull, the path integral only the task loss's gradient
    omega2 = torch.zeros(3)
    start = th.clone()
    for _ in range(4):
        g_task = a * (th - target2)
        g_total = g_task + 2 * c * Omega * (th - anchor)
        new = th - lr * g_total
        omega2 += -(g_task if gradient == "task" else g_total) * (new - th)
        th = new
    train(target2, 4)
    assert torch.allclose(model.theta.detach(), th, rtol=1e-5)
    assert torch.allclose(si.w["theta"], omega2, rtol=1e-5)
    si.end_task(ctx)
    assert torch.allclose(si.omega["theta"], Omega + omega2 / ((th - start) ** 2 + xi), rtol=1e-5)
    assert val(si.penalty(ctx, None, None)) == pytest.approx(0.0, abs=1e-10)  # at the new anchor


# ------------------------------------------------------------------------------------------------------------ MAS

def test_mas_importance_of_a_linear_model_matches_analytic():
    """f(x) = Wx + b, ‖f‖² = Σ_k f_k²: ∂/∂W_kj = 2 f_k x_j, ∂/∂b_k = 2 f_k; Ω = mean over samples of |·|
    over the task's active outputs (task-IL: its head)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    mas = MAS(lambda_=2.0)
    ctx = toy_context(model, mas, "task")
    mas.end_task(ctx)
    data = ctx.scenario.task_data(0)
    x = ctx.scenario.batch(data.idx, 0).x
    with torch.no_grad():
        f = model(x) * ctx.scenario.task_out[0]  # head 0 only
    want_w = (2 * f[:, :, None] * x[:, None, :]).abs().mean(0)
    want_b = (2 * f).abs().mean(0)
    assert torch.allclose(mas.omega["weight"], want_w, rtol=1e-5, atol=1e-7)
    assert torch.allclose(mas.omega["bias"], want_b, rtol=1e-5, atol=1e-7)
    assert torch.all(mas.omega["weight"][2:] == 0)  # other heads
    # per-sample absolute value, not the absolute value of the mean gradient
    assert float((2 * f[:, :, None] * x[:, None, :]).mean(0).abs().sum()) < 0.8 * float(want_w.sum())

    # accumulated over tasks by summation; penalty λ Σ Ω (θ − θ*)²
    ctx.task = 1
    mas.end_task(ctx)
    x1 = ctx.scenario.batch(ctx.scenario.task_data(1).idx, 1).x
    with torch.no_grad():
        f1 = model(x1) * ctx.scenario.task_out[1]
    assert torch.allclose(mas.omega["weight"], want_w + (2 * f1[:, :, None] * x1[:, None, :]).abs().mean(0),
                          rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        model.bias += 0.5
    assert val(mas.penalty(ctx, None, None)) == pytest.approx(2.0 * 0.25 * float(mas.omega["bias"].sum()),
                                                                rel=1e-5)


def test_output_sensitivity_domain_uses_every_output():
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    x = torch.randn(50, 3)
    om = output_sensitivity(model, [(x, torch.zeros(50, dtype=torch.long), None)])
    with torch.no_grad():
        f = model(x)
    assert torch.allclose(om["weight"], (2 * f[:, :, None] * x[:, None, :]).abs().mean(0), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------ LwF

@pytest.mark.parametrize("mode", ["task", "domain", "class"])
def test_lwf_loss_zero_when_model_equals_old_model(mode):
    torch.manual_seed(0)
    model = nn.Linear(4, 4 if mode != "domain" else 2)
    lwf = LwF(alpha=1.0, temperature=2.0)
    ctx = toy_context(model, lwf, mode)
    lwf.begin_task(ctx)
    assert lwf.old is None  # nothing to distil on the first task
    ctx.task = 1
    lwf.begin_task(ctx)
    batch = ctx.scenario.batch(ctx.scenario.task_data(1).idx[:32], 1)
    assert val(lwf.penalty(ctx, batch, model(batch.x))) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.weight += 0.5 * torch.randn_like(model.weight)
    assert val(lwf.penalty(ctx, batch, model(batch.x))) > 1e-3


def test_lwf_distils_the_old_outputs_per_mode():
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    old_out = torch.randn(16, 4)
    new_out = torch.randn(16, 4, requires_grad=True)
    for mode in ("task", "class"):
        model = nn.Linear(4, 4)
        lwf = LwF(alpha=0.5, temperature=3.0)
        ctx = toy_context(model, lwf, mode)
        ctx.task = 1
        lwf.begin_task(ctx)
        lwf.old = lambda _x: old_out  # a frozen "previous model" with known outputs
        batch = SimpleNamespace(x=x)
        got = lwf.penalty(ctx, batch, new_out)
        head0 = ctx.scenario.task_out[0]
        q = F.softmax(old_out[:, head0] / 3.0, 1)
        want = 0.5 * (q * (q.log() - F.log_softmax(new_out[:, head0] / 3.0, 1))).sum(1).mean()
        assert val(got) == pytest.approx(val(want), rel=1e-5)
        (g,) = torch.autograd.grad(got, new_out)
        assert torch.all(g[:, ~head0] == 0)  # the new task's outputs are not distilled
    assert float(distillation(old_out, old_out, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_lwf_task_il_distils_every_old_head_with_its_own_softmax():
    """At task 2 of 3 (task-IL) the penalty is α Σ_{h ∈ {0, 1}} KL(q_h ‖ p_h), one softmax per old head, and
    the current head gets no gradient."""
    torch.manual_seed(0)
    x = torch.randn(120, 4)
    y = torch.arange(120) % 6
    sc = from_tensors(x, y, x[:12], y[:12], mode="task", name="toy3", n_tasks=3)
    model = nn.Linear(4, sc.n_outputs)
    lwf = LwF(alpha=0.5, temperature=2.0)
    ctx = Context(model, sc.train_view(), TrainConfig(), lwf, torch.device("cpu"), torch.Generator().manual_seed(0),
                  torch.zeros(sc.n_outputs, dtype=torch.bool))
    ctx.task = 2
    lwf.begin_task(ctx)
    assert lwf.old_tasks == [0, 1]
    old_out = torch.randn(16, sc.n_outputs)
    new_out = torch.randn(16, sc.n_outputs, requires_grad=True)
    lwf.old = lambda _x: old_out
    got = lwf.penalty(ctx, SimpleNamespace(x=x[:16]), new_out)
    want = 0
    for h in (0, 1):
        head = sc.task_out[h]
        q = F.softmax(old_out[:, head] / 2.0, 1)
        want = want + (q * (q.log() - F.log_softmax(new_out[:, head] / 2.0, 1))).sum(1).mean()
    assert val(got) == pytest.approx(0.5 * val(want), rel=1e-5)
    both = sc.task_out[0] | sc.task_out[1]  # one softmax over both heads is another number
    q = F.softmax(old_out[:, both] / 2.0, 1)
    joint = (q * (q.log() - F.log_softmax(new_out[:, both] / 2.0, 1))).sum(1).mean()
    assert abs(val(got) - 0.5 * val(joint)) > 1e-3
    (g,) = torch.autograd.grad(got, new_out)
    assert torch.all(g[:, sc.task_out[2]] == 0) and torch.all(g[:, both].abs().sum(0) > 0)


def test_lwf_seen_class_targets_pad_the_new_classes_with_zero():
    """class_targets=seen (van de Ven's class-IL LwF): softmax over old + new classes, new classes' targets 0."""
    torch.manual_seed(0)
    old_out = torch.randn(16, 4)
    new_out = torch.randn(16, 4, requires_grad=True)
    model = nn.Linear(4, 4)
    lwf = LwF(alpha=0.5, temperature=3.0, class_targets="seen")
    ctx = toy_context(model, lwf, "class")
    ctx.task = 1
    lwf.begin_task(ctx)
    lwf.old = lambda _x: old_out
    got = lwf.penalty(ctx, SimpleNamespace(x=old_out), new_out)
    head0, head1 = ctx.scenario.task_out[0], ctx.scenario.task_out[1]
    q = F.softmax(old_out[:, head0] / 3.0, 1)
    both = torch.cat([new_out[:, head0], new_out[:, head1]], 1)
    log_p = F.log_softmax(both / 3.0, 1)[:, :int(head0.sum())]  # the student's softmax runs over all four classes
    want = 0.5 * (q * (q.log() - log_p)).sum(1).mean()
    assert val(got) == pytest.approx(val(want), rel=1e-5)
    (g,) = torch.autograd.grad(got, new_out)
    assert torch.all(g[:, head1] > 0)  # a descent step lowers the new classes' logits on the current inputs
    # not 0 at the old model, unlike class_targets=old: the new classes still take probability mass
    assert val(lwf.penalty(ctx, SimpleNamespace(x=old_out), old_out)) > 1e-3


# ------------------------------------------------------------------------------------------------ behaviour, config

@pytest.fixture(scope="module")
def finetune_digits():
    return retain.run(benchmark="split-digits", mode="task", method="finetune")


@pytest.mark.parametrize("method", ["ewc", "online_ewc", "si", "mas", "lwf"])
def test_each_method_forgets_less_than_finetuning_on_split_digits(method, finetune_digits):
    ft = finetune_digits.metrics
    got = retain.run(benchmark="split-digits", mode="task", method=method).metrics
    assert got["acc"] > ft["acc"]
    assert abs(got["bwt"]) < abs(ft["bwt"])


def test_class_il_warns_once():
    r = retain.run(benchmark="split-digits", mode="class", method="si", iterations=3)
    assert len([w for w in r.warnings if "class-IL" in w]) == 1
    r = retain.run(benchmark="split-digits", mode="task", method="si", iterations=3)
    assert not [w for w in r.warnings if "class-IL" in w]
    # inside a hybrid (e.g. EWC + replay) the warning would be wrong: only a method running alone warns
    for cls in (EWC, SI, MAS, LwF):
        part = cls()
        ctx = stub(nn.Linear(2, 2), "class")
        ctx.task = 0
        ctx.method = Compose(Method(), part)
        part.begin_task(ctx)
        assert not ctx.warnings
        ctx.method = part
        part.begin_task(ctx)
        assert len(ctx.warnings) == 1


@pytest.mark.parametrize("name,params", [
    ("ewc", {"lambda": -1}), ("ewc", {"gamma": 1.5}), ("ewc", {"fisher": "bogus"}), ("ewc", {"fisher_samples": 0}),
    ("online_ewc", {"lambda": float("inf")}), ("si", {"c": -1}), ("si", {"xi": 0}), ("mas", {"lambda": -0.1}),
    ("lwf", {"alpha": -1}), ("lwf", {"temperature": 0}), ("lwf", {"class_targets": "all"}),
])
def test_bad_params_raise_config_error(name, params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        create(name, params)


def test_bad_params_direct_construction():
    with pytest.raises(ConfigError, match="lambda"):
        EWC(lambda_=-1.0)
    with pytest.raises(ConfigError, match="xi"):
        SI(xi=-1.0)


def test_presets_cover_the_protocols():
    for name in ("ewc", "online_ewc", "si", "mas", "lwf"):
        cls = retain.method.methods()[name]
        for key in ("split-mnist/task", "split-mnist/domain", "split-mnist/class", "permuted-mnist/domain",
                    "split-digits/task"):
            assert key in cls.presets, (name, key)
            create(name, preset=key)  # every preset is valid


def _aten_ops(fn) -> int:
    """How many ATen operators ``fn`` dispatches (a cost that does not depend on the machine's speed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_online_penalty_cost_does_not_grow_with_tasks():
    """Online EWC keeps one Fisher and one anchor whatever the number of tasks (2 parameter-sized tensors per
    parameter), and its penalty dispatches the same operators after 1 and after 6 tasks; separate EWC stores a
    pair per task."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    n_params = len(list(model.parameters()))
    online, separate = create("online_ewc", {"fisher_samples": 20}), create("ewc", {"fisher_samples": 20})
    stored = lambda m: sum(len(f) + len(a) for f, a in m.penalties)  # noqa: E731 - parameter-sized tensors held
    costs = []
    for task in range(6):
        for method in (online, separate):
            ctx = toy_context(model, method)
            ctx.task = task % 2
            method.end_task(ctx)
        with torch.no_grad():
            model.weight += 0.1  # the next task moves the weights
        assert stored(online) == 2 * n_params and stored(separate) == 2 * n_params * (task + 1)
        costs.append(_aten_ops(lambda ctx=ctx: online.penalty(ctx, None, None)))
    assert costs[0] == costs[-1], costs
    assert float(online.penalty(ctx, None, None).detach()) > 0


def test_state_survives_copy():
    m = MAS()
    m.omega = {"w": torch.ones(2)}
    other = MAS()
    other.load_state_dict(copy.deepcopy(m.state_dict()))
    assert torch.equal(other.omega["w"], torch.ones(2))
