"""Learning without forgetting (LwF): distil the previous model's outputs on the current task's inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.errors import ConfigError
from retain.method import Method, frozen_copy, param, register
from retain.scenarios import Batch


def distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(q ‖ softmax(student / T)) with q = softmax(teacher / T), summed over the outputs, averaged over rows.

    Li & Hoiem's L_old is the cross-entropy −Σ y'_o log ŷ'_o; the KL differs from it by the teacher's entropy,
    a constant, so the gradient is the same and the loss is 0 when the student equals the teacher.

    The student may have more outputs than the teacher (its first ``k`` are the teacher's): q is then padded with
    probability 0 for the extra ones, as van de Ven et al.'s code does for LwF in class-IL, while the student's
    softmax runs over all of them. The loss is then not 0 at the teacher: it also pushes the extra outputs down
    on the current inputs.
    """
    log_p = F.log_softmax(student / temperature, dim=1)[:, :teacher.shape[1]]
    log_q = F.log_softmax(teacher / temperature, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(1).mean()


@register("lwf")
@dataclass
class LwF(Method):
    """LwF: cross-entropy on the new task + α · distillation toward the frozen previous model's outputs.

    Li & Hoiem 2016, "Learning without forgetting", ECCV (TPAMI 2018), eq. 2 (L_old with T = 2, λ_o = 1).

    Hooks: ``begin_task`` (freeze a copy of the model as trained so far; class-IL warning), ``penalty``.

    What is distilled, per mode (the "old outputs"):

    * task-IL: each earlier task's head, each with its own softmax; the per-head losses are summed (one L_old
      per old task, as in the paper's multi-task form);
    * class-IL: the logits of the classes of earlier tasks, one softmax over them (``class_targets = old``);
      or, with ``class_targets = seen`` (van de Ven et al.'s code, behind their published class-IL numbers), the
      student's softmax over every class seen so far, the current task's included, toward the old model's
      softmax over the earlier classes padded with 0 for the new ones (:func:`distillation`);
    * domain-IL: the shared outputs.

    Deviations: the targets come from the frozen copy on the fly (one extra no-grad forward per step) instead of
    being recorded once before training — identical without data augmentation or dropout, and it needs no
    per-task storage. The loss is the KL divergence rather than the paper's cross-entropy (same gradient, see
    :func:`distillation`), with no T² factor, as in the paper. The copy is called as a plain module
    (``old(x)``), so LwF composes with methods that override ``forward`` only if that forward is the model's.
    α = 1, T = 2 are the paper's values; the split-MNIST domain-IL preset uses α = 4 (a grid on seed 1), because
    with one shared head the new task's loss otherwise overwhelms the distillation term.
    """

    alpha: float = param(1.0, "weight of the distillation loss (λ_o in the paper)")
    temperature: float = param(2.0, "distillation temperature (T in the paper)")
    class_targets: str = param("old", "class-IL only: 'old' (softmax over the earlier classes) or 'seen' "
                                      "(softmax over all classes seen so far, new classes' targets 0)")

    needs_boundaries = True
    presets = {
        # P5 (Mammoth best_args.py, seq-cifar10, buffer 500; lr 0.01, set by the run)
        "seq-cifar10/class": {"lr": 0.01, "alpha": 3.0, "temperature": 2.0},
        "seq-cifar10/task": {"lr": 0.01, "alpha": 3.0, "temperature": 2.0},
        "split-mnist/task": {"alpha": 1.0},
        "split-mnist/domain": {"alpha": 4.0},
        "split-mnist/class": {"alpha": 1.0},
        "permuted-mnist/domain": {"alpha": 1.0},
        "split-digits/task": {"alpha": 1.0},
    }

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"lwf: alpha must be a finite number >= 0, got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"lwf: temperature must be a finite number > 0, got {self.temperature}")
        if self.class_targets not in ("old", "seen"):
            raise ConfigError(f"lwf: class_targets must be 'old' or 'seen', got {self.class_targets!r}")
        self.old: nn.Module | None = None
        self.old_tasks: list[int] = []

    def begin_task(self, ctx: Any) -> None:
        if ctx.scenario.mode == "class" and getattr(ctx, "method", self) is self:  # alone, not in a hybrid
            ctx.warn("lwf is regularisation-only: in class-IL the papers (van de Ven et al. 2019, Hsu et al. 2018) "
                     "find it barely better than fine-tuning; expect close to fine-tuning's accuracy")
        if ctx.task == 0:
            return
        self.old = frozen_copy(ctx.model)
        self.old_tasks = list(range(ctx.task))

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if self.old is None or self.alpha == 0:
            return None
        with torch.no_grad():
            target = self.old(batch.x)
        scenario = ctx.scenario
        T = self.temperature
        if scenario.mode == "task":
            heads = scenario.task_out[self.old_tasks]
            loss = sum(distillation(out[:, h], target[:, h], T) for h in heads)
        elif scenario.mode == "class":
            old = scenario.task_out[self.old_tasks].any(0)
            if self.class_targets == "seen":
                new = scenario.task_out[ctx.task] & ~old
                student = torch.cat([out[:, old], out[:, new]], 1)
                loss = distillation(student, target[:, old], T)
            else:
                loss = distillation(out[:, old], target[:, old], T)
        else:
            loss = distillation(out, target, T)
        return self.alpha * loss
