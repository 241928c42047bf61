"""retain's ViT and Google-.npz reader against timm's own, in an environment that has timm (it needs a torchvision
that matches its torch, which the CPU torch of retain's CI does not have; see docs/pretrained.md):

    python -m venv /tmp/timm-env && /tmp/timm-env/bin/pip install torch==2.14.1 torchvision==0.29.1 timm \
        numpy scikit-learn quadprog matplotlib pillow safetensors
    PYTHONPATH=. /tmp/timm-env/bin/python benchmarks/timm_equivalence.py

1. For a few of timm's ViTs (and shape overrides), timm's random-initialised model (perturbed) is loaded key for
   key, strictly, into retain's :class:`retain.vit.ViT`; both run on the same images; prints the largest
   difference of the class-token features and of all output tokens.
2. A random checkpoint in Google's ``.npz`` layout (the files of the ViT and AugReg papers) is read by timm's
   ``_load_weights`` and by :func:`retain.backbones.npz_to_timm`; prints whether the keys agree and the largest
   difference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.vision_transformer import _load_weights

from retain.backbones import npz_to_timm
from retain.vit import TIMM_VITS, ViT, ViTConfig


def models() -> None:
    torch.manual_seed(0)
    for name, kw in [("vit_tiny_patch16_224", {}), ("vit_small_patch16_224", {"img_size": 32, "patch_size": 4,
                                                                              "depth": 3}),
                     ("vit_base_patch16_224", {"depth": 2})]:
        t = timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()
        with torch.no_grad():
            for p in t.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        cfg = ViTConfig(**{**TIMM_VITS[name].asdict(), **kw})
        r = ViT(cfg).eval()
        r.load_state_dict({k: v for k, v in t.state_dict().items() if not k.startswith("head")}, strict=True)
        x = torch.randn(4, 3, cfg.img_size, cfg.img_size)
        with torch.no_grad():
            feat = float((t(x) - r(x)).abs().max())
            tok = float((t.forward_features(x) - r.tokens(x)).abs().max())
        print(f"{name} {kw or ''}: timm {timm.__version__}; features max |diff| {feat:.1e}, tokens {tok:.1e}")


def npz() -> None:
    heads, d, depth = 3, 192, 2
    rnd = np.random.default_rng(0)
    r = lambda *s: (rnd.standard_normal(s) * 0.02).astype(np.float32)  # noqa: E731
    g = {"embedding/kernel": r(16, 16, 3, d), "embedding/bias": r(d), "cls": r(1, 1, d),
         "Transformer/posembed_input/pos_embedding": r(1, 197, d),
         "Transformer/encoder_norm/scale": 1 + r(d), "Transformer/encoder_norm/bias": r(d)}
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        a = p + "MultiHeadDotProductAttention_1/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            g[p + ln + "/scale"], g[p + ln + "/bias"] = 1 + r(d), r(d)
        for n in ("query", "key", "value"):
            g[a + n + "/kernel"], g[a + n + "/bias"] = r(d, heads, d // heads), r(heads, d // heads)
        g[a + "out/kernel"], g[a + "out/bias"] = r(heads, d // heads, d), r(d)
        g[p + "MlpBlock_3/Dense_0/kernel"], g[p + "MlpBlock_3/Dense_0/bias"] = r(d, 4 * d), r(4 * d)
        g[p + "MlpBlock_3/Dense_1/kernel"], g[p + "MlpBlock_3/Dense_1/bias"] = r(4 * d, d), r(d)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.npz"
        np.savez(path, **g)
        t = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=depth)
        _load_weights(t, str(path))
        with np.load(path) as z:
            mine = npz_to_timm({k: torch.from_numpy(z[k]) for k in z.files})
    theirs = t.state_dict()
    same_keys = sorted(mine) == sorted(k for k in theirs if not k.startswith("head"))
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    print(f"Google .npz: timm's reader and retain's agree on the keys: {same_keys}; max |diff| {worst:.1e}")


if __name__ == "__main__":
    models()
    npz()
