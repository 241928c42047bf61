"""Dark experience replay (DER): match the logits the network produced on replayed inputs when they were stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from retain.buffers import Buffer
from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.scenarios import Batch


@register("der")
@dataclass
class DER(Method):
    """DER: a reservoir buffer of (x, logits) and the penalty α · MSE(f(x_buffer), stored logits).

    Buzzega, Boschini, Porrello, Abati & Calderara, "Dark Experience for General Continual Learning: a Strong,
    Simple Baseline", NeurIPS 2020 (eq. 6; Mammoth's ``der``).

    The stored logits are the raw (unmasked) outputs of the step's forward pass on the current rows, i.e. the
    network's response at insertion time, taken before the optimizer step as in the authors' code; with
    ``--augment`` they are the outputs of the augmented view the step trained on, while the buffer keeps the
    un-augmented rows, augmented afresh each time they are replayed (as in the authors' code). The MSE is
    the mean over rows and every output. ``replay_batch`` rows are drawn without replacement per step (default:
    the batch size, as in the paper). The buffer is a reservoir over everything seen (no task boundaries needed).

    Hooks: ``penalty`` (the logit-matching term), ``after_update`` (reservoir insertion).
    Deviations: none known.
    """

    alpha: float = param(0.3, "weight of the logit-matching term (α)")
    buffer_size: int = param(500, "rows kept in the reservoir buffer")
    replay_batch: int = param(0, "buffer rows per step (0 = the batch size)")

    presets = {
        # P5 (Mammoth best_args.py, seq-cifar10, buffer 500; lr 0.03, set by the run)
        "seq-cifar10/class": {"lr": 0.03, "alpha": 0.3, "buffer_size": 500, "replay_batch": 32},
        "seq-cifar10/task": {"lr": 0.03, "alpha": 0.3, "buffer_size": 500, "replay_batch": 32},
        # Mammoth best_args for seq-mnist, buffer 500 (P3): α = 1.0, 128 buffer rows per step (lr 0.03, SGD,
        # batch 10 and --all-outputs are set by the run).
        "split-mnist/class": {"alpha": 1.0, "buffer_size": 500, "replay_batch": 128},
        "split-mnist/task": {"alpha": 1.0, "buffer_size": 500, "replay_batch": 128},
        "split-digits/class": {"alpha": 0.5, "buffer_size": 200},
    }

    def __post_init__(self) -> None:
        if not self.alpha >= 0:
            raise ConfigError(f"{self.name}: alpha must be >= 0, got {self.alpha}")
        if self.buffer_size < 1:
            raise ConfigError(f"{self.name}: buffer_size must be at least 1, got {self.buffer_size}")
        if self.replay_batch < 0:
            raise ConfigError(f"{self.name}: replay_batch must be >= 0 (0 = the batch size), got {self.replay_batch}")
        self.buffer = Buffer(self.buffer_size)

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.buffer_size, scenario, logits=True)  # each row keeps its logits

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if len(self.buffer) == 0:
            return None
        rows = self.buffer.sample(self.replay_batch or len(ctx.batch), ctx.rng)
        # stored un-augmented, replayed under a fresh augmentation (Mammoth's DER)
        return self.alpha * F.mse_loss(ctx.forward(ctx.augmented(rows.x), rows.t), rows.logits)

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        new = batch.new
        if new is None:
            self.buffer.add(batch.x, batch.y, batch.t, logits=out.detach(), generator=ctx.rng)
        else:
            self.buffer.add(batch.x[new], batch.y[new], batch.t[new], logits=out.detach()[new], generator=ctx.rng)
