"""PODNet: pooled outputs distillation (spatial and flat) and the local-similarity classifier (Douillard 2020)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.buffers import Exemplars
from retain.context import masked
from retain.method import Memory, Method, frozen_copy, param, register
from retain.methods.lucir import CosineHead, balanced_finetune, check_common, install_head
from retain.scenarios import Batch, TaskData


def pooled(a: Tensor) -> Tensor:
    """POD-spatial's pooling of one map: squared activations summed over the width and, separately, over the
    height, concatenated per row ([B, C·H + C·W] for a [B, C, H, W] map). A [B, C] "map" (an MLP's hidden layer)
    has neither: its squared activations themselves, which is what the [B, C, 1, 1] map gives, up to the
    normalisation that follows."""
    a = a.pow(2)
    if a.dim() == 2:
        return a
    return torch.cat([a.sum(3).flatten(1), a.sum(2).flatten(1)], dim=1)


def pod_spatial(old: list[Tensor], new: list[Tensor]) -> Tensor:
    """L_POD-spatial (eq. 2-3): per map, the L2 distance between the L2-normalised pooled maps of the old and the
    new model, averaged over the rows; then averaged over the maps (the authors' ``pod``). 0 when old == new."""
    loss = new[0].new_zeros(())
    for a, b in zip(old, new):
        loss = loss + (F.normalize(pooled(a), dim=1) - F.normalize(pooled(b), dim=1)).norm(dim=1).mean()
    return loss / len(new)


def pod_flat(old: Tensor, new: Tensor) -> Tensor:
    """L_POD-flat on the final embedding: 1 − cos(h_old, h_new), averaged over the rows (the authors'
    ``embeddings_similarity``, a cosine embedding loss)."""
    return (1 - F.cosine_similarity(old.flatten(1), new.flatten(1), dim=1)).mean()


def nca(out: Tensor, y: Tensor, margin: float = 0.0, mask: Tensor | None = None) -> Tensor:
    """The LSC's NCA loss as both reference codes compute it (the authors' ``losses.nca``, PyCIL's ``nca``, with
    ``exclude_pos_denominator``): −z_y + log(exp(max_j z_j) + Σ_{i≠y} exp(z_i)), averaged over the rows, with
    z = η ŝ the head's output and z_y lowered by ``margin`` first. The codes zero the positive's slot after
    subtracting the row maximum, so the positive is left out of the denominator but exp(max) stands in for it:
    when the positive is the maximum this is the softmax cross-entropy, and the loss is never below 0. ``mask``
    (the scenario's training mask) leaves inactive outputs out."""
    z = masked(out, mask)
    positive = z.gather(1, y.unsqueeze(1)).squeeze(1) - margin
    others = z.scatter(1, y.unsqueeze(1), float("-inf"))
    top = torch.maximum(others.max(1).values, positive)
    return (torch.cat([others, top.unsqueeze(1)], 1).logsumexp(1) - positive).mean()


def stage_modules(model: nn.Module) -> tuple[list[nn.Module], str]:
    """The modules whose outputs are POD-spatial's maps, and what they are: the last block of each residual stage
    (retain's ResNets: a stage ends before a block with stride 2, and at the last block), or every ReLU of an
    MLP's ``features`` (its hidden layers, as 1-D maps)."""
    blocks = list(getattr(model, "stages", []))
    if blocks:
        def stride(b: nn.Module) -> int:
            s = getattr(getattr(b, "conv1", None), "stride", (1,))
            return int(s[0] if isinstance(s, tuple) else s)
        ends = [b for i, b in enumerate(blocks) if i == len(blocks) - 1 or stride(blocks[i + 1]) > 1]
        return ends, "stages"
    body = getattr(model, "features", None)
    relus = [m for m in body.modules() if isinstance(m, nn.ReLU)] if body is not None else []
    return relus, "hidden" if relus else "none"


def run_with_maps(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(outputs, embedding, intermediate maps) of ``model`` on ``x``; the maps are caught by forward hooks that
    are removed again before returning (a model keeps no hook, so it pickles and copies as it was)."""
    modules, _ = stage_modules(model)
    maps: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, o: maps.append(o)) for m in modules]
    try:
        f = model.features(x)
    finally:
        for h in handles:
            h.remove()
    return model.head(f), f, maps


@register("podnet")
@dataclass
class PODNet(Method):
    """PODNet: POD-spatial on the stages' maps, POD-flat on the embedding, the LSC classifier, balanced finetuning.

    Douillard, Cord, Ollion, Robert & Valle, "PODNet: Pooled Outputs Distillation for Small-Tasks Incremental
    Learning", ECCV 2020. The output layer becomes the local-similarity classifier (eq. 4): K proxies per class,
    ŝ_c = Σ_k softmax_k(cos(h, θ_c,k)) cos(h, θ_c,k), scaled by a learned η; trained with the NCA loss, the
    positive left out of the denominator (eq. 5, :func:`nca`), which replaces the cross-entropy. From the second
    task on, against the frozen previous model: λ_c · sqrt(N/T) · L_POD-spatial (:func:`pod_spatial`, width
    and height pooling of the squared maps, L2-normalised, L2 distance) on the output of each residual stage,
    caught with forward hooks, and
    λ_f · sqrt(N/T) · L_POD-flat (:func:`pod_flat`) on the embedding, with N the classes seen and T the current
    task's. The task trains on its data plus the exemplars; old classes' proxies stay fixed meanwhile (the
    authors' ``groupwise_factors: old_weights: 0``, PyCIL's ``fc1`` at lr 0). After each task: herding exemplars,
    ``buffer_size`` in total, equal per seen class; from the second task on, a finetuning of the classifier's
    proxies alone on them (the authors' ``finetuning_config``: undersampling, classifier, 20 epochs, lr 0.05,
    constant; batch-norm statistics not updated), with the same losses.

    Hooks: ``begin_task`` (LSC head at the first task; frozen copy), ``task_data`` (task data + exemplars),
    ``forward`` (keeps the embedding and the maps), ``penalty`` (NCA − the trainer's cross-entropy, so that the
    step's loss is the NCA, plus the two PODs), ``after_update`` (fixed proxies put back), ``end_task``.

    Deviations: on an MLP (no feature maps) POD-spatial runs on the hidden layers' outputs as 1-D maps, the
    squared activations L2-normalised (:func:`pooled`), besides POD-flat on the embedding; a model with neither
    stages nor a ReLU MLP gets POD-flat only (a warning says so). Evaluation uses the LSC (the CNN classifier;
    the paper's CIFAR results, and PyCIL reports NME). New classes' proxies start random, as PyCIL's (the authors
    imprint them from k-means of the class's embeddings). The NCA is the reference codes' loss (:func:`nca`), not
    eq. 5 as printed: eq. 5 hinges [−log(exp(η(ŝ_y − δ)) / Σ_{i≠y} exp(η ŝ_i))]_+ with δ = 0.6 and a learned η,
    which has a degenerate minimum (the term ηδ pulls η through 0 until an inverted classifier meets the hinge:
    tried here, 0% accuracy on split-digits with SGD at lr 0.1), and without the hinge has no lower bound (η grew
    without limit, to 51 in 400 steps on Split-MNIST). The codes subtract δ from every similarity, where it cancels,
    and keep exp(max) in the denominator; so the default δ is 0, and a δ given lowers z_y, in units of η·ŝ, where it
    does not act on η. The authors' LSC uses 2·cos − 2 (the negative squared distance of the normalised vectors): a
    factor the learned η absorbs, and a temperature of 2 in the proxies' softmax where this uses 1, as PyCIL. The
    backbone is retain's, with its last ReLU. Class-IL only.
    """

    lambda_c: float = param(3.0, "POD-spatial weight λ_c (× sqrt(classes seen / classes of the task))")
    lambda_f: float = param(1.0, "POD-flat weight λ_f (× sqrt(classes seen / classes of the task))")
    K: int = param(10, "proxies per class of the local-similarity classifier")
    margin: float = param(0.0, "NCA margin δ off the positive's η·ŝ (0: the reference codes, where δ cancels)")
    buffer_size: int = param(2000, "exemplars kept in total, split equally over the classes seen (paper: 20/class)")
    ft_epochs: int = param(20, "classifier finetuning epochs on the exemplars after each task from the second on")
    ft_lr: float = param(0.05, "learning rate of the classifier finetuning")

    modes = ("class",)
    needs_boundaries = True
    presets = {
        # The authors' options/podnet/podnet_cnn_cifar100.yaml (λ_c 3, λ_f 1, K 10, δ 0.6, finetuning 20 epochs at
        # 0.05; PyCIL: λ_c 5, ft lr 0.005); buffer 200 / 500: the Split-MNIST protocol.
        "split-mnist/class": {"buffer_size": 200},
        "split-fashion-mnist/class": {"buffer_size": 200},
        "split-digits/class": {"buffer_size": 200},
        "seq-cifar10/class": {"buffer_size": 500},
    }

    def __post_init__(self) -> None:
        check_common(self, "podnet", ("lambda_c", "lambda_f", "margin", "ft_lr"))
        self.exemplars = Exemplars(self.buffer_size)
        self.old: nn.Module | None = None  # the model as the previous task left it (frozen)
        self.factor = 0.0  # sqrt(N / T) of the current task
        self.fixed: Tensor | None = None  # bool over the head's weight rows: held fixed while the task trains
        self.fixed_values: Tensor | None = None  # their values
        self._transient()

    def _transient(self) -> None:
        self._step: tuple[Tensor, list[Tensor]] | None = None  # the step's (embedding, maps), set by forward
        self._finetuning = False

    def memory(self, scenario: Any) -> Memory:
        return self.exemplars.memory(scenario)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if not k.startswith("_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._transient()

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        head = install_head(ctx, self.K, "podnet")
        if ctx.task == 0 and stage_modules(ctx.model)[1] == "none":
            ctx.warn("podnet: the model has neither residual stages nor ReLU hidden layers; POD-spatial is off, "
                     "POD-flat on the embedding only")
        task_out = ctx.scenario.task_out.to(head.weight.device)
        old = task_out[:ctx.task].any(0)
        new = task_out[ctx.task] & ~old
        if ctx.task > 0:
            self.old = frozen_copy(ctx.model)
            seen = int((old | new).sum())
            self.factor = math.sqrt(seen / max(int(new.sum()), 1))
        self.fixed = ~head.rows(new)
        self.fixed_values = head.weight.detach()[self.fixed].clone()

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        return data.cat(self.exemplars.data()) if len(self.exemplars) else data

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        model = ctx.model
        if not isinstance(getattr(model, "head", None), CosineHead):
            return model(x)
        if not model.training:
            return model.head(model.features(x))
        out, f, maps = run_with_maps(model, x)
        self._step = (f, maps)
        return out

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if self._step is None:
            return None
        (f, maps), self._step = self._step, None
        mask = ctx.mask(batch.t if batch.task is None else batch.task)
        # the trainer adds the masked cross-entropy: subtracting it leaves the NCA as the step's loss
        loss = nca(out, batch.y, self.margin, mask) - ctx.loss(out, batch)
        if self.old is not None:
            with torch.no_grad():
                _, f_old, maps_old = run_with_maps(self.old, batch.x)
            if maps:
                loss = loss + self.lambda_c * self.factor * pod_spatial(maps_old, maps)
            loss = loss + self.lambda_f * self.factor * pod_flat(f_old, f)
        return loss

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        if not self._finetuning and self.fixed is not None:
            with torch.no_grad():
                ctx.model.head.weight[self.fixed] = self.fixed_values

    def end_task(self, ctx: Any) -> None:
        self._step = None
        self.exemplars.select(ctx)
        if ctx.task > 0 and self.ft_epochs > 0:
            balanced_finetune(self, ctx, [ctx.model.head.weight], self.ft_epochs, self.ft_lr, None)
