"""RanPAC: a frozen random projection with a ReLU after the pre-trained features, and a ridge-regression classifier
from the accumulated Gram matrix of the projected features (McDonnell et al. 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retain.errors import ConfigError
from retain.method import Method, param, register
from retain.methods.simplecil import no_rows, nothing_to_train, task_features
from retain.scenarios import TaskData

RIDGES = tuple(10.0 ** k for k in range(-8, 9))  # the λ grid of the authors' code: 1e-8 ... 1e8
CHUNK = 2048  # rows projected at a time (h is N x M)


def project(features: Tensor, W: Tensor) -> Tensor:
    """h = ReLU(f W): the random projection with its non-linearity, [N, D] x [D, M] -> [N, M]."""
    return F.relu(features.to(W.dtype) @ W)


def ridge_solution(G: Tensor, C: Tensor, ridge: float) -> Tensor:
    """W_o = (G + λI)⁻¹ C, [M, n_outputs]: the ridge regression of the one-hot targets on h (a linear solve, as the
    authors' code, not an inverse)."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + ridge * eye, C)


def select_ridge(G_fit: Tensor, C_fit: Tensor, H_val: Tensor, Y_val: Tensor,
                 ridges: tuple[float, ...] = RIDGES) -> tuple[float, list[float]]:
    """The λ of the grid whose ridge solution from (G_fit, C_fit) has the lowest mean squared error on the held-out
    rows (H_val, Y_val), and every λ's error. One eigendecomposition G_fit = V diag(e) Vᵀ serves the whole grid,
    W_o(λ) = V diag(1 / (e + λ)) Vᵀ C_fit: the same solutions as one solve per λ, at the cost of about one."""
    e, V = torch.linalg.eigh(G_fit)
    e = e.clamp(min=0)  # G is a Gram matrix (PSD); round-off can leave tiny negative eigenvalues
    VC, HV = V.T @ C_fit, H_val @ V
    errors = [float(((HV @ (VC / (e + lam).unsqueeze(1)) - Y_val) ** 2).mean()) for lam in ridges]
    best = min(range(len(ridges)), key=lambda i: (errors[i], i))  # ties: the smaller λ, as numpy's argmin
    return ridges[best], errors


@register("ranpac")
@dataclass
class RanPAC(Method):
    """RanPAC: h = ReLU(φ(x) W) with a frozen Gaussian W (D -> M); W_o = (G + λI)⁻¹ C from G = Σ h hᵀ, C = Σ h yᵀ.

    McDonnell, Gong, Parvaneh, Abbasnejad & van den Hengel, "RanPAC: Random Projections and Pre-trained Models
    for Continual Learning", NeurIPS 2023 (Algorithm 1; the authors' code github.com/RanPAC/RanPAC).

    Nothing is trained. At the first task's end W is drawn, i.i.d. N(0, 1) of shape [D, M] (``ctx.rng``), and
    kept. At each task's end, over the task's training rows (un-augmented, ``model.features`` in evaluation mode):
    h = ReLU(φ W); G += hᵀh [M, M] and C += hᵀY [M, n_outputs] with Y the one-hot targets in output space (both
    accumulated in float64); λ is chosen, as the authors' code does, on this task's rows only: shuffled, the
    first 80 % give G_fit, C_fit, and the λ of the grid 10⁻⁸ … 10⁸ whose W_o has the lowest mean squared error
    against the one-hot targets of the other 20 % wins (:func:`select_ridge`); then W_o = (G + λI)⁻¹ C over every
    task so far (:func:`ridge_solution`). Prediction: the scores h W_o (argmax over the evaluation mask).
    ``ridge`` set to a number skips the search.

    Hooks: ``task_data`` (no rows: no gradient step, ``train_s`` is the feature extraction and the solves),
    ``end_task`` (W, G, C, λ, W_o), ``forward`` (h W_o; before the first task ends, the untrained model's output).
    ``freeze = "all"`` (the features may be cached); ``parameters`` is empty.

    Deviations, each with its reason:

    * Phase 1 of the paper (first-session parameter-efficient tuning of the backbone, an adapter on CIFAR-100,
      SSF on ImageNet-R) is not done here: this is the paper's frozen-backbone variant (its "RanPAC without
      PETL" ablation; the authors' ``ncm`` + ``use_RP`` rows). ``aper``'s adapter/SSF code is the piece to add
      it with; the presets below say they are the frozen variant.
    * λ by one eigendecomposition instead of 17 solves (the same minimiser up to round-off; tested against the
      solves); the final W_o is the paper's solve. The accumulators are float64, the authors' float32: with
      M = 10⁴ the entries of G reach 10⁵ - 10⁷ and λ = 10⁻⁸ would vanish in float32.
    * PILOT's ``ranpac`` scores with its cosine head (h and the columns of W_o normalised); the authors' code and
      the paper use the plain h W_o, as here.
    * Domain-IL (the paper's CORe50 / DomainNet / CDDB runs) accumulates G and C over every task's rows for the
      shared outputs, as the authors' code; task-IL takes the same W_o under the task's mask.
    """

    M: int = param(10000, "random projection size (M; 10000 in the paper); 0: no projection, ridge on φ itself")
    ridge: float | None = param(None, "ridge λ; None: chosen per task on a 20 % hold-out over 1e-8 ... 1e8")
    holdout: float = param(0.2, "share of each task's rows held out to choose λ (the authors' 80:20 split)")

    modes = ("class", "task", "domain")
    needs_boundaries = True  # G, C and W_o are updated at each task's end
    freeze = "all"
    reads_backbone = False
    presets = {
        # the authors' args/cifar224_publish.csv row 4 (ncm, use_RP, M 10000: the frozen-backbone variant)
        "cifar100-b0inc10/class": {"M": 10000},
        # args/imagenetr_publish.csv row 4 (the same, ImageNet-R)
        "imagenet-r/class": {"M": 10000},
    }

    def __post_init__(self) -> None:
        if self.M < 0:
            raise ConfigError(f"ranpac: M must be >= 0, got {self.M}")
        if self.ridge is not None and not (self.ridge > 0 and math.isfinite(self.ridge)):
            raise ConfigError(f"ranpac: ridge must be a finite number > 0 (or none), got {self.ridge}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"ranpac: holdout must be in (0, 1), got {self.holdout}")
        self.W: Tensor | None = None  # [D, M] the random projection (None with M = 0: identity)
        self.G: Tensor | None = None  # [M, M] Σ h hᵀ, float64
        self.C: Tensor | None = None  # [M, n_outputs] Σ h yᵀ, float64
        self.Wo: Tensor | None = None  # [M, n_outputs] the ridge solution
        self.ridges: list[float] = []  # the λ chosen at each task's end

    def parameters(self, model: torch.nn.Module) -> list[Any]:
        return nothing_to_train()

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        return no_rows(data)

    def lift(self, features: Tensor) -> Tensor:
        """h of ``features`` [N, D] in float64 (φ itself when M = 0)."""
        features = features.flatten(1).double()
        return features if self.W is None else project(features, self.W.to(features.device))

    @torch.no_grad()
    def end_task(self, ctx: Any) -> None:
        feats, y = task_features(ctx)
        n_out, dev = ctx.scenario.n_outputs, feats.device
        if self.G is None:
            if self.M > 0:
                self.W = torch.randn(feats.shape[1], self.M, generator=ctx.rng, dtype=torch.float64).to(dev)
            m = self.M or feats.shape[1]
            self.G = torch.zeros(m, m, dtype=torch.float64, device=dev)
            self.C = torch.zeros(m, n_out, dtype=torch.float64, device=dev)
        order = torch.randperm(len(y), generator=ctx.rng).to(dev)
        feats, Y = feats[order], F.one_hot(y[order], n_out).double()
        n_fit = int(len(y) * (1 - self.holdout)) if self.ridge is None else len(y)
        G_fit, C_fit = torch.zeros_like(self.G), torch.zeros_like(self.C)
        held: list[Tensor] = []
        for i in range(0, len(y), CHUNK):
            h = self.lift(feats[i:i + CHUNK])
            Yc = Y[i:i + CHUNK]
            self.G += h.T @ h
            self.C += h.T @ Yc
            fit = max(0, min(len(h), n_fit - i))  # rows of this chunk among the first n_fit
            G_fit += h[:fit].T @ h[:fit]
            C_fit += h[:fit].T @ Yc[:fit]
            if fit < len(h):
                held.append(h[fit:])
        lam = self.ridge
        if lam is None:
            if not held or n_fit == 0:
                raise ConfigError(f"ranpac: task {ctx.task} has {len(y)} training rows, too few to hold out "
                                  f"{self.holdout:.0%} for choosing λ; give ridge=<λ>")
            lam, _ = select_ridge(G_fit, C_fit, torch.cat(held), Y[n_fit:])
        self.ridges.append(lam)
        self.Wo = ridge_solution(self.G, self.C, lam)

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        if self.Wo is None:
            return ctx.model(x)
        h = self.lift(ctx.model.features(x))
        return (h @ self.Wo.to(h.device)).float()
