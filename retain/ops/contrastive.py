"""Contrastive losses shared by methods (X-DER's consistency term, SCR's replay loss)."""

from __future__ import annotations

import torch
from torch import Tensor


def supcon(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of ``features`` [N, views, D] (L2-normalised): for every
    anchor view, minus the mean log-probability of its positives (same label, itself excluded) among all other
    views at ``temperature``; mean over a row's views, then over rows."""
    n, v, _ = features.shape
    f = features.transpose(0, 1).reshape(n * v, -1)  # view-major, as SupCon's contrast_feature
    sim = f @ f.t() / temperature
    sim = sim - sim.max(1, keepdim=True).values.detach()
    lab = labels.repeat(v)
    pos = (lab.unsqueeze(0) == lab.unsqueeze(1)).float()
    not_self = 1 - torch.eye(n * v, device=f.device, dtype=f.dtype)
    pos = pos * not_self
    log_prob = sim - torch.log((sim.exp() * not_self).sum(1, keepdim=True))
    per_anchor = -(pos * log_prob).sum(1) / pos.sum(1)
    return per_anchor.view(v, n).mean(0).mean()
