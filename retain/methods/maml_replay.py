"""MAML-style online meta-learning with replay (the course chapter's "online meta-learning")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.methods.mer import replay_batch, reservoir
from retain.scenarios import Batch


@register("maml_replay")
@dataclass
class MAMLReplay(Method):
    """MAML on each incoming batch plus a replay term: inner SGD steps on the batch, an outer step through them.

    The "online meta-learning" algorithm of the course chapter retain was created from; no paper defines it as
    such. It is Finn, Abbeel & Levine's MAML ("Model-agnostic meta-learning for fast adaptation of deep networks",
    ICML 2017) applied online, with the incoming batch as both support and query set, plus an experience-replay
    term. For each incoming batch B and memory M:

        θ'_0 = θ;  θ'_{n+1} = θ'_n − α ∇_θ' ℓ(B; θ'_n)   for n < ``inner_steps``  (α = ``inner_lr``)
        L(θ) = ℓ(B; θ'_N(θ)) + ℓ(B_M; θ)          (B_M: a batch of the same size from the reservoir memory)
        θ ← optimizer step on ∇_θ L with learning rate ``outer_lr``;   M ← reservoir(M, B)

    The memory term is evaluated on the *unadapted* weights θ: it is plain replay added to the MAML objective,
    not part of the meta-objective. The adapted weights are a dictionary of tensors that keep the autograd graph
    back to θ (run through the model with :func:`torch.func.functional_call`), so the outer gradient reaches θ
    through the inner steps, second order included (``first_order`` drops the second-order terms, as first-order
    MAML). The chapter's version edited a deep copy's ``.data`` instead, which sends no gradient through the
    adaptation (seed defect 8). ``inner_steps = 0`` is a plain step on the current batch plus the memory batch.

    What it is not (it was registered as ``oml`` before, which was wrong):

    * Javed & White's OML ("Meta-learning representations for continual learning", NeurIPS 2019) splits the
      network into a representation (RLN) and a prediction network (PLN), adapts only the PLN in the inner loop
      over a trajectory of one task's samples, computes the meta-loss with the fast weights on that trajectory plus
      random samples of all seen tasks, and meta-trains the RLN in a separate phase; it keeps no replay buffer.
      Here the whole network is adapted, the meta-loss sees only the current batch, and there is no separate
      meta-training.
    * La-MAML (Gupta, Yadav & Paull, NeurIPS 2020) adapts on the current batch and scores the fast weights on
      current *and* memory samples, with learned per-parameter learning rates; here the memory term uses θ and the
      learning rates are fixed.
    * MER (:mod:`retain.methods.mer`) is first-order Reptile over single-example SGD steps on current and memory
      examples; here the meta-gradient is exact (second order) and computed on whole batches.

    Hooks: ``observe`` (the whole step; the run's optimizer, Adam or SGD, takes the outer step with its learning
    rate set to ``outer_lr``). No task boundaries needed; every mode (the loss uses each row's mask). The memory is
    the shared reservoir :class:`retain.buffers.Buffer` (``buffer_size`` 0 = none). With ``--augment`` the
    incoming batch is augmented once per step (the same view is support and query set) and the memory batch
    afresh each step; the memory stores rows un-augmented, and partners' ``penalty`` sees the augmented view (as
    in the shared step).
    Deviations from the chapter: the meta-gradient flows through the inner loop (see above).
    """

    inner_steps: int = param(5, "SGD steps of the inner loop on the current batch")
    inner_lr: float = param(0.01, "inner-loop SGD learning rate (α)")
    outer_lr: float = param(0.001, "learning rate of the outer (meta) update (β)")
    buffer_size: int = param(1000, "reservoir memory size")
    first_order: bool = param(False, "drop the second-order terms of the meta-gradient (first-order MAML)")

    def __post_init__(self) -> None:
        if self.inner_steps < 0:
            raise ConfigError(f"maml_replay: inner_steps must be >= 0, got {self.inner_steps}")
        if not self.inner_lr > 0 or not self.outer_lr > 0:
            raise ConfigError("maml_replay: inner_lr and outer_lr must be > 0")
        if self.buffer_size < 0:
            raise ConfigError(f"maml_replay: buffer_size must be >= 0, got {self.buffer_size}")
        self.buffer = reservoir(self.buffer_size)

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.buffer_size, scenario)

    def adapt(self, ctx: Any, batch: Batch) -> dict[str, Tensor]:
        """The inner loop: weights after ``inner_steps`` SGD steps on ``batch``, differentiable w.r.t. θ."""
        model = ctx.model
        fast = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for _ in range(self.inner_steps):
            loss = ctx.loss(functional_call(model, fast, (batch.x,), strict=False), batch)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not self.first_order,
                                        allow_unused=True)
            fast = {n: w if g is None else w - self.inner_lr * g for (n, w), g in zip(fast.items(), grads)}
        return fast

    def observe(self, ctx: Any, batch: Batch) -> Tensor:
        view = Batch(ctx.augmented(batch.x), batch.y, batch.t, batch.new, batch.task)  # support and query alike
        fast = self.adapt(ctx, view)
        out = functional_call(ctx.model, fast, (view.x,), strict=False)
        loss = ctx.loss(out, view)
        replay = replay_batch(self.buffer, len(batch), ctx.rng)
        if replay is not None:
            loss = loss + ctx.loss(ctx.forward(ctx.augmented(replay.x), replay.t), replay)
        extra = ctx.method.penalty(ctx, view, out)  # partners' hooks when composed (ctx.method is the whole)
        if extra is not None:
            loss = loss + extra
        for group in ctx.optimizer.param_groups:
            group["lr"] = self.outer_lr
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.method.before_update(ctx)
        ctx.optimizer.step()
        ctx.method.after_update(ctx, batch, out)
        if self.buffer is not None:
            self.buffer.add(batch.x, batch.y, batch.t, generator=ctx.rng)
        return loss.detach()
