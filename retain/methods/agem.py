"""Averaged GEM (A-GEM): one reference gradient from a memory sample instead of one constraint per task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from retain.buffers import Buffer
from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.ops.qp import flat_grad, project_agem, write_grad
from retain.scenarios import Batch


@register("agem")
@dataclass
class AGEM(Method):
    """A-GEM: project the gradient only when it conflicts with the gradient on a random sample of the memory.

    Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient Lifelong Learning with A-GEM", ICLR 2019.

    Each task keeps ``memory_per_task`` rows. At every step, after backward, the reference gradient g_ref of the
    loss on ``sample_size`` rows drawn (without replacement) from the memory of the earlier tasks is computed; if
    ⟨g, g_ref⟩ < 0 the gradient becomes g − (gᵀg_ref / g_refᵀg_ref) g_ref (eq. 11), else it is left unchanged.
    Cost per step: one extra forward/backward over ``sample_size`` rows, whatever the number of tasks. The memory
    stores rows un-augmented; with ``--augment`` the reference sample is augmented like a training batch.

    Hooks: ``after_update`` (memory insertion), ``before_update`` (projection).
    Deviations: the paper fills a task's memory (ring buffer) while training on it; here each task's memory is a
    uniform reservoir sample of the task's stream (the same distribution for a shuffled single pass). The memory
    is keyed by the rows' task ids, so the method also runs on a task-free stream (the "earlier tasks" are those
    other than the task of the newest row).
    """

    memory_per_task: int = param(250, "rows of episodic memory per task (250 in the paper's MNIST runs)")
    sample_size: int = param(256, "memory rows drawn for the reference gradient (S in the paper)")

    presets = {
        # P5 (Mammoth best_args.py, seq-cifar10, buffer 500, lr 0.03 set by the run): Mammoth keeps buffer_size // 5
        # rows per task and draws 32 for the reference gradient
        "seq-cifar10/class": {"lr": 0.03, "memory_per_task": 100, "sample_size": 32},
        "seq-cifar10/task": {"lr": 0.03, "memory_per_task": 100, "sample_size": 32},
        "permuted-mnist/domain": {"memory_per_task": 250, "sample_size": 256},
        "split-mnist/task": {"memory_per_task": 220, "sample_size": 256},
        "split-mnist/domain": {"memory_per_task": 220, "sample_size": 256},
        "split-mnist/class": {"memory_per_task": 220, "sample_size": 256},
    }

    def __post_init__(self) -> None:
        if self.memory_per_task < 1:
            raise ConfigError(f"agem: memory_per_task must be at least 1, got {self.memory_per_task}")
        if self.sample_size < 1:
            raise ConfigError(f"agem: sample_size must be at least 1, got {self.sample_size}")
        self.buffer = Buffer(per_class=self.memory_per_task)  # keyed by task
        self.projections = 0

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.memory_per_task * scenario.n_tasks, scenario)

    def before_update(self, ctx: Any) -> None:
        old = [k for k in self.buffer.tasks() if k != ctx.task]
        if not old:
            return
        rows = self.buffer.sample(self.sample_size, ctx.rng, tasks=old)
        ref = Batch(rows.x, rows.y, rows.t)
        params = [p for group in ctx.optimizer.param_groups for p in group["params"] if p.requires_grad]
        g = flat_grad(params)
        loss = ctx.loss(ctx.forward(ctx.augmented(ref.x), ref.t), ref)  # memory kept un-augmented
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        g_ref = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                           for gr, p in zip(grads, params)])
        if torch.dot(g, g_ref) < 0:
            write_grad(params, project_agem(g, g_ref))
            self.projections += 1

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        new = batch.new
        x, y, t = (batch.x, batch.y, batch.t) if new is None else (batch.x[new], batch.y[new], batch.t[new])
        self.buffer.add(x, y, t, key=t, generator=ctx.rng)
