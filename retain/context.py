"""The context a method's hooks see: the model, the optimizer, the training view of the scenario, the current task.

Hooks are typed against :class:`Context` (``def penalty(self, ctx: Context, batch, out)``). It holds what a method
may read or change and a few helpers every method needs: the method's ``forward``, the mode-aware masked
cross-entropy, the task's batches, a fresh optimizer, extra training (``fit``) and once-only warnings. The loop
that drives it lives in :mod:`retain.trainer`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.scenarios import Batch, Scenario, TaskData

if TYPE_CHECKING:  # the trainer and the method module import this one
    from retain.method import Method
    from retain.trainer import TrainConfig


def masked(out: Tensor, mask: Tensor | None) -> Tensor:
    """Logits with inactive outputs at -inf (so they get no probability and no gradient)."""
    return out if mask is None else out.masked_fill(~mask, float("-inf"))


@dataclass
class Context:
    """What a method sees: the model, the optimizer, the training view of the scenario, the current task."""

    model: nn.Module
    scenario: Scenario  # training view: no test set
    config: TrainConfig
    method: Method
    device: torch.device
    rng: torch.Generator  # the methods' own randomness (buffer sampling, Fisher labels...), CPU
    seen: Tensor  # bool [n_outputs]: outputs of the classes trained so far (class-IL training mask)
    task: int = 0
    step: int = 0  # global step count
    optimizer: torch.optim.Optimizer | None = None
    warnings: list[str] = field(default_factory=list)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The method's forward (PNN and PackNet route by task); the one interface for training and evaluation."""
        return self.method.forward(self, x, t)

    def mask(self, t: Tensor | int) -> Tensor | None:
        """The training mask for rows of task(s) ``t`` (class-IL with ``all_outputs``: none, every output)."""
        return self.scenario.mask(t, None if self.config.all_outputs else self.seen)

    def loss(self, out: Tensor, batch: Batch, reduction: str = "mean") -> Tensor:
        """Mode-aware cross-entropy: logits masked as the scenario says (the same mask evaluation uses)."""
        logits = masked(out, self.mask(batch.t if batch.task is None else batch.task))
        return F.cross_entropy(logits, batch.y, reduction=reduction)

    def make_optimizer(self, params: list[nn.Parameter] | None = None, lr: float | None = None
                       ) -> torch.optim.Optimizer:
        """A fresh optimizer of the run's kind over ``params`` (default: what the method trains)."""
        c = self.config
        params = self.method.parameters(self.model) if params is None else params
        lr = c.lr if lr is None else lr
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=lr, betas=c.betas, weight_decay=c.weight_decay)

    def batches(self, data: TaskData, epochs: int | None = None, iterations: int | None = None,
                batch_size: int | None = None, seed: int | None = None, start: int = 0) -> Iterator[Batch]:
        """Shuffled batches of ``data``: ``epochs`` passes, or exactly ``iterations`` steps (cycling passes).

        The order of pass ``e`` comes from a generator seeded with ``(seed, e)``, so it can be regenerated;
        ``start`` skips the first steps without building them (resuming a run mid-task).
        """
        bs = batch_size or self.config.batch_size
        n = len(data)
        if n == 0:
            return
        if iterations is None and epochs is None:
            epochs, iterations = self.config.epochs, self.config.iterations
        single = int(data.t[0]) if bool((data.t == data.t[0]).all()) else None
        base = self.config.seed * 1_000_003 + self.task * 7919 if seed is None else seed
        steps, epoch, skip = 0, 0, start
        while True:
            if iterations is None and epoch >= epochs:
                return
            g = torch.Generator().manual_seed(base + epoch)
            perm = torch.randperm(n, generator=g).to(data.idx.device)
            for begin in range(0, n, bs):
                if iterations is not None and steps >= iterations:
                    return
                if steps >= skip:
                    sel = perm[begin:begin + bs]
                    yield self.scenario.batch(data.idx[sel], single if single is not None else data.t[sel])
                steps += 1
            epoch += 1

    def fit(self, data: TaskData, epochs: int | None = None, optimizer: torch.optim.Optimizer | None = None,
            iterations: int | None = None) -> None:
        """Extra training on ``data`` with the method's own step (PackNet's retraining after pruning): ``epochs``
        passes or exactly ``iterations`` steps, in an order of its own (seeded by the run's seed and the task)."""
        if (epochs is None) == (iterations is None):
            raise ValueError("Context.fit needs epochs or iterations, not both")
        if optimizer is not None:
            self.optimizer = optimizer
        for batch in self.batches(data, epochs=epochs, iterations=iterations,
                                  seed=self.config.seed * 31 + self.task + 10_000):
            self.method.observe(self, batch)

    def warn(self, message: str) -> None:
        """A warning shown once and stored in the result."""
        if message not in self.warnings:
            self.warnings.append(message)
