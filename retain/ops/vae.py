"""A fully connected variational auto-encoder: the generator of deep generative replay (DGR).

Sizes follow van de Ven et al. (arXiv 1809.10635): ``fc_layers`` hidden layers of ``fc_units`` ReLU units in the
encoder and mirrored in the decoder, a ``z_dim``-dimensional Gaussian latent with a standard-normal prior.

The loss is the negative ELBO per sample, both terms divided by the number of input elements (as van de Ven's
code does, so its scale does not depend on the image size):

    L(x) = [ recon(x, x̂) + KL(q(z|x) || N(0, I)) ] / D,   KL = -½ Σ_k (1 + log σ_k² − μ_k² − σ_k²)

``recon`` is the Bernoulli negative log-likelihood (binary cross-entropy summed over the D inputs) when the inputs
lie in [0, 1] (``likelihood="bernoulli"``, decoder output through a sigmoid), or the Gaussian one with unit variance
(half the summed squared error, linear decoder output) for inputs outside [0, 1] (``likelihood="gaussian"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VAE(nn.Module):
    """``encode`` / ``decode`` / ``sample`` / ``loss`` over inputs of shape ``input_shape`` (flattened inside)."""

    def __init__(self, input_shape: tuple[int, ...], fc_units: int = 400, fc_layers: int = 2, z_dim: int = 100,
                 likelihood: str = "bernoulli"):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be bernoulli or gaussian, got {likelihood!r}")
        self.input_shape = tuple(input_shape)
        self.input_dim = math.prod(self.input_shape)
        self.z_dim = z_dim
        self.likelihood = likelihood
        enc, dec = [], []
        sizes = [self.input_dim] + [fc_units] * fc_layers
        for a, b in zip(sizes, sizes[1:]):
            enc += [nn.Linear(a, b), nn.ReLU()]
        back = [z_dim] + [fc_units] * fc_layers
        for a, b in zip(back, back[1:]):
            dec += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*enc)
        self.mu = nn.Linear(sizes[-1], z_dim)
        self.logvar = nn.Linear(sizes[-1], z_dim)
        self.decoder = nn.Sequential(*dec, nn.Linear(back[-1], self.input_dim))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x.reshape(len(x), -1))
        return self.mu(h), self.logvar(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        """Decoder output before the likelihood's link function, flattened ``[B, D]``."""
        return self.decoder(z)

    def decode(self, z: Tensor) -> Tensor:
        """Mean of p(x|z), in the input's shape."""
        out = self.decode_logits(z)
        if self.likelihood == "bernoulli":
            out = torch.sigmoid(out)
        return out.view(len(z), *self.input_shape)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` inputs decoded from z ~ N(0, I) (drawn on the CPU from ``generator`` for reproducibility)."""
        device = self.mu.weight.device
        z = torch.randn(n, self.z_dim, generator=generator).to(device)
        return self.decode(z)

    def loss(self, x: Tensor, generator: torch.Generator | None = None, reduction: str = "mean") -> Tensor:
        """Negative ELBO per input element (see the module docstring); ``reduction`` = mean or none (per row)."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator).to(mu.device)
        z = mu + eps * torch.exp(0.5 * logvar)
        flat = x.reshape(len(x), -1)
        recon = self.reconstruction(self.decode_logits(z), flat)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        per_row = (recon + kl) / self.input_dim
        return per_row.mean() if reduction == "mean" else per_row

    def reconstruction(self, logits: Tensor, flat: Tensor) -> Tensor:
        """Negative log-likelihood of ``flat`` under p(x|z) with decoder output ``logits``, summed per row."""
        if self.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(logits, flat, reduction="none").sum(1)
        return 0.5 * (logits - flat).pow(2).sum(1)

    @torch.no_grad()
    def reconstruction_error(self, x: Tensor) -> Tensor:
        """Per-row negative log-likelihood of x under the decoding of its posterior mean, divided by D."""
        mu, _ = self.encode(x)
        return self.reconstruction(self.decode_logits(mu), x.reshape(len(x), -1)) / self.input_dim
