"""Pref-GRPO's groupwise win-rate reward (Wang et al. 2025, "Pref-GRPO: Pairwise Preference Reward-based
GRPO for Stable Text-to-Image Reinforcement Learning"; repository CodeGoat24/Pref-GRPO,
``fastvideo/rewards/unifiedreward_think.py``, ``_pairwise_win_rate``), the ``winrate`` reward.

Within a group of ``G`` samples of one prompt, every unordered pair ``(i, j), i < j`` is compared once:
the winner gets 1, a tie gives each 0.5, and

    win_rate_i = wins_i / (G - 1)        in [0, 1]

(Pref-GRPO divides by each sample's number of comparisons, which is ``G - 1``; a group of one sample has
no comparison and, as in Pref-GRPO, gets 0 -- ``details["comparisons"]`` shows it). The comparison comes
from

- a *pointwise* reward (any :class:`~rewards.base.Reward`): ``i`` wins when its score exceeds ``j``'s by
  more than ``tie_margin``, a tie when ``|s_i - s_j| <= tie_margin``; or
- a *pairwise judge* (:class:`PairwiseJudge`): ``judge.compare(images_a, images_b, prompts, metadata)``
  returns for each pair the probability in [0, 1] that ``a`` is better (1 = a wins, 0 = b wins, 0.5 = tie,
  e.g. Pref-GRPO's UnifiedReward-Think verdicts); ``symmetric=True`` also asks with the order swapped and
  averages ``p(a, b)`` with ``1 - p(b, a)`` against position bias. Soft probabilities count fractionally.

Not differentiable. Pref-GRPO rounds win rates to 3 decimals; this does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, RewardOutput

__all__ = ["PairwiseJudge", "WinRateReward", "win_rates", "win_rates_from_scores"]


class PairwiseJudge:
    """A judge of pairs: subclass and implement :meth:`compare`."""

    name = "pairwise-judge"

    def compare(
        self, images_a: Tensor, images_b: Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> Tensor:
        """``[P]`` probabilities in [0, 1] that ``images_a[p]`` is better than ``images_b[p]`` for ``prompts[p]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement compare")

    def to(self, device: str | torch.device) -> PairwiseJudge:
        return self


def win_rates(n: int, pairs: list[tuple[int, int]], p_first_wins: Tensor) -> Tensor:
    """Win rate of each of ``n`` samples given ``pairs[k] = (i, j)`` and ``P(i beats j) = p_first_wins[k]``."""
    wins = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    for (i, j), p in zip(pairs, p_first_wins.double().tolist()):
        wins[i] += p
        wins[j] += 1 - p
        counts[i] += 1
        counts[j] += 1
    return torch.where(counts > 0, wins / counts.clamp_min(1), torch.zeros_like(wins)).float()


def win_rates_from_scores(scores: Tensor, tie_margin: float = 0.0) -> Tensor:
    """Win rates of pointwise ``scores [G]`` within one group (ties: ``|s_i - s_j| <= tie_margin``)."""
    n = scores.shape[0]
    pairs = list(combinations(range(n), 2))
    if not pairs:
        return torch.zeros(n)
    s = scores.detach().double()
    diff = torch.stack([s[i] - s[j] for i, j in pairs])
    outcome = torch.where(diff.abs() <= tie_margin, 0.5, (diff > 0).double())
    return win_rates(n, pairs, outcome)


class WinRateReward(Reward):
    """Groupwise win rate of each sample against the rest of its group (see the module docstring).

    Args:
        judge: a pointwise :class:`Reward`, a :class:`PairwiseJudge`, or a reward name/dotted path for
            :func:`rewards.load_reward` (then ``judge_kwargs`` are its constructor arguments).
        tie_margin: pointwise scores closer than this are a tie.
        symmetric: ask a pairwise judge in both orders and average.
    """

    name = "winrate"
    differentiable = False
    groupwise = True

    def __init__(
        self,
        judge: Reward | PairwiseJudge | str = "compressibility",
        judge_kwargs: Mapping[str, Any] | None = None,
        tie_margin: float = 0.0,
        symmetric: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if isinstance(judge, str):
            from rewards.registry import load_reward

            judge = load_reward(judge, **dict(judge_kwargs or {}))
        elif judge_kwargs:
            raise ValueError(f"{self.name}: judge_kwargs are for a judge given by name, not an object.")
        if not isinstance(judge, (Reward, PairwiseJudge)):
            raise TypeError(
                f"{self.name}: judge must be a rewards.Reward, a PairwiseJudge or a reward name, got "
                f"{type(judge).__name__}."
            )
        if isinstance(judge, Reward) and judge.groupwise:
            raise ValueError(
                f"{self.name}: the judge {judge.name!r} is itself groupwise; use a pointwise reward."
            )
        if tie_margin < 0:
            raise ValueError(f"{self.name}: tie_margin must be >= 0, got {tie_margin}.")
        self.judge = judge
        self.tie_margin = float(tie_margin)
        self.symmetric = bool(symmetric)

    def to(self, device: str | torch.device) -> WinRateReward:
        super().to(device)
        self.judge.to(device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return self.judge.modules() if isinstance(self.judge, Reward) else []

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        n = images.shape[0]
        if isinstance(self.judge, Reward):
            judged = self.judge(images, prompts, metadata).scores
            rates = win_rates_from_scores(judged, self.tie_margin)
            details: dict[str, Any] = {"judge_score": judged.detach().float()}
        else:
            pairs = list(combinations(range(n), 2))
            if pairs:
                first = torch.tensor([i for i, _ in pairs], device=images.device)
                second = torch.tensor([j for _, j in pairs], device=images.device)
                pair_prompts = [prompts[i] for i, _ in pairs]
                pair_meta = [metadata[i] for i, _ in pairs]
                p = self._compare(images[first], images[second], pair_prompts, pair_meta)
                if self.symmetric:
                    p = (p + 1 - self._compare(images[second], images[first], pair_prompts, pair_meta)) / 2
                rates = win_rates(n, pairs, p)
            else:
                rates = torch.zeros(n)
            details = {}
        details["comparisons"] = torch.full((n,), float(n - 1))
        return RewardOutput(rates.float(), details=details)

    def _compare(self, a: Tensor, b: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> Tensor:
        assert isinstance(self.judge, PairwiseJudge)
        p = torch.as_tensor(self.judge.compare(a, b, prompts, metadata)).detach().float().cpu()
        if p.shape != (len(prompts),):
            raise RuntimeError(
                f"{self.name}: judge {self.judge.name!r} returned shape {tuple(p.shape)} for {len(prompts)} pairs; "
                "compare() must return one probability per pair."
            )
        if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
            raise RuntimeError(
                f"{self.name}: judge {self.judge.name!r} returned values outside [0, 1] ({p.tolist()}); compare() "
                "must return P(a better than b)."
            )
        return p
