"""Models: an MLP with configurable hidden sizes, a four-layer ConvNet (OML's), ResNet-18 (Mammoth's, and the
reduced one of GEM / A-GEM) and the CIFAR ResNet-32; ``build_model`` makes one by name (``--arch`` /
``--model``) for a scenario's input shape.

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

from retain.config import ARCHS
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


class ConvNet(nn.Module):
    """Four 3x3 convolutions of ``channels`` filters, strides 2, 1, 2, 1, each followed by ReLU (no normalisation,
    no padding), flattened, then the linear ``head``: the OML authors' Omniglot representation network (Javed & White
    2019: six such layers of 256 filters, strides 2, 1, 2, 1, 2, 2, for 84 x 84 images) cut to the size of 28 x 28
    digits. 28 x 28 inputs give 64 x 3 x 3 = 576 features. Without batch norm a sample's features do not depend on
    the rest of its batch, which one-sample-at-a-time learners (``oml``) need."""

    def __init__(self, in_channels: int, n_outputs: int, side: int, channels: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for stride in (2, 1, 2, 1):
            layers += [nn.Conv2d(cin, channels, 3, stride), nn.ReLU()]
            cin = channels
            side = (side - 3) // stride + 1
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * side * side, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    """The basic residual block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    Where the shape changes the shortcut is a 1x1 convolution with BN (option B, Mammoth's ResNet-18) or, with
    ``pad_shortcut``, parameter-free (option A, the CIFAR ResNets of He et al. and PyCIL): every second pixel, the
    new channels zero."""

    def __init__(self, cin: int, cout: int, stride: int, pad_shortcut: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = (_PadShortcut(cout - cin, stride) if pad_shortcut else
                             nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and append ``extra`` zero channels (no parameters)."""

    def __init__(self, extra: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))


STEMS = ("cifar", "imagenet")
IMAGENET_STEM_FROM = 128  # pixels (the shorter side) from which build_model gives a ResNet-18 the ImageNet stem


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016): four stages of two basic blocks with ``nf, 2nf, 4nf, 8nf`` channels, global
    average pooling, one linear output layer.

    ``nf = 64`` is Mammoth's ``resnet18``, the backbone of the DER paper's protocol (Buzzega et al. 2020) and of
    Mammoth's seq-tinyimg at 64 x 64; ``nf = 20`` is the reduced ResNet-18 of the GEM / A-GEM papers (Lopez-Paz &
    Ranzato 2017, Chaudhry et al. 2019; Mammoth's ``reduced-resnet18``). ``stem = "cifar"``: one 3x3 convolution
    with stride 1 and no max-pool (their stem, at 32 and 64 px); ``"imagenet"``: a 7x7 convolution with stride 2
    and a 3x3 max-pool with stride 2 (the original ResNet's stem, for images of 128 px and more).
    """

    def __init__(self, in_channels: int, n_outputs: int, nf: int = 64, stem: str = "cifar"):
        super().__init__()
        if stem not in STEMS:
            raise ConfigError(f"ResNet18 stem must be one of {', '.join(STEMS)}, got {stem!r}")
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, nf, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        stages, cin = [], nf
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = nf * 2**i
            stages += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        pool = [nn.MaxPool2d(3, 2, 1)] if stem == "imagenet" else []
        self.features = nn.Sequential(self.conv1, self.bn1, nn.ReLU(), *pool, self.stages, nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(cin, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ResNet32(nn.Module):
    """The CIFAR ResNet-32 of the CIFAR-100 class-incremental papers (iCaRL, LUCIR, PODNet; PyCIL's ``resnet32``):
    a 3x3 stem with 16 channels, three stages of five basic blocks with 16, 32, 64 channels (stride 2 into the
    second and third), parameter-free option-A shortcuts, global average pooling, one linear layer (He et al. 2016,
    section 4.2; 0.46 M parameters). Convolutions start from He et al.'s normal initialisation (fan-out), as in
    that code; the rest from PyTorch's defaults."""

    def __init__(self, in_channels: int, n_outputs: int, blocks: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for i, stride in enumerate((1, 2, 2)):
            cout = 16 * 2**i
            stages += [_Block(cin if b == 0 else cout, cout, stride if b == 0 else 1, pad_shortcut=True)
                       for b in range(blocks)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.features = nn.Sequential(self.conv1, self.bn1, nn.ReLU(), self.stages, nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(cin, n_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

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


def init_pycil_(module: nn.Module) -> nn.Module:
    """PyCIL's output layer (``convs/linears.py``'s ``SimpleLinear``), in place: the ``head``'s weights Kaiming-uniform
    with the linear gain, i.e. uniform in ±sqrt(3 / fan_in) (PyTorch's default: ±1/sqrt(fan_in), a row norm √3
    times smaller), its biases 0; the other layers keep PyTorch's. It matters for WA, whose weight aligning scales
    the new classes' rows by the ratio of the norms (docs/class-incremental.md)."""
    head = getattr(module, "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError("--init pycil re-draws the model's linear output layer (.head), and this model has none")
    with torch.no_grad():
        nn.init.kaiming_uniform_(head.weight, nonlinearity="linear")
        if head.bias is not None:
            head.bias.zero_()
    return module


def initialise(module: nn.Module, init: str) -> nn.Module:
    """``module`` re-initialised in place by ``init`` (``retain.config.INITS``): ``default`` leaves PyTorch's
    initialisation, ``xavier`` is :func:`init_xavier_` (linear layers only; convolutions keep PyTorch's, as in
    Mammoth), ``agem`` is :func:`init_agem_` (every parameter), ``pycil`` is :func:`init_pycil_` (the output layer
    only)."""
    if init == "xavier":
        return init_xavier_(module)
    if init == "agem":
        return init_agem_(module)
    if init == "pycil":
        return init_pycil_(module)
    if init != "default":
        raise ConfigError(f"unknown --init {init!r}; choose default, xavier, agem or pycil")
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
    """retain's model ``arch`` (``retain.config.ARCHS``) for inputs of ``input_shape`` and ``n_outputs`` outputs.

    ``mlp``: :class:`MLP` of ``hidden`` sizes. ``convnet``: :class:`ConvNet`, four plain convolutions (square
    images from 19 px). ``resnet18``: Mammoth's ResNet-18 (64 filters); ``resnet18-reduced``: the GEM / A-GEM one
    (20 filters); both with the CIFAR stem below 128 px (CIFAR's 32, Tiny-ImageNet's 64, as Mammoth) and the
    ImageNet stem from 128 px (ImageNet-R, CUB). ``resnet32``: the CIFAR ResNet-32, for inputs under 128 px.
    """
    if arch == "mlp":
        return MLP(math.prod(input_shape), n_outputs, hidden)
    if arch not in ARCHS:
        raise ConfigError(f"unknown model {arch!r}; choose one of {', '.join(ARCHS)}")
    if len(input_shape) != 3:
        raise ConfigError(f"{arch} needs image inputs [C, H, W], got shape {list(input_shape)}: use --arch mlp")
    side = min(input_shape[1:])
    if arch == "convnet":
        if side < 19 or input_shape[1] != input_shape[2]:
            raise ConfigError(f"convnet needs square images of at least 19 x 19 px, got {input_shape[1]}x"
                              f"{input_shape[2]}: use --arch mlp")
        return ConvNet(input_shape[0], n_outputs, side)
    if arch == "resnet32":
        if side >= IMAGENET_STEM_FROM:
            raise ConfigError(f"resnet32 is the CIFAR ResNet for images under {IMAGENET_STEM_FROM} px, got "
                              f"{input_shape[1]}x{input_shape[2]}: use --arch resnet18")
        return ResNet32(input_shape[0], n_outputs)
    stem = "imagenet" if side >= IMAGENET_STEM_FROM else "cifar"
    return ResNet18(input_shape[0], n_outputs, nf=64 if arch == "resnet18" else 20, stem=stem)
