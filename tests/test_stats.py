"""Confidence intervals and paired comparisons of benchmarks (flowalign.eval.stats): exact values, and
coverage / false-alarm / power in simulations with known per-prompt success probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flowalign.eval.stats import (
    Verdicts,
    benchmark_stats,
    mcnemar_exact,
    paired_comparison,
    pooled_gain,
    wilson_interval,
)

# The shapes test split's prompts per task, and the default balanced images per prompt (>= 4, >= 96 a task).
SPLIT = {"single_object": 2, "two_object": 3, "counting": 6, "colors": 12, "position": 12, "color_attr": 93}
RESAMPLES = 500  # enough for the simulations' 95% bounds, fast enough for 200 benchmarks


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        # By hand, z^2 = 3.8415: 0/10 upper = z^2 / (n + z^2) = 0.27753; 5/10 = (6.92 -+ 1.96 sqrt(2.5 + 0.96))
        # / 13.84. 81/263, 15/148, 0/20, 1/29: Newcombe's (1998, Stat. Med. 17:857) examples, method 3.
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_exact_values(correct, n, low, high):
    interval = wilson_interval(correct, n)
    assert interval.estimate == correct / n
    assert interval.low == pytest.approx(low, abs=5e-5) and interval.high == pytest.approx(high, abs=5e-5)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="correct=11, n=10"):
        wilson_interval(11, 10)


def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 10) == 2 / 1024 and mcnemar_exact(10, 0) == 2 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


def _layout(images_per_prompt=None):
    """Per-image prompt index and task for the shapes test split with balanced image counts."""
    index, task = [], []
    for tag, prompts in SPLIT.items():
        n = images_per_prompt or max(4, math.ceil(96 / prompts))
        for _ in range(prompts):
            index += [len(set(index))] * n
            task += [tag] * n
    return np.array(index), np.array(task, dtype=object)


def _probabilities(index, rng, low=0.4, high=0.9):
    """Per-image success probability: one per prompt, uniform in [low, high]."""
    return rng.uniform(low, high, size=index.max() + 1)[index]


def _truth(p, task):
    per_task = {tag: p[task == tag].mean() for tag in SPLIT}
    return per_task, float(np.mean(list(per_task.values())))


def test_intervals_cover_the_true_accuracy_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    index, task = _layout()
    p = _probabilities(index, rng)
    per_task, overall = _truth(p, task)
    covered_overall = covered_task = 0
    for k in range(200):
        verdicts = Verdicts.from_images(index, task, rng.random(len(p)) < p)
        stats = benchmark_stats(verdicts, n_resamples=RESAMPLES, seed=k)
        covered_overall += stats.overall.low <= overall <= stats.overall.high
        counting = stats.tasks["counting"].accuracy
        covered_task += counting.low <= per_task["counting"] <= counting.high
    assert 0.92 <= covered_overall / 200 <= 0.98
    assert 0.92 <= covered_task / 200 <= 0.98


def test_benchmark_stats_reports_the_per_task_layout():
    index, task = _layout()
    stats = benchmark_stats(Verdicts.from_images(index, task, np.ones(len(index), bool)), n_resamples=200)
    assert {tag: t.images_per_prompt for tag, t in stats.tasks.items()} == {
        "single_object": (48, 48), "two_object": (32, 32), "counting": (16, 16), "colors": (8, 8),
        "position": (8, 8), "color_attr": (4, 4),
    }  # fmt: skip
    assert [t.images for t in stats.tasks.values()] == [96, 96, 96, 96, 96, 372]
    assert stats.overall.estimate == stats.overall.low == stats.overall.high == 1.0
    assert "Wilson" in stats.method and "bootstrap" in stats.method


def test_single_image_prompts_still_give_an_interval():
    # One image per prompt has no within-prompt variance; a task's single-image prompts are pooled.
    index, task = _layout(images_per_prompt=1)
    rng = np.random.default_rng(1)
    stats = benchmark_stats(Verdicts.from_images(index, task, rng.random(len(index)) < 0.6), n_resamples=200)
    assert stats.overall.high - stats.overall.low > 0.05


def _model(index, task, u, p, planted=None):
    """A model's verdicts on per-image uniforms ``u`` (the noise): correct when ``u < p + planted[task]``;
    models judged on the same ``u`` are paired."""
    shift = np.array([(planted or {}).get(t, 0.0) for t in task])
    return Verdicts.from_images(index, task, u < p + shift)


def test_paired_comparison_detects_a_planted_difference():
    rng = np.random.default_rng(2)
    index, task = _layout()
    p = _probabilities(index, rng)
    u = rng.random(len(p))
    base, tuned = _model(index, task, u, p), _model(index, task, u, p, {"counting": 0.1})
    diff = paired_comparison(base, tuned)
    counting = diff.tasks["counting"]
    assert counting.difference.estimate == pytest.approx(0.1, abs=0.05)
    assert counting.difference.excludes_zero and counting.difference.low > 0 and counting.mcnemar_p < 0.05
    assert counting.a_only == 0 and counting.b_only > 0
    assert diff.overall.excludes_zero and diff.overall.low > 0
    for tag in SPLIT.keys() - {"counting"}:
        assert not diff.tasks[tag].difference.excludes_zero and diff.tasks[tag].mcnemar_p == 1.0


def test_identical_models_differ_by_exactly_zero():
    rng = np.random.default_rng(3)
    index, task = _layout()
    verdicts = Verdicts.from_images(index, task, rng.random(len(index)) < 0.5)
    diff = paired_comparison(verdicts, verdicts)
    for interval in (diff.overall, diff.image_accuracy, *(t.difference for t in diff.tasks.values())):
        assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
        assert not interval.excludes_zero
    assert all(t.mcnemar_p == 1.0 for t in diff.tasks.values())


def test_two_draws_of_the_same_model_are_rarely_called_different():
    rng = np.random.default_rng(4)
    index, task = _layout()
    p = _probabilities(index, rng)
    flagged = flagged_task = 0
    for k in range(200):
        a = Verdicts.from_images(index, task, rng.random(len(p)) < p)
        b = Verdicts.from_images(index, task, rng.random(len(p)) < p)
        diff = paired_comparison(a, b, n_resamples=RESAMPLES, seed=k)
        flagged += diff.overall.excludes_zero
        flagged_task += diff.tasks["color_attr"].difference.excludes_zero
    assert flagged / 200 <= 0.08 and flagged_task / 200 <= 0.08


def test_pooled_gain_averages_seeds_and_resamples_them_jointly():
    rng = np.random.default_rng(5)
    index, task = _layout()
    p = _probabilities(index, rng)
    u = rng.random(len(p))  # one base benchmark, shared by two training seeds
    base, tuned, other = (_model(index, task, u, p, {"position": d}) for d in (0.0, 0.2, 0.1))
    single = pooled_gain([(base, tuned)])
    assert single.overall == paired_comparison(base, tuned).overall  # one seed: the paired comparison
    pooled = pooled_gain([(base, tuned), (base, other)])
    seeds = [paired_comparison(base, t).overall.estimate for t in (tuned, other)]
    assert pooled.per_seed == pytest.approx(seeds)
    assert pooled.overall.estimate == pytest.approx(np.mean(seeds))
    assert pooled.tasks["position"].low > 0 and pooled.overall.excludes_zero
    same = pooled_gain([(base, base), (tuned, tuned)])
    assert (same.overall.low, same.overall.high) == (0.0, 0.0) and not same.overall.excludes_zero


def test_verdicts_reject_bad_layouts():
    with pytest.raises(ValueError, match="prompt-major"):
        Verdicts.from_images([1, 0], ["a", "a"], [True, False])
    with pytest.raises(ValueError, match="prompt 0 has images of two tasks"):
        Verdicts.from_images([0, 0], ["a", "b"], [True, False])
    a = Verdicts.from_images([0, 0], ["a", "a"], [True, False])
    b = Verdicts.from_images([0, 0, 0], ["a", "a", "a"], [True, False, True])
    with pytest.raises(ValueError, match="same prompts and images per prompt"):
        paired_comparison(a, b)
