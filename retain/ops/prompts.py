"""What the prompt methods (L2P, DualPrompt, CODA-Prompt) share: the ViT they prompt, the frozen query, key matching,
the current-task logit mask of their training, layer lists, and orthonormal rows (CODA-Prompt's Gram-Schmidt
initialisation) with its orthogonality penalty.

The three methods prompt the same frozen backbone the same way: the query is the class token's output of the plain
input (no prompts), computed without gradient; keys are matched to it by cosine similarity; class-IL training
scores only the current task's classes (the authors' ``train_mask``; PILOT and the CODA-Prompt code do the same).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.errors import ConfigError


def vit_encoder(ctx: Any, method: str) -> nn.Module:
    """``ctx.model.features`` when its backbone is retain's ViT (:class:`retain.vit.ViT`), its parameters frozen
    (a run freezes a model built from ``--weights`` already; a model passed in as it is gets frozen here, so that
    no gradient is computed for it); else a one-line :class:`ConfigError` naming the fix."""
    from retain.vit import ViT

    enc = getattr(ctx.model, "features", None)
    if enc is None or not isinstance(getattr(enc, "backbone", None), ViT) or not hasattr(enc, "tokens"):
        what = type(enc.backbone if hasattr(enc, "backbone") else ctx.model).__name__
        raise ConfigError(f"{method} prompts a pre-trained ViT, and this model's backbone is a {what}: use "
                          "--model timm:vit_base_patch16_224 (or another timm ViT name) with --weights PATH")
    for p in enc.backbone.parameters():
        p.requires_grad_(False)
    return enc


def layer_list(spec: str, what: str) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1): a comma-separated list of distinct 0-based layer indices (may be empty); ``what`` names
    the hyper-parameter in the error."""
    try:
        out = tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated layer indices, e.g. 0,1; got {spec!r}") from None
    if any(i < 0 for i in out) or len(set(out)) != len(out):
        raise ConfigError(f"{what} must be distinct layer indices >= 0, got {spec!r}")
    return out


@torch.no_grad()
def query(enc: nn.Module, x: Tensor) -> Tensor:
    """q(x): the frozen backbone's class-token output of the plain input, ``[B, D]`` (no gradient)."""
    return enc.tokens(x)[:, 0].float()


def cosine(q: Tensor, keys: Tensor) -> Tensor:
    """Cosine similarities ``[B, M]``: cos(q_b, k_m) for queries ``[B, D]`` and keys ``[M, D]``."""
    return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T


def select(sim: Tensor, top_k: int, batchwise: bool = False) -> Tensor:
    """Indices ``[B, top_k]`` of the keys each row picks: its ``top_k`` most similar (``sim`` ``[B, M]``).

    ``batchwise`` (the authors' ``batchwise_prompt``): every row gets the batch's ``top_k`` most often picked keys,
    ties broken by the mean similarity over the batch (the authors pad with the smallest picked index instead,
    which can repeat a prompt when fewer than ``top_k`` distinct keys were picked)."""
    idx = sim.topk(top_k, dim=1).indices
    if not batchwise:
        return idx
    counts = torch.zeros(sim.shape[1], device=sim.device).scatter_add_(0, idx.flatten(),
                                                                       torch.ones(idx.numel(), device=sim.device))
    score = counts * 4 + sim.mean(0)  # cos in [-1, 1]: the count decides, the similarity breaks ties
    return score.topk(top_k).indices.expand(sim.shape[0], -1)


def train_logits(ctx: Any, out: Tensor, t: Tensor) -> Tensor:
    """Class-IL training logits with every output outside the rows' own tasks at -inf (the authors' train_mask);
    other modes, and evaluation, unchanged. In class-IL a task's rows are all of one task, so this is the current
    task's classes. A task-free stream has no current task to read (the rows' task ids are the boundaries it hides):
    there the run's own mask, the classes seen so far, applies alone."""
    if not ctx.model.training or ctx.scenario.mode != "class" or ctx.config.task_free:
        return out
    task_out = ctx.scenario.task_out.to(out.device)
    return out.masked_fill(~task_out[t.to(out.device).long()], float("-inf"))


@torch.no_grad()
def zero_head(model: nn.Module) -> None:
    """Zero the model's output layer, as the L2P / DualPrompt authors' ViT head starts (``kernel_init = zeros``):
    an output not trained yet then scores 0 at evaluation instead of a random logit (retain's class-IL evaluation
    scores every output, the classes to come included)."""
    for p in model.head.parameters():
        p.zero_()


def uniform_(shape: tuple[int, ...], device: Any) -> nn.Parameter:
    """A prompt or key parameter drawn from U(-1, 1), as the PyTorch reimplementations of L2P and DualPrompt that
    the authors' README points to (and PILOT) initialise them."""
    return nn.Parameter(torch.empty(shape, device=device).uniform_(-1, 1))


def orthonormal_rows(old: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` unit rows ``[k, n]`` orthogonal to each other and to every row of ``old`` ``[s, n]`` (Gram-Schmidt on
    Gaussian draws, as CODA-Prompt initialises each task's new components; done with one QR here). Rows past the
    dimension (``s + k > n``) cannot all be orthogonal: those are unit Gaussian directions, orthogonal to what room
    is left."""
    n = old.shape[1]
    v = torch.randn(k, n, generator=generator).to(old)
    room = max(0, min(k, n - len(old)))
    if room:  # Q's first columns span old's rows (whatever their rank), the last ``room`` are orthogonal to them
        q, _ = torch.linalg.qr(torch.cat([old.detach().float(), v[:room].float()]).T)
        v[:room] = q[:, len(old):].T.to(v)
    return F.normalize(v, dim=1)


def ortho_penalty(t: Tensor) -> Tensor:
    """CODA-Prompt's orthogonality penalty: mean((T Tᵀ − I)²) over the rows of ``t`` ``[m, n]`` (0 iff orthonormal)."""
    t = t.flatten(1)
    return (t @ t.T - torch.eye(len(t), device=t.device, dtype=t.dtype)).pow(2).mean()
