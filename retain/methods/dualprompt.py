"""DualPrompt: a shared G-prompt in the first layers, one E-prompt per task in the next: prefixes of a frozen ViT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.ops.prompts import cosine, layer_list, query, train_logits, uniform_, vit_encoder, zero_head
from retain.scenarios import Batch
from retain.vit import Prefix


def prefixes(g: Tensor | None, g_layers: tuple[int, ...], e: Tensor | None, e_layers: tuple[int, ...]
             ) -> dict[int, Prefix]:
    """The per-layer prefixes of prefix tuning: ``g`` ``[B, len(g_layers), 2, L_g, D]`` (keys, values) at the
    G-layers, ``e`` ``[B, len(e_layers), 2, L_e, D]`` at the E-layers; at a layer in both, G's then E's tokens."""
    out: dict[int, Prefix] = {}
    for prompt, where in ((g, g_layers), (e, e_layers)):
        if prompt is None:
            continue
        for j, layer in enumerate(where):
            k, v = prompt[:, j, 0], prompt[:, j, 1]
            if layer in out:
                k, v = torch.cat([out[layer][0], k], 1), torch.cat([out[layer][1], v], 1)
            out[layer] = (k, v)
    return out


@register("dualprompt")
@dataclass
class DualPrompt(Method):
    """DualPrompt: a task-shared G-prompt and task-specific E-prompts (chosen by key matching) as attention prefixes.

    Wang, Zhang, Ebrahimi, Sun, Zhang, Lee, Ren, Su, Perot, Dy & Pfister, "DualPrompt: Complementary Prompting for
    Rehearsal-free Continual Learning", ECCV 2022 (§4); checked against the authors' JAX code (google-research/l2p,
    ``configs/cifar100_dualprompt.py``, ``imr_dualprompt.py``) and PILOT.

    Prefix tuning (``prefixes=`` of :meth:`retain.vit.ViT.tokens`): a prompt at a layer is a pair (p_K, p_V) of
    ``L`` tokens each, prepended to that layer's attention keys and values (the sequence keeps its length). The
    G-prompt g, one pair per layer of ``g_layers`` (default the first two, 0-1), is shared by every task and
    trained in every task. The E-prompts e_t, one per task with a key k_t, a pair per layer of ``e_layers``
    (default 2-4): in training a row of task t uses e_t (the task identity, as the paper trains), and the matching
    loss λ·(1 − cos(q(x), k_t)) pulls k_t to the query; at evaluation the E-prompt is the one whose key best
    matches q(x) among the tasks trained so far (task-IL: the row's own task, which that setting gives). The query
    q(x) is the frozen backbone's class-token output of the plain input, without gradient. The classifier (the
    model's ``head``) reads the class token (the authors' ``vit_classifier = "token"``). Class-IL training scores
    only the current task's classes (the authors' ``train_mask``). At each new task e_t starts as a copy of
    e_{t-1} (the authors' ``shared_prompt_pool``); keys start afresh. Backbone frozen (``freeze = "all"``).

    Hooks: ``begin_task`` (create the prompts, initialise e_t), ``forward`` (query, E-prompt choice, prefixed ViT,
    head; the current-task mask in training), ``penalty`` (the matching loss of the step's forward).

    Deviations and choices:

    * Lengths count tokens per key and per value, as the authors' code and PILOT store them ([2, L, D]); the paper
      writes one prompt of length L_p split into halves, i.e. L_p = 2·L here. Defaults (L_g = 5, L_e = 5, layers
      0-1 and 2-4, λ = 1) are the authors' CIFAR-100 config; their ImageNet-R config has L_e = 20 (the
      ``imagenet-r/class`` preset keeps PILOT's 5, see below). PILOT uses λ = 0.1.
    * The E-prompt pool is one prompt per task of the scenario (the authors' pool of 10 with top-1 and
      ``use_prompt_mask``: task t trains prompt t); each task's E-prompt and key are separate parameters and only
      the current task's are given to the optimizer, so earlier ones cannot move (not even by Adam's momentum).
    * The authors' ``batchwise_prompt`` majority vote at evaluation is not done: an evaluation batch holds one
      task's test rows, so a vote over it would read the task's identity; each row picks its own E-prompt.
    * The model's head is zeroed when the prompts are created (the authors' ViT head, ``kernel_init = zeros``;
      PILOT keeps timm's small random initialisation): an output not trained yet scores 0 rather than a random
      logit in retain's class-IL evaluation, which scores every output, the classes to come included.
    * Initialisation U(-1, 1) (the authors' linked PyTorch reimplementation, PILOT); the JAX code draws U(0, 0.01).
    * The training schedule is the run's (PILOT: Adam, lr 0.001, batch 24, 5 epochs on CIFAR-100, 10 on ImageNet-R).
    """

    g_length: int = param(5, "L_g: G-prompt tokens per key and per value at each G-layer")
    g_layers: str = param("0,1", "layers (0-based, comma-separated) whose attention gets the G-prompt prefix")
    e_length: int = param(5, "L_e: E-prompt tokens per key and per value at each E-layer")
    e_layers: str = param("2,3,4", "layers (0-based, comma-separated) whose attention gets the E-prompt prefix")
    lambda_: float = param(1.0, "λ: weight of the matching loss pulling the task's key towards the query")
    train_mask: bool = param(True, "class-IL training scores only the current task's classes (authors' train_mask)")

    needs_boundaries = True
    freeze = "all"
    reads_backbone = True
    # PILOT exps/dualprompt.json and exps/dualprompt_inr.json (the epochs, 5 and 10, are the run's --epochs).
    presets = {"cifar100-b0inc10/class": {"optimizer": "adam", "lr": 0.001, "batch_size": 24, "lambda": 0.1},
               "imagenet-r/class": {"optimizer": "adam", "lr": 0.001, "batch_size": 24, "lambda": 0.1}}

    def __post_init__(self) -> None:
        self.g_at = layer_list(self.g_layers, "dualprompt: g_layers")
        self.e_at = layer_list(self.e_layers, "dualprompt: e_layers")
        if (self.g_at and self.g_length < 1) or (self.e_at and self.e_length < 1):
            raise ConfigError("dualprompt: g_length and e_length must be >= 1")
        if not self.e_at:
            raise ConfigError("dualprompt: e_layers is empty; the E-prompts need at least one layer")
        if self.lambda_ < 0:
            raise ConfigError(f"dualprompt: lambda must be >= 0, got {self.lambda_}")
        self.g: nn.Parameter | None = None  # [len(g_layers), 2, L_g, D]
        self.e: list[nn.Parameter] = []  # per task: [len(e_layers), 2, L_e, D]
        self.keys: list[nn.Parameter] = []  # per task: [D]
        self.trained = 0  # tasks whose E-prompt has been trained (or is being): those evaluation may pick
        self.match: Tensor | None = None  # the matching loss of the last training forward, for penalty()

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        self._build(ctx)
        task = ctx.task
        if task > 0 and self.trained <= task:  # the authors' shared_prompt_pool: e_t starts where e_{t-1} ended
            with torch.no_grad():
                self.e[task].copy_(self.e[task - 1])
        self.trained = max(self.trained, task + 1)

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        enc = self._build(ctx)
        q = query(enc, x)
        keys = torch.stack(self.keys[:max(1, self.trained)])
        sim = cosine(q, keys)
        t = t.to(q.device).long()
        if ctx.model.training or ctx.scenario.mode == "task":
            which = t.clamp(max=len(self.e) - 1)
        else:
            which = sim.argmax(1)
        e = torch.stack(self.e)[which]  # [B, len(e_layers), 2, L_e, D]
        g = None if self.g is None else self.g.expand(len(x), *self.g.shape)
        tokens = enc.tokens(x, prefixes=prefixes(g, self.g_at, e, self.e_at))
        out = ctx.model.head(tokens[:, 0])
        if not ctx.model.training:
            return out
        self.match = self.lambda_ * (1 - sim.gather(1, which.clamp(max=sim.shape[1] - 1)[:, None])).mean()
        return train_logits(ctx, out, t) if self.train_mask else out

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        match, self.match = self.match, None
        return match

    # ----------------------------------------------------------------------------------------- parameters
    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The head, the G-prompt, and the current task's E-prompt and key (never the backbone)."""
        own = [] if self.g is None else [self.g]
        if self.e:
            current = min(max(self.trained - 1, 0), len(self.e) - 1)
            own += [self.e[current], self.keys[current]]
        return [p for p in model.head.parameters() if p.requires_grad] + own

    def _build(self, ctx: Any) -> nn.Module:
        enc = vit_encoder(ctx, self.name)
        if not self.e:
            vit = enc.backbone
            depth, d = len(vit.blocks), vit.embed_dim
            bad = [i for i in (*self.g_at, *self.e_at) if i >= depth]
            if bad:
                raise ConfigError(f"dualprompt: layer {bad[0]} does not exist; the ViT has {depth} blocks "
                                  f"(0..{depth - 1}): set g_layers / e_layers within them")
            n_tasks = len(ctx.scenario.tasks)
            zero_head(ctx.model)
            if self.g_at:
                self.g = uniform_((len(self.g_at), 2, self.g_length, d), ctx.device)
            self.e = [uniform_((len(self.e_at), 2, self.e_length, d), ctx.device) for _ in range(n_tasks)]
            self.keys = [uniform_((d,), ctx.device) for _ in range(n_tasks)]
        return enc

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("match", None)
        return state
