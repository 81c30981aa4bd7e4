"""Where a reward tilt puts a two-mode student's mode weights: the tilted target against the minimiser of the
objective DMD descends (issue 16).

A one-step generator is distilled by DMD2 onto a mixture of two equal modes at x_0 = -2 and +2 (sd 0.3;
``tests/analytic.py``'s ``MixtureDistillation``: exact teacher velocity, online fake score, samples with
Gaussian noise of sd 0.1 so that they have log-probs), then trained for ``--steps`` more generator steps on
DMD plus ``policy_weight`` x Flow-GRPO's loss of the reward r(x) = x_0. Prints the rewarded mode's weight:

- the dmd recipe's form (DMD2's normalised direction, group-normalised advantages) for each ``--weights``;
- the reverse KL's own units (the raw DMD direction weighted (1 - t)^2 / t^2, advantages r - mean, policy
  weight beta / 2 for this 2-D toy), for each ``--betas`` and ``--seeds``. That is gradient descent on
  F(q) = E_t KL(q_t || p_t) - beta E_q[r] over the flow-noised marginals, t ~ U(0.02, 0.98). Each row shows
  the tilted mixture p exp(beta r) / Z's weight e^{4 beta} / (1 + e^{4 beta}), which minimises
  KL(q || p) - beta E_q[r], and the minimiser of F over two-mode students (``noised_kl_minimiser``), which
  tilts further because noise shrinks every KL.

    python benchmarks/dmd/mode_tilt.py --steps 800

With several ``--seeds``, a last table gives each beta's mean over seeds of the second-half means, with a
95% Student-t interval over seeds.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from analytic import GaussianMixture, MixtureDistillation, noised_kl_minimiser  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--weights", type=float, nargs="*", default=[0.0, 0.1, 1.0, 10.0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    torch.manual_seed(0)
    mixture = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.3, 0.3])
    toy = MixtureDistillation(mixture, policy_std=0.1)
    toy.distil()
    with torch.no_grad():
        x, _ = toy.sample(20000)
    start = x[mixture.assign(x) == 1, 0].mean()
    print(
        f"distilled: rewarded-mode weight {toy.mode_weights()[1]:.3f} (teacher 0.500), its mean x_0 {start:.3f} (2)"
    )
    if args.weights:
        print("\n| form | policy weight | rewarded-mode weight after |\n|---|---|---|")
    for weight in args.weights:
        run = copy.deepcopy(toy)
        torch.manual_seed(1)
        for _ in range(args.steps):
            run.generator_step(weight, reward=lambda x: x[:, 0])
        print(f"| recipe (normalised) | {weight:g} | {run.mode_weights()[1]:.3f} |", flush=True)
    print(
        "\n| beta | seed | rewarded-mode weight after | its mean over the second half | its mode's mean moved by | tilted target: weight / shift"
        " | minimiser of F: weight / shift |\n|---|---|---|---|---|---|---|"
    )
    pooled = []
    for beta in args.betas:
        best = noised_kl_minimiser(beta)
        means = []
        for seed in args.seeds:
            run = copy.deepcopy(toy)
            torch.manual_seed(seed)
            late = []  # the rewarded weight every 50 steps of the second half
            for step in range(1, args.steps + 1):
                run.generator_step(
                    beta / 2, reward=lambda x: x[:, 0], normalize_advantages=False, kl_units=True
                )
                if step > args.steps // 2 and step % 50 == 0:
                    late.append(run.mode_weights()[1].item())
            with torch.no_grad():
                x, _ = run.sample(20000)
            rewarded = x[mixture.assign(x) == 1, 0]
            means.append(sum(late) / len(late))
            print(
                f"| {beta:g} | {seed} | {run.mode_weights()[1]:.3f} | {means[-1]:.3f} | {rewarded.mean() - start:+.3f} | "
                f"{best['tilted_weight']:.3f} / {best['tilted_shift']:+.3f} | "
                f"{best['weight']:.3f} / {best['shift_plus']:+.3f} |",
                flush=True,
            )
        pooled.append((beta, means, best))
    if len(args.seeds) > 1:
        print(
            "\n| beta | seeds | second-half mean over seeds [95% t interval] | tilted target | minimiser of F |"
        )
        print("|---|---|---|---|---|")
        for beta, means, best in pooled:
            low, mean, high = t_interval(means)
            print(
                f"| {beta:g} | {len(means)} | {mean:.3f} [{low:.3f}, {high:.3f}] | {best['tilted_weight']:.3f} | "
                f"{best['weight']:.3f} |"
            )


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """The mean and its two-sided 95% Student-t interval over ``values`` (one per seed), clipped to [0, 1]."""
    from scipy import stats

    mean = sum(values) / len(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return max(0.0, low), mean, min(1.0, high)


if __name__ == "__main__":
    main()
