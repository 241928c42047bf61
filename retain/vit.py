"""The Vision Transformer (Dosovitskiy et al. 2021) with timm's parameter names, and the hooks the pre-trained-model
methods need: prompt tokens (L2P, VPT), per-layer prefixes of keys and values (DualPrompt, CODA-Prompt) and
per-layer extra tokens (VPT-deep).

Why retain has its own: timm needs torchvision, which does not import beside every torch build (it does not beside
the CPU build these machines carry), and every prompt method rewrites the inside of the attention blocks, which
PILOT and the L2P / CODA-Prompt authors do by copying timm's ViT into their repositories. This one is written to
timm's ``VisionTransformer`` layout and maths (``class_token``, learned ``pos_embed`` including the class position,
pre-norm blocks, LayerNorm eps 1e-6, exact GELU, biased qkv, the final ``norm``, the class token's output as the
feature), so a timm ViT checkpoint's ``state_dict`` loads into it key for key (the classifier ``head`` aside).

Prompts and prefixes are arguments of :meth:`ViT.tokens`, never state of the module, so one backbone serves every
method and the frozen backbone's plain features are what :meth:`ViT.forward` gives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Prefix = tuple[Tensor, Tensor]  # (keys, values), each [B, L, D]: prepended to a layer's keys and values


@dataclass(frozen=True)
class ViTConfig:
    """A ViT's shape, named as timm's ``VisionTransformer`` arguments."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def asdict(self) -> dict:
        return asdict(self)


# timm's names for the ViTs the pre-trained CL papers use, with their shapes (timm.models.vision_transformer); a
# name's ".tag" (the pre-training, e.g. ".augreg_in21k") does not change the shape and is recorded as given.
TIMM_VITS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_224_in21k": ViTConfig(embed_dim=768, depth=12, num_heads=12),  # the older timm name (L2P...)
    "vit_base_patch32_224": ViTConfig(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
}


class Attention(nn.Module):
    """Multi-head self-attention, timm's ``Attention`` (fused ``qkv``, output ``proj``), with an optional prefix."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, prefix: Prefix | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if prefix is not None:  # prefix tuning (Li & Liang 2021), as DualPrompt and CODA-Prompt use it
            pk, pv = (p.reshape(b, p.shape[1], self.num_heads, self.head_dim).transpose(1, 2) for p in prefix)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """timm's ``Mlp``: ``fc1``, exact GELU, ``fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, prefix: Prefix | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), prefix)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution (timm's ``patch_embed.proj``), flattened to tokens."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """The ViT backbone: images ``[B, in_chans, img_size, img_size]`` -> the class token's output ``[B, embed_dim]``.

    :meth:`tokens` runs it with the methods' hooks and returns every output token (after the final ``norm``):

    - ``prompts`` ``[B, P, D]``: tokens inserted after the class token, after the position embedding (L2P's
      prompt, VPT-shallow); the outputs keep them at positions ``1 .. P``.
    - ``prefixes`` ``{layer: (keys, values)}``, each ``[B, L, D]``: prepended to that layer's keys and values
      (prefix tuning: DualPrompt, CODA-Prompt); the sequence length does not change.
    - ``deep_prompts`` ``{layer: [B, P, D]}``: tokens that replace the previous layer's prompt outputs before
      that layer (VPT-deep); at a layer with no entry the running prompt tokens pass through.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid ** 2 + 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.embed_dim = d
        self._init()

    def _init(self) -> None:
        """timm's initialisation for training from scratch: truncated-normal (std .02) linear weights and
        position embedding, zero biases, the class token N(0, 1e-6); the patch projection as a linear layer."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def embed(self, x: Tensor) -> Tensor:
        """Patch tokens with the class token in front, plus the position embedding: ``[B, 1 + grid², D]``."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def tokens(self, x: Tensor, prompts: Tensor | None = None, prefixes: dict[int, Prefix] | None = None,
               deep_prompts: dict[int, Tensor] | None = None) -> Tensor:
        """Every output token after the final norm, ``[B, 1 + P + grid², D]`` (see the class docstring)."""
        h = self.embed(x)
        p = 0
        if prompts is not None:
            p = prompts.shape[1]
            h = torch.cat([h[:, :1], prompts, h[:, 1:]], dim=1)
        for i, block in enumerate(self.blocks):
            if deep_prompts is not None and i in deep_prompts:
                new = deep_prompts[i]
                h = torch.cat([h[:, :1], new, h[:, 1 + p:]], dim=1)
                p = new.shape[1]
            h = block(h, prefixes.get(i) if prefixes else None)
        return self.norm(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.tokens(x)[:, 0]
