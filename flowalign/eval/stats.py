"""Confidence intervals for GenEval-style benchmarks, and paired comparisons of two models.

Everything here is conditional on the fixed prompt set: the only randomness is the initial noise of each
image, so the images are independent Bernoulli trials whose success probability depends on the prompt
(independent but not identically distributed). Three tools follow from that:

- **One task's accuracy**: the Wilson score interval (Wilson 1927) for ``k`` correct of ``n`` images.
  The number correct is Poisson-binomial; its variance ``sum p_i (1 - p_i)`` is at most the binomial
  ``n p (1 - p)`` with the mean ``p`` (Hoeffding 1956, "On the distribution of the number of successes in
  independent trials", Ann. Math. Stat. 27), so the binomial interval is conservative here.
- **The overall** (GenEval's unweighted mean of the task accuracies) **and % correct images**: a
  stratified percentile bootstrap that resamples images within each prompt (Efron & Tibshirani 1993,
  *An Introduction to the Bootstrap*, ch. 13 (percentile interval); Davison & Hinkley 1997, *Bootstrap
  Methods and their Application*, sec. 3.2 (stratified resampling)).
- **Two models judged on the same prompts and the same per-image noise**: a paired bootstrap of the
  difference (the same resampled images for both models), and per task McNemar's exact test on the
  discordant images (McNemar 1947, Psychometrika 12; exact conditional form: Fagerland, Lydersen & Laake
  2013, BMC Med. Res. Methodol. 13:91). :func:`pooled_gain` averages such differences over training seeds.

**Resampling details.** Each prompt is a stratum. Resampling ``n`` of ``n`` images of a stratum
underestimates the variance of its mean by the factor ``(n - 1) / n`` (0.75 at GenEval's 4 images per
prompt), so a stratum of ``n`` images is resampled ``n - 1`` times, which makes the bootstrap variance of
any linear statistic unbiased (McCarthy & Snowden 1985, "The bootstrap and finite population sampling",
Vital and Health Statistics 2(95); Rao & Wu 1988, JASA 83, the rescaling bootstrap with
``m_h = n_h - 1``). Prompts with a single image carry no within-prompt variance information; those of one
task are collapsed into one stratum (the collapsed-stratum estimator, conservative: Wolter 2007,
*Introduction to Variance Estimation*, 2nd ed.). Every statistic reported is linear in the images'
values, so a resample enters only through how many of each stratum's draws take each value; those counts
are drawn directly as a multinomial (a chain of binomials), which is the same distribution as drawing
indices and is vectorised over resamples.

    stats = benchmark_stats(verdicts)
    stats.overall.low, stats.overall.high
    diff = paired_comparison(base, tuned)
    diff.overall.excludes_zero, diff.tasks["counting"].mcnemar_p
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "BenchmarkStats",
    "Interval",
    "PairedComparison",
    "PooledGain",
    "TaskAccuracy",
    "TaskDifference",
    "Verdicts",
    "benchmark_stats",
    "interval_method",
    "mcnemar_exact",
    "paired_comparison",
    "pooled_gain",
    "wilson_interval",
]

N_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """True when 0 lies outside ``[low, high]`` (a difference is resolved at this confidence)."""
        return self.low > 0 or self.high < 0

    def as_json(self, difference: bool = False) -> dict[str, float | bool]:
        """``estimate``, ``low``, ``high``; for a ``difference`` also ``excludes_zero``."""
        out: dict[str, float | bool] = {"estimate": self.estimate, "low": self.low, "high": self.high}
        return out | {"excludes_zero": self.excludes_zero} if difference else out


@dataclass(frozen=True, eq=False)
class Verdicts:
    """The per-image verdicts of one benchmark run, prompt-major (build with :meth:`from_images`).

    Attributes:
        prompt_index: ``[U]`` int64, the prompt of each image, non-decreasing.
        task: ``[U]`` object array of task tags (one tag per prompt).
        correct: ``[U]`` bool, the judge's verdict.
    """

    prompt_index: np.ndarray
    task: np.ndarray
    correct: np.ndarray

    @classmethod
    def from_images(
        cls, prompt_index: Sequence[int], task: Sequence[str], correct: Sequence[bool]
    ) -> Verdicts:
        """Verdicts from per-image sequences of equal length; raises ``ValueError`` when they are empty,
        of different lengths, not prompt-major, or a prompt has two tasks."""
        index = np.asarray(prompt_index, dtype=np.int64)
        tags = np.asarray(list(task), dtype=object)
        verdicts = np.asarray(correct, dtype=bool)
        if not len(index) or not len(index) == len(tags) == len(verdicts):
            raise ValueError(
                f"verdicts need equal, non-zero numbers of prompt indices, tasks and verdicts; got "
                f"{len(index)}, {len(tags)} and {len(verdicts)}."
            )
        if np.any(np.diff(index) < 0):
            raise ValueError("verdicts must be prompt-major (prompt_index non-decreasing); sort the images.")
        starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
        same = tags == np.repeat(tags[starts], np.diff(np.r_[starts, len(index)]))
        if not same.all():
            bad = int(index[np.flatnonzero(~same)[0]])
            raise ValueError(f"prompt {bad} has images of two tasks; each prompt belongs to one task.")
        return cls(index, tags, verdicts)

    @property
    def tasks(self) -> list[str]:
        """The tasks in order of first appearance (GenEval's ``groupby('tag', sort=False)``)."""
        return list(dict.fromkeys(self.task.tolist()))

    def same_layout(self, other: Verdicts) -> bool:
        """Whether ``other`` judged the same prompts, tasks and number of images per prompt."""
        return np.array_equal(self.prompt_index, other.prompt_index) and np.array_equal(self.task, other.task)


@dataclass(frozen=True)
class TaskAccuracy:
    """One task of a benchmark: ``prompts``; ``images_per_prompt`` as ``(fewest, most)``; ``images`` and
    ``correct`` counts; ``accuracy`` with its Wilson interval."""

    prompts: int
    images_per_prompt: tuple[int, int]
    images: int
    correct: int
    accuracy: Interval

    def as_json(self) -> dict[str, object]:
        fewest, most = self.images_per_prompt
        return {
            "prompts": self.prompts,
            "images_per_prompt": fewest if fewest == most else [fewest, most],
            "images": self.images,
            "correct": self.correct,
            "accuracy": self.accuracy.estimate,
            "accuracy_low": self.accuracy.low,
            "accuracy_high": self.accuracy.high,
        }


@dataclass(frozen=True)
class BenchmarkStats:
    """A benchmark's accuracies with intervals (:func:`benchmark_stats`).

    Attributes:
        tasks: per task (order of first appearance) its :class:`TaskAccuracy` (Wilson interval).
        overall: unweighted mean of the task accuracies, stratified bootstrap interval.
        image_accuracy: fraction of images correct, stratified bootstrap interval.
        confidence, n_resamples: the interval's level and the bootstrap's size.
    """

    tasks: dict[str, TaskAccuracy]
    overall: Interval
    image_accuracy: Interval
    confidence: float
    n_resamples: int

    @property
    def method(self) -> str:
        return interval_method(self.confidence, self.n_resamples)

    def as_json(self) -> dict[str, object]:
        return {
            "interval_method": self.method,
            "confidence": self.confidence,
            "overall": self.overall.as_json(),
            "image_accuracy": self.image_accuracy.as_json(),
            "tasks": {tag: task.as_json() for tag, task in self.tasks.items()},
        }


@dataclass(frozen=True)
class TaskDifference:
    """One task of a paired comparison ``b - a``: the accuracy difference with its paired-bootstrap
    interval, the discordant images (``a_only``: only ``a`` correct; ``b_only``) and McNemar's exact
    two-sided p-value on them."""

    difference: Interval
    a_only: int
    b_only: int
    mcnemar_p: float

    def as_json(self) -> dict[str, object]:
        return {
            **self.difference.as_json(difference=True),
            "a_only": self.a_only,
            "b_only": self.b_only,
            "mcnemar_p": self.mcnemar_p,
        }


@dataclass(frozen=True)
class PairedComparison:
    """Model ``b`` minus model ``a`` on the same prompts and noise (:func:`paired_comparison`).

    Attributes:
        overall, image_accuracy: differences in overall and in % correct images, paired-bootstrap
            intervals (``.excludes_zero`` says whether the difference is resolved).
        tasks: per task its :class:`TaskDifference`.
    """

    overall: Interval
    image_accuracy: Interval
    tasks: dict[str, TaskDifference]
    confidence: float
    n_resamples: int

    @property
    def method(self) -> str:
        return (
            f"{self.confidence:.0%} intervals: paired stratified percentile bootstrap ({self.n_resamples} "
            "resamples of the images within each prompt, the same images for both models); per task also "
            "McNemar's exact test on the discordant images"
        )

    def as_json(self) -> dict[str, object]:
        return {
            "interval_method": self.method,
            "confidence": self.confidence,
            "overall": self.overall.as_json(difference=True),
            "image_accuracy": self.image_accuracy.as_json(difference=True),
            "tasks": {tag: task.as_json() for tag, task in self.tasks.items()},
        }


@dataclass(frozen=True)
class PooledGain:
    """The mean over training seeds of ``tuned - base`` (:func:`pooled_gain`).

    Attributes:
        overall, image_accuracy: the mean gains with paired-bootstrap intervals.
        tasks: per task the mean gain with its interval.
        per_seed: each seed's overall gain, in the order given.
    """

    overall: Interval
    image_accuracy: Interval
    tasks: dict[str, Interval]
    per_seed: tuple[float, ...]
    confidence: float
    n_resamples: int

    def as_json(self) -> dict[str, object]:
        return {
            "confidence": self.confidence,
            "n_resamples": self.n_resamples,
            "overall": self.overall.as_json(difference=True),
            "image_accuracy": self.image_accuracy.as_json(difference=True),
            "tasks": {tag: i.as_json(difference=True) for tag, i in self.tasks.items()},
            "per_seed": list(self.per_seed),
        }


def interval_method(confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES) -> str:
    """The one-line description of :func:`benchmark_stats`' intervals, for reports."""
    return (
        f"{confidence:.0%} intervals: per task the Wilson score interval (conservative for images of "
        f"different prompts); overall and % images a stratified percentile bootstrap ({n_resamples} "
        "resamples of the images within each prompt)"
    )


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson's score interval for ``correct`` successes in ``n`` trials (Wilson 1927, JASA 22:209;
    Newcombe 1998, Stat. Med. 17:857, method 3):
    ``(k + z^2/2 +- z sqrt(k (n - k) / n + z^2 / 4)) / (n + z^2)``.

    For the images of one task it is conservative: conditional on the fixed prompt set the images are
    independent but not identically distributed across prompts, and the binomial variance bounds the
    Poisson-binomial one (see the module docstring). Raises ``ValueError`` unless ``0 <= correct <= n``
    and ``n >= 1``."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n and n >= 1, got correct={correct}, n={n}.")
    z = _z(confidence)
    center = correct + z * z / 2
    half = z * math.sqrt(correct * (n - correct) / n + z * z / 4)
    low, high = (center - half) / (n + z * z), (center + half) / (n + z * z)
    # Exact at the boundaries (the formula gives them up to rounding).
    return Interval(correct / n, 0.0 if correct == 0 else low, 1.0 if correct == n else high)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """McNemar's exact two-sided p-value for paired binary outcomes: under "no difference" each of the
    ``a_only + b_only`` discordant pairs favours either model with probability 1/2, so
    ``p = min(1, 2 P[Binomial(d, 1/2) <= min(a_only, b_only)])`` (Fagerland et al. 2013); 1.0 when there
    are no discordant pairs."""
    d, k = a_only + b_only, min(a_only, b_only)
    if d == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(d, i) for i in range(k + 1)) / 2**d)


def benchmark_stats(
    verdicts: Verdicts,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> BenchmarkStats:
    """Per-task accuracy with Wilson intervals, and the overall (unweighted mean of the tasks, as GenEval)
    and % correct images with stratified-bootstrap percentile intervals (see the module docstring).
    Deterministic for a given ``seed``."""
    _check_level(confidence, n_resamples)
    values = verdicts.correct.astype(np.float64)
    overall, images, *_ = _bootstrap(verdicts, values, n_resamples, seed, confidence)
    tasks = {}
    for tag in verdicts.tasks:
        mask = verdicts.task == tag
        per_prompt = np.unique(verdicts.prompt_index[mask], return_counts=True)[1]
        n, correct = int(mask.sum()), int(verdicts.correct[mask].sum())
        tasks[tag] = TaskAccuracy(
            prompts=len(per_prompt),
            images_per_prompt=(int(per_prompt.min()), int(per_prompt.max())),
            images=n,
            correct=correct,
            accuracy=wilson_interval(correct, n, confidence),
        )
    return BenchmarkStats(
        tasks=tasks,
        overall=overall,
        image_accuracy=images,
        confidence=confidence,
        n_resamples=n_resamples,
    )


def paired_comparison(
    a: Verdicts,
    b: Verdicts,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> PairedComparison:
    """``b - a`` for two models judged on the same prompts with the same per-image noise (image ``j`` of
    prompt ``i`` in both): the paired stratified bootstrap of the difference in overall, % images and
    each task (the same resampled images for both models), and per task McNemar's exact test.

    Identical verdicts give difference 0 with interval ``[0, 0]``. Raises ``ValueError`` when the two
    judged different prompts or numbers of images."""
    _check_level(confidence, n_resamples)
    _check_same_layout([a, b])
    diff = b.correct.astype(np.float64) - a.correct.astype(np.float64)
    overall, images, *per_task = _bootstrap(a, diff, n_resamples, seed, confidence)
    tasks = {}
    for tag, difference in zip(a.tasks, per_task, strict=True):
        mask = a.task == tag
        a_only = int((a.correct & ~b.correct)[mask].sum())
        b_only = int((b.correct & ~a.correct)[mask].sum())
        tasks[tag] = TaskDifference(difference, a_only, b_only, mcnemar_exact(a_only, b_only))
    return PairedComparison(
        overall=overall,
        image_accuracy=images,
        tasks=tasks,
        confidence=confidence,
        n_resamples=n_resamples,
    )


def pooled_gain(
    pairs: Sequence[tuple[Verdicts, Verdicts]],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> PooledGain:
    """The mean over training seeds of ``tuned - base``, from one ``(base, tuned)`` pair per seed, all
    judged on the same prompts and per-image noise, with a paired bootstrap interval.

    Every pair's statistic is linear in its images, so the mean of the per-seed differences is the
    difference computed on each image's mean ``mean_s(tuned_s - base_s)``. The images are resampled
    jointly across seeds (the same resampled images for every seed): with a shared base benchmark (the
    same ``base`` in every pair, as ``benchmarks/shapes/evidence.py`` computes once) or shared noise the
    seeds' differences are correlated, and independent per-seed resampling would understate the
    variance. The interval covers evaluation noise given the trained models; seed-to-seed variation of
    training shows in ``per_seed``. ``pairs`` may also hold one treated run against several references
    (e.g. every (control, tuned) combination: the mean of ``tuned - control`` over the combinations is
    the difference of the two means).
    """
    _check_level(confidence, n_resamples)
    if not pairs:
        raise ValueError("pooled_gain needs at least one (base, tuned) pair of verdicts; got none.")
    _check_same_layout([v for pair in pairs for v in pair])
    diffs = [t.correct.astype(np.float64) - b.correct.astype(np.float64) for b, t in pairs]
    layout = pairs[0][0]
    overall, images, *per_task = _bootstrap(layout, np.mean(diffs, axis=0), n_resamples, seed, confidence)
    design = _design(layout)
    per_seed = tuple(float(design.observed(d)[0]) for d in diffs)
    return PooledGain(
        overall=overall,
        image_accuracy=images,
        tasks=dict(zip(layout.tasks, per_task, strict=True)),
        per_seed=per_seed,
        confidence=confidence,
        n_resamples=n_resamples,
    )


# --- the stratified bootstrap ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Design:
    """The strata of a benchmark and its statistics as functions of the stratum means.

    Attributes:
        stratum: ``[U]`` int, the stratum of each image (a prompt, or a task's single-image prompts).
        sizes: ``[S]`` images per stratum.
        membership: ``[S, T]`` 1.0 where stratum ``s`` belongs to task ``t`` (:attr:`Verdicts.tasks` order).
    """

    stratum: np.ndarray
    sizes: np.ndarray
    membership: np.ndarray

    def statistics(self, means: np.ndarray) -> np.ndarray:
        """``[..., 2 + T]`` from stratum means ``[..., S]``: the overall (GenEval's mean over tasks of the
        task accuracy), % images, then each task's accuracy, computed as GenEval does (task totals first)."""
        totals = (means * self.sizes) @ self.membership
        task_images = self.sizes @ self.membership
        per_task = totals / task_images
        overall = per_task.mean(axis=-1, keepdims=True)
        return np.concatenate(
            [overall, totals.sum(axis=-1, keepdims=True) / self.sizes.sum(), per_task], axis=-1
        )

    def observed(self, values: np.ndarray) -> np.ndarray:
        """``[2 + T]`` the statistics of per-image ``values``."""
        return self.statistics(
            np.bincount(self.stratum, weights=values, minlength=len(self.sizes)) / self.sizes
        )


def _design(verdicts: Verdicts) -> _Design:
    tasks = verdicts.tasks
    task_id = np.array([tasks.index(t) for t in verdicts.task.tolist()], dtype=np.int64)
    per_prompt = np.unique(verdicts.prompt_index, return_inverse=True, return_counts=True)
    images_of_prompt = per_prompt[2][per_prompt[1]]
    # A prompt with >= 2 images is its own stratum; a task's single-image prompts share one (key < 0).
    key = np.where(images_of_prompt >= 2, verdicts.prompt_index, -1 - task_id)
    _, stratum, sizes = np.unique(key, return_inverse=True, return_counts=True)
    membership = np.zeros((len(sizes), len(tasks)))
    membership[stratum, task_id] = 1.0
    return _Design(stratum, sizes.astype(np.float64), membership)


def _resampled_means(design: _Design, values: np.ndarray, n_resamples: int, rng: np.random.Generator):
    """``[n_resamples, S]`` stratum means of ``m = max(n - 1, 1)`` images drawn with replacement from each
    stratum's ``n``. Only how many draws take each distinct value matters: a multinomial, drawn as a chain
    of binomials (the draws left, with the probability of this value among the values left)."""
    levels, level = np.unique(values, return_inverse=True)
    n_strata = len(design.sizes)
    count = np.zeros((n_strata, len(levels)), dtype=np.int64)
    np.add.at(count, (design.stratum, level), 1)
    draws = np.maximum(design.sizes.astype(np.int64) - 1, 1)
    left = np.broadcast_to(draws, (n_resamples, n_strata)).copy()
    units_left = design.sizes.astype(np.int64)
    total = np.zeros((n_resamples, n_strata))
    for k, value in enumerate(levels[:-1]):
        p = np.divide(count[:, k], units_left, out=np.zeros(n_strata), where=units_left > 0)
        drawn = rng.binomial(left, p)
        total += value * drawn
        left -= drawn
        units_left = units_left - count[:, k]
    total += levels[-1] * left
    return total / draws


def _bootstrap(
    layout: Verdicts, values: np.ndarray, n_resamples: int, seed: int, confidence: float
) -> list[Interval]:
    """The statistics of per-image ``values`` (overall, % images, each task: see :class:`_Design`) with
    their percentile intervals under the stratified bootstrap of ``layout``."""
    design = _design(layout)
    resampled = design.statistics(_resampled_means(design, values, n_resamples, np.random.default_rng(seed)))
    alpha = 1 - confidence
    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2], axis=0)
    estimate = design.observed(values)
    return [Interval(float(e), float(lo), float(hi)) for e, lo, hi in zip(estimate, low, high, strict=True)]


def _check_level(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}; e.g. 0.95.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise ValueError(f"n_resamples must be an integer >= 100, got {n_resamples!r}; e.g. 2000.")


def _check_same_layout(verdicts: Sequence[Verdicts]) -> None:
    for k, other in enumerate(verdicts[1:], start=1):
        if not verdicts[0].same_layout(other):
            raise ValueError(
                f"verdict set {k} judged different prompts, tasks or numbers of images than set 0; a paired "
                "comparison needs the same prompts and images per prompt (the same benchmark settings)."
            )


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)
