"""One path from prompts to samples: encode -> per-sample seeded noise -> schedule -> plan -> rollout -> decode.

Training rollouts, training-time evaluation, the GenEval benchmark, ``flowalign sample`` and
``flowalign optimize-noise`` all generate through :func:`generate`. Every sample's randomness comes from
its own generators (:func:`seeded_generators`: one integer seed per sample), so a sample does not depend
on the batch, micro-batch or process it is drawn in, and ``micro_batch_size`` bounds the memory of a
generation call (the denoiser sees at most ``micro_batch_size`` samples per call, twice that with
classifier-free guidance) without changing what is generated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from flowalign.samplers.plan import SamplingPlan
from flowalign.samplers.rollout import Rollout, rollout
from flowalign.samplers.schedules import Schedule

__all__ = ["chunks", "generate", "seeded_generators"]


def seeded_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample, seeded with that sample's integer seed (the project's one seeding scheme:
    callers key the seeds, e.g. :func:`flowalign.eval.geneval.image_seed` or the training loop's
    ``(seed, iteration, purpose, sample)``)."""
    return [torch.Generator(device).manual_seed(int(s) % (2**63 - 1)) for s in seeds]


def chunks(n: int, size: int | None) -> list[slice]:
    """``range(n)`` in consecutive slices of at most ``size`` (one slice when ``size`` is None)."""
    if size is not None and size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None (no micro-batching), got {size}.")
    step = n if size is None or size >= n else size
    return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


def generate(
    model: Any,
    prompts: Sequence[str] | None,
    noise: Sequence[torch.Generator] | Tensor,
    *,
    steps: int,
    guidance: float,
    resolution: int | tuple[int, int] | None = None,
    plan: SamplingPlan | Callable[[Schedule], SamplingPlan] | None = None,
    sde_generators: Sequence[torch.Generator] | None = None,
    micro_batch_size: int | None = None,
    decode: bool = True,
    cond: Any = None,
    negative_prompts: str | Sequence[str] | None = None,
    levels: Sequence[float] | None = None,
    images: Tensor | None = None,
) -> Rollout:
    """Sample ``B = len(noise)`` images of ``prompts`` (``B`` strings; or pass ``cond``, already encoded)
    with a model adapter.

    Args:
        noise: one generator per sample (the sample's initial noise is its first draw), or the initial
            noise itself ``[B, *latent_shape]`` (noise optimization: gradients reach it).
        steps, guidance: sampling steps and guidance scale (CFG when the family uses it and ``guidance > 1``).
        resolution: image side in pixels, or ``(height, width)`` (default: the model's square side).
        plan: a :class:`SamplingPlan`, or a function of the schedule returning one (default: the ODE).
        sde_generators: one generator per sample for the stochastic steps' noise.
        micro_batch_size: samples per rollout call (None: all at once). The result is the same either way.
        decode: decode the final latents to images.
        cond: encoded prompts (``model.encode``) instead of ``prompts``.
        negative_prompts: for CFG, instead of the family's default unconditional input.
        levels: explicit noise levels of the ``steps`` steps (flow: the stock pipeline's ``sigmas=``;
            diffusion: its ``timesteps=``); None: the scheduler's ``steps``-step schedule.
        images: image-to-video models: one conditioning first frame per sample, ``[B, 3, H, W]`` in
            ``[0, 1]``; the video has their size unless ``resolution`` says otherwise.

    Gradients flow when grad mode is on and the plan's window lets them (reward backprop, noise
    optimization); a caller that needs bounded memory with gradients backpropagates per micro-batch itself.
    """
    n = len(noise)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"generate: steps must be an integer >= 1, got {steps!r}.")
    if not math.isfinite(guidance) or guidance < 1:
        raise ValueError(
            f"generate: guidance must be a finite number >= 1 (1: no guidance; CFG needs a scale above 1), got "
            f"{guidance!r}."
        )
    if cond is None:
        if prompts is None or len(prompts) != n:
            raise ValueError(
                f"generate: got noise for {n} samples but {0 if prompts is None else len(prompts)} prompts; pass "
                "one noise generator (or noise row) per sample; repeat a prompt for several images of it."
            )
        extra = {} if images is None else {"images": images}
        cond = model.encode(list(prompts), negative_prompts=negative_prompts, cfg=guidance > 1, **extra)
    elif images is not None:
        raise ValueError(
            "generate: cond already holds its conditioning images; pass images to model.encode, not here."
        )
    elif len(cond) != n:
        raise ValueError(f"generate: cond holds {len(cond)} samples but got noise for {n}.")
    if sde_generators is not None and len(sde_generators) != n:
        raise ValueError(f"generate: got {len(sde_generators)} SDE generators for {n} samples.")
    if resolution is None:
        resolution = model.resolution_of(cond)
    height, width = (resolution, resolution) if not isinstance(resolution, tuple) else resolution
    height, width = height or model.default_resolution, width or model.default_resolution
    shape = model.latent_shape(height, width)
    schedule = model.schedule(steps, shape) if levels is None else model.schedule(steps, shape, levels=levels)
    if plan is None:
        plan = SamplingPlan.ode(steps)
    elif callable(plan) and not isinstance(plan, SamplingPlan):
        plan = plan(schedule)
    parts = []
    for part in chunks(n, micro_batch_size):
        if isinstance(noise, Tensor):
            x_T = noise[part]
        else:
            x_T = model.initial_noise(part.stop - part.start, height, width, list(noise[part]))
        parts.append(
            rollout(
                model, cond.select(part) if part != slice(0, n) else cond, x_T, schedule, plan,
                guidance=guidance, generator=list(sde_generators[part]) if sde_generators is not None else None,
                decode=decode,
            )
        )  # fmt: skip
    return parts[0] if len(parts) == 1 else Rollout.cat(parts)
