"""Weight aligning (WA): distillation with exemplars, then the new classes' head rows rescaled to the old norms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from retain.buffers import Exemplars
from retain.errors import ConfigError
from retain.method import Memory, Method, frozen_copy, param, register
from retain.methods.bic import SELECTIONS, check_common, old_outputs, weighted_distillation
from retain.scenarios import Batch, TaskData


def head_of(model: nn.Module) -> nn.Linear:
    """The model's last fully connected layer (``model.head``), whose rows WA aligns."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError("wa needs a model whose output layer is a linear `head` (retain's mlp, resnet18, "
                          "resnet32); this model has none")
    return head


@torch.no_grad()
def align_weights(head: nn.Linear, old: Tensor, new: Tensor) -> float:
    """Scale the ``new`` rows of ``head.weight`` by γ = mean ‖w_old‖ / mean ‖w_new‖ (eq. 9); returns γ."""
    w = head.weight
    old, new = old.to(w.device), new.to(w.device)
    gamma = w[old].norm(dim=1).mean() / w[new].norm(dim=1).mean()
    w[new] *= gamma
    return float(gamma)


@register("wa")
@dataclass
class WA(Method):
    """WA: (1 - λ) CE + λ KD on new data + exemplars, then the new classes' head rows rescaled by γ after each task.

    Zhao, Xiao, Gan, Zhang & Xia, "Maintaining Discrimination and Fairness in Class Incremental Learning", CVPR
    2020 (eqs. 6-10); checked against PyCIL's ``wa`` (models/wa.py, exps/wa.json).

    Each task trains on its data and the exemplars of the earlier classes with (1 - λ) L_CE + λ L_KD, λ = n / (n +
    m) (n old classes, m new), L_CE the cross-entropy over the classes seen so far, L_KD the distillation of the
    old classes' logits at temperature T toward the model as it ended the previous task (aligned). After the task
    (from the second on) the head's rows of the new classes are multiplied by γ = mean ‖W_old‖ / mean ‖W_new‖, the
    mean norms of the old and new classes' weight vectors, so that afterwards both means are equal (the bias is
    left as it is, as PyCIL). With ``weight_clipping`` the head's weights of the seen classes are clipped to be
    non-negative after every optimizer step (the paper's weight clipping: the features after the ReLU are
    non-negative). Memory: ``buffer_size`` exemplars in total, an equal share per seen class, by iCaRL's herding
    (PyCIL's ``build_rehearsal_memory``) or at random.

    Hooks: ``begin_task`` (teacher, λ), ``task_data`` (new data + exemplars), ``penalty`` (λ (KD - CE), so the loss
    is (1 - λ) CE + λ KD), ``after_update`` (weight clipping), ``end_task`` (alignment, then the exemplars).

    Deviations and choices: the distillation is the KL divergence (PyCIL's cross-entropy less the teacher's
    entropy: same gradient), no T² factor, as PyCIL. PyCIL does not clip the weights (``weight_clipping = false``
    is its behaviour); clipping here spares the rows of classes not yet seen, because retain's head has every
    output from the start and class-IL evaluation scores them all (a clipped random row would compete on positive
    features). PyCIL aligns twice (after training and again in ``after_task``); the second is the identity (γ = 1).
    On Split-MNIST with one epoch per task γ > 1 (the new rows end up shorter than the old ones), so aligning alone
    does not remove the recency bias; the clipping does most of the work there (ACC 76 with it, 41 without, seed
    0). The exemplars are read from the training set by index (the trainer iterates new data ∪ exemplars as PyCIL's
    loader does); they are reported as ``buffer_size`` stored rows. The memory is kept full (the rest of
    ``buffer_size // classes`` goes to the earliest classes); PyCIL drops the rest (498 rows at 6 classes), which
    made no measurable difference on Split-MNIST (36.39 ± 4.25 against 37.51 ± 3.08, 6 seeds).

    The head's initialisation matters here, and is not the method's: PyCIL's output layer is drawn with a √3 larger
    scale than PyTorch's default (its SimpleLinear), so the new rows end a short task longer and γ is smaller.
    ``--init pycil`` draws retain's head that way; with it retain and PyCIL agree (docs/class-incremental.md).
    """

    buffer_size: int = param(2000, "exemplars kept in total, split equally over the seen classes (PyCIL's 2,000)")
    temperature: float = param(2.0, "distillation temperature (T in the paper)")
    weight_clipping: bool = param(True, "clip the seen classes' head weights to >= 0 after each step (the paper; "
                                        "PyCIL: false)")
    selection: str = param("herding", "exemplar choice at the end of a task: herding (PyCIL) or random",
                           choices=SELECTIONS)

    modes = ("class",)
    needs_boundaries = True
    presets = {
        # Memory sizes of the protocol (200/500 in total); PyCIL's exps/wa.json (CIFAR-100: memory 2000,
        # T = 2) has no MNIST or CIFAR-10 arguments, and its lr/epochs are run options here.
        "split-mnist/class": {"buffer_size": 500},
        "split-fashion-mnist/class": {"buffer_size": 500},
        "split-digits/class": {"buffer_size": 200},
        "seq-cifar10/class": {"buffer_size": 500},
    }

    def __post_init__(self) -> None:
        check_common("wa", self.buffer_size, self.temperature, self.selection)
        self.exemplars = Exemplars(self.buffer_size, remainder=True)
        self.teacher: nn.Module | None = None
        self.lam = 0.0
        self.gammas: list[float] = []  # γ of each alignment (tasks 2, 3, ...)

    def memory(self, scenario: Any) -> Memory:
        return self.exemplars.memory(scenario)

    def begin_task(self, ctx: Any) -> None:
        head_of(ctx.model)
        if ctx.task == 0:
            return
        self.teacher = frozen_copy(ctx.model)
        n_old, n_new = int(old_outputs(ctx.scenario, ctx.task).sum()), int(ctx.scenario.task_out[ctx.task].sum())
        self.lam = n_old / (n_old + n_new)

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        return data.cat(self.exemplars.data()) if len(self.exemplars) else data

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            target = self.teacher(batch.x)
        return weighted_distillation(ctx, out, batch, target, old_outputs(ctx.scenario, ctx.task), self.lam,
                                     1.0 - self.lam, self.temperature)

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        if self.weight_clipping:
            with torch.no_grad():
                w = head_of(ctx.model).weight
                seen = ctx.seen.to(w.device)
                w[seen] = w[seen].clamp(min=0)

    def end_task(self, ctx: Any) -> None:
        if ctx.task > 0:
            self.gammas.append(align_weights(head_of(ctx.model), old_outputs(ctx.scenario, ctx.task),
                                             ctx.scenario.task_out[ctx.task]))
        self.exemplars.select(ctx, self.selection)
