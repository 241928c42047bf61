"""X-DER: DER++ whose buffer logits are revised for classes learned later and whose future heads are prepared."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.augment import Augment, Greyscale, Jitter, ResizedCrop
from retain.buffers import Buffer
from retain.context import masked
from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.ops.contrastive import supcon
from retain.scenarios import Batch


@register("xder")
@dataclass
class XDER(Method):
    """X-DER: DER++ with the past-logit update, future-logit preparation (consistency + constraint) and a coreset.

    Boschini, Bonicelli, Buzzega, Porrello & Calderara, "Class-Incremental Continual Learning into the eXtended
    DER-verse", IEEE TPAMI 45(5), 2023 (arXiv 2201.00766; checked against the authors' Mammoth ``models/xder.py``,
    the variant with the SupCon consistency term, and ``xder_ce.py``, the one without it).

    Heads are the tasks' output groups (``scenario.task_out``): at task t the *current* head is task t's outputs,
    the *past* heads those of tasks < t, the *future* heads those of tasks > t. The step's loss is

    * ``CE(current head)`` on the incoming rows (only the current task's logits compete: "present head");
    * ``α · MSE(f(x'), z')`` on a buffer sample over every output (DER), ``β · CE`` on a second sample over the
      past heads (DER++), each sample through the network in its own pass and under a fresh ``--augment`` view;
    * future preparation, while a future head exists: ``λ`` · the supervised-contrastive (SupCon) loss of each
      future head's outputs, L2-normalised, over ``simclr_num_aug`` strong augmentations of the incoming rows and
      ``simclr_batch_size`` buffer rows (temperature ``simclr_temp``; mean over rows and future heads), and
      ``η · mean(relu(max future logit + m − max own-head logit))`` over the incoming and replayed rows (the future
      constraint; only the rows that violate it enter the mean);
    * optionally (``past_constraint``, off as in Mammoth) ``η`` · the same hinge on the softmax over the seen heads,
      current head against the (detached) past heads.

    Memory (the buffer): filled at each task's end, not online. Its capacity is shared equally by every class
    seen (Buffer's class-balanced storage; the rows of old classes chosen last are dropped first, Mammoth's "keep
    the first" reduction), the new classes' rows drawn at random from the task's data, each stored with the
    network's logits on an augmented view at that moment (no batch-norm statistics updated).

    The logit updates (``update_logits``; γ = ``gamma``): for a stored row with label y and stored logits z, a
    slice S of outputs is replaced by the network's current outputs o_S, rescaled by ``γ · z_y / max(o_S)`` when
    ``max(o_S) > z_y`` (so no revised logit outgrows γ times the stored ground-truth logit), the other outputs kept.

    * past-logit update at task t's end, for the rows of earlier tasks: S = the outputs of task t's head and every
      future head (Mammoth updates this joint slice, the future heads' logits being those the future preparation
      trained); the past heads, the row's own class included, are untouched;
    * the current task's rows at its end: z = o on every output, then S = the past heads rescaled against o_y;
    * during task t, each replayed row of an earlier task (both samples, once per step) is updated the same way
      (S = task t onward) with probability 1 / (times it was drawn during this task), Mammoth's online update.

    ``align_bn`` (Mammoth's default): the batch-norm running statistics are updated only by the first buffer pass,
    into which ``replay_batch // t`` incoming rows are mixed, from the second task on (and by the incoming pass in
    the first task); every other pass (incoming rows from task 1 on, the second buffer sample, the augmented views,
    the end-of-task logits) uses batch statistics without updating them. A model without batch norm is unaffected.

    Hooks: ``augment`` (snapshots the batch-norm statistics before the incoming pass), ``penalty`` (every loss term,
    with the trainer's masked CE of the incoming rows swapped for the current-head CE; the online logit update),
    ``end_task`` (coreset, stored logits, past-logit update).
    Deviations: (1) Mammoth's distance-preserving term (``dp_weight``, default 0) is not implemented. (2) The strong
    augmentation of the consistency term is retain's batched resized crop (scale 0.2–1) + flip + colour jitter
    (0.4, 0.4, 0.4, 0.1, p = 0.8) + greyscale (p = 0.2): Mammoth's ``strong_aug`` recipe, drawn from the method's
    generator; on single-channel images only the crop and flip (Mammoth's ``strong_aug`` fails on them), on
    non-image inputs the term is skipped with a warning. (3) The remainder of a class share goes to the earliest
    classes (Buffer's rule), not to random classes of the new task. (4) The penalty returns
    ``CE(current head) − CE_trainer + ...`` so that the shared step still owns the optimisation; the two CE terms
    on the incoming rows are the same computation and cancel exactly. (5) The stream pass's statistics under
    ``align_bn`` are put back after it (snapshot in ``augment``, restored in ``penalty``) rather than never taken:
    the trainer owns that pass. Not part of this class: Mammoth's ``xder_rpc`` (the RPC classifier variant).
    """

    alpha: float = param(0.3, "weight of the logit-matching term on buffer rows (α)")
    beta: float = param(0.8, "weight of the cross-entropy on buffer labels over the past heads (β)")
    gamma: float = param(0.85, "bound of a revised logit: at most γ times the stored ground-truth logit (γ)")
    lambda_: float = param(0.05, "weight of the SupCon consistency loss on the future heads (λ)")
    eta: float = param(0.1, "weight of the future (and past) logit constraints (η)")
    m: float = param(0.3, "margin of the logit constraints (m)")
    buffer_size: int = param(500, "rows kept in the buffer, shared equally by the seen classes")
    replay_batch: int = param(0, "rows per buffer sample (0 = the batch size; Mammoth's minibatch_size)")
    simclr_temp: float = param(5.0, "temperature of the SupCon consistency loss")
    simclr_batch_size: int = param(64, "buffer rows added to the incoming rows in the consistency loss")
    simclr_num_aug: int = param(4, "strong augmentations of each row in the consistency loss")
    future_constraint: bool = param(True, "hinge: the future heads' max logit stays m below the own head's")
    past_constraint: bool = param(False, "hinge on the softmax: current head above the past heads by m")
    align_bn: bool = param(True, "batch-norm statistics from the mixed buffer pass only (Mammoth's align_bn)")

    modes: ClassVar[tuple[str, ...]] = ("class", "task")
    needs_boundaries: ClassVar[bool] = True  # the buffer is filled and its logits revised at task ends
    presets = {
        # Mammoth models/config/xder.yaml, seq-cifar100, buffer 500 (the only tuned X-DER entry; lr 0.03, set by the
        # run): alpha 0.3, beta 0.8, simclr_num_aug 4; gamma, lambda, eta, m at Mammoth's defaults.
        "seq-cifar10/class": {"alpha": 0.3, "beta": 0.8, "buffer_size": 500, "replay_batch": 32},
        # Split-MNIST / Fashion-MNIST: no X-DER entry in Mammoth; DER++'s seq-mnist best args at buffer 500
        # (alpha 1.0, beta 0.5, minibatch 10; lr 0.03, batch 10 set by the run), eta as Mammoth's xder_ce (0.01),
        # and no consistency term (Mammoth's xder cannot run on single-channel images; xder_ce is its variant).
        "split-mnist/class": {"alpha": 1.0, "beta": 0.5, "buffer_size": 500, "replay_batch": 10, "lambda": 0.0,
                              "eta": 0.01},
        "split-fashion-mnist/class": {"alpha": 1.0, "beta": 0.5, "buffer_size": 500, "replay_batch": 10,
                                      "lambda": 0.0, "eta": 0.01},
        "split-digits/class": {"alpha": 0.5, "beta": 1.0, "buffer_size": 200, "lambda": 0.0},
    }

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "lambda_", "eta", "m"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"xder: {name.rstrip('_')} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.gamma:
            raise ConfigError(f"xder: gamma must be > 0, got {self.gamma}")
        if self.buffer_size < 1:
            raise ConfigError(f"xder: buffer_size must be at least 1, got {self.buffer_size}")
        if self.replay_batch < 0:
            raise ConfigError(f"xder: replay_batch must be >= 0 (0 = the batch size), got {self.replay_batch}")
        if self.simclr_batch_size < 0 or self.simclr_num_aug < 2 or not self.simclr_temp > 0:
            # one view would leave a row without a positive in SupCon
            raise ConfigError("xder: simclr_batch_size must be >= 0, simclr_num_aug >= 2 and simclr_temp > 0")
        self.buffer = Buffer(self.buffer_size, balanced=True)
        self.counter = torch.zeros(self.buffer_size)  # times each slot was replayed during the current task
        self._bn: list[Tensor] | None = None  # batch-norm statistics before the incoming pass (align_bn)

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.buffer_size, scenario, logits=True)

    # ------------------------------------------------------------------------------------------------- heads
    @staticmethod
    def heads(ctx: Any, first: int, last: int | None = None) -> Tensor:
        """Bool ``[n_outputs]``: the outputs of tasks ``first`` .. ``last - 1`` (to the end when ``last`` is None)."""
        out = ctx.scenario.task_out
        part = out[first:last]
        return part.any(0) if len(part) else torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)

    def update_logits(self, old: Tensor, new: Tensor, y: Tensor, slice_: Tensor) -> Tensor:
        """``old`` with the outputs ``slice_`` replaced by ``new``'s, rescaled by ``γ·old_y / max`` where their max
        exceeds the ground-truth logit ``old_y`` (X-DER's update; a new tensor)."""
        out = old.clone()
        if len(y) == 0 or not bool(slice_.any()):
            return out
        part = new[:, slice_]
        gt = old[torch.arange(len(y), device=y.device), y]
        top = part.max(1).values
        scale = torch.where(top > gt, self.gamma * gt / top, torch.ones_like(top))
        out[:, slice_] = part * scale.unsqueeze(1)
        return out

    # --------------------------------------------------------------------------------------------- the step
    def augment(self, ctx: Any, batch: Batch) -> Batch:
        self._bn = bn_state(ctx.model) if self.align_bn and ctx.task > 0 else None
        return batch

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if self._bn is not None:  # the incoming pass leaves no trace in the statistics (align_bn, task > 0)
            load_bn_state(ctx.model, self._bn)
            self._bn = None
        t, n_tasks = ctx.task, ctx.scenario.n_tasks
        current = self.heads(ctx, t, t + 1)
        loss = F.cross_entropy(masked(out, current), batch.y) - ctx.loss(out, batch)
        k = self.replay_batch or len(ctx.batch)
        rows = None
        if len(self.buffer) > 0:
            a = self.buffer.sample(k, ctx.rng)
            xa = ctx.augmented(a.x)
            if self.align_bn and t > 0:  # the first buffer pass updates the statistics with some incoming rows mixed
                out_a = ctx.forward(torch.cat([xa, batch.x[: k // t]]), torch.cat([a.t, batch.t[: k // t]]))[:len(a)]
            else:
                out_a = ctx.forward(xa, a.t)
            loss = loss + self.alpha * F.mse_loss(out_a, a.logits)
            b = self.buffer.sample(k, ctx.rng)
            with frozen_bn(ctx.model, self.align_bn):
                out_b = ctx.forward(ctx.augmented(b.x), b.t)
            past = self.heads(ctx, 0, t)
            mode = ctx.mask(b.t)
            keep = past if mode is None else past & mode
            loss = loss + self.beta * F.cross_entropy(masked(out_b, keep), b.y)
            # both samples, each slot once (its first occurrence)
            idx = torch.cat([a.idx, b.idx])
            first = first_occurrence(idx)
            rows = (idx[first], torch.cat([a.y, b.y])[first], torch.cat([a.t, b.t])[first],
                    torch.cat([a.logits, b.logits])[first], torch.cat([out_a, out_b])[first])
            self.online_update(ctx, *rows)
        if t < n_tasks - 1:
            loss = loss + self.future_terms(ctx, batch, out, rows)
        if self.past_constraint and t > 0 and self.eta > 0:
            seen = self.heads(ctx, 0, t + 1)
            prob = F.softmax(out[:, seen], 1)
            cur, old = current[seen], self.heads(ctx, 0, t)[seen]
            hinge = prob[:, old].max(1).values.detach() + self.m - prob[:, cur].max(1).values
            loss = loss + self.eta * positive_mean(hinge)
        return loss

    @torch.no_grad()
    def online_update(self, ctx: Any, idx: Tensor, y: Tensor, t: Tensor, logits: Tensor, out: Tensor) -> None:
        """During task t, a replayed row of an earlier task gets its logits from task t on revised with probability
        1 / (times it was drawn during this task)."""
        old = t < ctx.task
        if not bool(old.any()):
            return
        slots = idx[old].cpu()
        self.counter[slots] += 1
        chosen = old.clone()
        chosen[old] = (torch.rand(len(slots), generator=ctx.rng) * self.counter[slots] < 1).to(old.device)
        if bool(chosen.any()):
            later = self.heads(ctx, ctx.task)
            self.buffer.logits[idx[chosen]] = self.update_logits(logits[chosen], out[chosen].detach().float(),
                                                                 y[chosen], later)

    def future_terms(self, ctx: Any, batch: Batch, out: Tensor, rows: tuple | None) -> Tensor:
        """The future preparation: λ · SupCon on each future head + η · the future-logit constraint."""
        t = ctx.task
        loss = out.new_zeros(())
        if self.lambda_ > 0:
            loss = loss + self.lambda_ * self.consistency(ctx, batch)
        if self.future_constraint and self.eta > 0:
            future, current = self.heads(ctx, t + 1), self.heads(ctx, t, t + 1)
            bad = out[:, future].max(1).values
            good = out[:, current].max(1).values
            if rows is not None:
                _, _, rt, _, rout = rows
                own = ctx.scenario.task_out[rt]  # [rows, outputs]: each row's own head
                bad = torch.cat([bad, rout[:, future].max(1).values])
                good = torch.cat([good, masked(rout, own).max(1).values])
            loss = loss + self.eta * positive_mean(bad + self.m - good)
        return loss

    def consistency(self, ctx: Any, batch: Batch) -> Tensor:
        """Mean over future heads of SupCon on L2-normalised head outputs of strongly augmented views."""
        aug = self.strong_augmentation(ctx)
        if aug is None:
            return batch.x.new_zeros(())
        new = ctx.batch.is_new()
        x, y, tt = ctx.batch.x[new], ctx.batch.y[new], ctx.batch.t[new]  # un-augmented incoming rows
        if len(self.buffer) > 0 and self.simclr_batch_size > 0:
            s = self.buffer.sample(self.simclr_batch_size, ctx.rng)
            x, y, tt = torch.cat([s.x, x]), torch.cat([s.y, y]), torch.cat([s.t, tt])
        v = self.simclr_num_aug
        with torch.no_grad():
            views = aug(x.repeat_interleave(v, 0), ctx.rng)
        with frozen_bn(ctx.model, self.align_bn):
            z = ctx.forward(views, tt.repeat_interleave(v, 0)).float().view(len(x), v, -1)
        losses = [supcon(F.normalize(z[:, :, ctx.scenario.task_out[h]], dim=2), y, self.simclr_temp)
                  for h in range(ctx.task + 1, ctx.scenario.n_tasks)]
        return torch.stack(losses).mean()

    def strong_augmentation(self, ctx: Any) -> Augment | None:
        sc = ctx.scenario
        shape = tuple(sc.input_shape)
        if len(shape) != 3:
            ctx.warn("xder: the consistency term needs image inputs [C, H, W]; skipped (lambda has no effect)")
            return None
        colour = (Jitter(), Greyscale()) if shape[0] == 3 else ()
        if shape[0] != 3:
            ctx.warn("xder: single-channel images: the consistency term's augmentation is crop + flip only")
        return Augment("xder-strong", ResizedCrop(scale=(0.2, 1.0)), colour, sc.mean, sc.std, shape)

    # --------------------------------------------------------------------------------------------- task end
    @torch.no_grad()
    def end_task(self, ctx: Any) -> None:
        t = ctx.task
        data = ctx.scenario.task_data(t)
        parts = [ctx.scenario.batch(data.idx[i:i + 4096], t) for i in range(0, len(data), 4096)]
        x = torch.cat([p.x for p in parts])
        y = torch.cat([p.y for p in parts])
        tt = torch.cat([p.t for p in parts])
        # no share exceeds the capacity: a random pool of that many rows per class is all the selection can use
        pool = []
        for c in torch.unique(y).tolist():
            rows = (y == c).nonzero().flatten()
            pool.append(rows[torch.randperm(len(rows), generator=ctx.rng)[: self.buffer_size].to(rows.device)])
        pool = torch.cat(pool)
        x, y, tt = x[pool], y[pool], tt[pool]
        was = ctx.model.training
        ctx.model.train()  # Mammoth computes the stored logits in training mode, batch norm not tracking
        mix = torch.Generator().manual_seed(ctx.config.seed * 1000 + t)  # its own draws: ctx.rng's stream unchanged
        logits = self.outputs(ctx, ctx.augmented(x), tt, mix)  # on an augmented view, as Mammoth's train loader gives
        if t > 0:  # the current task's rows: past heads bounded by γ times the ground-truth logit
            logits = self.update_logits(logits, logits, y, self.heads(ctx, 0, t))
        self.buffer.select(x, y, tt, x.new_zeros(len(x), 1), "random", key=tt * ctx.scenario.n_outputs + y,
                           logits=logits, generator=ctx.rng)
        # the past-logit update: rows of earlier tasks get task t's head and the future heads revised
        stored = self.buffer.rows()
        old = stored.t < t
        if bool(old.any()):
            idx = stored.idx[old]
            now = self.outputs(ctx, ctx.augmented(stored.x[old]), stored.t[old], mix)
            self.buffer.logits[idx] = self.update_logits(stored.logits[old], now, stored.y[old], self.heads(ctx, t))
        self.counter.zero_()
        ctx.model.train(was)

    def outputs(self, ctx: Any, x: Tensor, t: Tensor, mix: torch.Generator) -> Tensor:
        """The network's outputs on ``x``, batch-norm statistics left untouched, in shuffled batches of the run's
        batch size (in training mode a batch's statistics normalise it: Mammoth's batches mix the classes, so a
        chunk of one class would give other targets), returned in ``x``'s order."""
        perm = torch.randperm(len(x), generator=mix).to(x.device)
        bs = ctx.config.batch_size
        out = torch.empty(0)
        with frozen_bn(ctx.model, True):
            parts = [ctx.forward(x[perm[i:i + bs]], t[perm[i:i + bs]]).float() for i in range(0, len(x), bs)]
        if parts:
            out = torch.empty(len(x), parts[0].shape[1], dtype=parts[0].dtype, device=parts[0].device)
            out[perm] = torch.cat(parts)
        return out


# ---------------------------------------------------------------------------------------------------- helpers

def positive_mean(x: Tensor) -> Tensor:
    """Mean of the positive entries (zero when none), the constraints' hinge."""
    hit = x > 0
    return x[hit].mean() if bool(hit.any()) else x.new_zeros(())


def first_occurrence(idx: Tensor) -> Tensor:
    """Bool mask of the first occurrence of each value of ``idx``."""
    keep = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
    seen: set[int] = set()
    for i, v in enumerate(idx.tolist()):
        keep[i] = v not in seen
        seen.add(v)
    return keep


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and mod.track_running_stats]


def bn_state(model: nn.Module) -> list[Tensor]:
    """A copy of every batch-norm running statistic of ``model``."""
    return [b.detach().clone() for mod in _bn_modules(model)
            for b in (mod.running_mean, mod.running_var, mod.num_batches_tracked)]


def load_bn_state(model: nn.Module, state: list[Tensor]) -> None:
    """Put the statistics of :func:`bn_state` back. They are rebound, not copied into the live tensors: the graph
    of a pass already made keeps the tensors it saved (an in-place write would invalidate its backward)."""
    it = iter(state)
    for mod in _bn_modules(model):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(mod, name, next(it))


@contextlib.contextmanager
def frozen_bn(model: nn.Module, on: bool) -> Iterator[None]:
    """Passes inside use batch statistics without updating the running ones, Mammoth's
    ``bn_track_stats(model, False)`` (``track_running_stats`` off for the time being)."""
    mods = _bn_modules(model) if on else []
    for mod in mods:
        mod.track_running_stats = False
    try:
        yield
    finally:
        for mod in mods:
            mod.track_running_stats = True
