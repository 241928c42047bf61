"""CODA-Prompt: prompts assembled from components weighted by attention-keyed matching, growing per task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.ops.prompts import layer_list, ortho_penalty, orthonormal_rows, query, train_logits, vit_encoder, zero_head
from retain.scenarios import Batch
from retain.vit import Prefix


def component_weights(q: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
    """α ``[B, M]``: α_m = cos(q ⊙ A_m, K_m) for queries ``[B, D]``, keys K and attention vectors A ``[M, D]``."""
    return (F.normalize(q[:, None, :] * attention[None], dim=2) * F.normalize(keys, dim=1)[None]).sum(2)


def assemble(alpha: Tensor, components: Tensor) -> Prefix:
    """The prompt Σ_m α_m P_m ``[B, L, D]`` of components ``[M, L, D]``, split into the prefix keys (first L/2
    tokens) and values (last L/2)."""
    p = torch.einsum("bm,mld->bld", alpha, components)
    half = p.shape[1] // 2
    return p[:, :half], p[:, half:]


@register("coda_prompt")
@dataclass
class CODAPrompt(Method):
    """CODA-Prompt: each prompted layer's prefix is Σ_m α_m P_m, α_m = cos(q ⊙ A_m, K_m); M/T new components a task.

    Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris & Kira, "CODA-Prompt: COntinual
    Decomposed Attention-based Prompting for Rehearsal-Free Continual Learning", CVPR 2023 (§4, Eq. 3-8); checked
    against the authors' code (GT-RIPL/CODA-Prompt, ``models/zoo.py``, ``experiments/*.sh``) and PILOT.

    Each layer of ``layers`` (default 0-4) has its own components P_m ``[L_p, D]``, keys K_m ``[D]`` and attention
    vectors A_m ``[D]``. The query q(x) is the frozen backbone's class-token output of the plain input, without
    gradient; the weights are α_m = cos(q(x) ⊙ A_m, K_m) (:func:`component_weights`) and the layer's prompt
    Σ_m α_m P_m is split into L_p/2 prefix keys and L_p/2 values (prefix tuning, ``prefixes=``). The classifier
    (the model's ``head``) reads the class token. The pool of M = ``pool_size`` components grows by M/T each task
    (T the scenario's tasks): a task's new P, K and A rows are initialised orthonormal to each other and to every
    earlier row (Gram-Schmidt, as the authors' current code re-initialises per task; :func:`orthonormal_rows`),
    trained, and then frozen: later tasks use them (detached: zero gradient) and train only their own. Evaluation
    uses every component trained so far. The loss is the cross-entropy over the current task's classes (class-IL
    training, the authors' masking of earlier classes) plus ``ortho_mu`` · Σ_layers (‖KKᵀ − I‖² + ‖AAᵀ − I‖² +
    ‖PPᵀ − I‖²) (means over the entries, :func:`retain.ops.prompts.ortho_penalty`; P flattened per component),
    over the components in use. Backbone frozen (``freeze = "all"``).

    Hooks: ``begin_task`` (grow the pool), ``forward`` (query, weights, prefixed ViT, head; the current-task mask
    in training), ``penalty`` (the orthogonality term of the step's forward).

    Deviations and choices:

    * ``ortho_mu`` defaults to 0.0, the authors' released scripts ("with updated code, now can be 0!") and PILOT;
      the paper used an orthogonality weight of 0.1 with one orthogonal initialisation of the whole pool at the
      start. The per-task re-initialisation of the authors' current code is what this does.
    * Each task's components are separate parameters and only the current task's are given to the optimizer, so
      earlier ones cannot move (not even by Adam's momentum); the authors detach them in the forward pass.
    * Orthonormal rows come from one QR decomposition per block (exact Gram-Schmidt); when a layer's rows outnumber
      their dimension (a tiny ViT with a large pool) the rows past it are unit Gaussian directions.
    * The model's head is zeroed when the first components are created (the authors' code keeps PyTorch's default
      initialisation; the L2P / DualPrompt authors zero theirs): retain's class-IL evaluation scores every output,
      the classes to come included, and a zero row scores 0 where a random one would compete.
    * The training schedule is the run's (the authors: Adam, lr 0.001, batch 128, 20 epochs on CIFAR-100 and 50 on
      ImageNet-R with a cosine schedule; retain keeps the rate constant).
    """

    pool_size: int = param(100, "M: prompt components in total at each layer (M / T added per task)")
    length: int = param(8, "L_p: tokens of each component, split into L_p/2 prefix keys and L_p/2 values")
    layers: str = param("0,1,2,3,4", "layers (0-based, comma-separated) whose attention gets the prefix")
    ortho_mu: float = param(0.0, "weight of the orthogonality penalty on P, K and A (authors' scripts 0; paper 0.1)")
    train_mask: bool = param(True, "class-IL training scores only the current task's classes (authors' masking)")

    needs_boundaries = True
    freeze = "all"
    reads_backbone = True
    # PILOT exps/coda_prompt.json and exps/coda_prompt_inr.json = the authors' experiments/cifar-100.sh and
    # imagenet-r.sh (20 and 50 epochs, cosine schedule: the run's --epochs, constant rate here).
    presets = {"cifar100-b0inc10/class": {"optimizer": "adam", "lr": 0.001, "batch_size": 128},
               "imagenet-r/class": {"optimizer": "adam", "lr": 0.001, "batch_size": 128}}

    def __post_init__(self) -> None:
        self.at = layer_list(self.layers, "coda_prompt: layers")
        if not self.at:
            raise ConfigError("coda_prompt: layers is empty")
        if self.pool_size < 1:
            raise ConfigError(f"coda_prompt: pool_size must be >= 1, got {self.pool_size}")
        if self.length < 2 or self.length % 2:
            raise ConfigError(f"coda_prompt: length must be even and >= 2 (halves are keys and values), got "
                              f"{self.length}")
        if self.ortho_mu < 0:
            raise ConfigError(f"coda_prompt: ortho_mu must be >= 0, got {self.ortho_mu}")
        # per task, per prompted layer: components [M/T, L_p, D], keys [M/T, D], attention vectors [M/T, D]
        self.P: list[list[nn.Parameter]] = []
        self.K: list[list[nn.Parameter]] = []
        self.A: list[list[nn.Parameter]] = []
        self.ortho: Tensor | None = None  # the penalty of the last training forward, for penalty()

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        enc = vit_encoder(ctx, self.name)
        while len(self.P) <= ctx.task:
            self._grow(enc, ctx)

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        enc = vit_encoder(ctx, self.name)
        if not self.P:  # evaluated before any task (the untrained baseline): the first task's components
            self._grow(enc, ctx)
        q = query(enc, x)
        training = ctx.model.training
        n = len(self.P) if not training else min(ctx.task + 1, len(self.P))
        prefixes: dict[int, Prefix] = {}
        ortho = []
        for j, layer in enumerate(self.at):
            P, K, A = (torch.cat([_frozen(part[i][j], i < n - 1 and training) for i in range(n)])
                       for part in (self.P, self.K, self.A))
            prefixes[layer] = assemble(component_weights(q, K, A), P)
            if training and self.ortho_mu > 0:
                ortho.append(ortho_penalty(K) + ortho_penalty(A) + ortho_penalty(P.flatten(1)))
        tokens = enc.tokens(x, prefixes=prefixes)
        out = ctx.model.head(tokens[:, 0])
        if not training:
            return out
        self.ortho = self.ortho_mu * torch.stack(ortho).sum() if ortho else None
        return train_logits(ctx, out, t) if self.train_mask else out

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        ortho, self.ortho = self.ortho, None
        return ortho

    # ----------------------------------------------------------------------------------------- parameters
    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The head and the newest task's components, keys and attention vectors (never the backbone, never an
        earlier task's components)."""
        own = [p for part in (self.P, self.K, self.A) if part for p in part[-1]]
        return [p for p in model.head.parameters() if p.requires_grad] + own

    def _grow(self, enc: nn.Module, ctx: Any) -> None:
        """Add the next task's M/T components at each layer, orthonormal to every earlier one."""
        vit = enc.backbone
        depth, d = len(vit.blocks), vit.embed_dim
        bad = [i for i in self.at if i >= depth]
        if bad:
            raise ConfigError(f"coda_prompt: layer {bad[0]} does not exist; the ViT has {depth} blocks "
                              f"(0..{depth - 1}): set layers within them")
        n_tasks = len(ctx.scenario.tasks)
        per_task = self.pool_size // n_tasks
        if per_task < 1:
            raise ConfigError(f"coda_prompt: pool_size {self.pool_size} gives no component to each of the "
                              f"{n_tasks} tasks; set pool_size >= {n_tasks}")
        task = len(self.P)
        if task == 0:
            zero_head(ctx.model)
        new = {"P": [], "K": [], "A": []}
        for j in range(len(self.at)):
            for name, part, shape in (("P", self.P, (self.length, d)), ("K", self.K, (d,)), ("A", self.A, (d,))):
                old = torch.cat([part[i][j].detach().flatten(1) for i in range(task)]) if task else \
                    torch.zeros(0, int(torch.Size(shape).numel()))
                rows = orthonormal_rows(old.cpu(), per_task, ctx.rng).view(per_task, *shape)
                new[name].append(nn.Parameter(rows.to(ctx.device)))
        self.P.append(new["P"])
        self.K.append(new["K"])
        self.A.append(new["A"])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("ortho", None)
        return state


def _frozen(p: Tensor, frozen: bool) -> Tensor:
    return p.detach() if frozen else p
