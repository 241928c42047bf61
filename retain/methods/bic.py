"""Bias correction (BiC): distillation with an exemplar memory, then two scalars rescale the new classes' logits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.buffers import Exemplars
from retain.errors import ConfigError
from retain.method import Memory, Method, frozen_copy, param, register
from retain.methods.lwf import distillation
from retain.scenarios import Batch, TaskData

SELECTIONS = ("herding", "random")
WEIGHTINGS = ("paper", "mammoth")


# ----------------------------------------------------------------------- the distillation (shared with WA)

def weighted_distillation(ctx: Any, out: Tensor, batch: Batch, teacher: Tensor, old: Tensor, kd_weight: float,
                          ce_weight: float, temperature: float) -> Tensor:
    """The extra term that turns the trainer's loss CE into ``ce_weight`` CE + ``kd_weight`` KD (the papers':
    (1 - λ) CE + λ KD).

    KD is the distillation over the old classes' logits at ``temperature`` (:func:`retain.methods.lwf.distillation`,
    the KL divergence: the paper's cross-entropy less the teacher's entropy, the same gradient)."""
    kd = distillation(out[:, old], teacher[:, old], temperature)
    if ce_weight == 1.0:
        return kd_weight * kd
    return kd_weight * kd + (ce_weight - 1.0) * ctx.loss(out, batch)


def old_outputs(scenario: Any, task: int) -> Tensor:
    """Outputs (bool ``[n_outputs]``) of the classes of the tasks before ``task``."""
    return scenario.task_out[:task].any(0)


def check_common(name: str, buffer_size: int, temperature: float, selection: str) -> None:
    if buffer_size < 1:
        raise ConfigError(f"{name}: buffer_size must be at least 1, got {buffer_size}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"{name}: temperature must be a finite number > 0, got {temperature}")
    if selection not in SELECTIONS:
        raise ConfigError(f"{name}: selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")


# ---------------------------------------------------------------------------------------------------------- BiC

@register("bic")
@dataclass
class BiC(Method):
    """BiC: training on new data + exemplars with (1 - λ) CE + λ KD, then a bias layer α z + β on the new classes.

    Wu, Chen, Wang, Ye, Liu, Guo & Fu, "Large Scale Incremental Learning", CVPR 2019 (eqs. 1-5).

    Stage 1 (each task): the training set is the task's data and the exemplars of the earlier classes, less a
    validation part (below); the loss is (1 - λ) L_c + λ L_d with λ = n / (n + m) (n old classes, m new), L_c the
    cross-entropy over the classes seen so far and L_d the distillation of the old classes' logits at temperature T
    toward the previous model's (its bias correction applied, the model that was evaluated). Stage 2 (from the second
    task on, in ``end_task``): with the rest of the model frozen (eval mode, no gradient) the two scalars of the
    bias layer, α (init 1) and β (init 0), are trained on the validation part only, by cross-entropy over the seen
    classes of the corrected logits: q_k = o_k for the old classes, α o_k + β for the new ones (eq. 4). Evaluation
    applies the correction (``forward``); the next task trains the bare model and distils from the corrected one.

    Validation part: ``val_fraction`` of each old class's exemplars (the paper's 9:1 split), i.e.
    ⌊val_fraction · buffer_size / n⌋ rows per old class (at least one), and as many rows of each new class taken out
    of the task's data, so it is balanced over old and new classes as the paper's (PyCIL's
    ``val_samples_per_class``). Memory: ``buffer_size`` exemplars in total, an equal share per seen class, chosen at
    the end of each class's task by iCaRL's herding (PyCIL) or at random (``selection``).

    Hooks: ``begin_task`` (teacher, λ, the validation split), ``task_data`` (new data + exemplars less the
    validation rows), ``penalty`` (λ (KD - CE), so the loss is (1 - λ) CE + λ KD), ``end_task`` (stage 2, then the
    exemplars), ``forward`` (the correction at evaluation).

    Deviations and choices, with reasons: the distillation is the KL divergence (the paper's cross-entropy less the
    teacher's entropy: same gradient), with no T² factor, as the paper and PyCIL; Mammoth multiplies it by T² and
    weighs it 1/(t+1), CE t/(t+1) (0-based t: the paper's λ reversed), which ``weighting = mammoth`` reproduces
    (it learns each new task better and keeps old ones worse: see the reference check). Stage 2 is trained on the
    validation rows' logits computed once (the model is frozen and in eval mode, so they do not change; no
    augmentation of the validation rows), with Adam (lr 1e-3, 250 epochs, Mammoth's values; the paper gives none).
    Only the last task's correction is applied, to its own classes (eq. 4: the old logits untouched; Mammoth) —
    PyCIL keeps every task's layer. The exemplars are read from the training set by index (the trainer iterates new
    data ∪ exemplars as the paper's loader does); they are reported as ``buffer_size`` stored rows. Herding is
    PyCIL's selection; Mammoth stores the first rows of each task's shuffled loader (``selection = random``).
    """

    buffer_size: int = param(2000, "exemplars kept in total, split equally over the seen classes (the paper's 2,000)")
    temperature: float = param(2.0, "distillation temperature (T in the paper)")
    val_fraction: float = param(0.1, "fraction of each old class's exemplars held out to train the bias layer (9:1)")
    bias_epochs: int = param(250, "epochs of stage 2 over the validation rows (Mammoth's bic_epochs)")
    bias_lr: float = param(1e-3, "Adam learning rate of the bias layer (Mammoth)")
    bias_batch: int = param(0, "batch size of stage 2 (0 = the run's batch size, as Mammoth's val loader)")
    selection: str = param("herding", "exemplar choice at the end of a task: herding (iCaRL, PyCIL) or random",
                           choices=SELECTIONS)
    weighting: str = param("paper", "paper: (1-λ) CE + λ KD, λ = n_old/(n_old+n_new); mammoth: Mammoth's bic, "
                                    "(1-1/t) CE + (1/t) T² KD at task t (1-based)", choices=WEIGHTINGS)

    modes = ("class",)
    needs_boundaries = True
    presets = {
        # Memory sizes of the protocol (200/500 in total); the other values are the defaults above, since
        # neither Mammoth (best_args.py, bic: seq-cifar100 only, lr 0.03) nor PyCIL (exps/bic.json: CIFAR-100,
        # memory 2000) has MNIST or CIFAR-10 arguments; the runs' lr/batch are the benchmark's.
        "split-mnist/class": {"buffer_size": 500},
        "split-fashion-mnist/class": {"buffer_size": 500},
        "split-digits/class": {"buffer_size": 200},
        "seq-cifar10/class": {"buffer_size": 500},
    }

    def __post_init__(self) -> None:
        check_common("bic", self.buffer_size, self.temperature, self.selection)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"bic: val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.bias_epochs < 0 or self.bias_batch < 0:
            raise ConfigError("bic: bias_epochs and bias_batch must be >= 0")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"bic: weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not (self.bias_lr > 0 and math.isfinite(self.bias_lr)):
            raise ConfigError(f"bic: bias_lr must be a finite number > 0, got {self.bias_lr}")
        self.exemplars = Exemplars(self.buffer_size, remainder=True)
        self.teacher: nn.Module | None = None
        self.teacher_correction: tuple[Tensor, Tensor, Tensor] | None = None
        self.correction: tuple[Tensor, Tensor, Tensor] | None = None  # (new outputs, α, β) of the last task
        self.val: TaskData | None = None  # the validation part of this task (exemplars + new rows)
        self.lam = self.kd_weight = 0.0
        self.ce_weight = 1.0

    def memory(self, scenario: Any) -> Memory:
        return self.exemplars.memory(scenario)

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        self.teacher_correction, self.correction, self.val = self.correction, None, None
        if ctx.task == 0:
            return
        self.teacher = frozen_copy(ctx.model)
        sc = ctx.scenario
        n_old, n_new = int(old_outputs(sc, ctx.task).sum()), int(sc.task_out[ctx.task].sum())
        self.lam = n_old / (n_old + n_new)
        if self.weighting == "mammoth":  # Mammoth: lamda = 1 / (t + 1) (0-based t) on KD · T², 1 - lamda on CE
            self.kd_weight, self.ce_weight = self.temperature ** 2 / (ctx.task + 1), ctx.task / (ctx.task + 1)
        else:
            self.kd_weight, self.ce_weight = self.lam, 1.0 - self.lam
        per_class = max(1, int(self.val_fraction * self.buffer_size / max(len(self.exemplars.idx), 1)))
        held = []
        for c, idx in self.exemplars.idx.items():
            pick = torch.randperm(len(idx), generator=ctx.rng)[:min(per_class, len(idx) - 1)]
            held.append((idx[pick.to(idx.device)], self.exemplars.task[c]))
        data = sc.task_data(ctx.task)
        y = sc.targets(sc.y_train[data.idx], ctx.task)
        for c in torch.unique(y).tolist():
            rows = (y == c).nonzero().flatten()
            pick = torch.randperm(len(rows), generator=ctx.rng)[:per_class].to(rows.device)
            held.append((data.idx[rows[pick]], ctx.task))
        self.val = TaskData(torch.cat([i for i, _ in held]),
                            torch.cat([torch.full((len(i),), t, dtype=torch.long, device=i.device) for i, t in held]))

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        if self.val is None:
            return data
        keep = ~torch.isin(data.idx, self.val.idx.to(data.idx.device))
        data = TaskData(data.idx[keep], data.t[keep])
        return data.cat(self.exemplars.data(self.val.idx)) if len(self.exemplars) else data

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            target = apply_correction(self.teacher(batch.x), self.teacher_correction)
        old = old_outputs(ctx.scenario, ctx.task)
        return weighted_distillation(ctx, out, batch, target, old, self.kd_weight, self.ce_weight, self.temperature)

    def end_task(self, ctx: Any) -> None:
        if ctx.task > 0 and self.val is not None and len(self.val):
            self.correction = self.train_bias(ctx)
        self.exemplars.select(ctx, self.selection)

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        out = ctx.model(x)
        return out if ctx.model.training else apply_correction(out, self.correction)

    # ------------------------------------------------------------------------------------------- stage 2
    def train_bias(self, ctx: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Fit α, β on the validation rows with the model frozen; returns (new outputs, α, β)."""
        sc, model = ctx.scenario, ctx.model
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        with torch.no_grad():
            logits, targets = [], []
            for start in range(0, len(self.val), 1000):
                b = sc.batch(self.val.idx[start:start + 1000], self.val.t[start:start + 1000])
                logits.append(model(b.x).float())
                targets.append(b.y)
        for m, training in modes:
            m.training = training
        z, y = torch.cat(logits), torch.cat(targets)
        new = sc.task_out[ctx.task]
        params = fit_bias(z, y, new, ctx.seen, self.bias_epochs, self.bias_batch or ctx.config.batch_size,
                          self.bias_lr, ctx.rng)
        return new.clone(), params[0], params[1]


def apply_correction(out: Tensor, correction: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    """The bias layer: α z + β on the outputs of ``correction[0]`` (the new classes), the others untouched."""
    if correction is None:
        return out
    new, alpha, beta = correction
    return torch.where(new.to(out.device), alpha.to(out.device) * out + beta.to(out.device), out)


def fit_bias(z: Tensor, y: Tensor, new: Tensor, seen: Tensor, epochs: int, batch_size: int, lr: float,
             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Train (α, β) from (1, 0) by Adam on the cross-entropy over the ``seen`` outputs of the corrected logits of
    the rows ``z`` (their targets ``y``), ``epochs`` passes in batches of ``batch_size``."""
    alpha = torch.ones((), device=z.device, requires_grad=True)
    beta = torch.zeros((), device=z.device, requires_grad=True)
    opt = torch.optim.Adam([alpha, beta], lr=lr)
    seen = seen.to(z.device)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=generator).to(z.device)
        for start in range(0, len(y), batch_size):
            sel = perm[start:start + batch_size]
            q = apply_correction(z[sel], (new, alpha, beta)).masked_fill(~seen, float("-inf"))
            loss = F.cross_entropy(q, y[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return alpha.detach(), beta.detach()
