"""Deep generative replay with a VAE generator, with or without distillation (DGR, DGR + distill)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.ops.vae import VAE
from retain.scenarios import Batch
from retain.trainer import masked


@register("dgr")
@dataclass
class DGR(Method):
    """Deep generative replay: a VAE trained alongside the classifier replays inputs labelled by the previous model.

    Shin, Lee, Kim & Kim, "Continual learning with deep generative replay", NeurIPS 2017; the protocol, sizes and
    loss weighting of van de Ven & Tolias, "Generative replay with feedback connections as a general strategy for
    continual learning", arXiv 1809.10635 ("DGR" and "DGR + distill").

    At task t (t tasks seen, counting the current one) every step draws ``replay_ratio`` x batch-size inputs from a
    frozen copy of the generator as it was after task t-1 and labels them with a frozen copy of the classifier as
    it was after task t-1: hard labels (its argmax), or with ``distill`` its temperature-``temperature`` softmax
    (Hinton's distillation loss, scaled by T²). The classifier loss is

        L = (1/t) · L_current + (1 − 1/t) · L_replay

    (van de Ven's weighting: the replayed batch stands for t-1 tasks). The replayed rows' loss spans the outputs
    active now (class-IL: every class seen so far, the targets of the new ones 0), as in van de Ven's code. The
    generator (:class:`retain.ops.vae.VAE`) is trained on the same current + replayed inputs with the same
    weights, by its own Adam optimizer (created at the first task, with the run's learning rate and betas unless
    ``gen_lr`` is set; its state carries over tasks like the classifier's, unless ``--reset-optimizer``), one step
    per classifier step.

    Modes. Task-IL: each replayed row gets an old task drawn uniformly from 0..t-2; it is labelled by, and trained
    on, that task's head. Domain-IL: labels over all outputs. Class-IL: labels over the classes seen up to task t-1
    (the previous model's active classes); the loss over all classes seen so far.

    Hooks: ``begin_task`` (snapshot the previous classifier and generator, build the VAE and its optimizer) and
    ``observe`` (one step of the classifier and the generator; overridden because the replayed rows carry soft
    targets and their own weight, which the default masked mean cannot express).

    Augmentation (``--augment``): the classifier trains on an augmented view of the current rows (partners'
    ``penalty`` sees it too, as in the shared step); the generated rows are not augmented (the generator learns,
    and replays, the un-augmented inputs: it is trained on the current rows as they came).

    Deviations: (1) in task-IL van de Ven replays every generated input once per previous head and averages over
    heads; here each row is routed to one sampled old head (as the issue asks), which has the same expectation at
    lower cost; (2) the likelihood is Bernoulli only when the inputs lie in [0, 1] (as MNIST's do); normalised
    inputs get a unit-variance Gaussian likelihood instead (the paper only uses [0, 1] images).
    """

    distill: bool = param(False, "soft targets of the previous model instead of its argmax (DGR + distill)")
    temperature: float = param(2.0, "distillation temperature (T; van de Ven uses 2)")
    replay_ratio: float = param(1.0, "replayed rows per current row (1 = a replayed batch of the same size, P1)")
    fc_units: int = param(400, "units per hidden layer of the VAE's encoder and decoder")
    fc_layers: int = param(2, "hidden layers of the VAE's encoder and decoder")
    z_dim: int = param(100, "latent dimension of the VAE")
    gen_lr: float = param(0.0, "the generator's Adam learning rate (0 = the run's learning rate)")

    needs_boundaries = True
    # split-digits (8x8 inputs, ~250 images per task): a smaller VAE learns its digits in a few hundred steps;
    # Split-MNIST uses the P1 defaults above (2 x 400 units, latent 100).
    presets = {f"split-digits/{mode}": {"fc_units": 200, "z_dim": 20} for mode in ("task", "domain", "class")}

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"dgr: temperature must be > 0, got {self.temperature}")
        if not (self.replay_ratio > 0 and math.isfinite(self.replay_ratio)):
            raise ConfigError(f"dgr: replay_ratio must be > 0, got {self.replay_ratio}")
        if self.fc_units < 1 or self.fc_layers < 1 or self.z_dim < 1:
            raise ConfigError("dgr: fc_units, fc_layers and z_dim must be >= 1")
        if self.gen_lr < 0:
            raise ConfigError(f"dgr: gen_lr must be >= 0, got {self.gen_lr}")
        self.generator: VAE | None = None
        self.gen_optimizer: torch.optim.Optimizer | None = None
        self.old_model: torch.nn.Module | None = None
        self.old_generator: VAE | None = None
        self.prev_seen: Tensor | None = None  # class-IL: outputs of the classes seen before the current task

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        if self.generator is None:
            self.generator = self._build_generator(ctx)
        if ctx.task > 0:
            self.old_model = _frozen(ctx.model)
            self.old_generator = _frozen(self.generator)
            self.prev_seen = ctx.scenario.task_out[:ctx.task].any(0)
        c = ctx.config
        if self.gen_optimizer is None or c.reset_optimizer:  # its state carries over tasks, as the classifier's
            self.gen_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.gen_lr or c.lr, betas=c.betas)

    def observe(self, ctx: Any, batch: Batch) -> Tensor:
        # The other hooks go through ctx.method, so that DGR inside a Compose (e.g. with EWC) keeps its partners'
        # penalties and update hooks.
        weight_current = 1.0 / (ctx.task + 1)
        view = Batch(ctx.augmented(batch.x), batch.y, batch.t, batch.new, batch.task)  # --augment: the classifier's
        out = ctx.forward(view.x, view.t)
        loss = ctx.loss(out, view)
        replay = None
        if self.old_model is not None and ctx.task > 0:
            replay = self.replay(ctx, max(1, round(self.replay_ratio * len(batch))))
            loss = weight_current * loss + (1 - weight_current) * self.replay_loss(ctx, replay)
        extra = ctx.method.penalty(ctx, view, out)
        if extra is not None:
            loss = loss + extra
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.method.before_update(ctx)
        ctx.optimizer.step()
        ctx.method.after_update(ctx, batch, out)
        self._generator_step(ctx, batch.x, None if replay is None else replay.x, weight_current)
        return loss.detach()

    # ------------------------------------------------------------------------------------------- replay
    @torch.no_grad()
    def replay(self, ctx: Any, n: int) -> Batch:
        """``n`` generated rows labelled by the previous classifier: ``y`` its argmax, ``soft`` its tempered softmax
        (distill only), ``t`` a sampled old task; new = False."""
        x = self.old_generator.sample(n, ctx.rng).to(ctx.device)
        t = torch.randint(0, ctx.task, (n,), generator=ctx.rng).to(ctx.device)
        logits = masked(self.old_model(x), self._replay_mask(ctx, t))
        soft = torch.softmax(logits / self.temperature, 1) if self.distill else None
        return Batch(x, logits.argmax(1), t, torch.zeros(n, dtype=torch.bool, device=ctx.device), None, soft)

    def replay_loss(self, ctx: Any, replay: Batch) -> Tensor:
        # The loss spans the outputs active now (class-IL: the new classes too, with target probability 0), so
        # replayed inputs also push the new classes' scores down; only the labels are restricted to old outputs.
        logits = masked(ctx.forward(replay.x, replay.t), ctx.mask(replay.t))
        if replay.soft is None:
            return F.cross_entropy(logits, replay.y)
        T = self.temperature
        log_q = torch.log_softmax(logits / T, 1)
        active = torch.isfinite(logits)  # masked outputs: p = 0, log q = -inf; their product counts as 0
        kd = -torch.where(active, replay.soft * log_q, torch.zeros_like(log_q)).sum(1).mean()
        return kd * T * T

    def _replay_mask(self, ctx: Any, t: Tensor) -> Tensor | None:
        mode = ctx.scenario.mode
        if mode == "task":
            return ctx.scenario.task_out[t]
        if mode == "class":
            return self.prev_seen
        return None

    # ---------------------------------------------------------------------------------------- generator
    def _build_generator(self, ctx: Any) -> VAE:
        probe = ctx.scenario.task_data(0)
        rows = probe.idx[:256]
        x = ctx.scenario.batch(rows, 0).x
        in_unit = bool(x.min() >= 0) and bool(x.max() <= 1)
        return VAE(ctx.scenario.input_shape, self.fc_units, self.fc_layers, self.z_dim,
                   "bernoulli" if in_unit else "gaussian").to(ctx.device)

    def _generator_step(self, ctx: Any, x: Tensor, x_replay: Tensor | None, weight_current: float) -> None:
        loss = self.generator.loss(x, ctx.rng)
        if x_replay is not None:
            loss = weight_current * loss + (1 - weight_current) * self.generator.loss(x_replay, ctx.rng)
        self.gen_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.gen_optimizer.step()

    def generator_parameters(self) -> int:
        return 0 if self.generator is None else sum(p.numel() for p in self.generator.parameters())


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(module)
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
