"""ER-AML: experience replay whose incoming rows learn by metric learning against positives and negatives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from retain.errors import ConfigError
from retain.method import param, register
from retain.methods.er_ace import ERACE, cosine_logits
from retain.scenarios import Batch


@register("er_aml")
@dataclass
class ERAML(ERACE):
    """ER-AML: a supervised-contrastive loss on the incoming rows (one positive and one negative each) + replay CE.

    Caccia, Aljundi, Asadi, Tuytelaars, Pineau & Belilovsky, "New Insights on Reducing Abrupt Representation Change
    in Online Continual Learning", ICLR 2022 (ER-AML, eqs. 6-7; the authors' ``pclucas14/AML`` ``methods/er_aml.py``
    ``ER_AML`` and ``buffer.py`` ``sample_pos_neg``, read to check every detail below). The loss is
    ``L_AML(incoming) + CE(replayed)``; the replay half, the cosine head, the buffer and the hyper-parameters they
    share are ER-ACE's (this class extends :class:`retain.methods.er_ace.ERACE` and replaces its incoming loss).

    The incoming loss. The pool is the buffer's rows together with the incoming batch's. For each incoming row i
    (label y_i) a positive p_i is drawn uniformly among the pool's rows of label y_i other than row i itself, and a
    negative n_i uniformly among the pool's rows whose label differs from y_i but is one of the labels present in
    the incoming batch (the authors' task-free rule standing for "classes of the current task": the negatives never
    come from classes absent from the batch, so old classes' representations are not pushed around). A row with
    no valid positive or negative is left out of the loss (none valid: the loss is 0 and the step is replay only).
    Features are the model's penultimate ones (``model.features``), each divided by its norm + 1e-5 (the authors'
    ``normalize``): h_i of the incoming row's training view, z of the fresh training views of p and n. With
    anchors h_i, the contrast set C = {z_p1..z_pk, z_n1..z_nk} and P(i) = the members of C labelled y_i (its own
    positive, and any other one of that label), :func:`aml_loss` is

        L = (τ/τ_b) · (1/k) Σ_i  −(1/|P(i)|) Σ_{c∈P(i)} log [ exp(h_i·z_c/τ) / Σ_{c'∈C} exp(h_i·z_c'/τ) ]

    with τ = ``temperature`` 0.2 (the authors' ``supcon_temperature``) and τ_b = 0.07 (their ``base_temperature``;
    the factor τ/τ_b only scales the loss, as in Khosla et al.'s code). The anchor is not in C, so nothing is
    excluded from the denominator (unlike SupCon). Gradients flow through anchors, positives and negatives alike.
    Before the buffer holds a row (the very first step) the incoming rows get the ordinary cross-entropy, as the
    authors' "regular training at the start".

    Hooks: ``forward`` (cosine head; in training it keeps the penultimate features of the rows it was given, so
    the incoming rows are not run through the network twice), ``penalty`` (ER-ACE's: the incoming loss replaces the
    trainer's CE, the replay CE is added), ``after_update`` (reservoir insertion).

    Deviations: the triplet variant (``ER_AML_Triplet``, margin loss) is not implemented; the authors' ER-AML is
    the SupCon form above. The negatives' rule is always the labels present in the batch (the authors' task-free
    rule; their task-aware rule, negatives of the same task id, is the same whenever a batch holds every class of
    its task). Only the valid rows' positives and negatives are forwarded (the authors forward all and drop the
    invalid ones: the same loss, and the same batch-norm statistics except for those dropped rows). As in ER-ACE,
    in class-IL without ``--all-outputs`` the replay CE spans the classes seen so far, the references' every output.
    """

    temperature: float = param(0.2, "τ of the AML loss (the authors' supcon_temperature)")
    base_temperature: float = param(0.07, "τ_b: the loss is scaled by τ/τ_b (the authors' base_temperature)")

    presets = {
        # The authors' defaults (main.py: batch 10, buffer_batch_size 10, lr 0.1); their MNIST-free repository has
        # no Split-MNIST entry, so the replay batch is theirs and the buffer the memory.
        "split-mnist/class": {"buffer_size": 500, "replay_batch": 10},
        "split-fashion-mnist/class": {"buffer_size": 500, "replay_batch": 10},
        "seq-cifar10/class": {"buffer_size": 200, "replay_batch": 10},
        "split-digits/class": {"buffer_size": 200},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.temperature > 0 and self.base_temperature > 0):
            raise ConfigError(f"er_aml: temperature and base_temperature must be > 0, got {self.temperature}, "
                              f"{self.base_temperature}")
        self._hidden: tuple[Tensor, Tensor] | None = None  # (rows, features) of the last training forward

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_hidden", None)  # a step's scratch, not state
        return state

    # --------------------------------------------------------------------------------------------- hooks
    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        if not ctx.model.training:
            return super().forward(ctx, x, t)
        h = self.hidden(ctx, x)
        self._hidden = (x, h)
        if self.cosine_head:
            return cosine_logits(h, ctx.model.head.weight, self.scale)
        return ctx.model.head(h)

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        try:
            return super().penalty(ctx, batch, out)
        finally:
            self._hidden = None  # the replayed rows' forward cached theirs too: not needed after the step

    def incoming_loss(self, ctx: Any, out: Tensor, batch: Batch) -> Tensor:
        """The AML loss of the incoming rows (plain CE while the buffer is empty)."""
        cached, self._hidden = self._hidden, None
        if len(self.buffer) == 0:
            return ctx.loss(out, batch)
        pos, neg, valid = positives_negatives(self.buffer.y[self.buffer.occupied()], batch.y, ctx.rng)
        if not bool(valid.any()):
            return out.sum() * 0.0
        h = cached[1] if cached is not None and cached[0] is batch.x else self.hidden(ctx, batch.x)
        # the incoming rows as they came (un-augmented, like the stored ones) when this process has them all
        raw = ctx.batch.x if ctx.batch is not None and len(ctx.batch) == len(batch) else batch.x
        pool_x = torch.cat([self.buffer.x[self.buffer.occupied()], raw])
        pool_y = torch.cat([self.buffer.y[self.buffer.occupied()], batch.y])
        pick = torch.cat([pos[valid], neg[valid]]).to(pool_y.device)
        z = self.hidden(ctx, ctx.augmented(pool_x[pick]))
        return aml_loss(normalize(h[valid.to(h.device)]), normalize(z), batch.y[valid.to(batch.y.device)],
                        pool_y[pick], self.temperature, self.base_temperature)

    # ------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def hidden(ctx: Any, x: Tensor) -> Tensor:
        body = getattr(ctx.model, "features", None)
        if body is None or not isinstance(getattr(ctx.model, "head", None), torch.nn.Linear):
            raise ConfigError("er_aml needs a model with .features (the representation its loss works on) and a "
                              "linear .head; retain's MLP and ResNets have both")
        return body(x).flatten(1)


def normalize(h: Tensor) -> Tensor:
    """``h / (|h| + 1e-5)`` row by row (the authors' ``normalize``, also their cosine head's)."""
    return h / (h.norm(dim=1, keepdim=True) + 1e-5)


def positives_negatives(buffer_y: Tensor, y: Tensor, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """For each incoming row, the pool index of a positive and of a negative, and whether both exist.

    The pool is ``buffer_y`` followed by ``y`` (the incoming rows, row i at ``len(buffer_y) + i``). A positive of
    row i: a pool row labelled ``y[i]`` other than row i; a negative: a pool row whose label is not ``y[i]`` but is
    one of the labels in ``y``. Each is drawn uniformly (``torch.multinomial`` over the valid rows, on the CPU with
    ``generator``); an invalid row's indices are drawn over the whole pool and must be ignored."""
    pool = torch.cat([buffer_y, y]).cpu()
    y = y.cpu()
    n_buf = len(buffer_y)
    same = pool.view(-1, 1) == y.view(1, -1)  # [pool, rows]
    itself = torch.arange(len(pool)).view(-1, 1) == (n_buf + torch.arange(len(y))).view(1, -1)
    present = torch.isin(pool, y.unique()).view(-1, 1)
    valid_pos = same & ~itself
    valid_neg = ~same & present
    valid = valid_pos.any(0) & valid_neg.any(0)
    valid_pos[:, ~valid] = True
    valid_neg[:, ~valid] = True
    pos = torch.multinomial(valid_pos.T.float(), 1, generator=generator).squeeze(1)
    neg = torch.multinomial(valid_neg.T.float(), 1, generator=generator).squeeze(1)
    return pos, neg, valid


def aml_loss(anchors: Tensor, contrast: Tensor, anchor_y: Tensor, contrast_y: Tensor, temperature: float,
             base_temperature: float) -> Tensor:
    """The AML loss (see :class:`ERAML`): ``anchors`` [k, D] against the ``contrast`` set [m, D] (both normalised),
    the positives of anchor i being the contrast rows labelled ``anchor_y[i]``; mean over anchors of
    −(τ/τ_b) · mean over its positives of log softmax(anchor·contrast/τ)."""
    logits = anchors @ contrast.t() / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
    positive = (anchor_y.view(-1, 1) == contrast_y.view(1, -1)).to(log_prob.dtype)
    per_anchor = -(positive * log_prob).sum(1) / positive.sum(1)
    return (temperature / base_temperature) * per_anchor.mean()
