"""The context a method's hooks see: the model, the optimizer, the training view of the scenario, the current task.

Hooks are typed against :class:`Context` (``def penalty(self, ctx: Context, batch, out)``). It holds what a method
may read or change and a few helpers every method needs: the method's ``forward``, the mode-aware masked
cross-entropy, the task's batches, a fresh optimizer, extra training (``fit``) and once-only warnings. The loop
that drives it lives in :mod:`retain.trainer`.

The step's plumbing is here too, so that :meth:`retain.method.Method.observe` reads as the maths: the training
view of a batch (:meth:`view`: augmented on the device, and this process's share of the rows when data-parallel),
:meth:`augmented` for rows a method replays from its own memory, mixed precision (:meth:`autocast`,
:meth:`backward` with fp16's gradient scaler, :meth:`step_optimizer`) and the outputs of every process's rows
(:meth:`gathered`). With one process in fp32 and no augmentation each of them is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

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
    augment: Any = None  # retain.augment.Augment | None: the training augmentation (None: none)
    scaler: Any = None  # torch.amp.GradScaler for fp16, else None
    world: Any = None  # retain.distributed.World when data-parallel over several processes, else None
    batch: Batch | None = None  # the step's whole batch (every process's rows, un-augmented), set by view()
    _draws: tuple[int, int] = (-1, 0)  # (step, calls of augmented() in that step): what seeds the next draw

    # ---------------------------------------------------------------------------------------- the step
    def augmented(self, x: Tensor) -> Tensor:
        """``x`` (prepared rows) under the run's training augmentation; itself when there is none.

        Each call draws anew, from a generator seeded by (seed, global step, call number in this step): the same
        run draws the same crops whether it was resumed or not, on the CPU or a GPU."""
        if self.augment is None:
            return x
        step, calls = self._draws
        calls = calls + 1 if step == self.step else 0
        self._draws = (self.step, calls)
        g = torch.Generator().manual_seed(((self.config.seed * 1_000_003 + self.step) * 1_000_003 + calls) % 2**63)
        return self.augment(x, g)

    def view(self, batch: Batch) -> Batch:
        """The rows this process trains on: ``batch`` augmented (all rows, so the draws are the same however many
        processes share the step), then this process's share of them when data-parallel. The whole batch stays in
        ``ctx.batch``: a penalty that sizes its replay sample by the step's rows reads ``len(ctx.batch)``."""
        self.batch = batch
        if self.augment is not None:
            batch = replace(batch, x=self.augmented(batch.x))
        if self.world is None:
            return batch
        from retain import distributed  # distributed: this process's contiguous share of the rows

        part = distributed.shard(len(batch), self.world)
        return Batch(batch.x[part], batch.y[part], batch.t[part], None if batch.new is None else batch.new[part],
                     batch.task, None if batch.soft is None else batch.soft[part])

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward and loss (``precision`` bf16 / fp16); nothing in fp32."""
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: Tensor, n_rows: int | None = None) -> Tensor:
        """``loss.backward()``, scaled under fp16 (the gradients are unscaled again before any hook reads them),
        and averaged over the processes of a data-parallel run (weighted by their ``n_rows`` shares of the step's
        rows, before unscaling, so that every process sees the same overflow). Returns the loss the step reports:
        the one of every process's rows."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.world is not None:
            from retain import distributed  # distributed: the mean gradient over every process's rows
            from retain.method import flat_parameters

            loss = distributed.all_reduce_gradients(flat_parameters(self.method.parameters(self.model)), self.world,
                                                    n_rows, loss)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return loss.detach()

    def step_optimizer(self) -> None:
        """The optimizer's step (fp16: skipped by the scaler when a gradient is not finite)."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def gathered(self, out: Tensor) -> Tensor:
        """The outputs of the whole batch's rows (every process's, in row order) from this process's ``out``."""
        if self.world is None:
            return out
        from retain import distributed  # distributed: every process's outputs, in row order

        return distributed.all_gather_rows(out, self.world, len(self.batch) if self.batch is not None else None)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The method's forward (PNN and PackNet route by task); the one interface for training and evaluation."""
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
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
        ``start`` skips the first steps without building them (resuming a run mid-task). When the training rows are
        on disk (a :class:`retain.images.DiskArray`) the next two batches are read in a background thread while
        the step runs: the same batches, in the same order.
        """
        from retain.images import DiskArray, prefetch

        bs = batch_size or self.config.batch_size
        n = len(data)
        if n == 0:
            return
        if iterations is None and epochs is None:
            epochs, iterations = self.config.epochs, self.config.iterations
        single = int(data.t[0]) if bool((data.t == data.t[0]).all()) else None
        base = self.config.seed * 1_000_003 + self.task * 7919 if seed is None else seed

        def rows() -> Iterator[Batch]:
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

        yield from prefetch(rows(), depth=2) if isinstance(self.scenario.x_train, DiskArray) else rows()

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
