"""GSS-Greedy: keep the samples whose gradients point away from those already stored (gradient-based selection)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from retain.buffers import Buffer
from retain.context import masked
from retain.errors import ConfigError
from retain.method import Memory, Method, param, register
from retain.scenarios import Batch

GATES = ("row", "batch")


@register("gss")
@dataclass
class GSS(Method):
    """GSS-Greedy: keep the rows whose gradients are unlike those stored; replay a random memory batch as ER.

    A row enters a full memory, over a stored one drawn by score, when its gradient is unlike all of a random few
    stored ones.

    Aljundi, Lin, Goujaud & Bengio, "Gradient based sample selection for online continual learning", NeurIPS 2019
    (Algorithm 2, GSS-Greedy; the authors' ``rahafaljundi/Gradient-based-Sample-Selection`` ``model/GSS_Greedy.py``
    and Mammoth's ``gss``). After each update, for every incoming row: g its loss gradient (over every trained
    parameter), G the gradients of ``n_compare`` rows drawn at random from the memory (one draw per step), and its
    score ``c = max_j cos(g, G_j) + 1`` in [0, 2]. While the memory holds fewer than ``buffer_size`` rows the row is
    stored with score c. Once full, a row with ``c < 1`` (negative similarity to every compared gradient) is a
    candidate: a stored row i is drawn with probability ``C_i / Σ_j C_j`` and replaced with probability
    ``C_i / (C_i + c)``, the newcomer taking score c; a row with ``c >= 1`` is not stored. Redundant rows (high
    scores) are thus the likeliest to go, and the memory drifts towards gradient-diverse samples. The first rows,
    met with an empty memory, get score 0.1 (both codes). Replay: ``replay_batch`` rows drawn uniformly from the
    memory, appended to the incoming batch (one loss over both, as Mammoth's ``gss`` and retain's ``er``).

    Hooks: ``augment`` (replay rows), ``after_update`` (the selection; gradients of retain's mode-aware masked
    cross-entropy with the model in eval mode, as Mammoth). The cosines need only the gradients' inner products:
    for a model of linear layers (retain's MLPs) they come from one forward and backward of the rows (:meth:`gram`),
    otherwise from per-row gradients (:meth:`gradients`); both are exact. The rows and their scores live in a
    :class:`retain.buffers.Buffer` (scores in its ``prio``).
    Deviations: (1) ``gate``. ``row`` (the default, Algorithm 2): each row is gated ``c < 1`` on its own score, and
    a row entering a memory with room is stored with its own score. ``batch`` (Mammoth's ``gss``; the authors' code
    gates alike, an economy): one score for the whole incoming batch, ``c_B = max_j cos(ḡ, G_j) + 1`` with ḡ the
    gradient of the batch's mean loss (the mean of its rows' gradients); the rows of a batch that meets a memory
    with room are stored with c_B (Mammoth), and once it is full the batch's rows are candidates only if
    ``c_B < 1``, each then drawn against (and stored with) its own score c, compared with the same G. The first
    batch, met with an empty memory, gets 0.1 either way. (2) G holds per-row gradients of ``n_compare`` stored
    rows, as the paper and Mammoth; the authors' code compares with the mean gradients of ``memory_strength`` (10)
    stored mini-batches. (3) one update per incoming batch (Mammoth's ``batch_num`` = 1); the authors' MNIST
    scripts take 3 (``n_iter``), each a step on the incoming batch then one on a replay batch. (4) the replacement
    draw uses C_i / Σ C (the paper, Mammoth); the authors' code min-max normalises C first.
    """

    buffer_size: int = param(500, "rows kept in memory (M)")
    n_compare: int = param(10, "stored rows whose gradients each new row is compared with (n in Alg. 2; "
                           "Mammoth's gss_minibatch_size)")
    replay_batch: int = param(10, "rows replayed per step (the authors' n_constraints; Mammoth's minibatch_size)")
    gate: str = param("row", "row: each incoming row gated on its own score and stored with it (Algorithm 2); "
                      "batch: the whole batch gated on its mean gradient's score, a filling batch stored with that "
                      "score (Mammoth's gss; the authors' code gates alike)", choices=GATES)

    presets = {
        # the authors' Disjoint_Mnist.sh GSS-Greedy: n_constraints 10, batch 10; memory 200/500 as issue 21 asks;
        # Mammoth best_args seq-mnist buffer 500: gss_minibatch_size 10
        "split-mnist/class": {"buffer_size": 500, "n_compare": 10, "replay_batch": 10},
        "split-fashion-mnist/class": {"buffer_size": 500, "n_compare": 10, "replay_batch": 10},
        "split-digits/class": {"buffer_size": 200, "n_compare": 10, "replay_batch": 10},
    }

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"gss: buffer_size must be at least 1, got {self.buffer_size}")
        if self.n_compare < 1:
            raise ConfigError(f"gss: n_compare must be at least 1, got {self.n_compare}")
        if self.replay_batch < 1:
            raise ConfigError(f"gss: replay_batch must be at least 1, got {self.replay_batch}")
        if self.gate not in GATES:
            raise ConfigError(f"gss: gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        self.buffer = Buffer(self.buffer_size)

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.buffer_size, scenario)

    # --------------------------------------------------------------------------------------------- hooks
    def augment(self, ctx: Any, batch: Batch) -> Batch:
        if len(self.buffer) == 0:
            return batch
        rows = self.buffer.sample(self.replay_batch, ctx.rng)
        return batch.cat(Batch(rows.x, rows.y, rows.t, torch.zeros(len(rows), dtype=torch.bool,
                                                                     device=rows.y.device)))

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        new = batch.is_new()
        self.select(ctx, batch.x[new], batch.y[new], batch.t[new])

    # --------------------------------------------------------------------------------------------- selection
    def gradients(self, ctx: Any, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """``[rows, parameters]``: each row's loss gradient, flattened (model in eval mode); one vectorised call
        (``torch.func``), or a loop over the rows for a model ``vmap`` cannot trace."""
        model = ctx.model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        was = model.training
        model.eval()
        try:
            mask = ctx.mask(t if len(t) else 0)
            mask = torch.ones(len(y), ctx.scenario.n_outputs, dtype=torch.bool, device=y.device) if mask is None \
                else mask.expand(len(y), -1)

            def row_loss(params: dict[str, Tensor], xi: Tensor, yi: Tensor, mi: Tensor) -> Tensor:
                out = functional_call(model, params, (xi.unsqueeze(0),), strict=False)
                return F.cross_entropy(masked(out, mi.unsqueeze(0)), yi.unsqueeze(0))

            try:
                g = vmap(grad(row_loss), in_dims=(None, 0, 0, 0))({n: p.detach() for n, p in named}, x, y, mask)
                return torch.cat([g[n].flatten(1) for n, _ in named], 1)
            except RuntimeError:  # an operation vmap does not support: one row at a time
                rows = []
                for i in range(len(y)):
                    row = Batch(x[i:i + 1], y[i:i + 1], t[i:i + 1])
                    loss = ctx.loss(ctx.forward(row.x, row.t), row)
                    gi = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
                    rows.append(torch.cat([(a if a is not None else torch.zeros_like(p)).flatten()
                                           for a, (_, p) in zip(gi, named)]))
                return torch.stack(rows)
        finally:
            model.train(was)

    def gram(self, ctx: Any, x: Tensor, y: Tensor, t: Tensor) -> Tensor | None:
        """``[rows, rows]``: the inner products of the rows' loss gradients, without forming them, or None when the
        model is not made of linear layers only.

        A linear layer's weight gradient for row i is the outer product δ_i a_iᵀ (δ the gradient at its output, a its
        input), so ⟨g_i, g_j⟩ = Σ_layers (δ_i·δ_j)(a_i·a_j + 1) (the 1: the bias). One forward and backward of the
        summed per-row losses gives every δ and a. Exact when every trainable parameter is a linear layer's and the
        rows do not interact (eval mode); otherwise None and :meth:`gradients` forms them."""
        model = ctx.model
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        in_linear = {id(p) for m in linears for p in m.parameters()}
        if not linears or any(p.requires_grad and id(p) not in in_linear for p in model.parameters()):
            return None
        seen: list[tuple[torch.nn.Linear, Tensor, Tensor]] = []
        hooks = [m.register_forward_hook(lambda m, a, z: seen.append((m, a[0], z))) for m in linears]
        was = model.training
        model.eval()
        try:
            batch = Batch(x, y, t)
            loss = ctx.loss(ctx.forward(x, t), batch, reduction="sum")  # row i's loss alone reaches δ_i
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        if any(a.dim() != 2 for _, a, _ in seen):
            return None
        deltas = torch.autograd.grad(loss, [z for _, _, z in seen], allow_unused=True)
        K = x.new_zeros(len(y), len(y))
        for (m, a, _), d in zip(seen, deltas):
            if d is None:
                continue
            inputs = a.detach() @ a.detach().T if m.weight.requires_grad else torch.zeros_like(K)
            bias = 1.0 if m.bias is not None and m.bias.requires_grad else 0.0
            K += (d @ d.T) * (inputs + bias)
        return K

    def scores(self, ctx: Any, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """c = max_j cos(g, G_j) + 1 for each row, G the gradients of ``n_compare`` random stored rows."""
        return self.batch_scores(ctx, x, y, t)[0]

    def batch_scores(self, ctx: Any, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's score c and the batch's c_B = max_j cos(ḡ, G_j) + 1 (ḡ the mean of the rows' gradients),
        against the same ``n_compare`` random stored rows G."""
        stored = self.buffer.sample(self.n_compare, ctx.rng)
        X, Y, T = torch.cat([x, stored.x.to(x.device)]), torch.cat([y, stored.y.to(y.device)]), \
            torch.cat([t, stored.t.to(t.device)])
        K = self.gram(ctx, X, Y, T)
        if K is None:
            g = self.gradients(ctx, X, Y, T)
            K = g @ g.T
        n = len(y)
        norm = K.diagonal().clamp_min(0).sqrt().clamp_min(1e-8)
        cos = K / (norm[:, None] * norm[None, :])
        rows = cos[:n, n:].max(dim=1).values + 1
        # ⟨ḡ, G_j⟩ = mean_i ⟨g_i, G_j⟩ and |ḡ|² = mean_{i,i'} ⟨g_i, g_i'⟩: the mean gradient needs no more than K
        mean = K[:n, :n].mean().clamp_min(0).sqrt().clamp_min(1e-8)
        batch = (K[:n, n:].mean(dim=0) / (mean * norm[n:])).max() + 1
        return rows, batch

    @torch.no_grad()
    def _store(self, slot: int, x: Tensor, y: Tensor, t: Tensor, score: float) -> None:
        b = self.buffer
        b.x[slot], b.y[slot], b.t[slot], b.key[slot], b.prio[slot] = x.to(b.x.dtype), y, t, y, score

    def select(self, ctx: Any, x: Tensor, y: Tensor, t: Tensor) -> None:
        """Algorithm 2 over the rows in stream order: fill, then score-driven replacement (``gate``: per row or per
        batch)."""
        if len(y) == 0:
            return
        if len(self.buffer) == 0:
            c = torch.full((len(y),), 0.1)
            self.insert(ctx, x, y, t, c)
            return
        rows, batch = self.batch_scores(ctx, x, y, t)
        c = rows.detach().cpu()
        if self.gate == "batch":
            whole = torch.full((len(y),), float(batch))
            self.insert(ctx, x, y, t, c, fill=whole, gate=whole)
        else:
            self.insert(ctx, x, y, t, c)

    def insert(self, ctx: Any, x: Tensor, y: Tensor, t: Tensor, c: Tensor, fill: Tensor | None = None,
               gate: Tensor | None = None) -> None:
        """Offer rows with scores ``c`` (in [0, 2]): stored while there is room (with score ``fill``, default c), then
        Algorithm 2's replacement for the rows whose ``gate`` (default c) is below 1, each drawn against its c."""
        fill = c if fill is None else fill
        gate = c if gate is None else gate
        b = self.buffer
        room = max(0, self.buffer_size - len(b))
        if room:  # the memory is not full: store outright, in order (the buffer's first slots fill in order)
            k = min(room, len(y))
            start = len(b)
            b.add(x[:k], y[:k], t[:k], generator=ctx.rng)
            b.prio[start:start + k] = fill[:k].to(b.prio.device)
            x, y, t, c, gate = x[k:], y[k:], t[k:], c[k:], gate[k:]
        for i in range(len(y)):
            b.seen += 1
            if float(gate[i]) >= 1:  # similar to some stored gradient: not a candidate
                continue
            C = b.prio[: self.buffer_size].cpu().clamp_min(0)
            j = int(torch.multinomial(C / C.sum(), 1, generator=ctx.rng)) if float(C.sum()) > 0 else \
                int(torch.randint(self.buffer_size, (1,), generator=ctx.rng))
            r, total = float(torch.rand(1, generator=ctx.rng)), float(C[j]) + float(c[i])
            if total > 0 and r < float(C[j]) / total:
                self._store(j, x[i], y[i], t[i], float(c[i]))
