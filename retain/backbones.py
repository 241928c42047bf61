"""Pre-trained backbones: ``--model timm:NAME`` with ``--weights PATH``, ``--freeze``, and cached frozen features.

**Which network.** ``timm:NAME[.tag][,key=value...]`` names a timm architecture with timm's own
``create_model`` keyword overrides (``timm:vit_tiny_patch16_224,img_size=28,patch_size=4,in_chans=1,depth=4``).
The ViTs of :data:`retain.vit.TIMM_VITS` are built by retain itself (:class:`retain.vit.ViT`, timm's parameter
names and maths), with or without timm installed, so the prompt methods can reach inside them; any other name
needs timm (``pip install 'retain[timm]'``) and is built by ``timm.create_model(NAME, num_classes=0, ...)``, for
the methods that read only its features. retain's own models (``--model resnet18-reduced``) take ``--weights``
too: the file is then a ``state_dict`` of that model, or of its ``.features`` (what
``benchmarks/pretrain_backbone.py`` saves).

**Which weights.** ``--weights PATH`` (``.safetensors``, ``.pth`` / ``.pt`` / ``.bin``, or Google's ViT ``.npz``);
without it, timm's local Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``,
``models--timm--NAME.tag``); never a download unless ``--download`` is given (then ``huggingface_hub`` fetches
``timm/NAME.tag`` into that cache and the same path loads it). The classifier of the checkpoint is dropped
(``head.*``, ``fc.*``); every other key must match the model in name and shape, or the run stops before training
with the keys that differ. The record's ``model.weights`` keeps the file's SHA-256, its source, timm's version
(None when timm is not installed) and the preprocessing used.

**Preprocessing.** Scenario inputs are resized (bilinear) to the backbone's ``img_size`` and a grey image is
repeated over three channels for a three-channel backbone; pixels are normalised with the weights' mean and std:
from the safetensors metadata ``retain.preprocess`` (what :func:`save_weights` writes), else a timm / Hugging Face
``config.json`` beside the file (``pretrained_cfg.mean`` / ``std``), else timm's convention for the name (0.5 for
the ``augreg`` / ``in21k`` ViTs, ImageNet's otherwise; the record says ``"default"``). ``--normalize`` overrides.

**Freezing.** ``--freeze all|none|N|PREFIX,...``: the whole backbone, none of it, its first ``N`` blocks (with the
patch and position embeddings), or the parameters whose names start with the prefixes. A method may require one
(``Method.freeze``: SimpleCIL, RanPAC and the prompt methods need ``all``). Frozen parameters get
``requires_grad = False`` and frozen batch-norm layers stay in evaluation mode, so nothing about them moves.

**The feature cache.** With the whole backbone frozen, no training augmentation, no per-task input transform and
a method that reads the backbone only through ``model.features`` (``Method.reads_backbone`` False), every
sample's features are computed once, kept in ``retain.data.cache_dir() / "features"`` under a key of the weights'
hash, the model, the preprocessing and the data's own hash, and the run trains on them: the scenario's inputs
become the features and ``model.features`` an identity. Results are the same as through the backbone (tested);
``--feature-cache off`` turns it off (the benchmark ``benchmarks/feature_cache.py`` measures both).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from retain.data import cache_dir, file_digest
from retain.errors import ConfigError
from retain.vit import TIMM_VITS, ViT, ViTConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
_INT_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")


# ------------------------------------------------------------------------------------------------- the name
@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed ``timm:NAME[.tag][,key=value...]``."""

    name: str
    tag: str | None
    overrides: dict[str, Any]

    @property
    def hub_id(self) -> str:
        return f"timm/{self.name}" + (f".{self.tag}" if self.tag else "")


def is_timm(arch: str | None) -> bool:
    return bool(arch) and str(arch).startswith("timm:")


def parse_spec(arch: str) -> Spec:
    """``timm:vit_base_patch16_224.augreg_in21k,img_size=32`` -> Spec (a ConfigError names a malformed part)."""
    body = arch[len("timm:"):]
    head, *rest = [p.strip() for p in body.split(",")]
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", head):
        raise ConfigError(f"--model {arch}: expected timm:NAME[.tag][,key=value...], e.g. "
                          "timm:vit_base_patch16_224.augreg_in21k")
    name, _, tag = head.partition(".")
    overrides: dict[str, Any] = {}
    for part in rest:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ConfigError(f"--model {arch}: {part!r} is not key=value (e.g. img_size=32)")
        try:
            overrides[key] = int(value) if key in _INT_KEYS else float(value)
        except ValueError:
            raise ConfigError(f"--model {arch}: {key} must be a number, got {value!r}") from None
    return Spec(name, tag or None, overrides)


def vit_config(spec: Spec) -> ViTConfig | None:
    """retain's ViT for ``spec`` (timm's shape with the overrides), or None when retain does not build NAME."""
    base = TIMM_VITS.get(spec.name)
    if base is None:
        return None
    bad = sorted(set(spec.overrides) - {f.name for f in dataclasses.fields(ViTConfig)})
    if bad:
        names = ", ".join(f.name for f in dataclasses.fields(ViTConfig))
        raise ConfigError(f"timm:{spec.name}: retain's ViT takes {names}; {', '.join(bad)} is not one of them")
    cfg = dataclasses.replace(base, **spec.overrides)
    if cfg.img_size % cfg.patch_size:
        raise ConfigError(f"timm:{spec.name}: img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.embed_dim % cfg.num_heads:
        raise ConfigError(f"timm:{spec.name}: embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
    return cfg


def timm_version() -> str | None:
    try:
        import timm
    except Exception:  # timm absent, or present but unable to import (torchvision missing)
        return None
    return str(timm.__version__)


# --------------------------------------------------------------------------------------------- the model
class Encoder(nn.Module):
    """Scenario inputs (pixels in [0, 1]) -> the backbone's inputs (:meth:`prepare`) -> its pooled features
    ``[B, dim]``.

    ``prepare``: a grey image repeated over three channels for a three-channel backbone, resized (bilinear) to
    ``img_size``, normalised with the weights' ``mean`` / ``std``. ``tokens(x, **hooks)`` runs a ViT backbone with
    prompts / prefixes (:meth:`retain.vit.ViT.tokens`). In training mode, frozen batch-norm layers stay in
    evaluation mode (their statistics are part of the weights)."""

    def __init__(self, backbone: nn.Module, dim: int, img_size: int | None = None, in_chans: int | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.backbone, self.dim, self.img_size, self.in_chans = backbone, dim, img_size, in_chans
        norm = mean is not None and std is not None
        self.register_buffer("mean", torch.tensor(mean if norm else (0.0,)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std if norm else (1.0,)).view(1, -1, 1, 1), persistent=False)
        self.normalise = norm

    def prepare(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            return x
        if x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.img_size is not None and (x.shape[-2] != self.img_size or x.shape[-1] != self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        if self.normalise:
            x = (x - self.mean[:, :x.shape[1]]) / self.std[:, :x.shape[1]]
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.prepare(x)).flatten(1)

    def tokens(self, x: Tensor, **hooks: Any) -> Tensor:
        if not isinstance(self.backbone, ViT):
            raise ConfigError("this method needs a ViT backbone (--model timm:vit_...), got "
                              f"{type(self.backbone).__name__}")
        return self.backbone.tokens(self.prepare(x), **hooks)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self


class Pretrained(nn.Module):
    """A pre-trained backbone and a linear output layer: ``head(features(x))``, with ``.features`` an
    :class:`Encoder` (``.features.backbone`` the network) and ``.head`` ``nn.Linear(dim, n_outputs)``."""

    def __init__(self, backbone: nn.Module, n_outputs: int, dim: int | None = None, img_size: int | None = None,
                 in_chans: int | None = None, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None):
        super().__init__()
        dim = dim if dim is not None else int(getattr(backbone, "embed_dim", 0) or backbone.num_features)
        self.features = Encoder(backbone, dim, img_size, in_chans, mean, std)
        self.head = nn.Linear(dim, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CachedFeatures(nn.Module):
    """The model a run trains on cached features: ``.features`` an identity, ``.head`` the pre-trained model's."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.features = nn.Identity()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


# -------------------------------------------------------------------------------------------- the weights
def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _cached_file(spec: Spec) -> Path | None:
    """timm's weights for ``spec`` in the local Hugging Face cache, or None."""
    repo = hub_cache() / ("models--" + spec.hub_id.replace("/", "--"))
    for name in ("model.safetensors", "pytorch_model.bin"):
        found = sorted(repo.glob(f"snapshots/*/{name}"))
        if found:
            return found[-1]
    return None


def locate_weights(arch: str, weights: str | None, download: bool, fetch: bool = True) -> tuple[Path | None, str]:
    """The weights file for ``arch`` and where it came from (``file``, ``cache``, ``download``); a ConfigError
    that says what to pass when there is none. ``arch`` is ``timm:NAME`` when ``weights`` is None. ``fetch`` False
    (the check when a run is resolved): a download that ``--download`` allows is not made yet, and the path is None;
    the run makes it when it builds the model, so the record says ``download``."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"--weights {weights}: no such file; pass the path of a "
                              f"{', '.join(WEIGHT_SUFFIXES)} file")
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise ConfigError(f"--weights {weights}: unknown format; retain reads {', '.join(WEIGHT_SUFFIXES)}")
        return path, "file"
    spec = parse_spec(arch)
    found = _cached_file(spec)
    if found is not None:
        return found, "cache"
    if not download:
        raise ConfigError(f"--model {arch} needs its pre-trained weights: pass --weights PATH (a .safetensors, .pth "
                          f"or .npz file), or --download to fetch {spec.hub_id} into {hub_cache()} (none there now)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ConfigError("--download of timm weights needs huggingface_hub: pip install 'retain[timm]'") from None
    if not fetch:
        return None, "download"
    try:
        return Path(hf_hub_download(spec.hub_id, "model.safetensors", cache_dir=str(hub_cache()))), "download"
    except Exception as e:  # no network, no such repository
        raise ConfigError(f"could not download {spec.hub_id}: {type(e).__name__}: {str(e).splitlines()[0][:200]}; "
                          "pass --weights PATH instead") from None


def read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a weights file and its metadata (safetensors' header metadata; {} otherwise)."""
    name = path.name
    try:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        if name.endswith(".npz"):
            import numpy as np

            with np.load(path) as z:
                return npz_to_timm({k: torch.from_numpy(z[k]) for k in z.files}), {}
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--weights {path}: cannot read it as {path.suffix}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    for key in ("state_dict", "model", "module", "model_state"):  # the usual training-script wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ConfigError(f"--weights {path}: not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}, {}


def npz_to_timm(z: dict[str, Tensor]) -> dict[str, Tensor]:
    """Google's ViT checkpoint layout (``Transformer/encoderblock_i/...``, the ``.npz`` files of the ViT and
    AugReg papers that timm reads) -> timm's ViT ``state_dict``: convolution and dense kernels transposed to
    PyTorch's layout, the per-head query / key / value kernels fused into ``qkv``."""
    if "embedding/kernel" not in z:
        raise ConfigError("--weights: this .npz is not a Google ViT checkpoint (no embedding/kernel); convert it to "
                          "a state_dict (.pth or .safetensors)")

    def dense(k: str) -> Tensor:
        return z[k].t()

    sd = {"patch_embed.proj.weight": z["embedding/kernel"].permute(3, 2, 0, 1),
          "patch_embed.proj.bias": z["embedding/bias"],
          "cls_token": z["cls"], "pos_embed": z["Transformer/posembed_input/pos_embedding"],
          "norm.weight": z["Transformer/encoder_norm/scale"], "norm.bias": z["Transformer/encoder_norm/bias"]}
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in z:
        p, o = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = p + "MultiHeadDotProductAttention_1/"
        sd[o + "norm1.weight"], sd[o + "norm1.bias"] = z[p + "LayerNorm_0/scale"], z[p + "LayerNorm_0/bias"]
        sd[o + "norm2.weight"], sd[o + "norm2.bias"] = z[p + "LayerNorm_2/scale"], z[p + "LayerNorm_2/bias"]
        qkv = ("query", "key", "value")
        sd[o + "attn.qkv.weight"] = torch.cat([z[att + f"{n}/kernel"].flatten(1).t() for n in qkv])
        sd[o + "attn.qkv.bias"] = torch.cat([z[att + f"{n}/bias"].flatten() for n in qkv])
        sd[o + "attn.proj.weight"] = z[att + "out/kernel"].flatten(0, 1).t()
        sd[o + "attn.proj.bias"] = z[att + "out/bias"]
        mlp = p + "MlpBlock_3/"
        sd[o + "mlp.fc1.weight"], sd[o + "mlp.fc1.bias"] = dense(mlp + "Dense_0/kernel"), z[mlp + "Dense_0/bias"]
        sd[o + "mlp.fc2.weight"], sd[o + "mlp.fc2.bias"] = dense(mlp + "Dense_1/kernel"), z[mlp + "Dense_1/bias"]
        i += 1
    return {k: v.float().contiguous() for k, v in sd.items()}


def _drop_classifier(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "pre_logits."))}


def fit_weights(module: nn.Module, sd: dict[str, Tensor], path: Path, model: str) -> None:
    """Load ``sd`` (its classifier dropped) into ``module`` strictly, or a ConfigError with what differs."""
    sd = _drop_classifier(sd)
    own = _drop_classifier(module.state_dict())
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shapes = [f"{k} {list(sd[k].shape)} in the file, {list(own[k].shape)} in the model"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shapes differ ({'; '.join(shapes[:2])})")
        if missing:
            parts.append(f"{len(missing)} keys missing ({', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} keys unexpected ({', '.join(extra[:3])})")
        raise ConfigError(f"--weights {path} does not fit --model {model}: {', '.join(parts)}; pass the weights of "
                          "this model, or the model (and its key=value overrides) these weights belong to")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)  # all but the head


def save_weights(module: nn.Module, path: str | Path, model: str, mean: tuple[float, ...], std: tuple[float, ...],
                 **info: Any) -> Path:
    """A backbone's ``state_dict`` as a safetensors file whose metadata names the model and its preprocessing (what
    :func:`read_weights` gives back): how a backbone pre-trained here is handed on."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}  # (shared: copied)
    meta = {"retain.model": model, "retain.preprocess": json.dumps({"mean": list(mean), "std": list(std)}),
            **{f"retain.{k}": json.dumps(v) for k, v in info.items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def preprocessing(spec: Spec | None, path: Path, meta: dict[str, str]) -> tuple[dict[str, list[float]], str]:
    """The weights' normalisation (``mean``, ``std``) and where it was read."""
    if "retain.preprocess" in meta:
        p = json.loads(meta["retain.preprocess"])
        return {"mean": list(p["mean"]), "std": list(p["std"])}, "metadata"
    beside = path.parent / "config.json"
    if beside.is_file():
        try:
            cfg = json.loads(beside.read_text())
            cfg = cfg.get("pretrained_cfg", cfg)
            return {"mean": list(cfg["mean"]), "std": list(cfg["std"])}, str(beside)
        except (ValueError, KeyError, TypeError):
            pass
    half = spec is not None and ("augreg" in (spec.tag or "") or "in21k" in spec.name + (spec.tag or ""))
    mean, std = (HALF, HALF) if half else (IMAGENET_MEAN, IMAGENET_STD)
    return {"mean": list(mean), "std": list(std)}, "default"


# ------------------------------------------------------------------------------------------- the build
def build(arch: str, weights: str | None, download: bool, input_shape: tuple[int, ...], n_outputs: int,
          hidden: tuple[int, ...] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The pre-trained model a run asks for and the record's ``weights`` entry."""
    path, source = locate_weights(arch, weights, download)
    assert path is not None  # fetched
    sd, meta = read_weights(path)
    spec = parse_spec(arch) if is_timm(arch) else None
    pre, pre_source = preprocessing(spec, path, meta)
    mean, std = tuple(pre["mean"]), tuple(pre["std"])
    if spec is not None:
        cfg = vit_config(spec)
        if cfg is not None:
            backbone: nn.Module = ViT(cfg)
            img, chans = cfg.img_size, cfg.in_chans
        else:
            backbone, img, chans = _timm_model(spec)
        if len(input_shape) == 3 and input_shape[0] not in (1, chans):
            raise ConfigError(f"--model {arch} takes {chans}-channel images, the data have {input_shape[0]}")
        fit_weights(backbone, sd, path, arch)
        model: nn.Module = Pretrained(backbone, n_outputs, img_size=img, in_chans=chans, mean=mean, std=std)
    else:
        from retain.models import build_model

        own = build_model(arch, input_shape, n_outputs, hidden or (400, 400))
        body = set(_drop_classifier(own.features.state_dict()))
        if set(_drop_classifier(sd)) <= body and not set(_drop_classifier(sd)) & (set(own.state_dict()) - body):
            fit_weights(own.features, sd, path, arch)  # the state_dict of its .features (a backbone saved alone)
        else:
            fit_weights(own, sd, path, arch)
        model = Pretrained(own.features, n_outputs, dim=own.head.in_features, in_chans=input_shape[0] if
                           len(input_shape) == 3 else None, mean=mean, std=std)
    info = {"path": str(path), "sha256": file_digest(path, "sha256"), "source": source, "timm": timm_version(),
            "preprocess": pre, "preprocess_source": pre_source}
    if "retain.model" in meta:
        info["trained_as"] = meta["retain.model"]
    return model, info


def _timm_model(spec: Spec) -> tuple[nn.Module, int, int]:
    try:
        import timm
    except Exception as e:
        raise ConfigError(f"--model timm:{spec.name} needs timm (retain builds only {', '.join(TIMM_VITS)} "
                          f"itself): pip install 'retain[timm]' ({type(e).__name__}: {e})") from None
    try:
        m = timm.create_model(spec.name + (f".{spec.tag}" if spec.tag else ""), pretrained=False, num_classes=0,
                              **spec.overrides)
    except Exception as e:
        raise ConfigError(f"timm cannot build {spec.name}: {e}") from None
    cfg = getattr(m, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return m, int(spec.overrides.get("img_size", size[-1])), int(spec.overrides.get("in_chans", size[0]))


# --------------------------------------------------------------------------------------------- freezing
def freeze(model: nn.Module, how: str) -> int:
    """Freeze ``model.features`` as ``how`` says (``all``, ``none``, ``N`` leading blocks, or name prefixes);
    the number of frozen parameters (elements)."""
    body = getattr(model, "features", None)
    if body is None:
        raise ConfigError("--freeze needs a model with .features (a pre-trained backbone, or retain's own models)")
    backbone = getattr(body, "backbone", body)
    named = list(backbone.named_parameters())
    if how == "none":
        chosen: list[nn.Parameter] = []
    elif how == "all":
        chosen = [p for _, p in named]
    elif how.isdigit():
        n = int(how)
        blocks = getattr(backbone, "blocks", None)
        if blocks is None:
            raise ConfigError(f"--freeze {how}: a number of blocks needs a ViT backbone; use all, none or "
                              "parameter-name prefixes for this model")
        if n > len(blocks):
            raise ConfigError(f"--freeze {how}: the backbone has {len(blocks)} blocks")
        keep = ("patch_embed.", "cls_token", "pos_embed") + tuple(f"blocks.{i}." for i in range(n))
        chosen = [p for k, p in named if k.startswith(keep)]
    else:
        prefixes = tuple(p.strip() for p in how.split(",") if p.strip())
        chosen = [p for k, p in named if k.startswith(prefixes)]
        unused = [pre for pre in prefixes if not any(k.startswith(pre) for k, _ in named)]
        if unused:
            raise ConfigError(f"--freeze: no parameter of the backbone starts with {unused[0]!r} (names look like "
                              f"{named[0][0]}, {named[-1][0]})")
    for p in chosen:
        p.requires_grad_(False)
    return sum(p.numel() for p in chosen)


# ------------------------------------------------------------------------------------------ feature cache
def _data_hash(*tensors: Any) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, Tensor):
            a = t.detach().cpu().contiguous()
            h.update(str((a.dtype, tuple(a.shape))).encode())
            h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
        else:  # a DiskArray: its file's own checksum
            h.update(str(getattr(t, "key", getattr(t, "path", t))).encode())
    return h.hexdigest()


@torch.no_grad()
def _features(encoder: nn.Module, scenario: Any, xs: Any, rows: Tensor, device: torch.device, chunk: int) -> Tensor:
    """The encoder's features of ``xs[rows]``, a chunk at a time."""
    from retain.images import DiskArray

    out = []
    for i in range(0, len(rows), chunk):
        idx = rows[i:i + chunk]
        x = xs.gather(idx, device) if isinstance(xs, DiskArray) else xs[idx.to(xs.device)].to(device)
        out.append(encoder(scenario.prepare(x, 0)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, encoder.dim)


def _rows(scenario: Any, split: str) -> Tensor:
    """The rows of ``split`` that some task uses (a reduced scenario reads few of the stored ones)."""
    parts = ([t.train_idx for t in scenario.tasks] + [t.val_idx for t in scenario.tasks] if split == "train"
             else [t.test_idx for t in scenario.tasks])
    parts = [p.reshape(-1).cpu().long() for p in parts if p is not None and p.numel()]
    return torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)


def feature_cache_path(scenario: Any, model: Pretrained, weights_sha: str, model_name: str
                       ) -> tuple[Path, dict[str, Tensor]]:
    """Where :func:`cache_features` keeps the features of ``scenario`` through ``model``'s frozen backbone, and
    the rows of each split that the tasks use. The key: the weights' hash, the model, its preprocessing, and the
    data's own hash with those rows."""
    enc = model.features
    rows = {"train": _rows(scenario, "train"), "test": _rows(scenario, "test") if scenario.x_test is not None
            else torch.zeros(0, dtype=torch.long)}
    key = hashlib.sha256(json.dumps({
        "weights": weights_sha, "model": model_name, "img_size": enc.img_size, "in_chans": enc.in_chans,
        "mean": enc.mean.flatten().tolist() if enc.normalise else None,
        "std": enc.std.flatten().tolist() if enc.normalise else None,
        "data": _data_hash(scenario.x_train, scenario.x_test, rows["train"], rows["test"])},
        sort_keys=True).encode()).hexdigest()
    return cache_dir() / "features" / f"{key[:32]}.pt", rows


def cache_features(scenario: Any, model: Pretrained, weights_sha: str, model_name: str, device: torch.device,
                   chunk: int = 500) -> tuple[Any, CachedFeatures, dict[str, Any]]:
    """The scenario with its inputs replaced by the frozen backbone's features (computed once for the rows the
    tasks use, then read from the cache; other rows are zeros no task reads), the head-only model, and the
    record's ``feature_cache`` entry."""
    enc = model.features
    start = time.perf_counter()
    path, rows = feature_cache_path(scenario, model, weights_sha, model_name)
    stored = None
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged file is rebuilt
            stored = None
    hit = stored is not None
    if stored is None:
        was = enc.training
        enc.eval().to(device)
        stored = {split: _features(enc, scenario, scenario.x_train if split == "train" else scenario.x_test, idx,
                                   device, chunk) for split, idx in rows.items()}
        enc.train(was)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(stored, tmp)
        os.replace(tmp, path)
    target = scenario.y_train.device

    def full(split: str, n: int) -> Tensor:
        out = torch.zeros(n, enc.dim)
        out[rows[split]] = stored[split]
        return out.to(target)

    cached = dataclasses.replace(
        scenario, x_train=full("train", len(scenario.y_train)),
        x_test=None if scenario.x_test is None else full("test", len(scenario.y_test)),
        info={**scenario.info, "features": model_name})
    entry = {"used": True, "hit": hit, "seconds": time.perf_counter() - start, "path": str(path),
             "dim": int(enc.dim), "rows": int(len(rows["train"]) + len(rows["test"]))}
    return cached, CachedFeatures(model.head), entry


def prepare(run: Any, scenario: Any, model: nn.Module) -> tuple[Any, nn.Module, dict[str, Any] | None]:
    """A run's pre-trained model made ready: the scenario's pixels left in [0, 1] (the weights normalise them),
    the backbone frozen as the method and ``--freeze`` say, and its features cached where that is exact.
    Returns the scenario and model to train and the record's entries (None for a model without weights)."""
    c, method = run.config, run.method
    how = method.freeze or (c.freeze if c.freeze != "auto" else "none")
    info = getattr(model, "pretrained", None)
    if info is None:  # the user's own model (the API): frozen as the method requires, nothing cached
        if how != "none":
            freeze(model, how)
        return scenario, model, None
    scenario = dataclasses.replace(scenario, mean=(0.0,), std=(1.0,))
    frozen = freeze(model, how)
    total = sum(p.numel() for p in model.features.parameters())
    entry: dict[str, Any] = {"weights": info, "freeze": how, "backbone_parameters": total,
                             "frozen_parameters": frozen}
    why = []
    if c.feature_cache == "off":
        why.append("--feature-cache off")
    if frozen < total or total == 0:
        why.append(f"the backbone is not wholly frozen (--freeze {how})")
    if method.reads_backbone:
        why.append(f"{method.name} runs the backbone itself")
    if (c.augment or "none") != "none":
        why.append(f"--augment {c.augment} changes the inputs at every step")
    if scenario.transform:
        why.append(f"the tasks' {scenario.transform} transform changes the inputs per task")
    if c.devices > 1 or os.environ.get("WORLD_SIZE"):
        why.append("data-parallel runs compute features in each process")
    if why:
        entry["feature_cache"] = {"used": False, "why": "; ".join(why)}
        return scenario, model, entry
    from retain.trainer import resolve_device

    scenario, model, entry["feature_cache"] = cache_features(scenario, model, info["sha256"], c.arch,
                                                             resolve_device(c.device))
    return scenario, model, entry
