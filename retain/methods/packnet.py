"""PackNet: after each task prune its weights by magnitude, retrain the rest, freeze them; evaluate per task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from retain.errors import ConfigError
from retain.method import Method, param, register

FREE = -1  # owner of a weight no task has kept (yet)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@register("packnet")
@dataclass
class PackNet(Method):
    """PackNet: iterative magnitude pruning packs several tasks into one network, each task owning its weights.

    Mallya & Lazebnik, "PackNet: Adding multiple tasks to a single network by iterative pruning", CVPR 2018.

    Every weight of a convolution or linear layer (the prunable ones) has an owner: a task, or free. Task k trains
    only the free weights; at its end, in every prunable layer, the ``prune_ratio`` fraction of those weights with
    the smallest magnitude is set to zero and released (exact top-k by |w|, per layer), the others become task k's;
    the kept weights are retrained alone for ``retrain_epochs`` epochs, then frozen for good. Frozen weights are
    protected twice: their gradients are zeroed before each step (``before_update``) and their stored values
    written back after it (``after_update``), so neither momentum nor weight decay can move them. Biases and
    normalisation layers are trained with task 0 and frozen afterwards (normalisation layers also kept in
    evaluation mode, so their running statistics stay put), as in the paper. The output layer (``model.head``) is
    not pruned: its rows are the per-task classifiers, each frozen after its task.

    Evaluating (or training) task t uses only the weights owned by tasks 0..t: the forward builds masked copies per
    task with :func:`torch.func.functional_call` and never writes the stored weights. A task not finished yet
    uses the whole network (its free weights included).

    Hooks: ``begin_task`` (decide what is trainable, snapshot), ``before_update`` (gradient mask), ``after_update``
    (restore frozen values), ``end_task`` (prune, retrain with :meth:`Context.fit` and a fresh optimizer, freeze),
    ``forward`` (per-task masked weights). Task-IL only: the masks are chosen by the task id.

    Deviations: retraining uses the run's optimizer and learning rate (the paper retrains at a lower one, e.g. a
    tenth); the paper also prunes after the last task only when more tasks may follow — here every task is pruned
    the same way, so each task's share is ``(1 - prune_ratio)`` of the weights that were free when it began;
    ``retrain_iterations`` (not in the paper) bounds retraining in steps for single-pass protocols.

    ``shares=equal`` (not in the paper, which prunes each added task by a fixed ratio) ignores ``prune_ratio``
    and gives every task of the scenario the same share: task k of T keeps 1/(T - k) of the weights still free, so
    each owns 1/T of every prunable layer (the last task keeps everything left). With a fixed ratio r task k keeps
    (1 - r) r^k of a layer: at r = 0.5 the 17th task would keep about one weight of a 256 x 256 layer.
    """

    prune_ratio: float = param(0.5, "fraction of a task's free weights released after it (pruning ratio)")
    retrain_epochs: int = param(1, "epochs of retraining the kept weights after pruning")
    retrain_iterations: int = param(0, "if > 0: retrain for this many steps instead of retrain_epochs epochs")
    shares: str = param("ratio", "ratio: each task keeps (1 - prune_ratio) of the free weights; equal: task k of T "
                        "keeps 1/(T - k) of them, so every task owns 1/T", choices=("ratio", "equal"))

    modes = ("task",)
    needs_boundaries = True
    # Permuted-MNIST is a single-pass protocol (A-GEM) with many tasks: retrain 100 steps instead of a whole extra
    # epoch, and share the network equally (a fixed ratio starves the later tasks of 17).
    presets = {"permuted-mnist/task": {"retrain_iterations": 100, "shares": "equal"}}

    def __post_init__(self) -> None:
        if not 0.0 < self.prune_ratio < 1.0:
            raise ConfigError(f"packnet: prune_ratio must be in (0, 1), got {self.prune_ratio}")
        if self.retrain_epochs < 0 or self.retrain_iterations < 0:
            raise ConfigError("packnet: retrain_epochs and retrain_iterations must be >= 0")
        if self.shares not in ("ratio", "equal"):
            raise ConfigError(f"packnet: shares must be ratio or equal, got {self.shares!r}")
        self.owner: dict[str, Tensor] = {}  # prunable weight name -> owner task per element (FREE = -1)
        self.head_owner: dict[str, Tensor] = {}  # head weight / bias name -> owner task per output row
        self.trainable: dict[str, Tensor] = {}  # name -> bool mask of the elements the current phase may move
        self.stored: dict[str, Tensor] = {}  # name -> values the frozen elements are restored to
        self.done = 0  # tasks finished (pruned, retrained, frozen)
        self.kept: list[dict[str, int]] = []  # per task: weights kept per prunable layer

    # ---------------------------------------------------------------------------------------------- setup
    def _init(self, model: nn.Module) -> None:
        head = getattr(model, "head", None)
        head_names = {f"head.{n}" for n, _ in head.named_parameters()} if isinstance(head, nn.Module) else set()
        prunable = {f"{name}.weight" for name, m in model.named_modules()
                    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
        for name, p in model.named_parameters():
            if name in head_names:
                self.head_owner[name] = torch.full((p.shape[0],), FREE, dtype=torch.long, device=p.device)
            elif name in prunable:
                self.owner[name] = torch.full(p.shape, FREE, dtype=torch.int16, device=p.device)

    def begin_task(self, ctx: Any) -> None:
        if not self.owner and not self.head_owner:
            self._init(ctx.model)
        self._phase(ctx, retraining=False)

    def _phase(self, ctx: Any, retraining: bool) -> None:
        """What may move now: training -> the free weights; retraining -> the weights task ``ctx.task`` kept."""
        task_out = ctx.scenario.task_out[ctx.task]
        self.trainable, self.stored = {}, {}
        for name, p in ctx.model.named_parameters():
            if name in self.owner:
                mask = self.owner[name] == (ctx.task if retraining else FREE)
            elif name in self.head_owner:
                rows = task_out & (self.head_owner[name] == FREE)
                mask = rows.view(-1, *([1] * (p.dim() - 1))).expand_as(p)
            else:  # biases and normalisation parameters: task 0 only
                mask = torch.full_like(p, self.done == 0, dtype=torch.bool)
            self.trainable[name] = mask
            self.stored[name] = p.detach().clone()

    # ------------------------------------------------------------------------------------------ the step
    def before_update(self, ctx: Any) -> None:
        for name, p in ctx.model.named_parameters():
            if p.grad is not None and name in self.trainable:
                p.grad.mul_(self.trainable[name])

    @torch.no_grad()
    def after_update(self, ctx: Any, batch: Any, out: Tensor) -> None:
        for name, p in ctx.model.named_parameters():
            if name in self.trainable:
                p.copy_(torch.where(self.trainable[name], p, self.stored[name]))

    # ------------------------------------------------------------------------------------------ end of task
    def end_task(self, ctx: Any) -> None:
        task = ctx.task
        keep_fraction = 1.0 - self.prune_ratio
        if self.shares == "equal":
            keep_fraction = 1.0 / max(1, ctx.scenario.n_tasks - task)
        kept = {}
        with torch.no_grad():
            params = dict(ctx.model.named_parameters())
            for name, owner in self.owner.items():
                p = params[name]
                free = (owner == FREE).flatten()
                candidates = free.nonzero().flatten()
                n_keep = int(round(keep_fraction * len(candidates)))
                keep = candidates[torch.topk(p.flatten()[candidates].abs(), n_keep).indices]
                owner.view(-1)[keep] = task
                released = free.clone()
                released[keep] = False
                p.view(-1)[released] = 0.0
                kept[name] = n_keep
        self.kept.append(kept)
        data = ctx.scenario.task_data(task)
        if self.retrain_iterations > 0 or self.retrain_epochs > 0:
            self._phase(ctx, retraining=True)
            if self.retrain_iterations > 0:
                ctx.fit(data, optimizer=ctx.make_optimizer(), iterations=self.retrain_iterations)
            else:
                ctx.fit(data, self.retrain_epochs, ctx.make_optimizer())
        for owner in self.head_owner.values():
            owner[ctx.scenario.task_out[task] & (owner == FREE)] = task
        self.done = task + 1
        self.trainable, self.stored = {}, {}

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        model = ctx.model
        if self.done > 0:
            for m in model.modules():  # frozen after task 0: keep their running statistics out of training mode
                if isinstance(m, _NORMS):
                    m.eval()
        tasks = [int(v) for v in torch.unique(t)]
        if all(task >= self.done for task in tasks):
            return model(x)
        out = None
        for task in tasks:
            rows = None if len(tasks) == 1 else (t == task).nonzero().flatten()
            xs = x if rows is None else x[rows]
            if task >= self.done:
                y = model(xs)
            else:
                weights = {name: p * ((self.owner[name] >= 0) & (self.owner[name] <= task))
                           for name, p in model.named_parameters() if name in self.owner}
                y = functional_call(model, weights, (xs,), strict=False)
            if rows is None:
                return y
            if out is None:
                out = y.new_zeros(len(x), y.shape[1])
            out[rows] = y
        return out

    def mask_sizes(self) -> dict[str, int]:
        """Bytes of the owner tables (the method's memory beyond the model; stored as int16)."""
        return {name: o.numel() * o.element_size() for name, o in self.owner.items()}
