"""SimpleCIL: the class prototypes of a frozen pre-trained model's features as a cosine classifier, no training; the
prototype classifier (:class:`Prototypes`) and the no-step helpers that APER and RanPAC share live here too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retain.buffers import EMBED_CHUNK, embed
from retain.method import Method, register
from retain.scenarios import TaskData


def cosine_scores(features: Tensor, prototypes: Tensor) -> Tensor:
    """cos(φ(x), p_c) for each row of ``features`` [B, D] and each prototype in ``prototypes`` [C, D]."""
    return F.linear(F.normalize(features.float(), dim=1), F.normalize(prototypes.float(), dim=1))


class Prototypes:
    """Class prototypes p_c = the mean feature of the training rows of output c, scored by cosine similarity.

    Kept as running sums and counts per output, so an output that recurs in later tasks (domain-IL: the same
    within-task position in every task) averages all its rows; in task- and class-IL each output belongs to one
    task and its prototype is that task's class mean. Outputs with no rows yet score -inf."""

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # [n_outputs, D]
        self.counts: Tensor | None = None  # [n_outputs]

    def add(self, features: Tensor, targets: Tensor, n_outputs: int) -> None:
        features = features.float()
        if self.sums is None:
            self.sums = features.new_zeros(n_outputs, features.shape[1])
            self.counts = features.new_zeros(n_outputs)
        self.sums.index_add_(0, targets, features)
        self.counts.index_add_(0, targets, torch.ones_like(targets, dtype=features.dtype))

    @property
    def means(self) -> Tensor:
        return self.sums / self.counts.clamp(min=1).unsqueeze(1)

    def scores(self, features: Tensor) -> Tensor:
        """[B, n_outputs] cosine similarities to the prototypes; -inf for outputs without one."""
        out = cosine_scores(features, self.means.to(features.device))
        return out.masked_fill(self.counts.to(features.device) == 0, float("-inf"))


def no_rows(data: TaskData) -> TaskData:
    """A task's data with no rows: the trainer then takes no step (no forward, no gradient) on it."""
    return TaskData(data.idx[:0], data.t[:0])


def nothing_to_train() -> list[dict[str, Any]]:
    """What a method that trains nothing gives the optimizer: one empty parameter group (torch refuses an empty
    list of parameters, not an empty group)."""
    return [{"params": []}]


@torch.no_grad()
def task_features(ctx: Any, features: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The current task's training rows as (features [N, D], targets [N] in output space), un-augmented, the
    model in evaluation mode: :func:`retain.buffers.embed` (``model.features``), or ``features(x)`` of the
    prepared inputs a chunk at a time when given (APER's two branches)."""
    sc = ctx.scenario
    data = sc.task_data(ctx.task)
    y = sc.targets(sc.y_train[data.idx], ctx.task)
    if features is None:
        return embed(ctx.model, sc, data.idx, ctx.task), y
    was = ctx.model.training
    ctx.model.eval()
    out = [features(sc.batch(data.idx[i:i + EMBED_CHUNK], ctx.task).x).float()
           for i in range(0, len(data.idx), EMBED_CHUNK)]
    ctx.model.train(was)
    return torch.cat(out), y


@register("simplecil")
@dataclass
class SimpleCIL(Method):
    """SimpleCIL: each class's prototype (its mean pre-trained feature) is its classifier weight; cosine at test.

    Zhou, Cai, Ye & Zhan, "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
    Adaptivity are All You Need", IJCV 2024 (arXiv 2303.07338, 2023), §4 "SimpleCIL".

    Nothing is trained: at each task's end the prototype p_c of each new class is the mean of ``model.features``
    over the class's training rows (un-augmented, in evaluation mode; :func:`retain.buffers.embed`), and the
    model predicts argmax_c cos(φ(x), p_c) over the prototypes it has (the paper's replacement of the fc weights
    by prototypes in a cosine classifier; PILOT's ``simplecil`` with its scale σ = 1, which no argmax sees).

    Hooks: ``task_data`` (no rows: the trainer takes no step, so the record's ``train_s`` is the feature
    extraction alone), ``end_task`` (prototypes), ``forward`` (cosine to the prototypes; the untrained model's own
    output before the first task ends, for the baseline b). ``freeze = "all"``: the run freezes the backbone (and
    may cache its features, since the method reads it only through ``model.features``). ``parameters`` is empty.

    Deviations: none in the maths. Modes: class-IL (the paper's) and task-IL. Domain-IL is refused: one prototype
    per output would average the rows of every domain (what :class:`Prototypes` supports, as RanPAC's code does for
    its domain-incremental runs), which on domains that differ is a poor classifier (it fails the contract test's
    learning check); RanPAC's ridge regression does not have that weakness and supports domain-IL.
    """

    modes = ("class", "task")
    needs_boundaries = True  # the prototypes are computed at each task's end
    freeze = "all"
    reads_backbone = False

    def __post_init__(self) -> None:
        self.prototypes = Prototypes()

    def parameters(self, model: torch.nn.Module) -> list[Any]:
        return nothing_to_train()

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        return no_rows(data)

    def end_task(self, ctx: Any) -> None:
        feats, y = task_features(ctx)
        self.prototypes.add(feats, y, ctx.scenario.n_outputs)

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        if self.prototypes.sums is None:
            return ctx.model(x)
        return self.prototypes.scores(ctx.model.features(x).flatten(1))
