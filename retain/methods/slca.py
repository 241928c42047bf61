"""SLCA: a slow-learning backbone, a per-task local head, and classifier alignment on Gaussian class statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.buffers import embed
from retain.errors import ConfigError
from retain.method import Method, param, register


def class_statistics(features: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """The mean [D] and full covariance [D, D] (unbiased, in float64) of one class's ``features`` [N, D], the
    covariance with ``ridge``·I added so that it has a Cholesky factor (the authors' code adds 1e-4·I)."""
    f = features.double()
    mean = f.mean(0)
    cov = torch.cov(f.T) if len(f) > 1 else torch.zeros(f.shape[1], f.shape[1], dtype=f.dtype, device=f.device)
    return mean, cov.reshape(f.shape[1], f.shape[1]) + ridge * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)


def sample_features(means: Tensor, covs: Tensor, n: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` draws from each class's N(μ_c, Σ_c): rows [C·n, D] (float32) and their class positions [C·n] (0..C-1).

    x = μ + L z with Σ = L Lᵀ (Cholesky, in float64) and z ~ N(0, I) drawn on the CPU from ``rng``, so the same
    generator gives the same features on any device."""
    c, d = means.shape
    z = torch.randn(c, n, d, generator=rng, dtype=torch.float64).to(means.device)
    chol = torch.linalg.cholesky(covs.double())  # [C, D, D]
    x = means.double().unsqueeze(1) + z @ chol.transpose(1, 2)
    labels = torch.arange(c, device=means.device).repeat_interleave(n)
    return x.reshape(c * n, d).float(), labels


def normalised_logits(logits: Tensor, groups: list[Tensor], tau: float) -> Tensor:
    """CA's logit normalisation: ``logits`` [B, C] divided by the mean over tasks of each task's logit norm
    ‖h_t‖ (+1e-7; ``groups`` are the columns of each task) and by the temperature ``tau``."""
    norms = torch.stack([logits[:, g].norm(dim=1) + 1e-7 for g in groups], 1).mean(1, keepdim=True)
    return logits / norms / tau


@register("slca")
@dataclass
class SLCA(Method):
    """SLCA: the backbone learns slowly, each task's head on its own classes, then the head is aligned post hoc on
    features sampled from every seen class's stored Gaussian.

    Zhang, Wang, Kang, Chen & Wei, "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
    Pre-trained Model", ICCV 2023; checked against the authors' code (github.com/GengDavid/SLCA, models/slca.py and
    exps/slca/*.json) and PILOT's (models/slca.py, exps/slca*.json).

    Slow learner: the optimizer trains two parameter groups (:meth:`parameters`), ``model.features`` at the run's
    learning rate times ``backbone_lr_scale`` and ``model.head`` at the run's learning rate: with the paper's
    ``--lr 0.01`` and the default scale 0.01 that is the paper's 1e-4 for the representation and 1e-2 for the
    classifier (the authors' ``bcb_lrscale``). ``backbone_lr_scale = 0`` leaves the backbone out of the optimizer
    (the authors' "fixed backbone" ablation). Each task trains its own classes' rows of the head with the
    cross-entropy over that task's logits only (``local = true``; the authors' code keeps one linear head per task
    and freezes the earlier ones): in training the other outputs are -inf, and after each step the head's rows of
    every other class are put back as the task began, so neither momentum nor weight decay moves them.

    Classifier alignment (``end_task``): the head as the task's training left it is saved; the mean and full
    covariance (+``cov_ridge``·I) of the new classes' features (``model.features`` in evaluation mode, the
    un-augmented training rows: :func:`retain.buffers.embed`) are stored once, never recomputed; then, from the
    second task on, ``ca_epochs`` epochs train only the seen classes' head rows: each epoch draws ``ca_samples``
    features per seen class (:func:`sample_features`, from ``ctx.rng``), shuffles them and steps through batches of
    ``ca_samples`` rows with SGD (momentum 0.9, ``weight_decay``, learning rate ``ca_lr`` or the run's, cosine
    annealed per epoch) on the cross-entropy over the seen classes of the normalised logits
    (:func:`normalised_logits`, temperature ``ca_logit_norm``; 0 for plain logits). The backbone is never called.
    Evaluation uses the aligned head with the outputs of unseen classes at -inf (the reference head has only the
    seen classes'); the next task's training restarts from the saved un-aligned head (``begin_task``), as the
    authors' ``after_task`` restores it, so alignment is redone from the un-aligned heads after every task.

    Hooks: ``begin_task`` (restore the un-aligned head, snapshot the rows to keep), ``forward`` (local logits in
    training, unseen classes masked in evaluation), ``after_update`` (put back the other classes' rows),
    ``end_task`` (statistics, alignment); :meth:`parameters` returns the two groups.

    Deviations, each with its reason:

    * The class means are scaled before sampling by 1 − d + d·(t+1)/(T+1) for a class learnt in task t when T is
      the current task (``ca_mean_decay`` d = 0.1), as the authors' code and PILOT both do (older classes' means
      shrink a little); the paper does not describe it. ``ca_mean_decay = 0`` samples from the stored means.
    * The schedules are the run's: the authors decay the learning rate by 10 at epoch 18 of 20 (CIFAR-100) or 40 of
      50 (ImageNet-R); retain's learning rate is constant. The authors and PILOT start a fresh optimizer per task
      (``--reset-optimizer true`` here; retain carries the optimizer's state by default).
    * The backbone of a batch-norm model (retain's ResNets) trains its statistics in training mode like the rest
      of it (the authors' ViT has none).
    * The head is the model's one ``nn.Linear`` over every output, initialised as torch does; the authors add a
      linear head per task, truncated-normal (std 0.02) with zero bias. Only the seen rows ever take part.
    * The authors' backbone discards the checkpoint's final LayerNorm and starts a fresh one (convs/vits.py); here
      the checkpoint's final norm is kept, as timm and PILOT (whose ``vit_base_patch16_224`` is timm's current
      default tag, ImageNet-21k fine-tuned on 1k, not the authors' 21k checkpoint) load it.
    * PILOT's json (exps/slca.json, exps/slca_inr.json) uses batch 64, 3 alignment epochs and, on ImageNet-R, 5
      epochs; the presets follow the authors' code (batch 128, 5 alignment epochs).
    """

    backbone_lr_scale: float = param(0.01, "backbone lr = run lr x this (slow learner; paper 1e-4 vs head 1e-2); "
                                           "0 freezes the backbone")
    local: bool = param(True, "each task's head trains on that task's logits only (the authors' separate heads)")
    ca_epochs: int = param(5, "classifier-alignment epochs after each task from the second (authors: 5); 0: none")
    ca_samples: int = param(256, "features drawn per class per alignment epoch, also the batch size (authors: 256)")
    ca_lr: float = param(0.0, "alignment learning rate (SGD, momentum 0.9, cosine); 0: the run's lr (authors)")
    ca_logit_norm: float = param(0.1, "temperature τ of the alignment's logit normalisation; 0: plain logits")
    ca_mean_decay: float = param(0.1, "older classes' means scaled by 1-d+d(t+1)/(T+1) before sampling (authors' "
                                      "code, not the paper); 0: none")
    cov_ridge: float = param(1e-4, "added to each stored covariance's diagonal (authors' code: 1e-4)")
    weight_decay: float = param(5e-4, "weight decay of both optimizer groups and of the alignment's SGD (authors' "
                                      "code: 5e-4)")

    modes = ("class",)
    needs_boundaries = True  # statistics and alignment at task boundaries
    freeze = None  # the backbone trains (slowly)
    reads_backbone = False  # only model.features / model.head / embed
    presets = {
        # the paper's learning rates (head 0.01, backbone 1e-4) with the authors' models/slca.py and
        # exps/slca/slca_cifar.json: SGD momentum 0.9, batch 128, 20 epochs (--epochs 20), weight decay 5e-4,
        # CA 5 epochs, τ 0.1. Weights: Google's AugReg ViT-B/16 ImageNet-21k, B_16-i21k-300ep-lr_0.001-aug_medium1-
        # wd_0.1-do_0.0-sd_0.0.npz (the authors' convs/vits.py; timm vit_base_patch16_224.augreg_in21k)
        "cifar100-b0inc10/class": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 128,
                           "ca_epochs": 5, "ca_logit_norm": 0.1},
        # the authors' exps/slca/slca_imgnetr.json: the same with 50 epochs (--epochs 50), the same weights
        "imagenet-r/class": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 128,
                             "ca_epochs": 5, "ca_logit_norm": 0.1},
    }

    def __post_init__(self) -> None:
        for name in ("backbone_lr_scale", "ca_lr", "ca_logit_norm", "ca_mean_decay", "cov_ridge", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"slca: {name} must be a finite number >= 0, got {value}")
        if self.ca_epochs < 0 or self.ca_samples < 1:
            raise ConfigError(f"slca: ca_epochs must be >= 0 and ca_samples >= 1, got {self.ca_epochs}, "
                              f"{self.ca_samples}")
        if self.ca_mean_decay > 1:
            raise ConfigError(f"slca: ca_mean_decay must be in [0, 1], got {self.ca_mean_decay}")
        self.lr: float | None = None  # the run's learning rate (the head's), read at begin_task
        self.means: dict[int, Tensor] = {}  # output -> μ_c [D] (float64)
        self.covs: dict[int, Tensor] = {}  # output -> Σ_c [D, D] (float32, ridge included)
        self.learnt: dict[int, int] = {}  # output -> the task it was learnt in
        self.head_state: dict[str, Tensor] | None = None  # the head before alignment (what the next task starts from)
        self.keep: dict[str, Tensor] | None = None  # the head as this task began: rows put back after each step
        self.rows: Tensor | None = None  # bool [n_outputs]: the rows this task trains

    # ------------------------------------------------------------------------------------------ parameters
    def parameters(self, model: nn.Module) -> list[Any]:
        """Two optimizer groups: ``model.features`` at lr·``backbone_lr_scale`` and the rest (the head) at lr, lr the
        run's learning rate (known from ``begin_task``; before it both groups take the optimizer's default), each
        with the method's ``weight_decay`` (torch's per-group decay, as the authors' groups carry it)."""
        body = getattr(model, "features", None)
        if body is None or getattr(model, "head", None) is None:
            raise ConfigError("slca needs a model with .features (the backbone) and .head (the classifier): retain's "
                              "mlp, resnet and pre-trained (timm:) models have both")
        slow = {id(p) for p in body.parameters()}
        backbone = [p for p in body.parameters() if p.requires_grad]
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in slow]
        decay = {"weight_decay": self.weight_decay}
        groups: list[dict[str, Any]] = []
        if backbone and self.backbone_lr_scale > 0:
            groups.append({"params": backbone, **decay,
                           **({} if self.lr is None else {"lr": self.lr * self.backbone_lr_scale})})
        groups.append({"params": rest, **decay, **({} if self.lr is None else {"lr": self.lr})})
        return groups

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        head = ctx.model.head
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"slca needs a linear head (model.head is {type(head).__name__})")
        self.lr = float(ctx.config.lr)
        if self.head_state is not None:  # undo the last alignment: training goes on from the un-aligned head
            head.load_state_dict(self.head_state)
        self.rows = ctx.scenario.task_out[ctx.task].to(head.weight.device)
        self.keep = {k: v.detach().clone() for k, v in head.state_dict().items()} if self.local else None

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        out = ctx.model(x)
        if ctx.model.training:
            if self.local and self.rows is not None:
                out = out.masked_fill(~self.rows, float("-inf"))
            return out
        seen = ctx.seen.to(out.device)
        return out.masked_fill(~seen, float("-inf")) if bool(seen.any()) else out

    @torch.no_grad()
    def after_update(self, ctx: Any, batch: Any, out: Tensor) -> None:
        if self.keep is None:
            return
        head, other = ctx.model.head, ~self.rows
        head.weight[other] = self.keep["weight"][other]
        if head.bias is not None:
            head.bias[other] = self.keep["bias"][other]

    def end_task(self, ctx: Any) -> None:
        head = ctx.model.head
        self.head_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        self.store_statistics(ctx)
        if ctx.task > 0 and self.ca_epochs > 0:
            self.align(ctx)

    # ------------------------------------------------------------------------------------------- helpers
    @torch.no_grad()
    def store_statistics(self, ctx: Any) -> None:
        """μ_c and Σ_c of each class of the task just trained, from its un-augmented training rows."""
        data = ctx.scenario.task_data(ctx.task)
        sc = ctx.scenario
        y = sc.targets(sc.y_train[data.idx.to(sc.y_train.device)], ctx.task)  # the outputs the rows train
        feats = embed(ctx.model, ctx.scenario, data.idx, ctx.task)
        y = y.to(feats.device)
        for c in sorted(set(y.tolist())):
            mean, cov = class_statistics(feats[y == c], self.cov_ridge)
            self.means[c], self.covs[c], self.learnt[c] = mean, cov.float(), ctx.task

    def align(self, ctx: Any) -> None:
        """Train the seen classes' head rows on features drawn from their Gaussians (the backbone is not called)."""
        head = ctx.model.head
        classes = sorted(self.means)
        T = ctx.task
        scale = torch.tensor([1 - self.ca_mean_decay + self.ca_mean_decay * (self.learnt[c] + 1) / (T + 1)
                              for c in classes], dtype=torch.float64)
        device = head.weight.device
        means = torch.stack([self.means[c] for c in classes]).to(device) * scale.to(device).unsqueeze(1)
        covs = torch.stack([self.covs[c] for c in classes]).to(device)
        pos = {c: i for i, c in enumerate(classes)}
        groups = [torch.tensor([pos[c] for c in classes if self.learnt[c] == k], device=device)
                  for k in sorted(set(self.learnt.values()))]
        cols = torch.tensor(classes, device=device)
        weight = head.weight.detach()[cols].clone().requires_grad_(True)
        bias = head.bias.detach()[cols].clone().requires_grad_(True) if head.bias is not None else None
        params = [weight] + ([bias] if bias is not None else [])
        lr = self.ca_lr or float(ctx.config.lr)
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=self.weight_decay)
        n = self.ca_samples
        for epoch in range(self.ca_epochs):
            for g in opt.param_groups:  # torch's CosineAnnealingLR stepped once per epoch, to 0 at ca_epochs
                g["lr"] = lr * (1 + math.cos(math.pi * epoch / self.ca_epochs)) / 2
            x, target = sample_features(means, covs, n, ctx.rng)
            perm = torch.randperm(len(x), generator=ctx.rng).to(device)
            x, target = x[perm], target[perm]
            for start in range(0, len(x), n):
                logits = F.linear(x[start:start + n], weight, bias)
                if self.ca_logit_norm > 0:
                    logits = normalised_logits(logits, groups, self.ca_logit_norm)
                loss = F.cross_entropy(logits, target[start:start + n])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            head.weight[cols] = weight.detach()
            if bias is not None:
                head.bias[cols] = bias.detach()
