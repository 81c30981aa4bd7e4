"""GenEval's evaluation rules over any detector's detections (see :mod:`rewards.geneval.scorer`).

Example::

    from rewards.geneval import Detection, evaluate, summarize
    dets = [Detection("circle", "red", (2, 10, 11, 19), 1.0), Detection("square", "blue", (20, 10, 29, 19), 1.0)]
    meta = {"tag": "position", "prompt": "a photo of a circle left of a square",
            "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    result = evaluate(dets, meta)        # result.correct == True, result.score == 1.0
    summary = summarize([result])        # per-task accuracy, overall, % correct images/prompts
"""

from rewards.geneval.scorer import (
    COUNTING_THRESHOLD,
    MAX_OBJECTS,
    POSITION_THRESHOLD,
    RELATIONS,
    TASKS,
    THRESHOLD,
    Detection,
    GenEvalResult,
    GenEvalSummary,
    MetadataError,
    evaluate,
    format_summary,
    relative_position,
    summarize,
    validate_metadata,
)

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
