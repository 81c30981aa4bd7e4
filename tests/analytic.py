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


class MixtureDistillation:
    """A one-step generator distilled onto a 2-D ``mixture`` by DMD2 against the mixture's exact velocity.

    The generator is an MLP from 2-D noise; with ``policy_std > 0`` a sample is its output plus Gaussian noise
    of that sd, so that it has a log-prob (RTDMD's policy path). The fake score is an MLP of ``(x_t, t)``
    trained online on the generator's detached samples, ``fake_steps`` per generator step; noise levels are
    U(0.02, 0.98) on the flow path. ``start`` places the untrained generator's output (its last bias).
    """

    def __init__(self, mixture: GaussianMixture, *, start=(0.0, 3.0), batch: int = 256, policy_std: float = 0.0,
                 fake_steps: int = 5, lr: float = 1e-3):  # fmt: skip
        from flowalign.algorithms.dmd import dmd_loss, fake_score_loss
        from flowalign.algorithms.grpo import grpo_loss

        self._dmd_loss, self._fake_score_loss, self._grpo_loss = dmd_loss, fake_score_loss, grpo_loss
        self.mixture, self.batch, self.policy_std, self.fake_steps = mixture, batch, policy_std, fake_steps
        self.student, self.fake = self._mlp(2, 128), self._mlp(3, 256)
        with torch.no_grad():
            self.student[-1].bias.copy_(torch.tensor(start))
        self.opt_student = torch.optim.Adam(self.student.parameters(), lr=lr)
        self.opt_fake = torch.optim.Adam(self.fake.parameters(), lr=lr)

    @staticmethod
    def _mlp(inputs: int, width: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(inputs, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )  # fmt: skip

    def sample(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        """``(x, mean)``: samples and the generator's outputs they are drawn around."""
        mean = self.student(torch.randn(n or self.batch, 2))
        if self.policy_std == 0:
            return mean, mean
        return mean + self.policy_std * torch.randn_like(mean), mean

    def _noised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t, noise = torch.rand(self.batch, 1) * 0.96 + 0.02, torch.randn(self.batch, 2)
        return (1 - t) * x + t * noise, t, noise

    def fake_step(self) -> None:
        with torch.no_grad():
            x, _ = self.sample()
        x_t, t, noise = self._noised(x)
        loss = self._fake_score_loss(self.fake(torch.cat([x_t, t], 1)), x, noise)
        self.opt_fake.zero_grad()
        loss.backward()
        self.opt_fake.step()

    def generator_step(self, policy_weight: float = 0.0, reward=None, normalize_advantages: bool = True,
                       kl_units: bool = False) -> None:  # fmt: skip
        """``fake_steps`` fake-score steps, then one generator step on DMD2's loss plus ``policy_weight`` x
        Flow-GRPO's loss of ``reward(x)`` (advantages ``r - mean``, divided by their std when
        ``normalize_advantages``; one update per rollout, so the ratio is 1). ``kl_units``: the raw DMD
        direction weighted by ``(1 - t)^2 / t^2``, the reverse KL's own gradient, instead of DMD2's
        normalised one."""
        for _ in range(self.fake_steps):
            self.fake_step()
        x, mean = self.sample()
        x_t, t, _ = self._noised(x)
        with torch.no_grad():
            real_x0 = x_t - t * self.mixture.velocity(x_t.double(), t[:, 0].double()).float()
            fake_x0 = x_t - t * self.fake(torch.cat([x_t, t], 1))
        if kl_units:
            loss = self._dmd_loss(x, real_x0, fake_x0, weight=((1 - t) ** 2 / t**2)[:, 0], normalize=False)
        else:
            loss = self._dmd_loss(x, real_x0, fake_x0)
        if policy_weight:
            rewards = reward(x.detach())
            advantages = rewards - rewards.mean()
            if normalize_advantages:
                advantages = advantages / (rewards.std() + 1e-4)
            log_prob = -((x.detach() - mean) ** 2).sum(1) / (2 * self.policy_std**2)
            policy, _ = self._grpo_loss(
                log_prob, log_prob.detach(), advantages, clip_range=1.0, adv_clip=None
            )
            loss = loss + policy_weight * policy
        self.opt_student.zero_grad()
        loss.backward()
        self.opt_student.step()

    def distil(self, warmup: int = 200, steps: int = 600) -> MixtureDistillation:
        """``warmup`` fake-score steps, then ``steps`` DMD2 generator steps; returns ``self``."""
        for _ in range(warmup):
            self.fake_step()
        for _ in range(steps):
            self.generator_step()
        return self

    def mode_weights(self, n: int = 20000) -> Tensor:
        with torch.no_grad():
            return self.mixture.mode_weights(self.student(torch.randn(n, 2)).double())


def noised_kl_minimiser(beta: float, *, separation: float = 2.0, std: float = 0.3, t_range=(0.02, 0.98),
                        levels: int = 96, grid: int = 4001) -> dict[str, float]:  # fmt: skip
    """Where DMD's objective with a linear tilt stops, for two equal modes: the minimiser over two-mode students.

    Teacher ``p = 0.5 N(-separation, std^2) + 0.5 N(+separation, std^2)`` on one axis (another axis with the
    same Gaussian in every mode cancels from the KL), reward ``r(x) = x``. DMD's raw direction weighted by
    ``(1 - t)^2 / t^2`` is the pathwise gradient of ``E_t KL(q_t || p_t)``, the KL of the flow-noised marginals
    ``x_t = (1 - t) x + t eps`` with ``t ~ U(t_range)`` (the analytic test of ``dmd_gradient``), so DMD with
    the tilt ``- beta E_q[r]`` descends ``F(q) = E_t KL(q_t || p_t) - beta E_q[r]``. Over students
    ``q = w N(+separation + d_+, std^2) + (1 - w) N(-separation + d_-, std^2)``, this returns the minimiser's
    rewarded-mode weight ``weight`` and shifts ``shift_plus`` / ``shift_minus``, next to the tilted target
    ``p exp(beta r) / Z``'s: ``tilted_weight = 1 / (1 + exp(-2 beta separation))`` and shift ``beta std^2``.
    ``E_t KL(q_t || p_t) < KL(q || p)`` (noise shrinks every KL), so the minimiser tilts further than the
    target. KLs by quadrature on ``grid`` points, ``E_t`` by the midpoint rule on ``levels`` levels."""
    dt = (t_range[1] - t_range[0]) / levels
    t = (t_range[0] + dt * (torch.arange(levels, dtype=torch.float64) + 0.5))[:, None]
    half = separation + 8 * std + 8
    x = torch.linspace(-half, half, grid, dtype=torch.float64)[None]
    dx = x[0, 1] - x[0, 0]
    var = (1 - t) ** 2 * std**2 + t**2

    def log_mixture(weight, mean_plus, mean_minus):
        def log_normal(mean):
            return -0.5 * (x - (1 - t) * mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)

        return torch.logaddexp(
            torch.log(weight) + log_normal(mean_plus), torch.log1p(-weight) + log_normal(mean_minus)
        )

    log_p = log_mixture(torch.tensor(0.5, dtype=torch.float64), separation, -separation)
    params = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # logit of w, d_+, d_-

    def objective():
        weight = torch.sigmoid(params[0])
        log_q = log_mixture(weight, separation + params[1], -separation + params[2])
        kl = (log_q.exp() * (log_q - log_p)).sum(1) * dx  # per level
        mean = weight * (separation + params[1]) + (1 - weight) * (-separation + params[2])
        return kl.mean() - beta * mean

    optimizer = torch.optim.LBFGS([params], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    params = params.detach()
    return {
        "weight": torch.sigmoid(params[0]).item(),
        "shift_plus": params[1].item(),
        "shift_minus": params[2].item(),
        "tilted_weight": 1 / (1 + math.exp(-2 * beta * separation)),
        "tilted_shift": beta * std**2,
    }
