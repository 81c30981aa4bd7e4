"""ReNO: reward-based noise optimization of a frozen one- or few-step generator (Eyring et al. 2024,
"ReNO: Enhancing One-step Text-to-Image Models through Reward-based Noise Optimization"; reference
``ExplainableML/ReNO``, ``training/trainer.py``).

For each sample, minimize ``L(z) = -sum_k w_k r_k(G(z)) + lambda (0.5 |z|^2 - (d - 1) log |z|)`` over the
initial noise ``z`` with SGD (lr 5, Nesterov momentum 0.9), gradient-norm clipping (0.1), ``N`` = 50
iterations, and return the best iterate by reward. The regularizer is the negative log-density of the
chi distribution of ``|z|`` for ``z ~ N(0, I_d)`` up to a constant: it keeps ``|z|`` near ``sqrt(d - 1)``,
where the generator was trained. As the reference, the last iteration only evaluates.
Deviation: the reference optimizes one prompt at a time; here a batch of prompts is optimized together,
with the norm, the clipping and the best-iterate choice per sample, so each sample follows exactly the
trajectory it would follow alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["NoiseOptResult", "chi_regularizer", "optimize_noise"]


def chi_regularizer(z: Tensor) -> Tensor:
    """``[B]`` ``0.5 |z_b|^2 - (d - 1) log |z_b|`` with ``d`` the number of elements of one sample."""
    d = z[0].numel()
    norm = z.flatten(1).float().norm(dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)


@dataclass
class NoiseOptResult:
    """Attributes:
    best_noise: ``[B, *S]`` the best iterate per sample; best_images: ``[B, 3, H, W]`` its images.
    best_rewards: ``[B]`` the weighted reward of the best iterate; initial_images / initial_rewards: iteration 0.
    trace: per iteration, ``{"reward": [B], "loss": [B], "norm": [B]}`` lists of floats.
    best_iteration: ``[B]`` the iteration each best iterate came from.
    snapshots: iteration count -> ``[B, 3, H, W]`` best images so far (see ``snapshot_at``).
    """

    best_noise: Tensor
    best_images: Tensor
    best_rewards: Tensor
    initial_images: Tensor
    initial_rewards: Tensor
    best_iteration: Tensor
    trace: list[dict[str, list[float]]] = field(default_factory=list)
    snapshots: dict[int, Tensor] = field(default_factory=dict)


def optimize_noise(
    generate: Callable[[Tensor], Tensor],
    reward_fn: Callable[[Tensor], Tensor],
    noise: Tensor,
    *,
    iterations: int = 50,
    lr: float = 5.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    grad_clip: float = 0.1,
    reg_weight: float = 0.01,
    snapshot_at: tuple[int, ...] = (),
    progress: bool = True,
) -> NoiseOptResult:
    """Optimize ``noise`` ``[B, *S]`` so that ``reward_fn(generate(noise))`` (``[B]``, higher is better) grows.

    ``generate`` maps noise to images in ``[0, 1]`` differentiably (e.g. a rollout whose gradient window
    covers every step of a few-step model, then decode). ``snapshot_at``: iteration counts ``k`` at which to
    keep the best images among the first ``k`` evaluated iterates (``result.snapshots[k]``; 0 = initial).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}.")
    z = noise.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.SGD([z], lr=lr, momentum=momentum, nesterov=nesterov)
    best_reward = torch.full((z.shape[0],), -float("inf"), device=z.device)
    best_noise, best_images = z.detach().clone(), None
    best_iteration = torch.zeros(z.shape[0], dtype=torch.long)
    initial_images = initial_rewards = None
    trace = []
    snapshots: dict[int, Tensor] = {}
    for iteration in tqdm(range(iterations), desc="noise optimization", disable=not progress, leave=False):
        optimizer.zero_grad(set_to_none=True)
        images = generate(z)
        reward = reward_fn(images)
        regularizer = chi_regularizer(z)
        loss = -reward + reg_weight * regularizer
        with torch.no_grad():
            if initial_images is None:
                initial_images, initial_rewards = images.detach().clone(), reward.detach().clone()
                best_images = images.detach().clone()
            better = reward.detach() > best_reward
            best_reward = torch.where(better, reward.detach(), best_reward)
            best_noise[better] = z.detach()[better]
            best_images[better] = images.detach()[better]
            best_iteration[better.cpu()] = iteration
            if iteration == 0 and 0 in snapshot_at:
                snapshots[0] = initial_images.clone()
            if iteration + 1 in snapshot_at:
                snapshots[iteration + 1] = best_images.clone()
        trace.append(
            {
                "reward": reward.detach().cpu().tolist(),
                "loss": loss.detach().cpu().tolist(),
                "norm": z.detach().flatten(1).norm(dim=1).cpu().tolist(),
            }
        )
        if iteration == iterations - 1:
            break
        loss.sum().backward()
        with torch.no_grad():  # per-sample gradient-norm clipping
            norms = z.grad.flatten(1).norm(dim=1).clamp(min=1e-12)
            scale = (grad_clip / norms).clamp(max=1.0)
            z.grad.mul_(scale.view(-1, *([1] * (z.ndim - 1))))
        optimizer.step()
    return NoiseOptResult(
        best_noise,
        best_images,
        best_reward,
        initial_images,
        initial_rewards,
        best_iteration,
        trace,
        snapshots,
    )
