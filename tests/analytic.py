"""Closed-form denoisers of a Gaussian mixture, for tests that know the exact answer.

For data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)``:

- flow (``x = (1 - sigma) x0 + sigma eps``): given component k, ``x ~ N((1 - sigma) mu_k, c_k I)`` with
  ``c_k = (1 - sigma)^2 s_k^2 + sigma^2``, ``E_k[x0 | x] = mu_k + (1 - sigma) s_k^2 / c_k (x - (1 - sigma) mu_k)``,
  and the exact velocity is ``v(x) = (x - E[x0 | x]) / sigma``.
- diffusion (``x = sqrt(a) x0 + sqrt(1 - a) eps``): ``c_k = a s_k^2 + 1 - a``,
  ``E_k[eps | x] = sqrt(1 - a) / c_k (x - sqrt(a) mu_k)``.
Responsibilities ``w_k(x)`` weight the per-component answers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianMixture:
    def __init__(self, weights, means, stds):
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.means = torch.tensor(means, dtype=torch.float64)  # [K, D]
        self.stds = torch.tensor(stds, dtype=torch.float64)  # [K]
        self.dim = self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * eps

    def assign(self, x: Tensor) -> Tensor:
        """Index of the nearest mode (modes are far apart relative to their spread)."""
        return torch.cdist(x.double(), self.means).argmin(dim=1)

    def mode_weights(self, x: Tensor) -> Tensor:
        return torch.bincount(self.assign(x), minlength=len(self.weights)).double() / x.shape[0]

    def moments(self) -> tuple[Tensor, Tensor]:
        mean = (self.weights[:, None] * self.means).sum(0)
        second = sum(
            w * (torch.outer(m, m) + s**2 * torch.eye(self.dim, dtype=torch.float64))
            for w, m, s in zip(self.weights, self.means, self.stds)
        )
        return mean, second - torch.outer(mean, mean)

    def _posterior(self, x: Tensor, scale: Tensor, noise_var: Tensor):
        """Responsibilities for ``x ~ N(scale mu_k, (scale^2 s_k^2 + noise_var) I)``; scale/noise_var: [B]."""
        x = x.double()
        c = scale[:, None] ** 2 * self.stds[None] ** 2 + noise_var[:, None]  # [B, K]
        diff = x[:, None, :] - scale[:, None, None] * self.means[None]  # [B, K, D]
        log_w = (
            torch.log(self.weights)[None]
            - 0.5 * (diff**2).sum(-1) / c
            - 0.5 * self.dim * torch.log(2 * math.pi * c)
        )
        return torch.softmax(log_w, dim=1), c, diff

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.double().expand(x.shape[0])
        w, c, diff = self._posterior(x, 1 - sigma, sigma**2)
        x0_k = self.means[None] + ((1 - sigma)[:, None] * self.stds[None] ** 2 / c)[..., None] * diff
        x0 = (w[..., None] * x0_k).sum(1)
        return ((x.double() - x0) / sigma[:, None]).float()

    def epsilon(self, x: Tensor, alpha_bar: Tensor) -> Tensor:
        a = alpha_bar.double().expand(x.shape[0])
        w, c, diff = self._posterior(x, a.sqrt(), 1 - a)
        eps_k = ((1 - a).sqrt()[:, None] / c)[..., None] * diff
        return (w[..., None] * eps_k).sum(1).float()


class MixtureFlowModel:
    """Denoiser protocol over the exact mixture velocity; the model time is ``1000 sigma``."""

    kind = "flow"
    prediction_type = "flow"

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture

    def predict(self, x_t, timestep, cond=None, guidance=1.0):
        # v = (x - E[x0|x]) / sigma is 0/0 at sigma = 0 (the clean end, where inversion starts); its limit is
        # approached at a tiny sigma.
        return self.mixture.velocity(x_t, (timestep / 1000).clamp(min=1e-5))

    def decode(self, latents):
        return latents


class MixtureEpsModel:
    """Denoiser protocol over the exact mixture epsilon for a DDPM ``alphas_cumprod`` table."""

    kind = "diffusion"
    prediction_type = "epsilon"

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: Tensor):
        self.mixture = mixture
        self.alphas_cumprod = alphas_cumprod

    def predict(self, x_t, timestep, cond=None, guidance=1.0):
        return self.mixture.epsilon(x_t, self.alphas_cumprod[timestep.long()])

    def decode(self, latents):
        return latents
