"""Memory aware synapses (MAS): importance from the sensitivity of the learned function, no labels needed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.ops import Params, output_sensitivity, quadratic_penalty, snapshot, task_batches, trainable
from retain.scenarios import Batch


@register("mas")
@dataclass
class MAS(Method):
    """MAS: a penalty λ Σ_ij Ω_ij (θ_ij − θ*_ij)², Ω the mean per-sample |∂‖f(x)‖²₂ / ∂θ| over a task's data.

    Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars 2018, "Memory aware synapses: learning what (not) to
    forget", ECCV, eqs. 2-4.

    Hooks: ``begin_task`` (the class-IL warning), ``penalty``, ``end_task`` (importance and anchor).

    * Ω_ij = (1/N) Σ_k |g_ij(x_k)|, g_ij(x_k) = ∂[ℓ2²(f(x_k; θ))] / ∂θ_ij: the absolute value is taken *per
      sample* before averaging (as the paper's equation 4 writes it), computed with ``torch.func`` in chunks.
      f is the raw output (logits) restricted to the task's active outputs: its head in task-IL, the classes
      seen so far in class-IL, every output in domain-IL — the paper's "output of the learned function" for
      the task at hand (the authors use the current task's head in their multi-head experiments).
    * Ω is accumulated over tasks by summation (Ω ← Ω + Ω_new), as the authors' reference code does; θ* is the
      parameters after the latest task.
    * The penalty has no factor 1/2 (the MAS paper's eq. 3), unlike EWC's λ/2; the quadratic form is the same.

    Deviations: Ω is computed on the task's training samples after training (the paper allows any unlabelled
    data the model is applied to; the training set is what the benchmarks give).
    """

    lambda_: float = param(1.0, "penalty strength (λ in the paper)")

    needs_boundaries = True
    presets = {
        "split-mnist/task": {"lambda": 0.1},
        "split-mnist/domain": {"lambda": 10.0},
        "split-mnist/class": {"lambda": 10.0},
        "permuted-mnist/domain": {"lambda": 1.0},
        "split-digits/task": {"lambda": 0.1},
    }

    def __post_init__(self) -> None:
        if not (self.lambda_ >= 0 and math.isfinite(self.lambda_)):
            raise ConfigError(f"mas: lambda must be a finite number >= 0, got {self.lambda_}")
        self.omega: Params | None = None
        self.anchor: Params | None = None

    def begin_task(self, ctx: Any) -> None:
        if ctx.scenario.mode == "class" and getattr(ctx, "method", self) is self:  # alone, not in a hybrid
            ctx.warn("mas is regularisation-only: in class-IL the papers (van de Ven et al. 2019, Hsu et al. 2018) "
                     "find it no better than fine-tuning; expect fine-tuning's accuracy")

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if self.omega is None or self.lambda_ == 0:
            return None
        return self.lambda_ * quadratic_penalty(trainable(ctx.model), self.omega, self.anchor)

    def end_task(self, ctx: Any) -> None:
        rows = ((x, t, mask) for x, t, _, mask in task_batches(ctx))
        new = output_sensitivity(ctx.model, rows, forward=ctx.forward)
        self.omega = new if self.omega is None else {n: self.omega[n] + new[n] for n in new}
        self.anchor = snapshot(ctx.model)
