"""GDumb: a greedy class-balanced memory of the stream, and a model trained from scratch on it alone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retain.buffers import Buffer
from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.methods.er import class_key
from retain.scenarios import Batch


class GreedyBuffer(Buffer):
    """GDumb's sampler (Prabhu et al. 2020, Algorithm 1) on :class:`retain.buffers.Buffer`'s storage.

    A row of class y is stored while the memory has room; once it is full, a row of a class holding fewer than
    k / |Y| rows (|Y|: the classes met so far, y included) takes the slot of a random row of the largest class
    (ties broken at random); otherwise it is not stored. Rows are offered one at a time, in stream order.
    """

    def __init__(self, capacity: int):
        super().__init__(capacity, balanced=True)
        self.count: dict[int, int] = {}  # rows held per key

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, t: Tensor, logits: Tensor | None = None, key: Tensor | None = None,
            generator: torch.Generator | None = None) -> None:
        if len(y) == 0:
            return
        key = y if key is None else key
        dev = self.device or x.device
        x, y, t, key = x.to(dev), y.to(dev), t.to(dev), key.to(dev)
        if self.x is None:
            self._allocate(x, None)
        zero = torch.zeros(1, device=dev)
        for i, k in enumerate(key.tolist()):
            self.seen += 1
            self.seen_per_key[k] = self.seen_per_key.get(k, 0) + 1
            if k not in self.count:
                self.count[k] = 0
                self.keys_order.append(k)
            held = sum(self.count.values())
            if held < self.capacity:
                slot = held  # slots fill in order and are never emptied
            elif self.count[k] < self.capacity / len(self.count):
                top = max(self.count.values())
                largest = [c for c, n in self.count.items() if n == top]
                victim = largest[int(torch.randint(len(largest), (1,), generator=generator))]
                slots = (self.key == victim).nonzero().flatten()
                slot = int(slots[int(torch.randint(len(slots), (1,), generator=generator))])
                self.count[victim] -= 1
            else:
                continue
            self.count[k] += 1
            src = torch.tensor([i], device=dev)
            self._write(torch.tensor([slot], device=dev), src, x, y, t, key, None, zero)


def cutmix(x: Tensor, lam: float, perm: Tensor, rng: np.random.Generator) -> tuple[Tensor, float]:
    """CutMix (Yun et al. 2019) as GDumb's code applies it: a box of area ≈ (1 − λ) of every image replaced by the
    same box of the image ``perm`` points to; returns the images and λ corrected to the box actually cut."""
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y1:y2, x1:x2] = x[perm][..., y1:y2, x1:x2]
    return x, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)


@register("gdumb")
@dataclass
class GDumb(Method):
    """GDumb: a greedy class-balanced sampler fills the memory; at evaluation a model trained from scratch on it.

    Prabhu, Torr & Dokania, "GDumb: A Simple Approach that Questions Our Progress in Continual Learning", ECCV
    2020 (Algorithm 1, §3 and §4 "Implementation details"; the authors' code, drimpossible/GDumb).

    The stream's rows go only into the memory (:class:`GreedyBuffer`): no step is taken on them. Whenever the model
    is to be evaluated (each task's end; on a task-free stream, the first evaluation after the memory changed) it
    is reset to the weights it had before any data (taken at the first step) and trained on the memory alone:
    ``num_passes`` epochs of batches of ``batch_size``, SGD (momentum, weight decay), one warm-up epoch at
    ``maxlr`` / 10, then ``maxlr`` annealed to ``minlr`` by cosine warm restarts (SGDR, T₀ = 1, T_mult = 2, one
    scheduler step per epoch), gradients clipped to norm ``clip``, CutMix with probability ``cutmix_prob`` per
    batch (on image inputs). The loss is the run's masked cross-entropy (class-IL: the classes seen so far, or
    every output with ``--all-outputs``; task-IL: each row's head). At test the outputs of classes absent from
    the memory are masked (−inf), the paper's masking. The weights at evaluation are thus a function of the memory
    and the run's seed only (the batch order, CutMix draws and the reset weights come from them).

    Hooks: ``observe`` (insertion only), ``end_task`` (retraining), ``forward`` (masking; the task-free
    retraining). Task-free: yes.

    Deviations, each with its reason:

    * Half precision (the authors' ``model.half()``) is the run's ``--precision`` (fp32 by default).
    * The authors report the best test accuracy over the passes (model selection on the test set); retain
      reports the model after the last pass.
    * The run's optimizer, ``--lr``, ``--epochs`` and ``--batch-size`` are not used for the retraining (GDumb has its
      own, these hyper-parameters); ``--batch-size`` is the stream's batch, which only the memory sees.
    * The reset is to the same initial weights at every evaluation, not a fresh random draw, so that the model at
      evaluation depends on the memory alone.
    * On a task-free stream the retraining happens inside the first evaluation forward after the memory changed
      (the only hook that runs before an evaluation there), so its time counts as evaluation time.
    * CutMix needs image inputs [C, H, W]; on flat inputs it is skipped (the authors use none on MNIST).

    Mammoth's ``gdumb`` (checked against its code) differs from the paper in: a reservoir buffer instead of the
    greedy class-balanced sampler; one retraining only, at the last task's end (earlier evaluations see the
    untrained model); no masking at test; momentum and weight decay from its global options (0 by default) and
    no gradient clipping; CutMix on every dataset. Its warm-up + SGDR schedule is the authors'.
    """

    buffer_size: int = param(500, "rows kept in memory in total (k)")
    num_passes: int = param(256, "epochs over the memory at each retraining")
    batch_size: int = param(16, "batch size of the retraining")
    maxlr: float = param(0.05, "learning rate after the warm-up epoch (start of each cosine cycle)")
    minlr: float = param(0.0005, "learning rate at the end of each cosine cycle (η_min)")
    momentum: float = param(0.9, "SGD momentum of the retraining")
    weight_decay: float = param(1e-6, "SGD weight decay of the retraining")
    clip: float = param(10.0, "gradient-norm clipping of the retraining (0 = none)")
    cutmix_prob: float = param(0.5, "probability of CutMix per batch (0 = none; image inputs only)")
    cutmix_alpha: float = param(1.0, "CutMix's Beta(α, α) for the mixing ratio")

    modes = ("task", "class")
    presets = {
        # the authors' scripts/replicate.sh, MNIST 5 x 2: memory 500, 128 passes, regularization none (MLP width 400
        # there, set by the run's --hidden)
        "split-mnist/class": {"buffer_size": 500, "num_passes": 128, "cutmix_prob": 0.0},
        # no entry for Fashion-MNIST in the authors' scripts: their MNIST arguments
        "split-fashion-mnist/class": {"buffer_size": 500, "num_passes": 128, "cutmix_prob": 0.0},
        # the authors' scripts/replicate.sh, CIFAR10 5 x 2, memory 500: 256 passes, cutmix (ResNet-18: the run's)
        "seq-cifar10/class": {"buffer_size": 500, "num_passes": 256},
        # retain's split-digits convention (a memory of 200); 32 passes keep the test in seconds
        "split-digits/class": {"buffer_size": 200, "num_passes": 32, "cutmix_prob": 0.0},
    }

    def __post_init__(self) -> None:
        for name in ("buffer_size", "num_passes", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gdumb: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("maxlr", "minlr", "momentum", "weight_decay", "clip", "cutmix_alpha"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"gdumb: {name} must be a finite number >= 0, got {value}")
        if not 0 <= self.cutmix_prob <= 1:
            raise ConfigError(f"gdumb: cutmix_prob must be in [0, 1], got {self.cutmix_prob}")
        if self.cutmix_prob > 0 and self.cutmix_alpha <= 0:
            raise ConfigError("gdumb: cutmix_alpha must be > 0 when cutmix_prob > 0")
        self.buffer = GreedyBuffer(self.buffer_size)
        self.init: dict[str, Tensor] | None = None  # the model's weights before any data: what each fit starts from
        self.stale = False  # the memory changed since the model was last fitted to it

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.buffer_size, scenario)

    # --------------------------------------------------------------------------------------------- hooks
    def observe(self, ctx: Any, batch: Batch) -> Tensor:
        if self.init is None:
            self.init = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        new = batch.new
        x, y, t = (batch.x, batch.y, batch.t) if new is None else (batch.x[new], batch.y[new], batch.t[new])
        before = dict(self.buffer.count)
        self.buffer.add(x, y, t, key=class_key(ctx, y, t), generator=ctx.rng)
        self.stale = self.stale or self.buffer.count != before  # a row was kept (a swap moves two counts)
        return torch.zeros((), device=ctx.device)

    def end_task(self, ctx: Any) -> None:
        self.fit(ctx)

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        if ctx.model.training:
            return ctx.model(x)
        if self.stale:  # task-free: nothing else runs before this evaluation
            with torch.enable_grad():
                self.fit(ctx)
            ctx.model.eval()
        out = ctx.model(x)
        if len(self.buffer) == 0:
            return out
        present = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
        present[self.buffer.rows().y.to(out.device)] = True
        return out.masked_fill(~present, float("-inf"))

    # ------------------------------------------------------------------------------------------- helpers
    def fit(self, ctx: Any) -> None:
        """Reset the model to its initial weights and train it on the memory alone (GDumb's learner)."""
        self.stale = False
        if self.init is None or len(self.buffer) == 0:
            return
        model = ctx.model
        model.load_state_dict(self.init)
        model.train()
        rows = self.buffer.rows()
        n = len(rows)
        seed = ctx.config.seed * 1_000_003 + 4_242
        g = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        params = self.parameters(model)
        opt = torch.optim.SGD(params, lr=self.maxlr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2, eta_min=self.minlr)
        images = rows.x.dim() == 4
        kept, ctx.optimizer = ctx.optimizer, opt  # ctx.backward / step_optimizer act on ctx.optimizer
        try:
            for epoch in range(self.num_passes):
                if epoch == 0:  # the authors' warm-up epoch
                    for group in opt.param_groups:
                        group["lr"] = self.maxlr * 0.1
                elif epoch == 1:
                    for group in opt.param_groups:
                        group["lr"] = self.maxlr
                else:
                    sched.step()
                order = torch.randperm(n, generator=g).to(rows.y.device)
                for start in range(0, n, self.batch_size):
                    sel = order[start:start + self.batch_size]
                    batch = Batch(rows.x[sel], rows.y[sel], rows.t[sel])
                    self.retrain_step(ctx, batch, images and self.cutmix_prob > 0 and rng.random() < self.cutmix_prob,
                              g, rng)
        finally:
            ctx.optimizer = kept
        model.eval()

    def retrain_step(self, ctx: Any, batch: Batch, mix: bool, g: torch.Generator, rng: np.random.Generator) -> None:
        """One retraining step on ``batch`` (CutMix'ed when ``mix``): λ·CE(y_a) + (1 − λ)·CE(y_b)."""
        x = ctx.augmented(batch.x)
        if mix:
            perm = torch.randperm(len(batch), generator=g).to(x.device)
            x, lam = cutmix(x, float(rng.beta(self.cutmix_alpha, self.cutmix_alpha)), perm, rng)
        with ctx.autocast():
            out = ctx.model(x)
            loss = ctx.loss(out, batch)
            if mix:
                other = Batch(x, batch.y[perm], batch.t[perm])
                loss = lam * loss + (1 - lam) * ctx.loss(out, other)
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.backward(loss, len(batch))
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters(ctx.model), self.clip)
        ctx.step_optimizer()
