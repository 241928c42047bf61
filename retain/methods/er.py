"""Experience replay (ER): each step trains on the current batch plus a batch replayed from a memory buffer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from retain.buffers import SELECTIONS, Buffer
from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.scenarios import Batch

STORAGES = ("reservoir", "class_balanced")
WEIGHTINGS = ("concat", "task")


@register("er")
@dataclass
class ER(Method):
    """Experience replay: the current batch plus ``replay_batch`` rows drawn from a tensor buffer at every step.

    Chaudhry et al., "On tiny episodic memories in continual learning", arXiv 1902.10486 (2019), with the buffer
    of Rolnick et al. (NeurIPS 2019, reservoir) or iCaRL's herding (Rebuffi et al., CVPR 2017); "naive rehearsal"
    in Hsu et al. (2018). The replayed rows keep the task id they were stored with, so in task-IL each is scored
    on its own head and in class-IL on every class seen so far.

    Memory: ``buffer_size`` rows in total, or ``per_class`` rows per class (van de Ven's protocol). With
    ``selection = random`` rows are inserted online after every step: ``storage = reservoir`` keeps a uniform
    sample of everything seen (Vitter's algorithm R), ``class_balanced`` an equal share per seen class (uniform
    within each class); ``per_class`` implies class-balanced storage. With ``herding`` or ``kcenter`` each class's
    share is chosen at the end of its task from the task's whole training set in the model's feature space
    (``model.features`` when the model has it, else the flattened inputs); that needs task boundaries.

    Loss weighting. ``concat`` (default): the replayed rows are appended to the batch (``augment``, ``new`` =
    False) and the loss is the mean over all rows, i.e. weight B_r / (B + B_r) on replay (1/2 with the default
    ``replay_batch`` = batch size), as in Hsu et al.'s naive rehearsal and Mammoth's ER. ``task``: van de Ven's
    weighting (``rnt`` in GMvandeVen/continual-learning), the replayed batch standing for the t − 1 earlier tasks:
    L = (1/t) L_current + (1 − 1/t) L_replay at task t (1-based). The weights sum to 1, so the loss keeps its scale
    across task boundaries. (Until this release it was t times that, L_current + (t − 1) L_replay, documented as
    leaving Adam's step unchanged; it does not when Adam's moments carry over a boundary, retain's default: the
    second moment still has the old scale, and the step is up to t/(t − 1) times larger for hundreds of steps.)

    Hooks: ``augment`` (concat) or ``penalty`` (task), ``after_update`` (online insertion), ``end_task``
    (herding / k-center selection). The buffer is part of ``state_dict`` (saved with checkpoints). It stores rows
    un-augmented; with ``--augment`` replayed rows get a fresh augmentation each time (concat: with the batch, in
    the shared step; task: ``ctx.augmented`` in the penalty), as Mammoth's ER does.
    Deviations: none in the update; the buffer variants are the ones named above.
    """

    buffer_size: int = param(500, "rows kept in memory in total (ignored when per_class > 0)")
    per_class: int = param(0, "rows kept per class instead of a total (0 = use buffer_size)")
    storage: str = param("reservoir", "online insertion: reservoir (uniform over all seen) or class_balanced",
                         choices=STORAGES)
    selection: str = param("random", "random (online insertion) or end-of-task herding / kcenter per class",
                           choices=SELECTIONS)
    replay_batch: int = param(0, "replayed rows per step (0 = the batch size)")
    weighting: str = param("concat", "concat: mean over current + replayed rows; task: L_cur/t + (1-1/t) L_replay",
                           choices=WEIGHTINGS)

    presets = {
        # P5 (Mammoth best_args.py, seq-cifar10, buffer 500; lr 0.1, set by the run)
        "seq-cifar10/class": {"buffer_size": 500, "replay_batch": 32},
        "seq-cifar10/task": {"buffer_size": 500, "replay_batch": 32},
        # Hsu et al. 2018 (P1 / Table 2): every memory method stores 1,100 samples, split evenly (their code
        # splits by task; two classes per task make that a class-balanced buffer).
        "split-mnist/task": {"buffer_size": 1100, "storage": "class_balanced"},
        "split-mnist/domain": {"buffer_size": 1100, "storage": "class_balanced"},
        "split-mnist/class": {"buffer_size": 1100, "storage": "class_balanced"},
        "permuted-mnist/domain": {"buffer_size": 2500},
        "split-digits/class": {"buffer_size": 200},
        "split-digits/task": {"buffer_size": 200},
        "split-digits/domain": {"buffer_size": 200},
    }

    def __post_init__(self) -> None:
        _check_memory("er", self.buffer_size, self.per_class, self.replay_batch)
        if self.storage not in STORAGES:
            raise ConfigError(f"er: storage must be one of {', '.join(STORAGES)}, got {self.storage!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"er: selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"er: weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        # online insertion runs on a task-free stream; an end-of-task selection needs the boundaries
        self.needs_boundaries = self.selection != "random"
        self.buffer = make_buffer(self.buffer_size, self.per_class, self.storage == "class_balanced"
                                  or self.selection != "random")

    def memory(self, scenario: Any) -> Memory:
        # per_class counts a budget per (task, class) key (class_key): every class of every task, in each mode
        classes = sum(len(task.classes) for task in scenario.tasks)
        return Memory.of(self.per_class * classes if self.per_class else self.buffer_size, scenario)

    # --------------------------------------------------------------------------------------------- hooks
    def augment(self, ctx: Any, batch: Batch) -> Batch:
        if self.weighting != "concat" or len(self.buffer) == 0:
            return batch
        return batch.cat(self.replay(ctx, len(batch)))

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if self.weighting != "task" or len(self.buffer) == 0 or ctx.task == 0:
            return None
        replay = self.replay(ctx, int(ctx.batch.is_new().sum()))  # the step's rows, every process's
        # added to the trainer's L_current: L_cur + (1 − 1/t)(L_replay − L_cur) = (1/t) L_cur + (1 − 1/t) L_replay
        share = ctx.task / (ctx.task + 1)
        replayed = ctx.forward(ctx.augmented(replay.x), replay.t)  # stored un-augmented, augmented when replayed
        return share * (ctx.loss(replayed, replay) - ctx.loss(out, batch))

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        if self.selection == "random":
            new = batch.new
            x, y, t = (batch.x, batch.y, batch.t) if new is None else (batch.x[new], batch.y[new], batch.t[new])
            self.buffer.add(x, y, t, key=class_key(ctx, y, t), generator=ctx.rng)

    def end_task(self, ctx: Any) -> None:
        if self.selection != "random":
            select_task(ctx, self.buffer, self.selection)

    # ------------------------------------------------------------------------------------------- helpers
    def replay(self, ctx: Any, batch_size: int) -> Batch:
        """A replay batch (``new`` = False) of ``replay_batch`` rows (default: ``batch_size``)."""
        rows = self.buffer.sample(self.replay_batch or batch_size, ctx.rng)
        return Batch(rows.x, rows.y, rows.t, torch.zeros(len(rows), dtype=torch.bool, device=rows.y.device))


def _check_memory(name: str, buffer_size: int, per_class: int, replay_batch: int) -> None:
    if per_class < 0:
        raise ConfigError(f"{name}: per_class must be >= 0, got {per_class}")
    if per_class == 0 and buffer_size < 1:
        raise ConfigError(f"{name}: buffer_size must be at least 1 (or set per_class), got {buffer_size}")
    if replay_batch < 0:
        raise ConfigError(f"{name}: replay_batch must be >= 0 (0 = the batch size), got {replay_batch}")


def make_buffer(buffer_size: int, per_class: int, balanced: bool) -> Buffer:
    if per_class > 0:
        return Buffer(per_class=per_class)
    return Buffer(buffer_size, balanced=balanced)


def class_key(ctx: Any, y: Tensor, t: Tensor) -> Tensor:
    """One id per (task, target): the class a row belongs to in every mode (domain-IL reuses targets per task)."""
    return t * ctx.scenario.n_outputs + y


@torch.no_grad()
def features(ctx: Any, x: Tensor, chunk: int = 1000) -> Tensor:
    """The model's feature space for selection: ``model.features`` if it has one, else the flattened inputs."""
    body = getattr(ctx.model, "features", None)
    if body is None:
        return x.flatten(1)
    was = ctx.model.training
    ctx.model.eval()
    out = torch.cat([body(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    ctx.model.train(was)
    return out


def select_task(ctx: Any, buffer: Buffer, how: str) -> None:
    """End-of-task selection from the current task's whole training set into ``buffer``."""
    data = ctx.scenario.task_data(ctx.task)
    parts = [ctx.scenario.batch(data.idx[i:i + 4096], ctx.task) for i in range(0, len(data), 4096)]
    x = torch.cat([b.x for b in parts])
    y = torch.cat([b.y for b in parts])
    t = torch.cat([b.t for b in parts])
    feats = features(ctx, x) if how != "random" else x.new_zeros(len(x), 1)
    buffer.select(x, y, t, feats, how, key=class_key(ctx, y, t), generator=ctx.rng)

