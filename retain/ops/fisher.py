"""Per-sample gradient statistics with ``torch.func`` and the quadratic parameter penalty.

The diagonal Fisher information of EWC (Kirkpatrick et al. 2017) is an expectation of *per-sample* squared
gradients, ``F = E_x E_{y~p(y|x)} [(∂ log p(y|x) / ∂θ)²]``; squaring the gradient of a batch mean instead
(``(E ∂ log p)²``) is a different, much smaller quantity. MAS (Aljundi et al. 2018) likewise averages the
per-sample absolute gradient of ``‖f(x)‖²``. Both are computed here in chunks with
``vmap(grad(functional_call(...)))``: one vectorised backward per chunk, never one backward per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = dict[str, Tensor]
Forward = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], t [B]) -> raw outputs [B, n_outputs]

# Per-sample gradients of a chunk take chunk x n_params floats; this bounds a chunk to ~256 MB of float32.
_MAX_ELEMENTS = 2**26


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a regulariser protects: every parameter that requires grad, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model: nn.Module) -> Params:
    """A detached copy of the trainable parameters (an anchor θ*)."""
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def quadratic_penalty(params: dict[str, Tensor], importance: Params, anchor: Params) -> Tensor:
    """``Σ_i importance_i (θ_i − θ*_i)²`` over every parameter named in ``importance`` (no factor in front)."""
    terms = [(importance[n] * (params[n] - anchor[n]).square()).sum() for n in importance]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class _Bound(nn.Module):
    """Holds ``model`` as a submodule so ``functional_call`` can swap its parameters while ``fn`` runs."""

    def __init__(self, model: nn.Module, fn: Forward):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.fn(x, t)


def per_sample_grad_stat(model: nn.Module, row_loss: Callable[..., Tensor],
                         batches: Iterable[tuple[Tensor, ...]], stat: str = "square",
                         forward: Forward | None = None, max_elements: int = _MAX_ELEMENTS,
                         engine: str = "auto") -> Params:
    """Mean over samples of ``stat(∂ row_loss(f(x_i), *rest_i) / ∂θ)`` for every trainable parameter.

    ``batches`` yields tuples ``(x, t, *rest)`` (each batch-first); ``forward(x, t)`` gives the raw outputs
    (default ``model(x)``); ``row_loss(out_row, *rest_row)`` is a scalar for one sample; ``stat`` is
    ``"square"`` (Fisher) or ``"abs"`` (MAS). Run in eval mode (batch-norm statistics are not per sample).

    ``engine="vmap"``: ``vmap(grad(functional_call))`` per chunk, any model. ``engine="linear"``: exact and much
    faster when every trainable parameter belongs to an ``nn.Linear`` applied once per sample to a 2-D input
    (MLPs): the per-sample gradient of a weight is the outer product δ_i a_iᵀ of the output gradient and the
    input, so Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ(a²) and Σ_i |δ_i a_iᵀ| = |δ|ᵀ|a| — one matrix product per layer instead of
    materialising B x n_params gradients. ``engine="auto"`` uses ``linear`` where it applies (checked per batch)
    and ``vmap`` otherwise; both give the same numbers (tested).
    """
    if stat not in ("square", "abs"):
        raise ValueError(f"stat must be 'square' or 'abs', got {stat!r}")
    if engine not in ("auto", "vmap", "linear"):
        raise ValueError(f"engine must be auto, vmap or linear, got {engine!r}")
    apply = torch.square if stat == "square" else torch.abs
    params = {n: p.detach() for n, p in trainable(model).items()}
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, max_elements // max(n_params, 1))
    fwd = forward if forward is not None else (lambda x, t: model(x))
    bound = _Bound(model, fwd)
    linears = _linear_owners(model, params) if engine != "vmap" else None
    if engine == "linear" and linears is None:
        raise ValueError("engine='linear' needs every trainable parameter to belong to an nn.Linear")

    def one(p: Params, x: Tensor, t: Tensor, *rest: Tensor) -> Tensor:
        out = functional_call(bound, {f"model.{n}": v for n, v in p.items()}, (x.unsqueeze(0), t.unsqueeze(0)))
        return row_loss(out[0], *rest)

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            sums = _linear_sums(model, linears, fwd, row_loss, batch, stat) if linears is not None else None
            if sums is None and engine == "linear":
                raise ValueError("engine='linear' needs each nn.Linear applied once per sample to a 2-D input")
            if sums is not None:
                for n, v in sums.items():
                    total[n] += v
            else:
                n_rest = len(batch) - 2
                per_sample = vmap(grad(one), in_dims=(None, 0, 0) + (0,) * n_rest)
                for start in range(0, len(batch[0]), chunk):
                    part = [b[start:start + chunk] for b in batch]
                    for n, g in per_sample(params, *part).items():
                        total[n] += apply(g).sum(0)
            count += len(batch[0])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no samples to estimate the importance from")
    return {n: v / count for n, v in total.items()}


def _linear_owners(model: nn.Module, params: Params) -> dict[str, nn.Linear] | None:
    """Module name -> ``nn.Linear`` if every trainable parameter is the weight or bias of one, else None."""
    owners: dict[str, nn.Linear] = {}
    covered = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            mine = [f"{name}.{k}" if name else k for k, p in m.named_parameters(recurse=False) if p.requires_grad]
            if mine:
                owners[name] = m
                covered.update(mine)
    return owners if covered == set(params) else None


def _linear_sums(model: nn.Module, linears: dict[str, nn.Linear], fwd: Forward, row_loss: Callable[..., Tensor],
                 batch: tuple[Tensor, ...], stat: str) -> Params | None:
    """Σ_i stat(per-sample gradient) for a batch through the outer-product identity; None if it does not apply."""
    x, t, *rest = batch
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in linears}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            seen[name].append((inputs[0], output))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        with torch.enable_grad():
            out = fwd(x, t)
    finally:
        for h in handles:
            h.remove()
    if any(len(v) != 1 or v[0][0].dim() != 2 or len(v[0][0]) != len(x) for v in seen.values()):
        return None
    outputs = [seen[name][0][1] for name in linears]
    losses = vmap(row_loss)(out, *rest)
    deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    apply = torch.square if stat == "square" else torch.abs
    sums: Params = {}
    for (name, m), delta in zip(linears.items(), deltas):
        a = seen[name][0][0].detach()
        delta = torch.zeros_like(outputs[0]) if delta is None else delta.detach()
        prefix = f"{name}." if name else ""
        if m.weight.requires_grad:
            sums[prefix + "weight"] = apply(delta).T @ apply(a)
        if m.bias is not None and m.bias.requires_grad:
            sums[prefix + "bias"] = apply(delta).sum(0)
    return sums


def _active(out: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, out, torch.full_like(out, float("-inf")))


def _rows(mask: Tensor | None, n: int, n_out: int, device: torch.device) -> Tensor:
    """A ``[n, n_out]`` boolean mask from a scenario mask (``None``, ``[n_out]`` or ``[n, n_out]``)."""
    if mask is None:
        return torch.ones(n, n_out, dtype=torch.bool, device=device)
    return mask.to(device).expand(n, n_out) if mask.dim() == 1 else mask.to(device)


def sample_predictive(logits: Tensor, mask: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
    """One label per row drawn from ``softmax`` over the active outputs (``generator`` lives on the CPU)."""
    probs = F.softmax(_active(logits, _rows(mask, len(logits), logits.shape[1], logits.device)), dim=1)
    return torch.multinomial(probs.detach().float().cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def fisher_diagonal(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, Tensor, Tensor | None]],
                    labels: str = "true", generator: torch.Generator | None = None,
                    forward: Forward | None = None, max_elements: int = _MAX_ELEMENTS) -> Params:
    """Diagonal Fisher: mean over samples of ``(∂ log p(y|x) / ∂θ)²``, ``p`` the softmax over the active outputs.

    ``batches`` yields ``(x, t, y, mask)`` with ``mask`` the scenario's active outputs (``None`` = all).
    ``labels="true"``: ``y`` is drawn from the model's own predictive distribution (the Fisher information);
    ``labels="empirical"``: the given ``y`` (the "empirical Fisher"); ``labels="predicted"``: the model's most
    likely active class (van de Ven et al.'s code default; neither estimator of the Fisher, a common variant).
    """
    if labels not in ("true", "empirical", "predicted"):
        raise ValueError(f"labels must be 'true', 'empirical' or 'predicted', got {labels!r}")
    fwd = forward if forward is not None else (lambda x, t: model(x))

    def rows() -> Iterable[tuple[Tensor, ...]]:
        for x, t, y, mask in batches:
            logits = _eval_forward(model, fwd, x, t) if labels != "empirical" or mask is None else None
            m = _rows(mask, len(x), mask.shape[-1] if logits is None else logits.shape[1], x.device)
            if labels == "true":
                y = sample_predictive(logits, m, generator)
            elif labels == "predicted":
                y = _active(logits, m).argmax(1)
            yield x, t, y, m

    def nll(out: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        return -F.log_softmax(_active(out, mask), dim=0).gather(0, y.unsqueeze(0)).squeeze(0)

    return per_sample_grad_stat(model, nll, rows(), "square", forward, max_elements)


def output_sensitivity(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, Tensor | None]],
                       forward: Forward | None = None, max_elements: int = _MAX_ELEMENTS) -> Params:
    """MAS importance: mean over samples of ``|∂ ‖f(x)‖²₂ / ∂θ|``, ``f`` the active outputs (no labels used).

    ``batches`` yields ``(x, t, mask)`` with ``mask`` the scenario's active outputs (``None`` = all).
    """
    fwd = forward if forward is not None else (lambda x, t: model(x))

    def rows() -> Iterable[tuple[Tensor, ...]]:
        for x, t, mask in batches:
            n_out = _eval_forward(model, fwd, x[:1], t[:1]).shape[1] if mask is None else mask.shape[-1]
            yield x, t, _rows(mask, len(x), n_out, x.device)

    def sq_norm(out: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, out, torch.zeros_like(out)).square().sum()

    return per_sample_grad_stat(model, sq_norm, rows(), "abs", forward, max_elements)


@torch.no_grad()
def _eval_forward(model: nn.Module, fwd: Forward, x: Tensor, t: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return fwd(x, t)
    finally:
        model.train(was_training)


def task_batches(ctx, samples: int | None = None, batch_size: int = 256
                 ) -> Iterable[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
    """The current task's training rows as ``(x, t, y, mask)`` batches for the estimators above.

    ``samples`` (None = all) draws a random subset with ``ctx.rng``; ``mask`` is the training mask of the task
    (task-IL its head, class-IL the classes seen so far, domain-IL None), so "the model's predictive
    distribution" is over the outputs the task actually trained.
    """
    data = ctx.scenario.task_data(ctx.task)
    idx = data.idx
    if samples is not None and samples < len(idx):
        idx = idx[torch.randperm(len(idx), generator=ctx.rng)[:samples].to(idx.device)]
    mask = ctx.mask(ctx.task)
    for start in range(0, len(idx), batch_size):
        b = ctx.scenario.batch(idx[start:start + batch_size], ctx.task)
        yield b.x, b.t, b.y, mask
