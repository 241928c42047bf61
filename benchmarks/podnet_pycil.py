"""Diagnostic: retain's ``podnet`` with PyCIL's departures (``models/podnet.py`` at ``87cc411``) as switches.

Not a method for experiments: it exists to explain the difference between retain's ``podnet`` and PyCIL's on
Split-MNIST, by running retain's code with what PyCIL does differently and nothing else. Every switch defaults to
retain's behaviour, so ``--method podnet_pycil:PyCILPODNet`` with no ``--param`` is retain's ``podnet``.

What PyCIL does, as read in its file (not copied):

* ``weight_decay``: its SGD has weight decay 5e-4 in the main phase and in the finetuning (momentum 0.9 on both
  is retain's ``--momentum 0.9``; a fresh optimizer per task is ``--reset-optimizer``). retain has no command-line
  weight decay, so this plugin gives its parameters to the optimizer as one group with that weight decay.
* ``ft_train=pycil``: after the main phase of task t >= 1, PyCIL finetunes every parameter except the old classes'
  proxies (``fc1`` at lr 0): the backbone, the current task's proxies (``fc2``) and the scale η (sigma), with the
  same three losses (NCA, POD-flat, POD-spatial against the previous task's model). retain's finetuning trains the
  proxies (old and new) and nothing else. ``ft_train=retain`` keeps retain's.
* ``ft_cosine``: its finetuning lr follows CosineAnnealingLR(T_max = ft_epochs), stepped once per epoch (epoch e
  at ft_lr (1 + cos(pi e / E)) / 2); retain's is constant. (The main phase's cosine over one epoch never moves.)
* ``ft_share=pycil``: its finetuning set has ``memory // old classes`` rows per seen class (the old classes' rows
  as stored, the new classes' herded with the model after the main phase), larger than the memory (400, 300,
  264, 250 rows at memory 200 on 5 x 2); the memory kept afterwards is chosen after the finetuning (the new
  classes herded again with the finetuned model, the old shrunk). retain finetunes on the memory as kept
  (200, 198, 200, 200 rows), chosen before.

The finetuning batch size is the run's (PyCIL's module ``batch_size``, 10 here). Written for retain, no PyCIL
code; batch-norm statistics are not frozen in the finetuning (the comparison's MLP has none). Read with
docs/class-incremental.md, "Checked against the reference code". Run (from the repository root) with::

    PYTHONPATH=benchmarks retain run --benchmark split-mnist --data-dir ../shared/data/mnist --mode class \\
        --hidden 100,100 --epochs 1 --batch-size 10 --optimizer sgd --lr 0.1 --momentum 0.9 --reset-optimizer \\
        --method podnet_pycil:PyCILPODNet --param buffer_size=200 --param weight_decay=5e-4 --param lambda_c=5 \\
        --param ft_lr=0.005 --param ft_train=pycil --param ft_cosine=true --param ft_share=pycil --seed 0
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from retain.errors import ConfigError
from retain.method import param
from retain.methods.lucir import balanced_finetune
from retain.methods.podnet import PODNet


@dataclass
class PyCILPODNet(PODNet):
    """retain's PODNet with PyCIL's weight decay, finetuning parameters, lr schedule and finetuning set."""

    weight_decay: float = param(0.0, "SGD weight decay in the main phase and the finetuning (PyCIL: 5e-4)")
    ft_train: str = param("retain", "what the finetuning trains: retain (all proxies) | pycil (all but old proxies)")
    ft_cosine: bool = param(False, "cosine annealing of the finetuning lr, stepped per epoch (PyCIL)")
    ft_share: str = param("retain", "finetuning set: retain (the memory) | pycil (memory // old classes per class)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ft_train not in ("retain", "pycil") or self.ft_share not in ("retain", "pycil"):
            raise ConfigError("podnet_pycil: ft_train and ft_share are retain or pycil")

    def parameters(self, model: torch.nn.Module) -> Any:
        ps = [p for p in model.parameters() if p.requires_grad]
        if self.weight_decay == 0:
            return ps
        return [{"params": ps, "weight_decay": self.weight_decay}]

    def after_update(self, ctx: Any, batch: Any, out: torch.Tensor) -> None:
        # the old proxies stay as they were (PyCIL's fc1 at lr 0) in the main phase, and in a pycil finetuning
        if self.fixed is not None and (not self._finetuning or self.ft_train == "pycil"):
            with torch.no_grad():
                ctx.model.head.weight[self.fixed] = self.fixed_values

    def _finetune(self, ctx: Any, data: Any) -> None:
        model = ctx.model
        # pycil: the backbone, all proxies (the old ones put back after each step) and sigma; retain: the proxies
        train = list(model.parameters()) if self.ft_train == "pycil" else [model.head.weight]
        cosine = (lambda e: self.ft_lr * (1 + math.cos(math.pi * e / self.ft_epochs)) / 2) if self.ft_cosine else None
        balanced_finetune(self, ctx, train, self.ft_epochs, self.ft_lr, None, self.weight_decay, data=data,
                          lr_at=cosine, freeze_bn=False)

    def end_task(self, ctx: Any) -> None:
        self._step = None
        if ctx.task == 0 or self.ft_epochs <= 0:
            self.exemplars.select(ctx)
            return
        if self.ft_share == "pycil":
            n_old = len(self.exemplars.idx)  # classes in memory before this task
            share = self.buffer_size // n_old
            tmp = copy.deepcopy(self.exemplars)
            n_seen = n_old + int(ctx.scenario.task_out[ctx.task].sum())
            tmp.size = share * n_seen
            tmp.select(ctx)  # old classes keep their share rows, the new ones herded with `share` each
            self._finetune(ctx, tmp.data())
            self.exemplars.select(ctx)  # the memory kept: chosen with the finetuned model
        else:
            self.exemplars.select(ctx)
            self._finetune(ctx, self.exemplars.data())
