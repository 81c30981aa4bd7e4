"""Where RTDMD's policy path puts a two-mode student's mode weights, against the tilted target (issue 16).

A one-step generator is distilled by DMD2 onto a mixture of two equal modes at x_0 = -2 and +2 (sd 0.3;
``tests/analytic.py``'s ``MixtureDistillation``: exact teacher velocity, online fake score, samples with
Gaussian noise of sd 0.1 so that they have log-probs), then trained for ``--steps`` more generator steps on
DMD plus ``policy_weight`` x Flow-GRPO's loss of the reward r(x) = x_0. Prints the rewarded mode's weight:

- the dmd recipe's form (DMD2's normalised direction, group-normalised advantages) for each ``--weights``;
- the reverse KL's own units (the raw DMD direction weighted (1 - t)^2 / t^2, advantages r - mean, policy
  weight beta / 2 for this 2-D toy), whose objective KL(q || p) - beta E_q[r] is minimised by the tilted
  mixture p exp(beta r): rewarded-mode weight e^{4 beta} / (1 + e^{4 beta}).

    python benchmarks/dmd/mode_tilt.py --steps 800
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from analytic import GaussianMixture, MixtureDistillation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.25])
    args = parser.parse_args()
    torch.manual_seed(0)
    mixture = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.3, 0.3])
    toy = MixtureDistillation(mixture, policy_std=0.1)
    toy.distil()
    print(f"distilled: rewarded-mode weight {toy.mode_weights()[1]:.3f} (teacher 0.500)")
    print("| form | policy weight | beta | rewarded-mode weight after | tilted target |")
    print("|---|---|---|---|---|")
    for weight in args.weights:
        run = copy.deepcopy(toy)
        torch.manual_seed(1)
        for _ in range(args.steps):
            run.generator_step(weight, reward=lambda x: x[:, 0])
        print(f"| recipe (normalised) | {weight:g} | none | {run.mode_weights()[1]:.3f} | — |", flush=True)
    for beta in args.betas:
        run = copy.deepcopy(toy)
        torch.manual_seed(1)
        for _ in range(args.steps):
            run.generator_step(beta / 2, reward=lambda x: x[:, 0], normalize_advantages=False, kl_units=True)
        target = math.exp(4 * beta) / (1 + math.exp(4 * beta))
        print(
            f"| reverse-KL units | {beta / 2:g} | {beta:g} | {run.mode_weights()[1]:.3f} | {target:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
