"""Diagnostic: retain's ``lucir`` with Mammoth's five departures from the paper switched on.

Not a method for experiments (it is not registered): it exists to explain the difference between retain's
``lucir`` and Mammoth's ``models/lucir.py`` (commit ``e75a491c``) on Split-MNIST, by running retain's code with what
Mammoth does differently and nothing else. Read with docs/class-incremental.md, "Checked against the reference
code". The five departures, each read in Mammoth's files:

1. λ of the less-forget term: Mammoth sets it in ``end_task`` to ``sqrt(current_task) · lamda_base`` *after* the
   task, so the task with index t (0-based) trains with λ_base · sqrt(t − 1): 0 at the second task, then 5, 5√2,
   5√3. The paper's λ_base · sqrt(|C_old| / |C_new|) gives 5, 5√2, 5√3, 10.
2. Hard negatives of the margin ranking loss: Mammoth takes the top-K over every column from the current task on,
   the future tasks' untrained ones included; the paper over the new classes only.
3. The finetuning after each task (``fit_buffer``), also after the first: only the current task's class weights
   and σ have ``requires_grad`` (the other tasks' are frozen), so the old classes are not rebalanced.
4. Its learning rate: ``MultiStepLR(milestones=[10])`` stepped after every *batch*, so lr_finetune / 10 from the
   eleventh step on (the paper and retain divide at half of the epochs).
5. The exemplars: ``utils.buffer.fill_buffer`` (called with ``normalize_features`` off) herds on the features as
   they are; iCaRL's herding, the paper's and retain's, on L2-normalised features.

Run as a plugin (from the repository root)::

    PYTHONPATH=benchmarks retain run --benchmark split-mnist --data-dir ../shared/data/mnist --mode class \
        --hidden 100,100 --epochs 1 --batch-size 10 --optimizer sgd --lr 0.1 --normalize 0,1 --init xavier \
        --all-outputs --method lucir_mammoth:MammothLUCIR --param buffer_size=200 --seed 0

(``--all-outputs``: Mammoth's cross-entropy is over all columns; ``--normalize 0,1``: its seq-mnist is
``ToTensor`` only; ``--init xavier``: its MNIST MLP's initialisation. Mammoth's ``fitting_epochs`` 20 and
``lr_finetune`` 0.01 are retain's ``ft_epochs`` and ``ft_lr`` defaults.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from retain.methods.lucir import LUCIR, balanced_finetune
from retain.scenarios import Batch


@dataclass
class MammothLUCIR(LUCIR):
    """retain's LUCIR with Mammoth's λ schedule, hard negatives, finetuning, its per-step lr decay and herding."""

    decay_step: int = 10  # Mammoth's ft_lr_strat = [10], counted in steps

    def begin_task(self, ctx: Any) -> None:
        super().begin_task(ctx)
        if ctx.task > 0:
            self.lam = self.lambda_base * math.sqrt(ctx.task - 1)  # departure 1

    def negatives(self) -> torch.Tensor:
        return ~self.old_classes  # departure 2: every column not of an earlier task is a candidate negative

    def after_update(self, ctx: Any, batch: Batch, out: torch.Tensor) -> None:
        super().after_update(ctx, batch, out)
        if self._finetuning:
            self._ft_steps += 1
            if self._ft_steps == self.decay_step:  # departure 4
                for g in ctx.optimizer.param_groups:
                    g["lr"] = self.ft_lr * 0.1

    def end_task(self, ctx: Any) -> None:
        self._feats = None
        self.exemplars.select(ctx, normalize=False)  # departure 5
        if self.ft_epochs <= 0:
            return
        head = ctx.model.head
        current = head.rows(self.new_classes).unsqueeze(1).to(head.weight.dtype)
        hook = head.weight.register_hook(lambda g: g * current)  # departure 3: the other tasks' rows frozen
        self._ft_steps = 0
        try:
            balanced_finetune(self, ctx, [head.weight, head.sigma], self.ft_epochs, self.ft_lr, None)
        finally:
            hook.remove()
