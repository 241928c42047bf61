"""APER (ADAM): adapt a copy of the pre-trained model on the first task (adapter, SSF, VPT or full fine-tuning),
freeze it, and classify by prototypes of the concatenated [pre-trained, adapted] features (Zhou et al. 2023)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.methods.lucir import CosineHead
from retain.methods.simplecil import Prototypes, no_rows, nothing_to_train, task_features
from retain.scenarios import TaskData
from retain.vit import ViT

VARIANTS = ("adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune")


# ------------------------------------------------------------------------------------------ the adaptations
class Adapter(nn.Module):
    """AdaptFormer's bottleneck (Chen et al. 2022): ``scale · up(dropout(ReLU(down(x))))``, the up-projection
    initialised to zero (PILOT's ``lora`` init: down Kaiming-uniform, biases zero), so at initialisation it adds
    nothing."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float = 0.1):
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        self.scale, self.dropout = scale, dropout
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.down(x)), self.dropout, self.training)
        return self.up(h) * self.scale


class AdaptedBlock(nn.Module):
    """A ViT block with a parallel adapter beside its MLP branch: ``x' = x + attn(norm1(x))``, then
    ``x' + mlp(norm2(x')) + adapter(x')`` (the adapter reads the residual stream, PILOT's ``parallel`` option
    with no adapter LayerNorm)."""

    def __init__(self, block: nn.Module, bottleneck: int, scale: float):
        super().__init__()
        self.block = block
        dim = block.norm2.normalized_shape[0]
        self.adapter = Adapter(dim, bottleneck, scale).to(block.norm2.weight.device)

    def forward(self, x: Tensor, prefix: Any = None) -> Tensor:
        b = self.block
        x = x + b.attn(b.norm1(x), prefix)
        return x + b.mlp(b.norm2(x)) + self.adapter(x)


class SSF(nn.Module):
    """Scale and shift of a module's output features (Lian et al. 2022): ``module(x) · γ + β`` over the last
    dimension, γ ~ N(1, 0.02), β ~ N(0, 0.02) (the SSF code's and PILOT's initialisation)."""

    def __init__(self, module: nn.Module, dim: int):
        super().__init__()
        self.module = module
        dev = next((p.device for p in module.parameters()), None)
        self.scale = nn.Parameter(torch.empty(dim, device=dev).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(dim, device=dev).normal_(0.0, 0.02))

    def forward(self, *args: Any) -> Tensor:
        return self.module(*args) * self.scale + self.shift


def add_adapters(vit: ViT, bottleneck: int, scale: float) -> list[nn.Parameter]:
    """Wrap every block of ``vit`` in place with a parallel adapter; the adapters' parameters."""
    for i, block in enumerate(vit.blocks):
        vit.blocks[i] = AdaptedBlock(block, bottleneck, scale)
    return [p for b in vit.blocks for p in b.adapter.parameters()]


def add_ssf(vit: ViT) -> list[nn.Parameter]:
    """SSF after every operation PILOT's SSF ViT scales: the patch embedding, each block's norm1, qkv, proj,
    norm2, fc1, fc2, and the final norm; the scales' and shifts' parameters."""
    d = vit.embed_dim
    vit.patch_embed = SSF(vit.patch_embed, d)
    wrapped = [vit.patch_embed]
    for b in vit.blocks:
        b.norm1, b.norm2 = SSF(b.norm1, d), SSF(b.norm2, d)
        b.attn.qkv, b.attn.proj = SSF(b.attn.qkv, 3 * d), SSF(b.attn.proj, d)
        b.mlp.fc1, b.mlp.fc2 = SSF(b.mlp.fc1, b.mlp.fc1.out_features), SSF(b.mlp.fc2, d)
        wrapped += [b.norm1, b.norm2, b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2]
    vit.norm = SSF(vit.norm, d)
    wrapped.append(vit.norm)
    return [p for m in wrapped for p in (m.scale, m.shift)]


@register("aper")
@dataclass
class APER(Method):
    """APER: tune a copy of the pre-trained model on the first task only, then prototypes of [φ_pre(x), φ_tuned(x)].

    Zhou, Cai, Ye & Zhan, "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
    Adaptivity are All You Need", IJCV 2024 (arXiv 2303.07338, 2023; "ADAM" in its first version), §4.

    First task: a copy of the backbone is adapted (``variant``) with a cosine classifier (σ·cos, σ learned, as
    PILOT's head) over the first task's classes, by the run's cross-entropy, optimizer and ``--epochs``; the
    pre-trained model is not touched. ``adapter``: AdaptFormer's parallel bottleneck in every block's MLP branch
    (``ffn_num`` = 64 wide, scaled by 0.1, zero up-projection, so the tuned copy starts as the pre-trained model);
    ``ssf``: a scale and shift after every operation; ``vpt_shallow`` / ``vpt_deep``: ``prompt_tokens`` learned
    tokens at the input / at every layer (the pre-trained ViT itself, with prompts: no copy); ``finetune``: every
    weight of the copy (any backbone, a ResNet too). Then the copy is frozen for good, and at each task's end
    (the first one included) the prototype of each new class is the mean over its training rows of the
    concatenation [φ_pre(x), φ_tuned(x)]; the prediction is argmax_c cos(·, p_c), as :mod:`simplecil`.

    Hooks: ``begin_task`` (first task: the copy / prompts and the head), ``parameters`` (those, then nothing),
    ``task_data`` (later tasks: no rows, no step), ``forward`` (first task's training: the tuned copy's head;
    else the prototypes), ``end_task`` (freeze, prototypes). ``reads_backbone``: it runs the adapted copy, so the
    run never replaces the backbone by cached features; ``freeze = "all"``: the pre-trained branch is never
    trained (the tuned copy is the method's own).

    Deviations, each with its reason:

    * PILOT's first-task schedule (SGD, momentum 0.9, weight decay 5e-4, 20 epochs, cosine annealing to 0) is
      the run's: retain has no learning-rate schedule, so the rate stays constant; the presets give PILOT's lr,
      batch size and optimizer, ``--epochs 20`` is for the user to give (epochs are not a preset's to set).
    * VPT's prompts start uniform in ±sqrt(6 / (in_chans · patch² + D)) (VPT's own initialisation), not at
      PILOT's zeros: zero prompts all receive the same gradient and stay identical tokens.
    * The adapter reads the residual stream (PILOT's code, no adapter LayerNorm), not LN(x) of AdaptFormer's
      equation; with dropout 0.1 inside, as PILOT.
    * Task-IL is allowed (not in the paper): the prototypes as in :mod:`simplecil`; domain-IL is refused, as there.
    """

    variant: str = param("adapter", "how the first task tunes the copy: adapter, ssf, vpt_shallow, vpt_deep or "
                         "finetune", choices=VARIANTS)
    ffn_num: int = param(64, "adapter bottleneck width (PILOT's ffn_num)")
    ffn_scale: float = param(0.1, "adapter output scale s (PILOT's ffn_adapter_scalar)")
    prompt_tokens: int = param(5, "VPT prompt tokens (per layer for vpt_deep; PILOT's prompt_token_num)")

    modes = ("class", "task")  # domain-IL refused, as SimpleCIL (its prototypes would average the domains)
    needs_boundaries = True  # the first task's end freezes the copy; each task's end adds prototypes
    freeze = "all"
    reads_backbone = True
    presets = {
        # PILOT exps/aper_aperpter.json (adapter, ffn_num 64, SGD lr 0.01, batch 48; tuned_epoch 20: --epochs 20)
        "cifar100-b0inc10/class": {"variant": "adapter", "ffn_num": 64, "lr": 0.01, "batch_size": 48,
                           "optimizer": "sgd", "momentum": 0.9},
        # PILOT exps/aper_aperpter_inr.json (adapter, SGD lr 0.05, batch 16; tuned_epoch 10: --epochs 10)
        "imagenet-r/class": {"variant": "adapter", "ffn_num": 64, "lr": 0.05, "batch_size": 16,
                             "optimizer": "sgd", "momentum": 0.9},
    }

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"aper: variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.ffn_num < 1:
            raise ConfigError(f"aper: ffn_num must be at least 1, got {self.ffn_num}")
        if not math.isfinite(self.ffn_scale):
            raise ConfigError(f"aper: ffn_scale must be a finite number, got {self.ffn_scale}")
        if self.prompt_tokens < 1:
            raise ConfigError(f"aper: prompt_tokens must be at least 1, got {self.prompt_tokens}")
        self.tuned: nn.Module | None = None  # the adapted copy (None for VPT: the prompts run the original)
        self.prompts: nn.Parameter | None = None  # VPT: [1, P, D] (shallow) or [depth, P, D] (deep)
        self.head: CosineHead | None = None  # the first task's classifier on the tuned features
        self.trainable: list[nn.Parameter] = []  # what the first task trains
        self.frozen = False  # True once the first task has ended
        self.prototypes = Prototypes()

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        if self.frozen or self.head is not None:  # later tasks, or a run resumed inside the first
            return
        enc = getattr(ctx.model, "features", None)
        backbone = getattr(enc, "backbone", None)
        if backbone is None or not hasattr(enc, "prepare"):
            raise ConfigError("aper needs a pre-trained backbone: --model timm:NAME --weights PATH (the model's "
                              ".features must be retain.backbones' Encoder)")
        if self.variant != "finetune" and not isinstance(backbone, ViT):
            raise ConfigError(f"aper variant {self.variant} needs a ViT backbone (--model timm:vit_...); use "
                              f"--param variant=finetune for a {type(backbone).__name__}")
        for p in enc.parameters():  # the pre-trained branch never trains (the run freezes it too: freeze="all")
            p.requires_grad_(False)
        dev = next(enc.parameters()).device
        if self.variant.startswith("vpt"):
            d, patch = backbone.embed_dim, backbone.cfg.patch_size
            bound = math.sqrt(6.0 / (backbone.cfg.in_chans * patch * patch + d))
            layers = 1 if self.variant == "vpt_shallow" else len(backbone.blocks)
            self.prompts = nn.Parameter(torch.empty(layers, self.prompt_tokens, d, device=dev).uniform_(-bound, bound))
            self.trainable = [self.prompts]
        else:
            self.tuned = copy.deepcopy(backbone)
            if self.variant == "adapter":
                self.trainable = add_adapters(self.tuned, self.ffn_num, self.ffn_scale)
            elif self.variant == "ssf":
                self.trainable = add_ssf(self.tuned)
            else:
                self.trainable = list(self.tuned.parameters())
                for p in self.trainable:
                    p.requires_grad_(True)
        self.head = CosineHead(enc.dim, ctx.scenario.n_outputs).to(dev)
        self.trainable = self.trainable + list(self.head.parameters())

    def parameters(self, model: nn.Module) -> list[Any]:
        return nothing_to_train() if self.frozen or not self.trainable else list(self.trainable)

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        return no_rows(data) if self.frozen else data

    def end_task(self, ctx: Any) -> None:
        if not self.frozen:
            for p in self.trainable:
                p.requires_grad_(False)
            self.trainable, self.head, self.frozen = [], None, True
        feats, y = task_features(ctx, lambda x: self.both(ctx, x))
        self.prototypes.add(feats, y, ctx.scenario.n_outputs)

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        if not self.frozen:  # the first task: training (and the baseline before it) through the tuned branch
            if ctx.model.training and self.head is not None:
                return self.head(self.adapted(ctx, x, train=True))
            return ctx.model(x)
        return self.prototypes.scores(self.both(ctx, x))

    # ------------------------------------------------------------------------------------------- helpers
    def adapted(self, ctx: Any, x: Tensor, train: bool = False) -> Tensor:
        """φ_tuned(x): the adapted copy's features (VPT: the pre-trained ViT with the learned prompts)."""
        enc = ctx.model.features
        if self.prompts is not None:
            b = len(x)
            if self.variant == "vpt_shallow":
                return enc.tokens(x, prompts=self.prompts.expand(b, -1, -1))[:, 0]
            return enc.tokens(x, deep_prompts={i: p.expand(b, -1, -1) for i, p in enumerate(self.prompts)})[:, 0]
        self.tuned.train(train)
        return self.tuned(enc.prepare(x)).flatten(1)

    def both(self, ctx: Any, x: Tensor) -> Tensor:
        """[φ_pre(x), φ_tuned(x)]: the features the prototypes live in."""
        return torch.cat([ctx.model.features(x).flatten(1), self.adapted(ctx, x)], dim=1)
