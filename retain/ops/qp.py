"""GEM's quadratic program: project a gradient onto the cone where it conflicts with no memory gradient.

Lopez-Paz & Ranzato (2017), eq. 10-11. The primal, over the projected gradient g̃,

    min_g̃ ½ ||g − g̃||²   s.t.   G g̃ ≥ 0          (G: one row per earlier task, its memory gradient g_k)

has far fewer constraints than unknowns, so it is solved in the dual, over v ∈ R^(rows of G):

    min_v ½ vᵀ G Gᵀ v + gᵀ Gᵀ v   s.t.   v ≥ γ,          then   g̃ = Gᵀ v + g

where γ ≥ 0 is the paper's margin ("memory strength"): γ = 0 gives the closest vector to g that satisfies every
constraint; γ > 0 biases the update toward improving the earlier tasks. The dual is solved exactly with quadprog
(Goldfarb-Idnani), which must be installed: ``pip install quadprog`` (:func:`require_quadprog` checks it up front).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from retain.errors import ConfigError


def require_quadprog() -> None:
    """Raise a :class:`ConfigError` naming the fix when the QP solver is not installed."""
    try:
        import quadprog  # noqa: F401
    except ImportError:
        raise ConfigError("gem needs the quadprog package for its quadratic program; install it with "
                          "pip install quadprog") from None


def project_gem(g: Tensor, G: Tensor, margin: float = 0.0, eps: float = 1e-10) -> Tensor:
    """The GEM projection of ``g`` [P] given memory gradients ``G`` [K, P] (returns ``g`` itself when
    ``G g ≥ 0`` already holds). The dual's K x K matrix is formed in float64 and solved as is; only when it is
    singular (linearly dependent memory gradients) is a ridge added, starting at ``eps`` relative to its largest
    diagonal entry."""
    import quadprog

    if G.shape[0] == 0 or bool((G @ g >= 0).all()):
        return g
    Gd, gd = G.double(), g.double()
    P = (Gd @ Gd.T).cpu().numpy()
    P = 0.5 * (P + P.T)
    q = -(Gd @ gd).cpu().numpy()  # quadprog minimises ½ vᵀPv − qᵀv
    C = np.eye(len(P))
    h = np.full(len(P), float(margin))
    scale = max(float(np.diag(P).max()), 1e-30)
    ridge = 0.0
    while True:  # exact when G Gᵀ is positive definite; else the smallest ridge that makes it so
        try:
            v = quadprog.solve_qp(P + np.eye(len(P)) * ridge * scale, q, C, h)[0]
            break
        except ValueError:
            if ridge >= 1e-2:
                raise
            ridge = eps if ridge == 0.0 else ridge * 100
    return (torch.from_numpy(v).to(Gd) @ Gd + gd).to(g.dtype)


def project_agem(g: Tensor, g_ref: Tensor) -> Tensor:
    """A-GEM (Chaudhry et al. 2019, eq. 11): ``g`` if ⟨g, g_ref⟩ ≥ 0, else
    ``g − (gᵀ g_ref / g_refᵀ g_ref) g_ref``, the closest vector to g with ⟨g̃, g_ref⟩ = 0."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - (dot / torch.dot(g_ref, g_ref).clamp_min(1e-30)) * g_ref


def flat_grad(params: list[torch.nn.Parameter]) -> Tensor:
    """The parameters' ``.grad`` as one vector (zeros where a gradient is missing)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def write_grad(params: list[torch.nn.Parameter], flat: Tensor) -> None:
    """Copy the vector ``flat`` back into the parameters' ``.grad``."""
    start = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(flat[start:start + n].view_as(p))
        start += n
