"""Models: an MLP with configurable hidden sizes and a reduced ResNet-18 (Lopez-Paz & Ranzato 2017) for CIFAR.

Multi-head output for task-IL is one output layer whose columns are grouped into per-task heads; the scenario's
mask selects a task's head in the loss and in evaluation, which is exactly equivalent to separate heads (masked
logits get no gradient). Any user ``nn.Module`` mapping ``[B, *input_shape]`` to ``[B, n_outputs]`` works.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from retain.errors import ConfigError


class MLP(nn.Module):
    """Fully connected ReLU network: ``in_features -> hidden... -> n_outputs``; flattens its input."""

    def __init__(self, in_features: int, n_outputs: int, hidden: tuple[int, ...] = (400, 400)):
        super().__init__()
        sizes = [in_features, *hidden]
        self.features = nn.Sequential(
            nn.Flatten(), *(m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU()))
        )
        self.head = nn.Linear(sizes[-1], n_outputs)
        self.hidden = tuple(hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """Reduced ResNet-18: the four stages of two basic blocks with ``nf, 2nf, 4nf, 8nf`` channels (nf = 20 in the
    GEM / A-GEM papers instead of 64), 3x3 stem, global average pooling, one linear output layer."""

    def __init__(self, in_channels: int, n_outputs: int, nf: int = 20):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        stages, cin = [], nf
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = nf * 2**i
            stages += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.features = nn.Sequential(self.conv1, self.bn1, nn.ReLU(), self.stages, nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(cin, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def init_agem_(module: nn.Module) -> nn.Module:
    """The A-GEM authors' TensorFlow initialisation (Chaudhry et al. 2019, ``model/model.py``), in place: every
    weight drawn from a normal with std 0.1 truncated (redrawn) beyond two standard deviations, every bias 0.1.
    Used to check published numbers that depend on it (``reproduce_replay.py --init agem``, PNN ``init=agem``)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.fill_(0.1)
            elif p.dim() > 0:
                nn.init.trunc_normal_(p, std=0.1, a=-0.2, b=0.2)
    return module


def init_xavier_(module: nn.Module) -> nn.Module:
    """Mammoth's initialisation (``backbone.xavier``, the DER paper's MNIST MLP), in place: every weight of a
    ``nn.Linear`` uniform in ±sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio), every bias 0. PyTorch's default draws
    the weights in ±1/sqrt(fan_in) and the biases too. Used by ``reproduce_replay.py``'s P3."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
    return module


def parse_hidden(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"400,400"`` -> ``(400, 400)``; every size a positive integer."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated positive integers like 400,400, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--hidden must be comma-separated positive integers like 400,400, got {text!r}")
    return sizes


def build_model(arch: str, input_shape: tuple[int, ...], n_outputs: int, hidden: tuple[int, ...] = (400, 400)
                ) -> nn.Module:
    """``arch`` = ``mlp`` or ``resnet18``."""
    if arch == "mlp":
        return MLP(math.prod(input_shape), n_outputs, hidden)
    if arch == "resnet18":
        if len(input_shape) != 3:
            raise ConfigError(f"resnet18 needs image inputs [C, H, W], got shape {list(input_shape)}")
        return ResNet18(input_shape[0], n_outputs)
    raise ConfigError(f"unknown model {arch!r}; choose mlp or resnet18")
