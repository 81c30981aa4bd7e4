"""How noisy is an online recipe's gradient? Agreement of independent iterations' gradients at the base model.

For ``--iterations K`` iterations of CONFIG's recipe (each with its own prompts and noise, as training draws
them) the script records the iteration's whole gradient (the sum over its minibatches, before clipping) and
applies no update, so every gradient is taken at the same parameters. It reports

- ``cosine``: the mean cosine similarity of two iterations' gradients. For independent estimates
  ``g_k = mu + noise_k`` it estimates ``|mu|^2 / (|mu|^2 + tr(Sigma) / B)`` (``B`` samples per iteration), so
  ``r = cosine / (1 - cosine)`` is the signal-to-noise ratio of one iteration's gradient and ``B / r`` the
  number of samples one would need for ``r = 1`` (cosine 0.5);
- ``coordinate_snr``: the median over parameters of ``|mean_k g_k| / std_k g_k``, the quantity Adam's
  per-coordinate normalisation sees.

A recipe whose iterations barely agree moves the model mostly by noise, whatever its learning rate. Example
(one torch thread; the report goes to stdout and, with ``--out``, to a JSON file)::

    python benchmarks/shapes/grad_snr.py configs/grpo/shapes.yaml --iterations 10 --threads 1
    python benchmarks/shapes/grad_snr.py configs/nft/shapes.yaml --iterations 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch


def agreement(gradients: torch.Tensor) -> dict[str, float]:
    """Statistics of ``K >= 2`` gradient estimates ``[K, P]`` (see the module docstring): mean and spread of
    the pairwise cosines, the implied signal-to-noise ratio of one estimate, the median coordinate SNR."""
    if gradients.ndim != 2 or len(gradients) < 2:
        raise ValueError(f"need gradients [K >= 2, P], got {tuple(gradients.shape)}")
    unit = gradients / gradients.norm(dim=1, keepdim=True)
    k = len(gradients)
    pairwise = (unit @ unit.T)[~torch.eye(k, dtype=torch.bool)]
    cosine = pairwise.mean().item()
    return {
        "cosine": cosine,
        "cosine_std": pairwise.std().item(),
        "iteration_snr": cosine / (1 - cosine) if cosine < 1 else float("inf"),
        "coordinate_snr": (gradients.mean(0).abs() / gradients.std(0).clamp_min(1e-30)).median().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (cosines need two gradients)")

    from flowalign.config import load_config
    from flowalign.train import recipe as recipe_for
    from flowalign.train import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp(prefix="grad_snr_")
    overrides = [
        *args.overrides,
        f"train.steps={args.iterations}",
        f"train.output_dir={scratch}",
        "train.checkpoint_every=0",
        "train.log_with=[]",
        "train.progress=false",
        "eval.every=0",
    ]
    config = load_config(args.config, overrides)
    recipe = recipe_for(config.train.algorithm)
    gradients: list[torch.Tensor] = []
    samples: list[float] = []

    summed: dict[str, torch.Tensor] = {}

    def no_update(ctx) -> dict[str, float]:
        """Stands in for ``ctx.optimizer_step``: add the gradient to the iteration's sum, zero it, never step."""
        flat = torch.cat(
            [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in ctx.trainable]
        )
        summed["gradient"] = summed.get("gradient", 0) + flat.double().cpu()
        ctx.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": flat.norm().item(), "skipped_updates": 0.0}

    times: list[float] = []
    dropped: list[int] = []  # iterations without a usable gradient (none, zero or non-finite)

    class Measured(type(recipe)):
        def iteration(self, step: int) -> dict[str, float]:
            return measured_iteration(self, step)

    def measured_iteration(self, step: int) -> dict[str, float]:
        ctx = self.ctx
        ctx.optimizer_step = lambda: no_update(ctx)
        summed.pop("gradient", None)
        began = time.perf_counter()
        metrics = type(recipe).iteration(self, step)
        times.append(time.perf_counter() - began)
        gradient = summed.pop("gradient", None)
        norm = float("nan") if gradient is None else gradient.norm().item()
        if gradient is not None and math.isfinite(norm) and norm > 0:
            gradients.append(gradient)
            samples.append(
                metrics.get("informative_fraction", 1.0)
                * config.data.group_size
                * config.data.groups_per_step
            )
        else:
            dropped.append(step)
        print(
            f"iteration {step}: reward {metrics.get('reward', float('nan')):.3f}, gradient norm {norm:.3g}",
            flush=True,
        )
        return metrics

    run_training(config, Measured())
    seconds = sum(times) / len(times)
    if len(gradients) < 2:
        raise SystemExit(f"only {len(gradients)} iterations produced a gradient; nothing to compare.")
    stats = agreement(torch.stack(gradients))
    per_iteration = sum(samples) / len(samples)
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "iterations": len(gradients),
        "dropped_iterations": dropped,
        "samples_per_iteration": per_iteration,
        "seconds_per_iteration": seconds,
        **stats,
        "samples_for_snr_1": per_iteration / stats["iteration_snr"]
        if stats["iteration_snr"] > 0
        else float("inf"),
    }
    for key, value in report.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
