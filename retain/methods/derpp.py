"""DER++: dark experience replay plus a cross-entropy term on a second buffer sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from retain.method import param, register
from retain.methods.der import DER
from retain.scenarios import Batch


@register("derpp")
@dataclass
class DERPP(DER):
    """DER++: α · MSE(f(x'), stored logits) + β · CE(f(x''), y'') on two independent buffer samples.

    Buzzega et al., NeurIPS 2020 (eq. 7; Mammoth's ``derpp``). The buffer, its insertion and the stored logits are
    DER's (:class:`retain.methods.der.DER`); the labelled term uses the mode's masked cross-entropy (task-IL: each
    row's own head; class-IL: the classes seen so far), each row with the task id it was stored with.

    Hooks: ``penalty``, ``after_update``.
    The two samples go through the network in two forward passes, one each, as in Mammoth's ``derpp``: under batch
    normalisation in training mode a joint pass would normalise each sample with the statistics of both (and
    update the running statistics once instead of twice), which changes the outputs of a CNN. Each sample is drawn
    without replacement, independently of the other, as in the paper; with ``--augment`` each sample gets its own
    fresh augmentation of the stored (un-augmented) rows.
    Deviations: none known.
    """

    beta: float = param(0.5, "weight of the cross-entropy term on buffer labels (β)")

    presets = {
        # P5 (Mammoth best_args.py, seq-cifar10, buffer 500; lr 0.03, set by the run)
        "seq-cifar10/class": {"lr": 0.03, "alpha": 0.2, "beta": 0.5, "buffer_size": 500, "replay_batch": 32},
        "seq-cifar10/task": {"lr": 0.03, "alpha": 0.2, "beta": 0.5, "buffer_size": 500, "replay_batch": 32},
        # Mammoth best_args for seq-mnist, buffer 500 (P3): α = 1.0, β = 0.5, buffer rows per sample = the batch
        # size (lr 0.03, SGD, batch 10 and --all-outputs are set by the run).
        "split-mnist/class": {"alpha": 1.0, "beta": 0.5, "buffer_size": 500},
        "split-mnist/task": {"alpha": 1.0, "beta": 0.5, "buffer_size": 500},
        "split-digits/class": {"alpha": 0.5, "beta": 1.0, "buffer_size": 200},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta >= 0:
            from retain.errors import ConfigError

            raise ConfigError(f"derpp: beta must be >= 0, got {self.beta}")

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if len(self.buffer) == 0:
            return None
        n = self.replay_batch or len(ctx.batch)
        a = self.buffer.sample(n, ctx.rng)
        logit_term = self.alpha * F.mse_loss(ctx.forward(ctx.augmented(a.x), a.t), a.logits)
        b = self.buffer.sample(n, ctx.rng)
        return logit_term + self.beta * ctx.loss(ctx.forward(ctx.augmented(b.x), b.t), Batch(b.x, b.y, b.t))
