"""Training augmentation on the device: batched random crop, flip, resized crop and colour jitter of image batches.

A pipeline works on a whole batch of normalised float images ``[B, C, H, W]`` at once (a row and a column gather
or one ``grid_sample`` for the geometry, a few elementwise ops for the colour), on whatever device the batch is on;
there is no per-sample Python. Evaluation is never augmented (the trainer applies a pipeline to training steps
only), and replay buffers store un-augmented rows that are augmented again each time they are replayed (Mammoth's
convention).

Pipelines (``--augment``):

==================  ==========================================================================================
``none``            nothing (:func:`build` returns None); the MNIST family's protocols
``crop-flip``       random crop with zero padding, then a horizontal flip with p = 0.5: the CIFAR-10/100 and
                    Tiny-ImageNet protocols of DER (Buzzega et al., NeurIPS 2020; P5, Mammoth's ``seq-cifar10``,
                    ``seq-tinyimg``) and of iCaRL / PODNet / PyCIL (``RandomCrop(32, padding=4)`` + flip)
``crop-flip-jitter`` ``crop-flip`` then the colour recipe below
``rrc-flip``        random resized crop (scale (0.08, 1), ratio (3/4, 4/3), output = input size) then a flip with
                    p = 0.5: the ImageNet-style training transform, for larger images (ImageNet-R, CUB)
``rrc-flip-jitter`` ``rrc-flip`` then the colour recipe below
==================  ==========================================================================================

Padding: p = min(4, min(H, W) // 8) pixels on each side, i.e. 4 for 32- and 64-pixel images as CIFAR's and Mammoth's
Tiny-ImageNet protocol pad (``RandomCrop(64, padding=4)``), one eighth of the side for smaller ones (1 for 8x8);
``build(..., pad=N)`` overrides it. The pad is black: torchvision pads the [0, 1] image with 0 before normalising,
so here the fill is (0 - mean) / std per channel. The crop's offset is uniform in 0..2p on each axis, per row.

Colour recipe (the ``-jitter`` pipelines): SimCLR's colour distortion (Chen et al., ICML 2020) at strength s = 0.5,
as the supervised-contrastive CIFAR recipe uses it (Khosla et al., NeurIPS 2020; also Co2L, Cha et al., ICCV 2021):
with p = 0.8 per row a colour jitter of brightness 0.4, contrast 0.4, saturation 0.4 and hue 0.1, then with p = 0.2
per row greyscale. Each jitter factor is uniform in [max(0, 1 - s), 1 + s] (hue: a shift uniform in [-0.1, 0.1] of a
turn), applied on the de-normalised [0, 1] image in the fixed order brightness, contrast, saturation, hue (torchvision
draws a random order per image; a fixed order costs four ops instead of sixteen masked ones), clamped to [0, 1]
after each, and normalised again. Brightness scales the image; contrast blends it with its mean grey level;
saturation blends it with its grey image (luma 0.299 R + 0.587 G + 0.114 B, ITU-R 601); hue rotates H in HSV. Rows
that draw neither jitter nor greyscale come back bit for bit.

Resized crop: torchvision's sampling, vectorised. Each row draws 10 candidate (area fraction, log aspect ratio)
pairs at once and takes the first whose rounded width and height fit in the image; a row where none fits falls
back to the centre crop of the largest box with the ratio clamped into (3/4, 4/3) (the whole image when it is
square). The crop is resampled to the input size by one ``affine_grid`` + ``grid_sample`` (bilinear, border
padding; the crop is never larger than the output, so no anti-aliasing is needed); the flip is folded into the same
affine map (and into the crop's gather), so a geometry plus its flip is one resampling.

Random draws: :meth:`Augment.draw` takes every random number of a batch from the given CPU ``torch.Generator``, a
fixed count per row and pipeline, independent of the images, their dtype and their device; the draws then travel to
the batch's device in one copy. CPU and GPU runs therefore draw the same, and a generator seeded from the run's
(seed, step, call) (:meth:`retain.context.Context.augmented`) makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from retain.errors import ConfigError

PIPELINES = ("none", "crop-flip", "crop-flip-jitter", "rrc-flip", "rrc-flip-jitter")

F32 = torch.float32  # draws are float32 whatever torch's default dtype, so the stream never changes
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma weights (PIL's "L" conversion, torchvision's rgb_to_grayscale)


# ------------------------------------------------------------------------------------------------------ geometry

@dataclass(frozen=True)
class Crop:
    """Random crop of the image padded by ``pad`` pixels with ``fill``, and a horizontal flip with ``flip``."""

    pad: int
    flip: float = 0.5
    width = 3  # columns of draws per row: offset y, offset x, flipped

    def draw(self, n: int, size: tuple[int, int], g: torch.Generator) -> Tensor:
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flipped = torch.rand(n, generator=g, dtype=F32) < self.flip
        return torch.cat([offsets.float(), flipped.float()[:, None]], 1)

    def apply(self, x: Tensor, p: Tensor, fill: Tensor) -> Tensor:
        b, c, h, w = x.shape
        pad = self.pad
        padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad:pad + h, pad:pad + w] = x
        dy, dx, flipped = p[:, 0].long(), p[:, 1].long(), p[:, 2] > 0.5
        # Two batched gathers, rows then columns: selecting whole rows (index_select) and then columns within them
        # is ~4x faster on the CPU than one advanced index over all four dimensions, and as fast on a GPU.
        dev = x.device
        plane = torch.arange(b, device=dev).view(b, 1, 1) * c + torch.arange(c, device=dev).view(1, c, 1)
        rows = plane * (h + 2 * pad) + dy.view(b, 1, 1) + torch.arange(h, device=dev).view(1, 1, h)
        picked = padded.view(-1, w + 2 * pad).index_select(0, rows.view(-1)).view(b, c, h, w + 2 * pad)
        cols = torch.arange(w, device=dev).expand(b, w)
        cols = torch.where(flipped[:, None], w - 1 - cols, cols) + dx[:, None]  # the flip folded into the gather
        return picked.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


@dataclass(frozen=True)
class ResizedCrop:
    """Random resized crop (torchvision's sampling, 10 tries, centre-crop fallback) and a horizontal flip."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    tries: int = 10
    width = 5  # top, left, height, width (pixels), flipped

    def draw(self, n: int, size: tuple[int, int], g: torch.Generator) -> Tensor:
        h, w = size
        area = torch.empty(n, self.tries, dtype=F32).uniform_(*self.scale, generator=g) * (h * w)
        log_ratio = torch.empty(n, self.tries, dtype=F32).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                                        generator=g)
        pos = torch.rand(n, 2, generator=g, dtype=F32)  # the chosen box's position, a fraction of its free range
        flipped = torch.rand(n, generator=g, dtype=F32) < self.flip
        aspect = torch.exp(log_ratio)
        cw = torch.round(torch.sqrt(area * aspect))
        ch = torch.round(torch.sqrt(area / aspect))
        fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = fits.int().argmax(1, keepdim=True)  # the first fitting try (argmax returns the first maximum)
        bw, bh = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
        top = torch.minimum(torch.floor(pos[:, 0] * (h - bh + 1)), h - bh)
        left = torch.minimum(torch.floor(pos[:, 1] * (w - bw + 1)), w - bw)
        # no try fits: the centre crop of the largest box whose ratio is within the bounds
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(h * self.ratio[1]), h
        else:
            fw, fh = w, h
        none = ~fits.any(1)
        bw, bh = torch.where(none, float(fw), bw), torch.where(none, float(fh), bh)
        top = torch.where(none, float((h - fh) // 2), top)
        left = torch.where(none, float((w - fw) // 2), left)
        return torch.stack([top, left, bh, bw, flipped.float()], 1)

    def apply(self, x: Tensor, p: Tensor, fill: Tensor) -> Tensor:
        b, c, h, w = x.shape
        top, left, bh, bw, flipped = p.unbind(1)
        # The affine map sends the output's [-1, 1] (pixel edges, align_corners=False) to the box's edges.
        sx, sy = bw / w, bh / h
        cx, cy = (2 * left + bw) / w - 1, (2 * top + bh) / h - 1
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([torch.where(flipped > 0.5, -sx, sx), zero, cx], 1),
                             torch.stack([zero, sy, cy], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), [b, c, h, w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -------------------------------------------------------------------------------------------------------- colour

def grey(img: Tensor) -> Tensor:
    """Luma of RGB images in [0, 1]: ``[B, 3, H, W] -> [B, 1, H, W]``."""
    r, g, b = img.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def hue_shift(img: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` turns per row (``[B]``), through HSV."""
    r, g, b = img.unbind(1)
    v = img.amax(1)
    delta = v - img.amin(1)
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (v - r) / safe, (v - g) / safe, (v - b) / safe
    h6 = torch.where(v == r, bc - gc, torch.where(v == g, 2 + rc - bc, 4 + gc - rc))  # hue in sixths of a turn
    h6 = torch.remainder(h6 + 6 * shift.view(-1, 1, 1), 6.0)  # grey pixels (s = 0) ignore it
    # HSV -> RGB: channel n in (R, G, B) = (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h6, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, 1)


@dataclass(frozen=True)
class Jitter:
    """Colour jitter with probability ``p`` per row: brightness, contrast, saturation, hue, in that order."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8
    width = 5  # applied, brightness, contrast, saturation factors, hue shift

    def draw(self, n: int, size: tuple[int, int], g: torch.Generator) -> Tensor:
        u = torch.rand(n, 5, generator=g, dtype=F32)
        cols = [(u[:, 0] < self.p).float()]
        for k, s in enumerate((self.brightness, self.contrast, self.saturation), 1):
            lo, hi = max(0.0, 1 - s), 1 + s
            cols.append(lo + (hi - lo) * u[:, k])
        cols.append(self.hue * (2 * u[:, 4] - 1))
        return torch.stack(cols, 1)

    def apply(self, img: Tensor, p: Tensor) -> Tensor:
        bri, con, sat = (p[:, k].view(-1, 1, 1, 1) for k in (1, 2, 3))
        out = (img * bri).clamp(0, 1)
        out = (con * out + (1 - con) * grey(out).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
        out = (sat * out + (1 - sat) * grey(out)).clamp(0, 1)
        if self.hue > 0:
            out = hue_shift(out, p[:, 4]).clamp(0, 1)
        return torch.where(p[:, 0].view(-1, 1, 1, 1) > 0.5, out, img)


@dataclass(frozen=True)
class Greyscale:
    """The image's luma in all three channels, with probability ``p`` per row."""

    p: float = 0.2
    width = 1  # applied

    def draw(self, n: int, size: tuple[int, int], g: torch.Generator) -> Tensor:
        return (torch.rand(n, 1, generator=g, dtype=F32) < self.p).float()

    def apply(self, img: Tensor, p: Tensor) -> Tensor:
        return torch.where(p[:, 0].view(-1, 1, 1, 1) > 0.5, grey(img).expand_as(img), img)


# ------------------------------------------------------------------------------------------------------ pipeline

class Augment:
    """A named pipeline: one geometric op (with its flip) and optional colour ops, for ``[B, C, H, W]`` batches.

    ``aug(x, generator)`` draws the batch's parameters (:meth:`draw`) and applies them (:meth:`apply`); the two
    halves are public so that a test (or a method) can see exactly what was drawn.
    """

    def __init__(self, name: str, geometry: Crop | ResizedCrop, colour: Sequence[Jitter | Greyscale],
                 mean: Sequence[float], std: Sequence[float], input_shape: tuple[int, int, int]) -> None:
        self.name = name
        self.geometry = geometry
        self.colour = tuple(colour)
        self.input_shape = tuple(input_shape)
        c = self.input_shape[0]
        self.mean = torch.tensor([float(m) for m in mean]).expand(c).clone()
        self.std = torch.tensor([float(s) for s in std]).expand(c).clone()
        self.width = geometry.width + sum(op.width for op in self.colour)
        self._on: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"Augment({self.name!r}, {self.geometry}, colour={list(self.colour)})"

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """Every random parameter for ``n`` rows, ``[n, width]`` float32 on the CPU, from ``generator`` only."""
        size = self.input_shape[1:]
        parts = [self.geometry.draw(n, size, generator)] + [op.draw(n, size, generator) for op in self.colour]
        return torch.cat(parts, 1)

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        """``x`` (normalised images) augmented with the drawn ``params``; same shape, dtype and device."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"augment {self.name}: expected images [B, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(x.shape)}")
        # one host-to-device copy per batch; non_blocking: a pageable source is staged at once, no device sync
        params = params.to(x.device, non_blocking=True)
        mean, std, fill = self._constants(x.device, x.dtype)
        k = self.geometry.width
        out = self.geometry.apply(x, params[:, :k], fill)
        if not self.colour:
            return out
        img = (out * std + mean).clamp(0, 1)
        touched = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for op in self.colour:
            p = params[:, k:k + op.width].to(x.dtype)  # keeps bf16 / fp16 batches in their dtype
            img = op.apply(img, p)
            touched |= p[:, 0] > 0.5
            k += op.width
        return torch.where(touched.view(-1, 1, 1, 1), (img - mean) / std, out)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, self.draw(len(x), generator))

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._on:  # moved once per device and dtype, not every step
            mean = self.mean.to(device, dtype).view(1, -1, 1, 1)
            std = self.std.to(device, dtype).view(1, -1, 1, 1)
            self._on[key] = (mean, std, (-mean / std).view(-1))  # black (0 before normalising), normalised
        return self._on[key]


def default_pad(height: int, width: int) -> int:
    """Crop padding: 4 pixels (CIFAR's, Mammoth's Tiny-ImageNet's), an eighth of the side below 32 pixels."""
    return min(4, min(height, width) // 8)


def build(name: str, mean: Sequence[float], std: Sequence[float], input_shape: Sequence[int],
          pad: int | None = None) -> Augment | None:
    """The pipeline ``name`` for images of ``input_shape`` [C, H, W] normalised by ``mean`` / ``std`` (one value
    or one per channel); None for ``none``. Refuses, in one line, a pipeline the inputs cannot take."""
    if name not in PIPELINES:
        raise ConfigError(f"unknown augmentation {name!r}; choose one of {', '.join(PIPELINES)}")
    if name == "none":
        return None
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ConfigError(f"--augment {name} needs image inputs [C, H, W]; this scenario's inputs are "
                          f"{list(shape)}; use --augment none")
    c, h, w = shape
    if name.endswith("-jitter") and c != 3:
        raise ConfigError(f"--augment {name} needs RGB images (3 channels) for its colour jitter; this scenario's "
                          f"inputs are {list(shape)}; use --augment {name.removesuffix('-jitter')}")
    for what, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, c):
            raise ConfigError(f"--augment {name}: the normalisation {what} has {len(values)} values for {c} "
                              f"channels; give one value or one per channel")
    if any(float(s) == 0 for s in std):
        raise ConfigError(f"--augment {name}: the normalisation std has a zero; give positive values")
    if pad is not None and pad < 0:
        raise ConfigError(f"augment {name}: pad must be >= 0 pixels, got {pad}")
    geometry = (Crop(default_pad(h, w) if pad is None else pad) if name.startswith("crop") else ResizedCrop())
    colour = (Jitter(), Greyscale()) if name.endswith("-jitter") else ()
    return Augment(name, geometry, colour, mean, std, (c, h, w))
