"""OML: a representation meta-learnt so that online updates of a prediction network on top of it do not interfere."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.scenarios import Batch


def meta_loss(body: nn.Module, pln: nn.Module, params: dict[str, Tensor], x_traj: Tensor, y_traj: Tensor,
              x_meta: Tensor, y_meta: Tensor, alpha: float) -> Tensor:
    """The OML meta-objective of one trajectory: the prediction network ``pln`` (run with ``params``, on ``body``'s
    features) takes one SGD step of size ``alpha`` per trajectory sample, in order, on fast weights; the loss is the
    cross-entropy of the last fast weights on the meta batch. Differentiable in ``body``'s parameters and in the
    initial ``params`` (second order: the inner gradients are part of the graph)."""
    from torch.func import functional_call

    names = list(params)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules()):
        f_traj = [body(x_traj[i:i + 1]).flatten(1) for i in range(len(x_traj))]  # one sample at a time, as seen
        f_meta = body(x_meta).flatten(1)
    else:  # the body is not updated by the inner steps: one batched pass gives the same features, faster
        f = body(torch.cat([x_traj, x_meta])).flatten(1)
        f_traj, f_meta = f[:len(x_traj)].split(1), f[len(x_traj):]
    for i in range(len(x_traj)):
        out = functional_call(pln, params, (f_traj[i],))
        grads = torch.autograd.grad(F.cross_entropy(out, y_traj[i:i + 1]), [params[n] for n in names],
                                    create_graph=True)
        params = {n: params[n] - alpha * g for n, g in zip(names, grads)}
    return F.cross_entropy(functional_call(pln, params, (f_meta,)), y_meta)


@register("oml")
@dataclass
class OML(Method):
    """OML: meta-train the representation on held-out classes, then learn the stream on it one sample at a time.

    Javed & White, "Meta-Learning Representations for Continual Learning", NeurIPS 2019 (Algorithm 1), checked
    against the authors' code (khurramjaved96/mrcl: ``model/meta_learner.py``, ``oml_omniglot.py`` for phase 1,
    ``evaluate_omniglot.py`` for phase 2). The model is split into the representation learning network φ (the
    model's ``features``: RLN) and the prediction learning network (its ``head``: PLN).

    Phase 1, meta-training, before the first task, on the classes of the dataset that no task of the run uses (the
    stream never shows them; ``--class-order`` with fewer classes than the dataset leaves some, e.g. split-mnist
    with ``--class-order 5,6,7,8,9 --n-tasks 5`` meta-trains on digits 0-4): each of ``meta_steps`` steps samples a
    class and a trajectory of ``trajectory`` of its rows, resets that class's row of a meta-training head (Kaiming
    normal, the authors' ``reset_classifer``), takes one SGD step of size ``inner_lr`` per trajectory sample on fast
    weights of the PLN, and computes the cross-entropy of the final fast weights on a meta batch of
    ``random_samples`` rows of all meta-training classes plus ``class_samples`` more of the trajectory's class (the
    authors' ``sample_training_data``); Adam (``meta_lr``) updates φ and the PLN's initial weights through the inner
    steps (second-order), the meta-gradient clipped elementwise to ±``clip``. The record's warnings say which
    classes meta-trained.

    Phase 2, continual learning, the run's stream (the authors' evaluation): the PLN's output layer is
    re-initialised (Kaiming normal weights, zero bias: the authors' ``reset_vars``), φ is frozen (in evaluation
    mode, no gradient), and the PLN learns one sample at a time, in stream order, with the run's optimizer and
    learning rate whatever the batch size. The authors use Adam there, its learning rate the best of a sweep
    (0.03 ... 1e-5); ``retain sweep`` over ``--lr`` does the same (``benchmarks/oml_behaviour.py`` sweeps it).

    Hooks: ``begin_task`` (meta-training, at the first task; on a task-free stream at the first step instead),
    ``parameters`` (the PLN only), ``observe`` (the per-sample steps). Works task-free (``--online``): the
    boundaries are not needed.

    The PLN is the model's head and its last ``pln_layers - 1`` hidden layers (an MLP's); the representation φ the
    layers before. The paper's PLN is two fully connected layers; the authors' refactored code (2020, the one the
    repository runs) has one, the output layer, which is also the default here (it did better on split-MNIST).
    The authors' representation is convolutional (six 3x3 layers of 256 filters, no normalisation); ``--arch
    convnet`` is that layout cut to 28 x 28 digits, and on split-MNIST it is what makes OML work: an MLP's
    meta-learnt representation does not carry over to unseen digits (docs/online.md). The representation is not
    changed by the inner steps, so without batch norm the trajectory's and the meta batch's features are computed
    in one pass (the same numbers as one sample at a time); with batch norm, one sample at a time as the stream
    shows them. ``meta_steps=0`` skips meta-training and freezes the representation the model starts with (its
    initialisation, or weights it was given): the ablation that says what meta-training adds.

    Deviations and additions: the meta-training output layer is a separate linear layer over the meta-training
    classes (the authors' one output layer covers all 1,000 Omniglot classes, and the evaluation resets it anyway);
    hidden PLN layers (``pln_layers`` > 1) keep their meta-learned initialisation in phase 2 (the authors' reset
    re-draws them too: with it, a second PLN layer would be a random layer); the meta batch is drawn from the
    meta-training rows directly rather than from the authors' loaders. ``rotations`` (not in the paper, whose
    Omniglot has 963 meta-training classes) turns each held-out class into 2 or 4 classes of its images under
    quarter-turns, the usual way to multiply Omniglot's classes (Santoro et al. 2016): with split-MNIST's five
    held-out digits the representation otherwise overfits them (a linear probe of the other five digits on it does
    worse than on a random one, docs/online.md).
    """

    meta_steps: int = param(2000, "meta-training steps (the authors' Omniglot runs take 20,000+; 0: none, the "
                                  "model's initial representation frozen, an ablation)")
    meta_lr: float = param(1e-4, "Adam learning rate of the meta-update (authors' meta_lr)")
    inner_lr: float = param(0.01, "SGD step of the meta-training inner updates (authors' update_lr)")
    trajectory: int = param(10, "samples per trajectory, one inner step each (authors' update_step)")
    random_samples: int = param(15, "meta-batch rows drawn from all meta-training classes")
    class_samples: int = param(5, "meta-batch rows of the trajectory's own class, not in the trajectory (authors': 5)")
    clip: float = param(5.0, "elementwise clip of the meta-gradient (authors': 5)")
    reset: bool = param(True, "re-initialise the trajectory class's output row before each trajectory (authors')")
    rotations: int = param(1, "meta-training classes per held-out class: its images turned 0..rotations-1 "
                              "quarter-turns, each a class of its own (1: none; 4: all four)")
    pln_layers: int = param(1, "linear layers of the prediction network: the head and the last hidden layers of an "
                               "MLP (the authors' code: 1, the paper: 2); the rest is the representation")

    modes = ("task", "domain", "class")

    def __post_init__(self) -> None:
        if self.meta_steps < 0:
            raise ConfigError(f"oml: meta_steps must be >= 0 (0: the initial representation, frozen), got "
                              f"{self.meta_steps}")
        for name in ("trajectory", "random_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"oml: {name} must be at least 1, got {getattr(self, name)}")
        if self.pln_layers < 1:
            raise ConfigError(f"oml: pln_layers must be at least 1, got {self.pln_layers}")
        if self.rotations not in (1, 2, 4):
            raise ConfigError(f"oml: rotations must be 1, 2 or 4 (quarter-turns per class), got {self.rotations}")
        if self.class_samples < 0:
            raise ConfigError(f"oml: class_samples must be >= 0, got {self.class_samples}")
        for name in ("meta_lr", "inner_lr", "clip"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"oml: {name} must be a positive number, got {v}")
        self.meta_classes: list[int] | None = None  # the dataset labels meta-trained on (None: not yet)
        self.meta_curve: list[float] = []  # the meta-loss, every 100 meta-steps

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        if self.meta_classes is None:
            self.meta_train(ctx)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        if self.meta_classes is None:  # before meta-training (nothing trains yet)
            return [p for p in model.parameters() if p.requires_grad]
        return list(_parts(model, self.pln_layers)[1].parameters())

    def observe(self, ctx: Any, batch: Batch) -> Tensor:
        if self.meta_classes is None:  # a task-free stream calls no begin_task: meta-train before the first step
            self.meta_train(ctx)
        body, pln = _parts(ctx.model, self.pln_layers)
        body.eval()  # φ is frozen: no gradient, fixed normalisation statistics
        with torch.no_grad():
            f = body(batch.x).flatten(1)
        losses = []
        for i in range(len(batch)):  # one optimizer step per sample, in order (the authors' evaluation)
            row = Batch(batch.x[i:i + 1], batch.y[i:i + 1], batch.t[i:i + 1], None, batch.task)
            loss = ctx.loss(pln(f[i:i + 1]), row)
            ctx.optimizer.zero_grad(set_to_none=True)
            losses.append(ctx.backward(loss, 1))
            ctx.step_optimizer()
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------------------------- meta-training
    def meta_train(self, ctx: Any) -> None:
        sc = ctx.scenario
        used = {c for t in sc.tasks for c in t.classes}
        labels = sc.y_train.cpu()
        classes = sorted(set(torch.unique(labels).tolist()) - used)
        if len(classes) < 2 and self.meta_steps > 0:
            raise ConfigError("oml meta-trains on classes the stream does not use, and this run uses all of the "
                              "dataset's; leave some out, e.g. --class-order 5,6,7,8,9 --n-tasks 5 on split-mnist")
        body, pln = _parts(ctx.model, self.pln_layers)
        head = pln[-1]
        if not any(True for _ in body.parameters()):
            ctx.warn(f"oml: with pln_layers={self.pln_layers} every layer of this model is in the prediction network "
                     "and the representation has no parameters; meta-training then learns only the prediction "
                     "network's initialisation (add hidden layers, or lower pln_layers)")
        shape = list(sc.x_train.shape[1:])
        if self.rotations > 1 and (len(shape) < 2 or shape[-1] != shape[-2]):
            raise ConfigError(f"oml: rotations={self.rotations} turns square images, and this benchmark's inputs "
                              f"have shape {shape}; use rotations=1")
        rows = {c: (labels == c).nonzero().flatten() for c in classes}
        all_rows = torch.cat(list(rows.values())) if rows else torch.zeros(0, dtype=torch.long)  # (meta_steps=0)
        out_of = {c: i for i, c in enumerate(classes)}
        turns = self.rotations  # meta-training class (c, k): class c's images turned k quarter-turns
        n_meta = len(classes) * turns
        dev = ctx.device
        meta_head = nn.Linear(head.in_features, n_meta).to(dev)
        meta_pln = nn.Sequential(*pln[:-1], meta_head)  # the PLN's hidden layers themselves: their init carries over
        trained = [*body.parameters(), *meta_pln.parameters()]
        opt = torch.optim.Adam(trained, lr=self.meta_lr)
        g = ctx.rng
        need = self.trajectory + self.class_samples
        was = body.training
        body.train()
        for step in range(self.meta_steps):
            c = classes[int(torch.randint(len(classes), (1,), generator=g))]
            k = int(torch.randint(turns, (1,), generator=g)) if turns > 1 else 0
            label = out_of[c] * turns + k
            mine = rows[c][torch.randperm(len(rows[c]), generator=g)[:need]]
            traj, extra = mine[:self.trajectory], mine[self.trajectory:]
            rand = all_rows[torch.randint(len(all_rows), (self.random_samples,), generator=g)]
            rand_k = torch.randint(turns, (self.random_samples,), generator=g) if turns > 1 else \
                torch.zeros(self.random_samples, dtype=torch.long)
            if self.reset:
                with torch.no_grad():
                    nn.init.kaiming_normal_(meta_head.weight[label:label + 1])
            x_t = _turned(_inputs(sc, traj), [k] * len(traj)).to(dev)
            y_t = torch.full((len(traj),), label, dtype=torch.long, device=dev)
            q = torch.cat([extra, rand])
            q_k = [k] * len(extra) + rand_k.tolist()
            x_q = _turned(_inputs(sc, q), q_k).to(dev)
            y_q = torch.tensor([out_of[int(v)] * turns + kk for v, kk in zip(labels[q], q_k)], dtype=torch.long,
                               device=dev)
            loss = meta_loss(body, meta_pln, dict(meta_pln.named_parameters()), x_t, y_t, x_q, y_q, self.inner_lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in trained:
                    if p.grad is not None:
                        p.grad.clamp_(-self.clip, self.clip)
            opt.step()
            if step % 100 == 0:
                self.meta_curve.append(float(loss.detach()))
        body.train(was)
        for p in body.parameters():
            p.requires_grad_(False)
        with torch.no_grad():  # the online phase's output layer starts afresh (the authors' reset_vars)
            nn.init.kaiming_normal_(head.weight)
            if head.bias is not None:
                head.bias.zero_()
        self.meta_classes = classes
        turned = f", each in {turns} quarter-turns" if turns > 1 else ""
        if self.meta_steps == 0:
            ctx.warn("oml: meta_steps=0, no meta-training: the representation is the model's as it starts (its "
                     "initialisation, or the weights it was given), frozen")
        else:
            ctx.warn(f"oml: meta-trained {self.meta_steps} steps on the dataset's classes {classes}{turned} (no task "
                     "uses them), then froze the representation; the stream's classes were not seen in meta-training")


def _parts(model: nn.Module, pln_layers: int = 1) -> tuple[nn.Module, nn.Sequential]:
    """(representation, prediction network): the PLN is the head and the last ``pln_layers - 1`` Linear-ReLU pairs
    of ``model.features`` (an MLP's), the representation what comes before."""
    body, head = getattr(model, "features", None), getattr(model, "head", None)
    if body is None or not isinstance(head, nn.Linear):
        raise ConfigError("oml needs a model with a .features representation and a linear .head (the prediction "
                          "network); retain's mlp and resnet models have both")
    k = 2 * (pln_layers - 1)
    if k == 0:
        return body, nn.Sequential(head)
    tail = list(body)[-k:] if isinstance(body, nn.Sequential) and len(body) > k else []
    if not (len(tail) == k and all(isinstance(m, nn.Linear if i % 2 == 0 else nn.ReLU) for i, m in enumerate(tail))):
        raise ConfigError(f"oml: pln_layers={pln_layers} takes the last {pln_layers - 1} hidden layers of an MLP into "
                          "the prediction network; this model has not as many (use --hidden with more layers, or "
                          "pln_layers=1)")
    return body[:-k], nn.Sequential(*tail, head)


def _turned(x: Tensor, turns: list[int]) -> Tensor:
    """Each image of ``x`` turned its number of quarter-turns (``torch.rot90`` over the last two axes)."""
    if not any(turns):
        return x
    return torch.stack([torch.rot90(x[i], k, dims=(-2, -1)) for i, k in enumerate(turns)])


def _inputs(sc: Any, idx: Tensor) -> Tensor:
    """Training rows ``idx`` as model inputs (the scenario's scaling and normalisation; no task transform)."""
    from retain.images import DiskArray

    x = sc.x_train.gather(idx, sc.y_train.device) if isinstance(sc.x_train, DiskArray) else \
        sc.x_train[idx.to(sc.y_train.device)]
    return sc.prepare(x, 0)
