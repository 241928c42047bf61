"""Gradient episodic memory (GEM): never let an update increase the loss on an earlier task's memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from retain.buffers import Buffer
from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.ops.qp import flat_grad, project_gem, require_quadprog, write_grad
from retain.scenarios import Batch


@register("gem")
@dataclass
class GEM(Method):
    """GEM: project each step's gradient so that it does not conflict with any earlier task's memory gradient.

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.

    Each task keeps ``memory_per_task`` of its rows. At every step, after backward, the gradient g_k of the loss on
    each earlier task k's memory is computed (task-IL: on task k's head; class-IL: on the classes seen so far). If
    any ⟨g, g_k⟩ < 0, g is replaced by the solution of the paper's dual quadratic program with margin γ
    (:func:`retain.ops.qp.project_gem`, solved exactly by quadprog) and written back into ``p.grad`` before the
    optimizer step.

    Per-step cost with t tasks seen: t − 1 extra forward/backward passes over ``memory_per_task`` rows each, a
    (t − 1) x P gradient matrix (P = number of parameters) held in memory, O(t² P) to form G Gᵀ and a (t − 1)-sized
    QP (negligible), i.e. linear in the number of tasks for compute and memory (quadratic only in the tiny QP).
    The memories are stored un-augmented; with ``--augment`` each memory gradient is taken on a fresh augmented
    view of them, like the training batch's.

    With ``memory_size`` > 0 the memory is instead a total budget shared equally by the tasks finished so far,
    each task's share drawn at random from its training set at the end of the task (older shares shrink as tasks
    arrive): the ``GEM_1100`` of Hsu et al. 2018, whose published split-MNIST numbers P1 quotes.

    Hooks: ``after_update`` (online memory insertion), ``end_task`` (the ``memory_size`` variant),
    ``before_update`` (projection).
    Deviations: the paper keeps the *last* ``memory_per_task`` rows of each task; here each task's memory is a
    uniform reservoir sample of the task's stream (the same distribution when the task is shuffled, and well
    defined for several epochs). The dual is solved as is; a ridge is added only if G Gᵀ is singular (the
    GEM authors' code always adds 1e-3 · I, which slightly violates the constraints it is meant to enforce; the
    A-GEM authors' GEM adds none). On long streams at a high learning rate GEM can become unstable: see
    docs/replay.md, P2.
    """

    memory_per_task: int = param(256, "rows of episodic memory per task (M / T in the paper)")
    margin: float = param(0.5, "margin added to the dual variables (γ, 'memory strength'; 0.5 in the paper)")
    memory_size: int = param(0, "total rows shared equally by the finished tasks, chosen at random at the end of "
                                "each task (Hsu et al.'s GEM_1100); 0 = memory_per_task rows per task, online")

    needs_boundaries = True
    presets = {
        # P5 (Mammoth best_args.py, seq-cifar10, buffer 500, lr 0.03 set by the run): Mammoth's buffer is a total
        # shared by the finished tasks, refilled at each task's end
        "seq-cifar10/class": {"lr": 0.03, "memory_size": 500, "margin": 0.5},
        "seq-cifar10/task": {"lr": 0.03, "memory_size": 500, "margin": 0.5},
        # Hsu et al. 2018 (GEM_1100, their code): 1,100 rows shared by the finished tasks, margin 0.5.
        "split-mnist/task": {"memory_size": 1100},
        "split-mnist/domain": {"memory_size": 1100},
        "split-mnist/class": {"memory_size": 1100},
        # Chaudhry et al. 2019 (A-GEM paper, permuted MNIST): 250 per task.
        "permuted-mnist/domain": {"memory_per_task": 250},
        "split-digits/class": {"memory_per_task": 40},
        "split-digits/task": {"memory_per_task": 40},
        "split-digits/domain": {"memory_per_task": 40},
    }

    def __post_init__(self) -> None:
        if self.memory_per_task < 1:
            raise ConfigError(f"gem: memory_per_task must be at least 1, got {self.memory_per_task}")
        if not self.margin >= 0:
            raise ConfigError(f"gem: margin must be >= 0, got {self.margin}")
        if self.memory_size < 0:
            raise ConfigError(f"gem: memory_size must be >= 0 (0 = memory_per_task per task), got {self.memory_size}")
        require_quadprog()
        # keyed by task: one share per task (fixed, or an equal part of memory_size)
        self.buffer = (Buffer(self.memory_size, balanced=True) if self.memory_size
                       else Buffer(per_class=self.memory_per_task))
        self.projections = 0  # steps whose gradient was projected (reported in docs/tests)

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.memory_size or self.memory_per_task * scenario.n_tasks, scenario)

    def before_update(self, ctx: Any) -> None:
        old = [k for k in self.buffer.tasks() if k != ctx.task]
        if not old:
            return
        params = [p for group in ctx.optimizer.param_groups for p in group["params"] if p.requires_grad]
        g = flat_grad(params)
        G = torch.stack([self._memory_grad(ctx, params, k) for k in old])
        if bool((G @ g < 0).any()):
            write_grad(params, project_gem(g, G, self.margin))
            self.projections += 1

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        if self.memory_size:
            return
        new = batch.new
        x, y, t = (batch.x, batch.y, batch.t) if new is None else (batch.x[new], batch.y[new], batch.t[new])
        self.buffer.add(x, y, t, key=t, generator=ctx.rng)

    def end_task(self, ctx: Any) -> None:
        if not self.memory_size:
            return
        data = ctx.scenario.task_data(ctx.task)
        rows = ctx.scenario.batch(data.idx, ctx.task)
        self.buffer.select(rows.x, rows.y, rows.t, rows.x[:, :0], "random", key=rows.t, generator=ctx.rng)

    def _memory_grad(self, ctx: Any, params: list[torch.nn.Parameter], task: int) -> Tensor:
        rows = self.buffer.rows(task)
        mem = Batch(rows.x, rows.y, rows.t, None, task)
        loss = ctx.loss(ctx.forward(ctx.augmented(mem.x), mem.t), mem)  # memory kept un-augmented
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                          for gr, p in zip(grads, params)])
