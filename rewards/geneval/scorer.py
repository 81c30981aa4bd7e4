"""GenEval's rules over the detections of a pluggable object detector.

This module reimplements the decision rules of GenEval (Ghosh et al., 2023, "GenEval: An Object-Focused
Framework for Evaluating Text-to-Image Alignment"; repository djghosh13/geneval, files
``evaluation/evaluate_images.py`` and ``evaluation/summary_scores.py``) and the partial-credit reward that
Flow-GRPO trains with (Liu et al., 2025; repository yifan123/reward-server, ``reward_server/gen_eval.py``,
function ``evaluate_reward``). It knows nothing about how detections are made: GenEval's Mask2Former +
CLIP colour classifier, an open-vocabulary detector, or the shapes world's exact detector
(:mod:`rewards.shapes.detector`) all produce :class:`Detection` lists, and a real-image detector fills in
``color`` (e.g. zero-shot CLIP on the masked crop, as GenEval does) before calling :func:`evaluate`.

Prompt metadata follows GenEval's schema::

    {"tag": "position", "prompt": "a photo of a circle left of a square",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "exclude": []}

Boxes are ``(x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` one past the last pixel (mmdetection's
convention for Mask2Former's mask-derived boxes, which GenEval consumes): a box's centre is
``((x0 + x1) / 2, (y0 + y1) / 2)`` and its size ``(x1 - x0, y1 - y0)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COUNTING_THRESHOLD",
    "Detection",
    "GenEvalResult",
    "GenEvalSummary",
    "MAX_OBJECTS",
    "MetadataError",
    "POSITION_THRESHOLD",
    "RELATIONS",
    "TASKS",
    "THRESHOLD",
    "evaluate",
    "format_summary",
    "relative_position",
    "summarize",
    "validate_metadata",
]

THRESHOLD = 0.3
"""GenEval's detection confidence threshold (a detection is kept when ``confidence > THRESHOLD``)."""
COUNTING_THRESHOLD = 0.9
"""GenEval's stricter threshold for prompts tagged ``counting``."""
POSITION_THRESHOLD = 0.1
"""GenEval's ``POSITION_THRESHOLD``: the centre offset shrinks by ``0.1 * (dim_a + dim_b)`` per axis."""
MAX_OBJECTS = 16
"""GenEval keeps at most this many detections per class (its ``max_objects`` option)."""
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six task tags, in the order of its prompt file."""
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


class MetadataError(ValueError):
    """Raised for prompt metadata that does not follow GenEval's schema (or names an unknown class/colour)."""


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        class_name: the detector's class label, compared with the metadata's ``class``.
        color: colour name compared with the metadata's ``color``; None when the detector does not say
            (then a prompt that asks for a colour raises :class:`MetadataError`).
        bbox: ``(x0, y0, x1, y1)`` pixels, ``x1``/``y1`` exclusive (see the module docstring).
        confidence: score in ``[0, 1]``; GenEval keeps detections with ``confidence > threshold``.
        pixel_count: number of mask pixels, when the detector has a mask (informational).
    """

    class_name: str
    color: str | None
    bbox: tuple[float, float, float, float]
    confidence: float
    pixel_count: int | None = None


@dataclass(frozen=True)
class GenEvalResult:
    """The verdict on one image.

    Attributes:
        tag: the metadata's task tag.
        prompt: the metadata's prompt text.
        prompt_key: ``json.dumps(metadata, sort_keys=True)``; images of one prompt share it
            (:func:`summarize` groups prompts by it, as GenEval groups by its ``metadata`` column).
        correct: GenEval's binary verdict.
        reason: GenEval's explanation of a failure, one line per failed clause; empty when correct.
        score: Flow-GRPO's partial-credit reward in ``[0, 1]`` (see :func:`evaluate`).
        strict_correct: Flow-GRPO's strict verdict: every include clause has exactly ``count`` detections of
            its class, all of the right colour and in the right position (exclude clauses are not read).
    """

    tag: str
    prompt: str
    prompt_key: str
    correct: bool
    reason: str
    score: float
    strict_correct: bool


def validate_metadata(
    metadata: Mapping[str, Any],
    classes: Collection[str] | None = None,
    colors: Collection[str] | None = None,
) -> None:
    """Check that ``metadata`` follows GenEval's schema; raise :class:`MetadataError` naming the problem.

    ``classes``/``colors``, when given, are the vocabularies of the detector in use: a clause naming
    anything else can never be detected, which is a mistake in the prompt file, not a failed image.
    """
    if not isinstance(metadata, Mapping):
        raise MetadataError(
            f"metadata must be a mapping with 'tag' and 'include', got {type(metadata).__name__}."
        )
    tag = metadata.get("tag")
    if not isinstance(tag, str):
        raise MetadataError(
            f"metadata needs a string 'tag' (one of {list(TASKS)}), got {tag!r} in {dict(metadata)}."
        )
    include = metadata.get("include")
    if not isinstance(include, Sequence) or isinstance(include, str) or not include:
        raise MetadataError(f"metadata 'include' must be a non-empty list of clauses, got {include!r}.")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, Sequence) or isinstance(exclude, str):
        raise MetadataError(f"metadata 'exclude' must be a list of clauses, got {exclude!r}.")
    for where, clauses in (("include", include), ("exclude", exclude)):
        for index, clause in enumerate(clauses):
            _validate_clause(
                clause, f"{where}[{index}]", index if where == "include" else None, classes, colors
            )


def _validate_clause(
    clause: Any,
    where: str,
    include_index: int | None,
    classes: Collection[str] | None,
    colors: Collection[str] | None,
) -> None:
    if not isinstance(clause, Mapping):
        raise MetadataError(f"{where} must be a mapping like {{'class': ..., 'count': ...}}, got {clause!r}.")
    name = clause.get("class")
    if not isinstance(name, str):
        raise MetadataError(f"{where} needs a string 'class', got {name!r}.")
    if classes is not None and name not in classes:
        raise MetadataError(f"{where} names unknown class {name!r}; the detector knows {sorted(classes)}.")
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise MetadataError(f"{where} ({name}) needs an integer 'count' >= 1, got {count!r}.")
    allowed = {"class", "count", "color", "position"} if include_index is not None else {"class", "count"}
    unknown = set(clause) - allowed
    if unknown:
        raise MetadataError(
            f"{where} ({name}) has unknown keys {sorted(unknown)}; allowed keys are {sorted(allowed)}."
        )
    if "color" in clause:
        color = clause["color"]
        if not isinstance(color, str):
            raise MetadataError(f"{where} ({name}) 'color' must be a string, got {color!r}.")
        if colors is not None and color not in colors:
            raise MetadataError(
                f"{where} ({name}) names unknown colour {color!r}; the detector knows {sorted(colors)}."
            )
    if "position" in clause:
        position = clause["position"]
        if (
            not isinstance(position, Sequence)
            or isinstance(position, str)
            or len(position) != 2
            or position[0] not in RELATIONS
            or isinstance(position[1], bool)
            or not isinstance(position[1], int)
        ):
            raise MetadataError(
                f"{where} ({name}) 'position' must be [relation, index] with relation in {list(RELATIONS)}, "
                f"got {position!r}."
            )
        if not 0 <= position[1] < include_index:  # type: ignore[operator]
            raise MetadataError(
                f"{where} ({name}) 'position' refers to include clause {position[1]}, but only earlier clauses "
                f"(0..{include_index - 1}) can be targets."  # type: ignore[operator]
            )


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of box A relative to box B, GenEval's ``relative_position``.

    With centres ``c`` and sizes ``d`` (width, height), the offset ``o = c_a - c_b`` shrinks towards zero by
    ``threshold * (d_a + d_b)`` per axis (clamped at 0, sign kept). If both shrunk components are below
    1e-3 in magnitude there is no relation. Otherwise the shrunk offset is divided by the norm of the
    *unshrunk* offset, and ``x < -0.5`` gives "left of", ``x > 0.5`` "right of", ``y < -0.5`` "above",
    ``y > 0.5`` "below" (image y points down). Example: equal 10-px boxes 20 px apart horizontally:
    ``(20 - 0.1 * 20) / 20 = 0.9`` -> ``{"left of"}`` or ``{"right of"}``.
    """
    center_a = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    center_b = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    shrunk = []
    offsets = []
    for axis in range(2):
        offset = center_a[axis] - center_b[axis]
        dims = abs(box_a[axis + 2] - box_a[axis]) + abs(box_b[axis + 2] - box_b[axis])
        shrunk.append(max(abs(offset) - threshold * dims, 0.0) * _sign(offset))
        offsets.append(offset)
    if abs(shrunk[0]) < 1e-3 and abs(shrunk[1]) < 1e-3:
        return set()
    norm = math.hypot(offsets[0], offsets[1])
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def evaluate(
    detections: Sequence[Detection],
    metadata: Mapping[str, Any],
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    position_threshold: float = POSITION_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    classes: Collection[str] | None = None,
    colors: Collection[str] | None = None,
) -> GenEvalResult:
    """Judge one image's detections against its prompt metadata with GenEval's rules.

    GenEval (``evaluate_images.py``: ``evaluate_image`` then ``evaluate``):

    1. Keep detections with ``confidence > counting_threshold`` for tag ``counting`` and
       ``> threshold`` otherwise; group them by class, sort each group by confidence in GenEval's order
       (``np.argsort(scores)[::-1]``: descending, ties to the *later* detection in the detector's list) and
       keep the first ``max_objects`` (no NMS: GenEval's default ``max_overlap`` is 1).
    2. Include clauses, ANDed, in order. Clause ``k`` takes the top-``count`` detections of its class; fewer
       than ``count`` fails. With ``color``, fewer than ``count`` of them having that colour fails. With
       ``position = [relation, i]`` (checked only if the clause has not failed yet), clause ``i`` must
       have matched, and *every* pair (object of this clause, object of clause ``i``) must have
       ``relation`` in :func:`relative_position`. A clause that passes makes its objects the target
       group ``k``; a failed clause leaves group ``k`` empty.
    3. Exclude clauses, ORed: ``count`` or more kept detections of the class fails.

    Partial credit (``score``) is Flow-GRPO's ``evaluate_reward`` from its GenEval reward server, over the
    same kept detections, with two corrections named in flowalign's design. Per include clause with
    required count ``n`` and ``m`` kept detections of its class (all of them, not only the top ``n``):

    - count term ``max(0, 1 - |n - m| / n)`` (upstream does not clamp, so ``m > 2n`` went negative);
    - if ``m != n`` and the clause has a colour or a position: one term ``0``;
    - otherwise, with a colour: ``1 - |n - k| / n`` where ``k`` of the ``m`` have the colour; and with a
      position (only when the colour, if any, matched all ``n``): ``1`` if every pair has the relation,
      else ``0`` -- one term either way (upstream appends ``0`` and then an unconditional ``1`` on a
      failed position). A missing target group (clause ``i`` failed) gives ``0``.

    ``score`` is the mean of all terms; exclude clauses do not enter it (as upstream). ``strict_correct``
    is upstream's ``strict_correct``: all terms of all clauses passed with exact counts.

    Args:
        detections: everything the detector found in the image, any order; ``color`` must be set for
            detections whose class a colour clause names.
        metadata: GenEval prompt metadata (``tag``, ``prompt``, ``include``, optional ``exclude``).
        threshold, counting_threshold, position_threshold, max_objects: GenEval's options, defaults as
            in GenEval.
        classes, colors: optional vocabularies for :func:`validate_metadata`.
    """
    validate_metadata(metadata, classes, colors)
    tag = metadata["tag"]
    cutoff = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if det.confidence > cutoff:
            by_class.setdefault(det.class_name, []).append(det)
    for name, group in by_class.items():
        # GenEval orders by `np.argsort(scores)[::-1]`: descending, ties to the later detection.
        group.reverse()
        group.sort(key=lambda d: -d.confidence)
        by_class[name] = group[:max_objects]

    correct = strict = True
    reasons: list[str] = []
    terms: list[float] = []
    groups: list[list[Detection] | None] = []  # GenEval's matched groups
    strict_groups: list[list[Detection] | None] = []  # Flow-GRPO's matched groups (exact counts)
    for req in metadata["include"]:
        name, count = req["class"], req["count"]
        kept = by_class.get(name, [])
        found = kept[:count]
        # --- GenEval's verdict ---
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors_found = [_color_of(d, name) for d in found]
                n_color = colors_found.count(req["color"])
                if n_color < count:
                    matched = False
                    summary = ", ".join(f"{colors_found.count(c)} {c}" for c in dict.fromkeys(colors_found))
                    reasons.append(
                        f"expected {req['color']} {name}>={count}, found {n_color} {req['color']}; and {summary}"
                    )
            if "position" in req and matched:
                relation, target = req["position"]
                failure = _position_failure(found, groups[target], name, relation, position_threshold)
                if failure is not None:
                    matched = False
                    reasons.append(failure)
        correct &= matched
        groups.append(found if matched else None)
        # --- Flow-GRPO's partial credit and strict verdict ---
        clause_ok = len(kept) == count
        terms.append(max(0.0, 1.0 - abs(count - len(kept)) / count))
        if not clause_ok:
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                n_color = sum(_color_of(d, name) == req["color"] for d in kept)
                terms.append(1.0 - abs(count - n_color) / count)
                clause_ok = n_color == count
            if "position" in req and clause_ok:
                relation, target = req["position"]
                clause_ok = (
                    _position_failure(kept, strict_groups[target], name, relation, position_threshold) is None
                )
                terms.append(1.0 if clause_ok else 0.0)
        strict &= clause_ok
        strict_groups.append(kept if clause_ok else None)

    for req in metadata.get("exclude", []):
        name = req["class"]
        n_found = len(by_class.get(name, []))
        if n_found >= req["count"]:
            correct = False
            reasons.append(f"expected {name}<{req['count']}, found {n_found}")

    return GenEvalResult(
        tag=tag,
        prompt=str(metadata.get("prompt", "")),
        prompt_key=json.dumps(metadata, sort_keys=True),
        correct=correct,
        reason="\n".join(reasons),
        score=sum(terms) / len(terms),
        strict_correct=strict,
    )


def _color_of(det: Detection, name: str) -> str:
    if det.color is None:
        raise MetadataError(
            f"the prompt asks for the colour of a {name!r} but the detector gave no colour; classify the colour "
            "of each detection (GenEval uses zero-shot CLIP on the masked crop) before calling evaluate()."
        )
    return det.color


def _position_failure(
    found: Sequence[Detection],
    target_group: Sequence[Detection] | None,
    name: str,
    relation: str,
    position_threshold: float,
) -> str | None:
    """GenEval's reason string for the first (object, target) pair lacking ``relation``, or None."""
    if target_group is None:
        return f"no target for {name} to be {relation}"
    for obj in found:
        for target in target_group:
            true_relations = relative_position(obj.bbox, target.bbox, position_threshold)
            if relation not in true_relations:
                return (
                    f"expected {name} {relation} target, found {' and '.join(sorted(true_relations))} target"
                )
    return None


@dataclass(frozen=True)
class GenEvalSummary:
    """GenEval's summary of many judged images (``summary_scores.py``).

    Attributes:
        n_images, n_prompts: totals; prompts are distinct ``prompt_key`` values.
        image_accuracy: fraction of images judged correct ("% correct images").
        prompt_accuracy: fraction of prompts with *at least one* correct image ("% correct prompts";
            GenEval: ``df.groupby('metadata')['correct'].any().mean()``).
        task_accuracy: per tag, the fraction of that tag's images judged correct, in order of first
            appearance (GenEval's ``groupby('tag', sort=False)``).
        task_counts: per tag, ``(n_correct_images, n_images)``.
        overall: unweighted mean of ``task_accuracy`` over the tags present ("Overall score").
        mean_score: mean partial-credit ``score`` over images (not part of GenEval's summary).
        strict_image_accuracy: fraction of images with ``strict_correct`` (Flow-GRPO's strict accuracy).
    """

    n_images: int
    n_prompts: int
    image_accuracy: float
    prompt_accuracy: float
    task_accuracy: dict[str, float]
    task_counts: dict[str, tuple[int, int]]
    overall: float
    mean_score: float
    strict_image_accuracy: float
    missing_tasks: tuple[str, ...] = field(default=())
    """GenEval tags with no image here (their accuracy is absent, not zero, as in GenEval)."""


def summarize(results: Sequence[GenEvalResult]) -> GenEvalSummary:
    """Aggregate per-image verdicts exactly as GenEval's ``summary_scores.py`` does (see
    :class:`GenEvalSummary`); raises ``ValueError`` on an empty list."""
    if not results:
        raise ValueError("summarize() needs at least one GenEvalResult; got an empty list.")
    n = len(results)
    by_prompt: dict[str, bool] = {}
    by_tag: dict[str, list[int]] = {}
    for r in results:
        by_prompt[r.prompt_key] = by_prompt.get(r.prompt_key, False) or r.correct
        tally = by_tag.setdefault(r.tag, [0, 0])
        tally[0] += int(r.correct)
        tally[1] += 1
    task_accuracy = {tag: c / t for tag, (c, t) in by_tag.items()}
    return GenEvalSummary(
        n_images=n,
        n_prompts=len(by_prompt),
        image_accuracy=sum(r.correct for r in results) / n,
        prompt_accuracy=sum(by_prompt.values()) / len(by_prompt),
        task_accuracy=task_accuracy,
        task_counts={tag: (c, t) for tag, (c, t) in by_tag.items()},
        overall=sum(task_accuracy.values()) / len(task_accuracy),
        mean_score=sum(r.score for r in results) / n,
        strict_image_accuracy=sum(r.strict_correct for r in results) / n,
        missing_tasks=tuple(t for t in TASKS if t not in by_tag),
    )


def format_summary(summary: GenEvalSummary) -> str:
    """The summary as GenEval's ``summary_scores.py`` prints it, plus the partial-credit mean."""
    lines = [
        "Summary",
        "=======",
        f"Total images: {summary.n_images}",
        f"Total prompts: {summary.n_prompts}",
        f"% correct images: {summary.image_accuracy:.2%}",
        f"% correct prompts: {summary.prompt_accuracy:.2%}",
        "",
        "Task breakdown",
        "==============",
    ]
    for tag, accuracy in summary.task_accuracy.items():
        correct, total = summary.task_counts[tag]
        lines.append(f"{tag:<16} = {accuracy:.2%} ({correct} / {total})")
    lines += ["", f"Overall score (avg. over tasks): {summary.overall:.5f}"]
    if summary.missing_tasks:
        lines.append(f"(tasks without images, not averaged: {', '.join(summary.missing_tasks)})")
    lines.append(f"Mean partial-credit score: {summary.mean_score:.5f}")
    return "\n".join(lines)
