"""Progressive neural networks: a new column per task, lateral adapters from every earlier column, old ones frozen."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.models import init_agem_

_LINEAR_NEEDS_MLP = "pnn: lateral=linear is defined for MLP columns only; use column=mlp or lateral=adapter"


class _Adapter(nn.Module):
    """Rusu et al.'s non-linear lateral connection into layer i: U σ(V (α · [h_{i-1}^{(1)} .. h_{i-1}^{(k-1)}])).

    α is a learned scalar (initialised to a small random value), V projects the concatenated activations of the
    earlier columns down to the width of one column's layer (a 1x1 convolution for feature maps), U maps into the
    layer's output like the column's own weight W does (same kernel and stride for convolutions).
    """

    def __init__(self, kind: str, n_in: int, width: int, n_out: int, stride: int = 1):
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(()) * 0.1)
        if kind == "conv":
            self.V = nn.Conv2d(n_in, width, 1)
            self.U = nn.Conv2d(width, n_out, 3, stride, 1)
        else:
            self.V = nn.Linear(n_in, width)
            self.U = nn.Linear(width, n_out)

    def forward(self, below: list[Tensor]) -> Tensor:
        return self.U(F.relu(self.V(self.alpha * torch.cat(below, 1))))


class _Linear(nn.Module):
    """The A-GEM authors' lateral into layer i: Σ_j (U_j h_{i-1}^{(j)} + b_j) over the earlier columns j, linear,
    one weight and one bias per earlier column (their ``extensible_fc_column_progNN``)."""

    def __init__(self, n_in: int, n_out: int, n_columns: int, from_input: bool):
        super().__init__()
        self.U = nn.Linear(n_columns * n_in, n_out, bias=False)  # [U_1 .. U_k] applied to the concatenation
        self.bias = nn.Parameter(torch.zeros(n_columns, n_out))  # b_j: each trained, so the sum moves k times
        self.from_input = from_input
        self._summed: tuple[tuple[int, int], Tensor] | None = None  # Σ_j U_j of a frozen column, by weight version

    def forward(self, below: list[Tensor]) -> Tensor:
        if self.from_input:  # every column's h_0 is the same x: Σ_j U_j x = (Σ_j U_j) x, k times cheaper
            return F.linear(below[0], self._input_weight(len(below))) + self.bias.sum(0)
        return self.U(torch.cat(below, 1)) + self.bias.sum(0)

    def _input_weight(self, k: int) -> Tensor:
        w = self.U.weight
        if w.requires_grad:  # the column being trained: summed afresh so that every U_j gets its gradient
            return w.view(w.shape[0], k, -1).sum(1)
        key = (w._version, w.data_ptr())  # a frozen column's sum is kept until its weight is written (a load)
        if self._summed is None or self._summed[0] != key:
            self._summed = (key, w.detach().view(w.shape[0], k, -1).sum(1))
        return self._summed[1]

    def __getstate__(self) -> dict[str, Any]:  # the cached sum is derived: not written into checkpoints
        return {**self.__dict__, "_summed": None}


class _Column(nn.Module):
    """One task's network: ``layers[i]`` maps h_i to h_{i+1} (h_0 = x). With ``lateral="adapter"`` (Rusu et al.)
    ``laterals[i-1]`` feeds layer i (i >= 1) from the earlier columns' h_i, the output of the layer *below*, the
    same input W_i sees in this column; with ``lateral="linear"`` ``laterals[i]`` feeds every layer i >= 0, the
    first one from each earlier column's copy of the input (h_0 = x)."""

    def __init__(self, kind: str, in_shape: tuple[int, ...], widths: tuple[int, ...], n_out: int, index: int,
                 lateral: str = "adapter"):
        super().__init__()
        self.kind = kind
        self.first = 0 if lateral == "linear" else 1  # the first layer fed by a lateral
        layers, laterals = [], []
        if kind == "conv":
            chans = [in_shape[0], *widths]
            for i, (a, b) in enumerate(zip(chans, chans[1:])):
                layers.append(nn.Conv2d(a, b, 3, 2, 1))
                if i > 0 and index > 0:
                    laterals.append(_Adapter("conv", index * a, a, b, 2))
            layers.append(nn.Linear(chans[-1], n_out))
            if index > 0:
                laterals.append(_Adapter("fc", index * chans[-1], chans[-1], n_out))
        else:
            sizes = [math.prod(in_shape), *widths, n_out]
            for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
                layers.append(nn.Linear(a, b))
                if index > 0 and lateral == "linear":
                    laterals.append(_Linear(a, b, index, i == 0))
                elif i > 0 and index > 0:
                    laterals.append(_Adapter("fc", index * a, a, b))
        self.layers = nn.ModuleList(layers)
        self.laterals = nn.ModuleList(laterals)

    def forward(self, x: Tensor, earlier: list[list[Tensor]]) -> list[Tensor]:
        """Activations [h_1, ..., h_L, logits] of this column given every earlier column's activations."""
        h = x if self.kind == "conv" else x.reshape(len(x), -1)
        x0 = h
        acts = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if self.kind == "conv" and i == last:
                h = h.mean((2, 3))  # global average pooling before the output layer
            z = layer(h)
            if i >= self.first and earlier:
                below = [x0] * len(earlier) if i == 0 else [col[i - 1] for col in earlier]
                if self.kind == "conv" and i == last:
                    below = [b.mean((2, 3)) for b in below]
                z = z + self.laterals[i - self.first](below)
            h = z if i == last else F.relu(z)
            acts.append(h)
        return acts


@register("pnn")
@dataclass
class PNN(Method):
    """Progressive neural networks: one column per task, laterally connected to all earlier (frozen) columns.

    Rusu, Rabinowitz, Desjardins, Soyer, Kirkpatrick, Kavukcuoglu, Pascanu & Hadsell, "Progressive neural
    networks", arXiv 1606.04671 (2016). Layer i of column k computes

        h_i^(k) = ReLU( W_i^(k) h_{i-1}^(k) + U_i^(k) ReLU( V_i^(k) α_i^(k) [h_{i-1}^(1), ..., h_{i-1}^(k-1)] ) )

    (linear at the output layer), so the laterals come from the layer below in the earlier columns. Columns are MLPs
    (``hidden`` sizes, default the run model's) or, for image inputs with 3 channels or ``column=conv``, stacks of
    stride-2 3x3 convolutions (``channels``) with global average pooling, whose adapters use 1x1 convolutions for V.
    Column k's output layer has exactly task k's outputs; they are scattered into the scenario's output space.

    Hooks: ``begin_task`` (freeze every column, add one), ``forward`` (route each row through the column of its task;
    rows of a batch may belong to different tasks), ``parameters`` (the optimizer trains the new column and its
    adapters only). The method owns its columns; the run's model is not used. ``param_counts[k]`` is the total
    number of parameters after task k's column was added (printed by the reproduction script).

    ``lateral=linear`` with ``init=agem`` is the PNN of the A-GEM authors' code (Chaudhry et al. 2019, whose
    permuted-MNIST PNN number P2 quotes): linear laterals U_j h_{i-1}^{(j)} + b_j from every earlier column j into
    every layer, the first layer included (from each column's copy of the input), and their TensorFlow
    initialisation (:func:`retain.models.init_agem_`). MLP columns only.

    Deviations: a task whose column does not exist yet (evaluation before it is trained) gets all-zero scores (the
    first of its outputs is predicted), since the paper defines no output for it; conv columns carry no batch
    normalisation, because running statistics updated while a frozen column feeds a new one would change old
    tasks' outputs; α is initialised uniformly in [0, 0.1) ("a random small value").
    """

    hidden: str = param("", "column hidden sizes, comma-separated (empty = the run model's, else 400,400)")
    column: str = param("auto", "column type: auto (conv for 3-channel images), mlp or conv",
                        choices=("auto", "mlp", "conv"))
    channels: str = param("20,40,80", "conv column channels per layer, comma-separated")
    lateral: str = param("adapter", "lateral connections: adapter (Rusu et al.'s non-linear adapters from the layer "
                         "below) or linear (the A-GEM authors' code: one linear map per earlier column into every "
                         "layer, the input included; MLP columns only)", choices=("adapter", "linear"))
    init: str = param("torch", "column initialisation: torch (PyTorch's default) or agem (the A-GEM authors': "
                      "truncated normal std 0.1, biases 0.1)", choices=("torch", "agem"))

    modes = ("task",)
    needs_boundaries = True

    def __post_init__(self) -> None:
        self._hidden = _sizes("hidden", self.hidden) if self.hidden else None
        self._channels = _sizes("channels", self.channels)
        if self.column not in ("auto", "mlp", "conv"):
            raise ConfigError(f"pnn: column must be auto, mlp or conv, got {self.column!r}")
        if self.lateral not in ("adapter", "linear"):
            raise ConfigError(f"pnn: lateral must be adapter or linear, got {self.lateral!r}")
        if self.init not in ("torch", "agem"):
            raise ConfigError(f"pnn: init must be torch or agem, got {self.init!r}")
        if self.lateral == "linear" and self.column == "conv":
            raise ConfigError(_LINEAR_NEEDS_MLP)
        self.columns = nn.ModuleList()
        self.outputs: list[Tensor] = []  # per column: indices of its task's outputs
        self.param_counts: list[int] = []

    def begin_task(self, ctx: Any) -> None:
        while len(self.columns) <= ctx.task:
            self._add_column(ctx)

    def _add_column(self, ctx: Any) -> None:
        for p in self.columns.parameters():
            p.requires_grad_(False)
        shape = ctx.scenario.input_shape
        kind = self.column
        if kind == "auto":
            kind = "conv" if len(shape) == 3 and shape[0] == 3 else "mlp"
        if kind == "conv" and len(shape) != 3:
            raise ConfigError(f"pnn: conv columns need image inputs [C, H, W], got {list(shape)}")
        if kind == "conv" and self.lateral == "linear":
            raise ConfigError(_LINEAR_NEEDS_MLP)
        widths = self._channels if kind == "conv" else (
            self._hidden or tuple(getattr(ctx.model, "hidden", (400, 400))))
        k = len(self.columns)
        outs = ctx.scenario.task_out[k].nonzero().flatten()
        column = _Column(kind, shape, tuple(widths), len(outs), k, self.lateral)
        if self.init == "agem":
            init_agem_(column)
        self.columns.append(column.to(ctx.device))
        self.outputs.append(outs.to(ctx.device))
        self.param_counts.append(sum(p.numel() for p in self.columns.parameters()))

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in self.columns.parameters() if p.requires_grad]

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        out = torch.zeros(len(x), ctx.scenario.n_outputs, device=x.device, dtype=x.dtype)
        tasks = [int(v) for v in torch.unique(t)]
        for task in tasks:
            if task >= len(self.columns):
                continue
            rows = None if len(tasks) == 1 else (t == task).nonzero().flatten()
            xs = x if rows is None else x[rows]
            acts: list[list[Tensor]] = []
            for col in self.columns[:task + 1]:
                acts.append(col(xs, acts))
            logits = acts[-1][-1]
            if rows is None:
                out[:, self.outputs[task]] = logits
            else:
                out[rows.unsqueeze(1), self.outputs[task].unsqueeze(0)] = logits
        return out


def _sizes(name: str, text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"pnn: {name} must be comma-separated positive integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"pnn: {name} must be comma-separated positive integers, got {text!r}")
    return sizes
