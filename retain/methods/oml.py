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


def meta_loss(body: nn.Module, w: Tensor, b: Tensor, x_traj: Tensor, y_traj: Tensor, x_meta: Tensor,
              y_meta: Tensor, alpha: float) -> Tensor:
    """The OML meta-objective of one trajectory: the prediction network (a linear layer ``w, b`` on ``body``'s
    features) takes one SGD step of size ``alpha`` per trajectory sample, in order, on fast weights; the loss is the
    cross-entropy of the last fast weights on the meta batch. Differentiable in ``body``'s parameters and in the
    initial ``w, b`` (second order: the inner gradients are part of the graph)."""
    for i in range(len(x_traj)):
        loss = F.cross_entropy(F.linear(body(x_traj[i:i + 1]).flatten(1), w, b), y_traj[i:i + 1])
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        w, b = w - alpha * gw, b - alpha * gb
    return F.cross_entropy(F.linear(body(x_meta).flatten(1), w, b), y_meta)


@register("oml")
@dataclass
class OML(Method):
    """OML: meta-train the representation on held-out classes, then learn the stream on it one sample at a time.

    Javed & White, "Meta-Learning Representations for Continual Learning", NeurIPS 2019 (Algorithm 1), checked
    against the authors' code (khurramjaved96/mrcl, ``model/meta_learner.py``, ``oml_omniglot_paper.py``). The model
    is split into the representation learning network φ (the model's ``features``: RLN) and the prediction
    learning network (its ``head``: PLN).

    Phase 1, meta-training, before the first task, on the classes of the dataset that no task of the run uses (the
    stream never shows them; ``--class-order`` with fewer classes than the dataset leaves some, e.g. split-mnist
    with ``--class-order 5,6,7,8,9 --n-tasks 5`` meta-trains on digits 0-4): each of ``meta_steps`` steps samples a
    class and a trajectory of ``trajectory`` of its rows, resets that class's row of a meta-training head (Kaiming
    normal, the authors' ``reset``), takes one SGD step of size ``inner_lr`` per trajectory sample on fast weights of
    the head, and computes the cross-entropy of the final fast weights on a meta batch of ``random_samples`` rows
    of all meta-training classes plus ``class_samples`` more of the trajectory's class; Adam (``meta_lr``) updates φ
    and the head's initial weights through the inner steps (second-order), the meta-gradient clipped elementwise to
    ±``clip`` (the authors' ``clip_grad_params``). The record's warnings say which classes meta-trained.

    Phase 2, continual learning, the run's stream: φ is frozen (in evaluation mode, no gradient), and the PLN learns
    one sample at a time with plain SGD of step ``inner_lr`` (the inner loop's own rule), whatever the batch size.

    Hooks: ``begin_task`` (meta-training, at the first task; on a task-free stream at the first step instead),
    ``parameters`` (the PLN only), ``observe`` (the per-sample steps). Works task-free (``--online``): the
    boundaries are not needed.

    Deviations: the PLN is the model's last linear layer (the authors' Omniglot PLN is its last two fully
    connected layers; retain's models end in one), and the meta-training head is a separate linear layer over
    the meta-training classes (the authors' one output layer covers all 1,000 Omniglot classes; only φ carries over
    to phase 2 either way, their evaluation re-initialises the output layer too). The meta batch is drawn from the
    meta-training rows directly rather than from the authors' loaders.
    """

    meta_steps: int = param(2000, "meta-training steps (the authors' Omniglot runs take 20,000+)")
    meta_lr: float = param(1e-4, "Adam learning rate of the meta-update (authors' meta_lr)")
    inner_lr: float = param(0.01, "SGD step of the inner updates and of the online phase (authors' update_lr)")
    trajectory: int = param(10, "samples per trajectory, one inner step each (authors' update_step)")
    random_samples: int = param(15, "meta-batch rows drawn from all meta-training classes")
    class_samples: int = param(5, "meta-batch rows of the trajectory's own class, not in the trajectory (authors': 5)")
    clip: float = param(5.0, "elementwise clip of the meta-gradient (authors': 5)")
    reset: bool = param(True, "re-initialise the trajectory class's output row before each trajectory (authors')")

    modes = ("task", "domain", "class")

    def __post_init__(self) -> None:
        for name in ("meta_steps", "trajectory", "random_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"oml: {name} must be at least 1, got {getattr(self, name)}")
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
        return list(_parts(model)[1].parameters())

    def observe(self, ctx: Any, batch: Batch) -> Tensor:
        if self.meta_classes is None:  # a task-free stream calls no begin_task: meta-train before the first step
            self.meta_train(ctx)
        body, head = _parts(ctx.model)
        body.eval()  # φ is frozen: no gradient, fixed normalisation statistics
        with torch.no_grad():
            f = body(batch.x).flatten(1)
        losses = []
        params = list(head.parameters())
        for i in range(len(batch)):
            row = Batch(batch.x[i:i + 1], batch.y[i:i + 1], batch.t[i:i + 1], None, batch.task)
            loss = ctx.loss(head(f[i:i + 1]), row)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                torch._foreach_add_(params, list(grads), alpha=-self.inner_lr)
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------------------------- meta-training
    def meta_train(self, ctx: Any) -> None:
        sc = ctx.scenario
        used = {c for t in sc.tasks for c in t.classes}
        labels = sc.y_train.cpu()
        classes = sorted(set(torch.unique(labels).tolist()) - used)
        if len(classes) < 2:
            raise ConfigError("oml meta-trains on classes the stream does not use, and this run uses all of the "
                              "dataset's; leave some out, e.g. --class-order 5,6,7,8,9 --n-tasks 5 on split-mnist")
        body, head = _parts(ctx.model)
        rows = {c: (labels == c).nonzero().flatten() for c in classes}
        all_rows = torch.cat(list(rows.values()))
        out_of = {c: i for i, c in enumerate(classes)}
        dev = ctx.device
        meta_head = nn.Linear(head.in_features, len(classes)).to(dev)
        opt = torch.optim.Adam([*body.parameters(), *meta_head.parameters()], lr=self.meta_lr)
        g = ctx.rng
        need = self.trajectory + self.class_samples
        was = body.training
        body.train()
        for step in range(self.meta_steps):
            c = classes[int(torch.randint(len(classes), (1,), generator=g))]
            mine = rows[c][torch.randperm(len(rows[c]), generator=g)[:need]]
            traj, extra = mine[:self.trajectory], mine[self.trajectory:]
            rand = all_rows[torch.randint(len(all_rows), (self.random_samples,), generator=g)]
            if self.reset:
                with torch.no_grad():
                    nn.init.kaiming_normal_(meta_head.weight[out_of[c]:out_of[c] + 1])
            x_t = _inputs(sc, traj).to(dev)
            y_t = torch.full((len(traj),), out_of[c], dtype=torch.long, device=dev)
            q = torch.cat([extra, rand])
            x_q = _inputs(sc, q).to(dev)
            y_q = torch.tensor([out_of[int(v)] for v in labels[q]], dtype=torch.long, device=dev)
            loss = meta_loss(body, meta_head.weight, meta_head.bias, x_t, y_t, x_q, y_q, self.inner_lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in [*body.parameters(), *meta_head.parameters()]:
                    if p.grad is not None:
                        p.grad.clamp_(-self.clip, self.clip)
            opt.step()
            if step % 100 == 0:
                self.meta_curve.append(float(loss))
        body.train(was)
        for p in body.parameters():
            p.requires_grad_(False)
        self.meta_classes = classes
        ctx.warn(f"oml: meta-trained {self.meta_steps} steps on the dataset's classes {classes} (no task uses them), "
                 "then froze the representation; the stream's classes were not seen in meta-training")


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    body, head = getattr(model, "features", None), getattr(model, "head", None)
    if body is None or not isinstance(head, nn.Linear):
        raise ConfigError("oml needs a model with a .features representation and a linear .head (the prediction "
                          "network); retain's mlp and resnet models have both")
    return body, head


def _inputs(sc: Any, idx: Tensor) -> Tensor:
    """Training rows ``idx`` as model inputs (the scenario's scaling and normalisation; no task transform)."""
    from retain.images import DiskArray

    x = sc.x_train.gather(idx, sc.y_train.device) if isinstance(sc.x_train, DiskArray) else \
        sc.x_train[idx.to(sc.y_train.device)]
    return sc.prepare(x, 0)
