"""DER++: dark experience replay plus a cross-entropy term on a second buffer sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
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
    Deviations: the two samples go through the network in one forward pass (same result, fewer kernel launches);
    each sample is drawn without replacement, independently of the other, as in the paper.
    """

    beta: float = param(0.5, "weight of the cross-entropy term on buffer labels (β)")

    presets = {
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
        n = self.replay_batch or len(batch)
        a = self.buffer.sample(n, ctx.rng)
        b = self.buffer.sample(n, ctx.rng)
        both = ctx.forward(torch.cat([a.x, b.x]), torch.cat([a.t, b.t]))
        out_a, out_b = both[:len(a)], both[len(a):]
        return (self.alpha * F.mse_loss(out_a, a.logits)
                + self.beta * ctx.loss(out_b, Batch(b.x, b.y, b.t)))
