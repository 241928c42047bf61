"""Elastic weight consolidation (EWC) and online EWC."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.ops import Params, fisher_diagonal, quadratic_penalty, snapshot, task_batches, trainable
from retain.scenarios import Batch


@register("ewc")
@dataclass
class EWC(Method):
    """EWC: a quadratic penalty λ/2 Σ_i F_i (θ_i − θ*_i)² that keeps the parameters important to earlier tasks.

    Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", PNAS 114(13), eq. 3;
    online EWC: Schwarz et al. 2018, "Progress & compress", ICML (F ← γF + F_new, one anchor).

    Hooks: ``begin_task`` (the class-IL warning, when run alone), ``penalty``, ``end_task`` (Fisher and anchor).

    * F is the diagonal Fisher information of the task just trained, the **mean over samples of per-sample
      squared gradients** of log p(y|x), computed in chunks with ``torch.func`` (:mod:`retain.ops.fisher`);
      ``fisher=true`` draws y from the model's predictive distribution over the task's active outputs (its head
      in task-IL, the classes seen so far in class-IL), ``fisher=empirical`` uses the true labels.
    * ``online=false``: one penalty per earlier task, each with its own (F_t, θ*_t) (as in the paper's
      multi-task form). Their sum is evaluated through its sufficient statistics,
      Σ_t F_t (θ − θ*_t)² = A (θ − m)² + c with A = Σ_t F_t, m = Σ_t F_t θ*_t / A and a constant c (built in
      float64 at each task end): the same value and gradient at the cost of one penalty, whatever the number of
      tasks. ``online=true``: one running Fisher F ← γF + F_new and one anchor (the parameters after the latest
      task).

    Deviations: the Fisher uses ``fisher_samples`` random training samples of the task (all by default), where
    the paper does not say how many; labels are *sampled* once per sample rather than summed over all classes
    (an unbiased single-sample estimate of the same expectation, one backward per sample instead of one per
    class). Online EWC follows van de Ven et al.'s form F ← γF + F_new and default γ = 1 rather than Schwarz
    et al.'s normalised Fisher with γ < 1, because P1/P2's published numbers (docs/protocols.md) used that form.
    """

    lambda_: float = param(5000.0, "penalty strength (λ in the paper)")
    fisher: str = param("true", "labels for the Fisher: true = sampled from the model, empirical = true labels, "
                        "predicted = the model's most likely class (van de Ven's code)",
                        choices=("true", "empirical", "predicted"))
    fisher_samples: int | None = param(None, "training samples of a task used for its Fisher (all when unset)")
    online: bool = param(False, "online EWC (Schwarz et al. 2018): one running Fisher and one anchor")
    gamma: float = param(1.0, "online only: decay of the old Fisher, F <- gamma F + F_new (γ)")

    needs_boundaries = True
    presets = {
        "split-mnist/task": {"lambda": 1e9},  # full-length grid on seed 1 (docs/regularisation.md); vdV: 1e5
        "split-mnist/domain": {"lambda": 1e10},
        "split-mnist/class": {"lambda": 1e9},
        "permuted-mnist/domain": {"lambda": 100.0},
        "split-digits/task": {"lambda": 100.0},
    }

    def __post_init__(self) -> None:
        if not (self.lambda_ >= 0 and math.isfinite(self.lambda_)):
            raise ConfigError(f"{self.name}: lambda must be a finite number >= 0, got {self.lambda_}")
        if self.fisher not in ("true", "empirical", "predicted"):
            raise ConfigError(f"{self.name}: fisher must be true, empirical or predicted, got {self.fisher!r}")
        if self.fisher_samples is not None and self.fisher_samples < 1:
            raise ConfigError(f"{self.name}: fisher_samples must be at least 1 (or unset for all), "
                              f"got {self.fisher_samples}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"{self.name}: gamma must be in [0, 1], got {self.gamma}")
        self.penalties: list[tuple[Params, Params]] = []  # (F_t, θ*_t); online: a single running pair
        self._combined: tuple[Any, Params, Params, float] | None = None  # (key, A, m, c) of the penalties' sum

    def begin_task(self, ctx: Any) -> None:
        if ctx.scenario.mode == "class" and getattr(ctx, "method", self) is self:  # alone, not in a hybrid
            ctx.warn(f"{self.name} is regularisation-only: in class-IL the papers (van de Ven et al. 2019, Hsu et "
                     "al. 2018) find it no better than fine-tuning; expect fine-tuning's accuracy")

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if not self.penalties or self.lambda_ == 0:
            return None
        params = trainable(ctx.model)
        if len(self.penalties) == 1:
            return 0.5 * self.lambda_ * quadratic_penalty(params, *self.penalties[0])
        _, importance, centre, const = self.combined()
        return 0.5 * self.lambda_ * (quadratic_penalty(params, importance, centre) + const)

    def combined(self) -> tuple[Any, Params, Params, float]:
        """The separate penalties as one: Σ_t F_t (θ − θ*_t)² = Σ_i A_i (θ_i − m_i)² + c (see the class doc).

        Recomputed when the list of penalties changes; float64 inside, so the constant does not cancel badly.
        """
        key = (len(self.penalties), id(self.penalties[-1]))
        if self._combined is None or self._combined[0] != key:
            importance, centre, const = {}, {}, 0.0
            for n, f0 in self.penalties[0][0].items():
                a = b = q = torch.zeros(f0.shape, dtype=torch.float64, device=f0.device)
                for f, anchor in self.penalties:
                    f, x = f[n].double(), anchor[n].double()
                    a, b, q = a + f, b + f * x, q + f * x * x
                m = torch.where(a > 0, b / a.clamp_min(torch.finfo(torch.float64).tiny),
                                self.penalties[-1][1][n].double())
                const += float(q.sum() - (a * m * m).sum())
                importance[n], centre[n] = a.to(f0.dtype), m.to(f0.dtype)
            self._combined = (key, importance, centre, const)
        return self._combined

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_combined", None)  # derived from the penalties
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._combined = None

    def end_task(self, ctx: Any) -> None:
        new = fisher_diagonal(ctx.model, task_batches(ctx, self.fisher_samples), self.fisher, ctx.rng,
                              forward=ctx.forward)
        anchor = snapshot(ctx.model)
        if self.online and self.penalties:
            old, _ = self.penalties[0]
            self.penalties = [({n: self.gamma * old[n] + f for n, f in new.items()}, anchor)]
        else:
            self.penalties.append((new, anchor))


@register("online_ewc")
@dataclass
class OnlineEWC(EWC):
    """Online EWC (Schwarz et al. 2018): ``ewc`` with ``online=true`` (one running Fisher, one anchor)."""

    online: bool = param(True, "online EWC (Schwarz et al. 2018): one running Fisher and one anchor")
    # EWC's presets (van de Ven's code uses the same λ for both), plus P5 (Mammoth best_args.py, seq-cifar10: its
    # λ 10 with penalty λ Σ F (θ − θ*)², i.e. λ 20 in retain's λ/2; lr 0.03, set by the run)
    presets = {**EWC.presets,
               "seq-cifar10/class": {"lr": 0.03, "lambda": 20.0, "gamma": 1.0, "fisher": "empirical"},
               "seq-cifar10/task": {"lr": 0.03, "lambda": 20.0, "gamma": 1.0, "fisher": "empirical"}}
