"""SCR: supervised contrastive replay, and the nearest-class-mean classifier over the buffer at evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.augment import Augment, Greyscale, Jitter, ResizedCrop
from retain.buffers import Buffer
from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.methods.er import features
from retain.methods.icarl import class_mean, nme_scores
from retain.ops.contrastive import supcon
from retain.scenarios import Batch

HEADS = ("mlp", "linear")


@register("scr")
@dataclass
class SCR(Method):
    """SCR: the SupCon loss on the incoming and a memory batch, two views each; nearest class mean at evaluation.

    Mai, Li, Kim & Sanner, "Supervised Contrastive Replay: Revisiting the Nearest Class Mean Classifier in Online
    Class-Incremental Continual Learning", CVPR Workshops 2021 (the authors' ``RaptorMai/online-continual-learning``:
    ``agents/scr.py``, ``agents/base.py``, ``models/resnet.py`` ``SupConResNet``, ``utils/loss.py``, and the
    papers' settings in ``config_CVPR/agent/scr``, read to check every detail below).

    Step. ``mem_batch`` rows are drawn from a reservoir buffer and put before the incoming rows; the network's
    features of the combined rows go through a projection head (``head = mlp``: Linear(d, d), ReLU, Linear(d,
    ``feat_dim``); ``linear``: one Linear) and are L2-normalised; this is done for the rows as they are and for an
    augmented view of them, and the loss is the supervised contrastive loss of Khosla et al. 2020 over the 2N views
    at ``temperature`` (:func:`retain.ops.contrastive.supcon`: every view an anchor, its positives the other views
    of its label, itself excluded from the denominator; no τ/τ_b factor, as the authors' copy). There is no
    cross-entropy: the model's linear head is never trained. With an empty buffer (the first step) there is no
    update, as the authors' ``if mem_x.size(0) > 0``. The incoming rows are then inserted into the buffer.

    Evaluation (``forward`` when ``not ctx.model.training``): each class stored in the buffer gets the mean μ_c of
    its rows' L2-normalised features (``model.features``, before the projection), re-normalised; a test row scores
    −‖φ(x)/|φ(x)| − μ_c‖² per class (:func:`retain.methods.icarl.class_mean`, ``nme_scores``: the authors' rule).
    The means are computed from the buffer with the current network at the first evaluation after a step, so an
    anytime curve (``--eval-every``) sees the buffer of that moment, as the authors' ``evaluate`` does.

    The augmented view (the authors' ``self.transform``, on the device): a random resized crop (area fraction in
    [``crop_scale``, 1], ratio in [3/4, 4/3], :class:`retain.augment.ResizedCrop`), a horizontal flip with p = 0.5
    when ``flip``, and on RGB images colour jitter (0.4, 0.4, 0.4, 0.1; p = 0.8) and greyscale (p = 0.2), as
    kornia's pipeline there. The authors' code has no MNIST; for flat vectors of a square number of pixels (retain's
    MNIST, Fashion-MNIST, digits) the rows are viewed as one-channel square images, cropped (flipped when ``flip``)
    and flattened again; no colour ops on one channel. Inputs that are not images (tabular vectors) have no such
    view: the second view is then the rows themselves, with a warning in the record. ``flip`` is on by default (the
    authors' pipeline) and off in the digit presets, where a mirrored digit is another shape (Fashion-MNIST keeps
    it: its classes are mirror symmetric). The first view is the rows under the run's ``--augment`` (the rows
    themselves without one, the authors' setting).

    ``review`` (the papers' configs set ``review_trick: True``): at a task's end one pass over the buffer in
    shuffled batches of ``mem_batch`` (the last incomplete batch dropped), the same two-view SupCon loss, gradients
    divided by 10 before the step (Mai et al.'s review trick as ``agents/base.py`` ``after_train`` applies it). It
    needs task boundaries, so a ``--task-free`` run, which has none, never does it.

    Hooks: ``observe`` (the SupCon step; ``ctx.autocast`` / ``ctx.backward`` / ``ctx.step_optimizer`` keep mixed
    precision), ``end_task`` (review), ``forward`` (NCM in evaluation). ``parameters`` adds the projection head,
    which is built on first use with the width of the model's ``head`` input and saved with the method's state.

    Deviations: a class seen but absent from the buffer scores −inf (the authors give it a random mean). The
    projection head's optimizer state is not carried across task boundaries (it is not a model parameter; with the
    authors' plain SGD there is none). Data-parallel runs compute the loss over the whole step's rows in every
    process (SupCon contrasts every row with every other), so they gain no speed.
    """

    buffer_size: int = param(500, "rows kept in the reservoir buffer (the authors' mem_size)")
    mem_batch: int = param(100, "buffer rows drawn per step (the authors' eps_mem_batch, config_CVPR)")
    temperature: float = param(0.1, "τ of the SupCon loss (the authors' temp, config_CVPR)")
    head: str = param("mlp", "projection head: mlp (Linear-ReLU-Linear) or linear", choices=HEADS)
    feat_dim: int = param(128, "size of the projection (the authors' feat_dim)")
    crop_scale: float = param(0.2, "smallest area fraction of the random resized crop (the authors' scale=(0.2, 1))")
    flip: bool = param(True, "horizontal flip (p = 0.5) in the augmented view (the authors' pipeline)")
    review: bool = param(True, "review trick at each task's end (config_CVPR); never in task-free runs")

    modes = ("class",)  # the authors' setting (class-incremental, nc); the NCM spans every stored class
    presets = {
        # config_CVPR/agent/scr/scr_05k.yml (mem 500, eps_mem_batch 100, temp 0.1, lr 0.1, review) and the
        # authors' defaults (batch 10, SGD); the repository has no MNIST: the crop is theirs, the flip left out
        "split-mnist/class": {"buffer_size": 500, "mem_batch": 100, "temperature": 0.1, "flip": False},
        "split-fashion-mnist/class": {"buffer_size": 500, "mem_batch": 100, "temperature": 0.1},
        "seq-cifar10/class": {"buffer_size": 200, "mem_batch": 100, "temperature": 0.1},  # scr_02k.yml
        "split-digits/class": {"buffer_size": 200, "flip": False},
    }

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.mem_batch < 1 or self.feat_dim < 1:
            raise ConfigError(f"scr: buffer_size, mem_batch and feat_dim must be at least 1, got {self.buffer_size}, "
                              f"{self.mem_batch}, {self.feat_dim}")
        if not self.temperature > 0:
            raise ConfigError(f"scr: temperature must be > 0, got {self.temperature}")
        if self.head not in HEADS:
            raise ConfigError(f"scr: head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"scr: crop_scale must be in (0, 1], got {self.crop_scale}")
        self.buffer = Buffer(self.buffer_size)
        self.projection: nn.Module | None = None  # built on first use, with the width of the model's features
        self._means: tuple[Tensor, Tensor] | None = None  # (classes, means) for the NCM, until the next step
        self._view: Augment | bool | None = None  # the second view's pipeline (False: inputs are not images)

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.buffer_size, scenario)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        if self.projection is None:
            head = getattr(model, "head", None)
            if getattr(model, "features", None) is None or not isinstance(head, nn.Linear):
                raise ConfigError("scr needs a model with .features and a linear .head (the projection is built on "
                                  "the head's input width); retain's MLP and ResNets have both")
            d = head.in_features
            proj = (nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, self.feat_dim)) if self.head == "mlp"
                    else nn.Linear(d, self.feat_dim))
            self.projection = proj.to(head.weight.device)
        return super().parameters(model) + list(self.projection.parameters())

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for scratch in ("_means", "_view"):  # recomputed on demand
            state.pop(scratch, None)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._means = None

    # --------------------------------------------------------------------------------------------- hooks
    def observe(self, ctx: Any, batch: Batch) -> Tensor:
        self._means = None
        new = batch.is_new()
        loss = torch.zeros((), device=batch.y.device)
        if len(self.buffer) > 0:
            mem = self.buffer.sample(self.mem_batch, ctx.rng)
            x, y = torch.cat([mem.x, batch.x]), torch.cat([mem.y, batch.y])
            loss = self.step(ctx, x, y)
        self.buffer.add(batch.x[new], batch.y[new], batch.t[new], generator=ctx.rng)
        return loss

    def end_task(self, ctx: Any) -> None:
        if not self.review or len(self.buffer) < self.mem_batch:
            return
        idx = self.buffer.occupied()
        idx = idx[torch.randperm(len(idx), generator=ctx.rng).to(idx.device)]
        for i in range(0, len(idx) - self.mem_batch + 1, self.mem_batch):
            rows = self.buffer.get(idx[i:i + self.mem_batch])
            self.step(ctx, rows.x, rows.y, grad_scale=0.1)
        self._means = None

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        if ctx.model.training:
            return ctx.model(x)
        if self._means is None:
            self._means = self.class_means(ctx)
        classes, means = self._means
        scores = x.new_full((len(x), ctx.scenario.n_outputs), float("-inf"), dtype=torch.float32)
        if len(classes):
            scores[:, classes] = nme_scores(F.normalize(ctx.model.features(x).flatten(1).float(), dim=1), means)
        return scores

    # ------------------------------------------------------------------------------------------- helpers
    def step(self, ctx: Any, x: Tensor, y: Tensor, grad_scale: float = 1.0) -> Tensor:
        """One SupCon update on rows ``x`` (labels ``y``): the rows (under the run's augmentation) and SCR's view."""
        with ctx.autocast():
            views = torch.stack([self.project(ctx, ctx.augmented(x)), self.project(ctx, self.second_view(ctx, x))], 1)
            loss = supcon(views.float(), y, self.temperature)
        ctx.optimizer.zero_grad(set_to_none=True)
        loss = ctx.backward(loss, len(y))
        if grad_scale != 1.0:
            for p in self.parameters(ctx.model):
                if p.grad is not None:
                    p.grad.mul_(grad_scale)
        ctx.step_optimizer()
        return loss

    def project(self, ctx: Any, x: Tensor) -> Tensor:
        """The L2-normalised projection of the model's features of ``x`` (the authors' ``SupConResNet.forward``)."""
        if self.projection is None:
            self.parameters(ctx.model)
        return F.normalize(self.projection(ctx.model.features(x).flatten(1)).float(), dim=1)

    def second_view(self, ctx: Any, x: Tensor) -> Tensor:
        """SCR's augmented view of ``x`` (prepared rows), drawn from ``ctx.rng``."""
        if self._view is None:
            self._view = self.view_pipeline(ctx.scenario)
        if self._view is False:
            ctx.warn(f"scr: the inputs {list(ctx.scenario.input_shape)} are not images; its second view is the rows "
                     "themselves")
            return x
        shape = self._view.input_shape
        return self._view(x.reshape(len(x), *shape), ctx.rng).reshape(x.shape)

    def view_pipeline(self, scenario: Any) -> Augment | bool:
        """SCR's augmentation for the scenario's inputs; False when they are not images."""
        shape = tuple(int(s) for s in scenario.input_shape)
        if len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
            shape = (1, math.isqrt(shape[0]), math.isqrt(shape[0]))  # flat square images: one channel
        if len(shape) != 3:
            return False
        crop = ResizedCrop(scale=(self.crop_scale, 1.0), flip=0.5 if self.flip else 0.0)
        colour = (Jitter(), Greyscale()) if shape[0] == 3 else ()
        return Augment("scr", crop, colour, scenario.mean, scenario.std, shape)

    @torch.no_grad()
    def class_means(self, ctx: Any) -> tuple[Tensor, Tensor]:
        """The stored classes and the re-normalised means of their rows' normalised features."""
        if len(self.buffer) == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
        rows = self.buffer.rows()
        feats = features(ctx, rows.x).flatten(1).float()
        classes = torch.unique(rows.y)
        means = torch.stack([class_mean(feats[rows.y == c]) for c in classes])
        return classes, means
