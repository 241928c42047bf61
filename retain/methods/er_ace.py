"""ER-ACE: experience replay with the asymmetric cross-entropy (incoming rows scored only among their own classes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retain.buffers import Buffer
from retain.context import masked
from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.scenarios import Batch


@register("er_ace")
@dataclass
class ERACE(Method):
    """ER-ACE: CE of the incoming rows over the classes present in their batch + CE of replayed rows over all classes.

    Caccia, Aljundi, Asadi, Tuytelaars, Pineau & Belilovsky, "New Insights on Reducing Abrupt Representation Change
    in Online Continual Learning", ICLR 2022 (ER-ACE, eq. 5; the authors' ``pclucas14/AML`` ``methods/er_ace.py``
    and Mammoth's ``er_ace``). The loss is ``L_inc + L_replay``: ``L_inc`` is the cross-entropy of the incoming
    batch with the logits of every class *absent* from it masked out (those get exactly zero gradient from it, so
    incoming samples of new classes do not push down the logits of old ones), ``L_replay`` the ordinary
    cross-entropy of ``replay_batch`` rows drawn from a reservoir buffer, over all classes seen so far (the mode's
    training mask: class-IL the seen classes, every output with ``--all-outputs``; task-IL each row's own head).

    Which mask: the classes present in the batch, not the current task's. Both reference codes build it as
    ``present ∪ {c ≥ max(seen so far)}`` (AML ``process_inc``; Mammoth ``observe``): present in the incoming batch
    (``y.unique()``), plus the outputs from the largest class id met so far upward, i.e. the classes not met yet (the
    reference has all outputs active in the softmax; class ids arrive in increasing order). Here the same index rule
    is intersected with the mode's mask, so in class-IL (seen classes only) the active logits are the present
    classes plus, at most, not-yet-met classes of the current task at or above the largest id met; with
    ``--all-outputs`` it is exactly the references' rule. A current-task class absent from a batch and below the
    largest id met is masked for that batch (the references do the same): the rule needs no task identity, only the
    labels of the batch, which is what makes the method task-free. Masking to the current task's classes instead
    would need task identity and differs from both references; it was not used. The mask applies from the first
    step (the authors force task-free mode; Mammoth's ``--task_free 1``), and replay starts as soon as the buffer
    holds a row.

    ``cosine_head`` (default on, as both references): the logits are ``10 · cos(features(x), w_c)``, the
    authors' ``distLinear`` (Mammoth's ``CustomLinear``: a bias-free linear layer on L2-normalised features and
    weight rows, + 1e-5 in each norm, scale 10), computed in ``forward`` from the model's ``features`` and the weight
    of its ``head`` (its bias is unused); evaluation uses it too.

    Hooks: ``forward`` (cosine head), ``penalty`` (swaps the trainer's CE of the incoming rows for the masked one
    and adds the replay CE), ``after_update`` (reservoir insertion). The replayed rows go through the network in a
    pass of their own, as in both references (it matters under batch normalisation); stored un-augmented, they get
    a fresh ``--augment`` view each time.
    Deviations: the penalty returns ``L_inc - CE_trainer + L_replay`` so that the shared step (mixed precision,
    data-parallel) still owns the optimisation; the two CE terms on the incoming rows are the same computation, so
    they cancel exactly, including in the gradient. In class-IL without ``--all-outputs`` the classes not yet
    trained are outside both losses (retain's class-IL mask); the references keep every output in both, which
    ``--all-outputs`` reproduces.
    """

    buffer_size: int = param(500, "rows kept in the reservoir buffer (M)")
    replay_batch: int = param(0, "replayed rows per step (0 = the batch size; the authors' buffer_batch_size)")
    cosine_head: bool = param(True, "logits = scale · cosine(features, head weights), the authors' distLinear")
    scale: float = param(10.0, "scale of the cosine logits (the authors' scale_factor)")

    modes = ("class", "task")  # as Mammoth's er_ace (class-il, task-il)
    presets = {
        # Mammoth models/config/er_ace.yaml, seq-cifar10, buffer 200: lr 0.1, task_free 1 (lr set by the run);
        # minibatch = batch size 32 (Mammoth's default replay batch = the batch size).
        "seq-cifar10/class": {"buffer_size": 200, "replay_batch": 32},
        # Split-MNIST: Mammoth has no er_ace entry for seq-mnist; ER's best_args (buffer 500: lr 0.1, batch 10,
        # minibatch 10) are used, the lr and batch set by the run.
        "split-mnist/class": {"buffer_size": 500, "replay_batch": 10},
        "split-fashion-mnist/class": {"buffer_size": 500, "replay_batch": 10},
        "split-digits/class": {"buffer_size": 200},
    }

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"er_ace: buffer_size must be at least 1, got {self.buffer_size}")
        if self.replay_batch < 0:
            raise ConfigError(f"er_ace: replay_batch must be >= 0 (0 = the batch size), got {self.replay_batch}")
        if not self.scale > 0:
            raise ConfigError(f"er_ace: scale must be > 0, got {self.scale}")
        self.buffer = Buffer(self.buffer_size)
        self.max_seen = -1  # the largest output id met in an incoming batch so far (the references' seen_so_far.max())

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.buffer_size, scenario)

    # --------------------------------------------------------------------------------------------- hooks
    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        if not self.cosine_head:
            return ctx.model(x)
        body, head = getattr(ctx.model, "features", None), getattr(ctx.model, "head", None)
        if body is None or not isinstance(head, torch.nn.Linear):
            raise ConfigError("er_ace: cosine_head needs a model with .features and a linear .head (retain's "
                              "MLP and ResNets); use --param cosine_head=false for other models")
        return cosine_logits(body(x), head.weight, self.scale)

    def incoming_mask(self, ctx: Any, batch: Batch) -> Tensor:
        """Bool ``[rows, outputs]``: the logits the incoming loss keeps (present classes and ids ≥ the largest met,
        within the mode's training mask). Updates the largest id met with this batch's labels first."""
        n = ctx.scenario.n_outputs
        # the step's whole batch when known (data-parallel: every process's rows, so that all build one mask)
        whole = ctx.batch if ctx.batch is not None and len(ctx.batch) >= len(batch) else batch
        labels = whole.y[whole.is_new()]
        present = torch.zeros(n, dtype=torch.bool, device=batch.y.device)
        present[labels] = True
        self.max_seen = max(self.max_seen, int(labels.max()))
        present[self.max_seen:] = True
        mode = ctx.mask(batch.t if batch.task is None else batch.task)
        keep = present.expand(len(batch), n)
        return keep if mode is None else keep & mode.expand(len(batch), n)

    def incoming_loss(self, ctx: Any, out: Tensor, batch: Batch) -> Tensor:
        """The asymmetric part: CE of the incoming rows over the classes their batch holds (``L_inc``)."""
        return F.cross_entropy(masked(out, self.incoming_mask(ctx, batch)), batch.y)

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        # the trainer's loss is the plain masked CE of the incoming rows: replace it by L_inc
        loss = self.incoming_loss(ctx, out, batch) - ctx.loss(out, batch)
        if len(self.buffer) > 0:
            rows = self.buffer.sample(self.replay_batch or len(ctx.batch), ctx.rng)
            replayed = ctx.forward(ctx.augmented(rows.x), rows.t)  # stored un-augmented, augmented when replayed
            loss = loss + ctx.loss(replayed, Batch(rows.x, rows.y, rows.t))
        return loss

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        new = batch.is_new()
        self.buffer.add(batch.x[new], batch.y[new], batch.t[new], generator=ctx.rng)


def cosine_logits(features: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale · <f/(|f| + 1e-5), w_c/(|w_c| + 1e-5)>`` for every class c (the authors' distLinear)."""
    f = features.flatten(1)
    f = f / (f.norm(dim=1, keepdim=True) + 1e-5)
    w = weight / (weight.norm(dim=1, keepdim=True) + 1e-5)
    return scale * f @ w.t()
