"""Synaptic intelligence (SI): importance from the path integral of the loss along the training trajectory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.ops import Params, quadratic_penalty, snapshot, trainable
from retain.scenarios import Batch


@register("si")
@dataclass
class SI(Method):
    """SI: a surrogate loss c Σ_k Ω_k (θ_k − θ*_k)² with Ω from each parameter's share of the loss decrease.

    Zenke, Poole & Ganguli 2017, "Continual learning through synaptic intelligence", ICML, eqs. 3-5.

    Hooks: ``begin_task`` (start point θ(t_{μ-1}), ω ← 0, class-IL warning), ``penalty``, ``before_update``
    (the step's task-loss gradient and the parameters before the step), ``after_update`` (path integral),
    ``end_task`` (Ω and the anchor).

    * Per step: ω_k += −g_k · Δθ_k, with Δθ_k = θ_k(after step) − θ_k(before step), the step's *own* change
      (not the displacement since the task began), so ω is the path integral of −g along the trajectory.
    * At the end of task μ: Ω_k += ω_k / ((Δ_k^μ)² + ξ), Δ_k^μ = θ_k(end of μ) − θ_k(start of μ); the anchor
      θ* becomes θ(end of μ).

    **Which gradient.** g is the gradient of the *task loss* (everything the step minimises except SI's own
    surrogate), as in the paper (ω measures each parameter's contribution to the decrease of the task's loss
    L_μ) and in Zenke et al.'s reference code (the "unregularised" gradient). It costs no extra backward pass:
    after backward, ``p.grad`` holds the total gradient and the surrogate's gradient is known in closed form,
    2cΩ(θ − θ*), so ``before_update`` subtracts it. ``gradient=total`` keeps the surrogate's part, as van de
    Ven et al.'s implementation does (their P1/P2 numbers were produced that way). Composed with other methods,
    their loss terms count as "task loss", and a method that rewrites ``p.grad`` in ``before_update`` before SI
    does changes g too.

    Deviations: none in the maths; ω is not clipped at 0 (the paper does not; with Adam an entry can be
    slightly negative). Default ξ = 0.1 follows van de Ven et al.'s split-MNIST setting (P1).
    """

    c: float = param(1.0, "surrogate-loss strength (c in the paper)")
    xi: float = param(0.1, "damping of the normalisation by the squared total change (ξ in the paper)")
    gradient: str = param("task", "gradient in the path integral: task (the paper; surrogate left out) or total "
                          "(surrogate included, as van de Ven et al.'s code)", choices=("task", "total"))

    needs_boundaries = True
    presets = {
        # P5 (Mammoth best_args.py, seq-cifar10, buffer 500; lr 0.03, set by the run)
        "seq-cifar10/class": {"lr": 0.03, "c": 0.5, "xi": 1.0},
        "seq-cifar10/task": {"lr": 0.03, "c": 0.5, "xi": 1.0},
        "split-mnist/task": {"c": 10.0},
        "split-mnist/domain": {"c": 50000.0},
        "split-mnist/class": {"c": 5000.0},
        "permuted-mnist/domain": {"c": 10.0},
        "split-digits/task": {"c": 10.0},
    }

    def __post_init__(self) -> None:
        if not (self.c >= 0 and math.isfinite(self.c)):
            raise ConfigError(f"si: c must be a finite number >= 0, got {self.c}")
        if not (self.xi > 0 and math.isfinite(self.xi)):
            raise ConfigError(f"si: xi must be a finite number > 0, got {self.xi}")
        if self.gradient not in ("task", "total"):
            raise ConfigError(f"si: gradient must be task or total, got {self.gradient!r}")
        self.omega: Params | None = None  # Ω, summed over finished tasks
        self.anchor: Params | None = None  # θ* = θ at the end of the previous task
        self.start: Params = {}  # θ at the start of the current task
        self.w: Params = {}  # running path integral ω of the current task
        self._grad: Params = {}
        self._before: Params = {}

    def begin_task(self, ctx: Any) -> None:
        if ctx.scenario.mode == "class" and getattr(ctx, "method", self) is self:  # alone, not in a hybrid
            ctx.warn("si is regularisation-only: in class-IL the papers (van de Ven et al. 2019, Hsu et al. 2018) "
                     "find it no better than fine-tuning; expect fine-tuning's accuracy")
        self.start = snapshot(ctx.model)
        self.w = {n: torch.zeros_like(p) for n, p in self.start.items()}

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if self.omega is None or self.c == 0:
            return None
        return self.c * quadratic_penalty(trainable(ctx.model), self.omega, self.anchor)

    @torch.no_grad()
    def before_update(self, ctx: Any) -> None:
        self._grad, self._before = {}, {}
        for n, p in trainable(ctx.model).items():
            if p.grad is None:
                continue
            g = p.grad.detach()
            if self.omega is not None and self.c != 0 and self.gradient == "task":
                g = g - 2 * self.c * self.omega[n] * (p.detach() - self.anchor[n])
            self._grad[n] = g.clone()
            self._before[n] = p.detach().clone()

    @torch.no_grad()
    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        params = trainable(ctx.model)
        for n, g in self._grad.items():
            self.w[n] -= g * (params[n].detach() - self._before[n])

    @torch.no_grad()
    def end_task(self, ctx: Any) -> None:
        now = snapshot(ctx.model)
        new = {n: self.w[n] / ((now[n] - self.start[n]).square() + self.xi) for n in now}
        self.omega = new if self.omega is None else {n: self.omega[n] + new[n] for n in new}
        self.anchor = now
        self._grad, self._before = {}, {}
