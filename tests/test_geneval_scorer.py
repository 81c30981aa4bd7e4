"""GenEval's rules, Flow-GRPO's partial credit and GenEval's summary on hand-built detections (exact)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from rewards.geneval import (
    Detection,
    GenEvalResult,
    MetadataError,
    evaluate,
    format_summary,
    relative_position,
    summarize,
    validate_metadata,
)

REPO = Path(__file__).resolve().parents[1]
GENEVAL_METADATA = Path("/work/shared/data/geneval/evaluation_metadata.jsonl")


def det(name, color=None, box=(0, 0, 10, 10), conf=1.0):
    return Detection(name, color, tuple(box), conf)


def meta(tag, include, exclude=None, prompt="p"):
    m = {"tag": tag, "include": include, "prompt": prompt}
    if exclude is not None:
        m["exclude"] = exclude
    return m


def counting(name, n):
    return meta("counting", [{"class": name, "count": n}], [{"class": name, "count": n + 1}])


def position(a, relation, b):
    return meta("position", [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}])


# --- relative_position: GenEval's rule with exact numbers ------------------------------------------------


def test_relative_position_shrinks_offset_and_uses_cosine():
    # Centres 20 px apart, dims 10 + 10: (20 - 0.1 * 20) / 20 = 0.9 > 0.5.
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert relative_position((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}
    # Diagonal: (10 - 2) / (10 * sqrt 2) = 0.566 on both axes -> two relations.
    assert relative_position((0, 0, 10, 10), (10, 10, 20, 20)) == {"left of", "above"}
    # |offset| 1 < shrink 2 on x, 0 on y -> no relation at all.
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()


def test_relative_position_direction_cosine_is_strict():
    # Offset (-6, -8), norm 10. Widths 5 + 5 shrink x by 1.0: dx = -5 / 10 = -0.5, not < -0.5.
    assert relative_position((0, 0, 5, 0), (6, 8, 11, 8)) == {"above"}
    # Widths 4 + 4 shrink x by 0.8: dx = -0.52 -> left of too.
    assert relative_position((0, 0, 4, 0), (6, 8, 10, 8)) == {"left of", "above"}
    # A larger position threshold removes the relation: shrink 0.5 * 8 = 4 -> dx = -0.2.
    assert relative_position((0, 0, 4, 0), (6, 8, 10, 8), threshold=0.5) == {"above"}


# --- evaluate: GenEval's verdict -------------------------------------------------------------------------


def test_counting_threshold_is_09_and_strict():
    m = counting("circle", 2)
    dets = [det("circle", conf=0.95), det("circle", conf=0.92), det("circle", conf=0.9)]
    assert evaluate(dets, m).correct  # 0.9 is not > 0.9: two circles kept
    dets[2] = det("circle", conf=0.91)
    result = evaluate(dets, m)
    assert not result.correct and result.reason == "expected circle<3, found 3"
    # Under any other tag the threshold is 0.3, so a 0.85 circle counts.
    two = [det("circle", conf=0.95), det("circle", conf=0.85)]
    assert evaluate(two, m).reason == "expected circle>=2, found 1"
    assert evaluate(two, {**m, "tag": "two_object"}).correct


def test_default_threshold_is_03_and_strict():
    m = meta("single_object", [{"class": "square", "count": 1}])
    assert not evaluate([det("square", conf=0.3)], m).correct
    assert evaluate([det("square", conf=0.3001)], m).correct
    assert evaluate([det("square", conf=0.3)], m, threshold=0.2).correct
    assert evaluate([det("square", conf=0.3)], m).reason == "expected square>=1, found 0"


def test_colour_is_checked_on_top_count_by_confidence():
    m = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
    assert not evaluate([det("circle", "red", conf=0.7), det("circle", "blue", conf=0.8)], m).correct
    assert evaluate([det("circle", "red", conf=0.8), det("circle", "blue", conf=0.7)], m).correct
    # Ties go to the later detection, as GenEval's `np.argsort(scores)[::-1]` orders them.
    assert evaluate([det("circle", "blue"), det("circle", "red")], m).correct
    result = evaluate([det("circle", "red"), det("circle", "blue")], m)
    assert result.reason == "expected red circle>=1, found 0 red; and 1 blue"
    three = [
        det("circle", "red", conf=0.9),
        det("circle", "blue"),
        det("circle", "green"),
        det("circle", "red"),
    ]
    order = np.argsort(np.array([d.confidence for d in three]), kind="stable")[::-1]
    assert [three[i].color for i in order] == ["red", "green", "blue", "red"]
    m3 = meta("colors", [{"class": "circle", "count": 3, "color": "red"}])
    assert evaluate(three, m3).reason.endswith("found 1 red; and 1 red, 1 green, 1 blue")


def test_include_clauses_are_anded_and_exclude_clauses_ored():
    m = meta("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}])
    assert evaluate([det("circle"), det("square")], m).correct
    assert evaluate([det("circle"), det("square"), det("circle")], m).correct  # extras are fine here
    result = evaluate([det("circle")], m)
    assert not result.correct and result.reason == "expected square>=1, found 0"
    ex = meta(
        "single_object",
        [{"class": "circle", "count": 1}],
        [{"class": "square", "count": 1}, {"class": "diamond", "count": 2}],
    )
    assert evaluate([det("circle"), det("diamond")], ex).correct
    assert not evaluate([det("circle"), det("square")], ex).correct
    assert not evaluate([det("circle"), det("diamond"), det("diamond")], ex).correct
    both = evaluate([det("circle"), det("square"), det("diamond"), det("diamond")], ex)
    assert both.reason == "expected square<1, found 1\nexpected diamond<2, found 2"


def test_position_rule_over_detections():
    m = position("circle", "left of", "square")
    left, right = (0, 10, 10, 20), (20, 10, 30, 20)
    assert evaluate([det("circle", box=left), det("square", box=right)], m).correct
    result = evaluate([det("circle", box=right), det("square", box=left)], m)
    assert not result.correct and result.reason == "expected circle left of target, found right of target"
    near = evaluate([det("circle", box=(0, 10, 10, 20)), det("square", box=(1, 10, 11, 20))], m)
    assert near.reason == "expected circle left of target, found  target"  # GenEval's wording, empty set
    # Missing target: the target clause failed, so its group is empty.
    result = evaluate([det("circle", box=left)], m)
    assert result.reason == "expected square>=1, found 0\nno target for circle to be left of"
    # Only the top detection per clause is placed; a lower-confidence square elsewhere does not matter.
    assert evaluate(
        [
            det("circle", box=left),
            det("square", box=right, conf=0.9),
            det("square", box=(0, 0, 10, 5), conf=0.5),
        ],
        m,
    ).correct


def test_position_checks_every_pair_against_the_target_group():
    m = meta(
        "position",
        [{"class": "square", "count": 2}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
    )
    circle = det("circle", box=(0, 10, 10, 20))
    assert evaluate(
        [circle, det("square", box=(20, 0, 30, 10)), det("square", box=(20, 20, 30, 30))], m
    ).correct
    assert not evaluate(
        [circle, det("square", box=(20, 0, 30, 10)), det("square", box=(0, 25, 10, 31))], m
    ).correct


def test_max_objects_caps_each_class():
    m = counting("circle", 2)
    dets = [det("circle", conf=0.99)] * 20
    assert evaluate(dets, m).reason == "expected circle<3, found 16"
    assert evaluate(dets, m, max_objects=2).correct


def test_detector_without_colour_is_a_clear_error():
    m = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
    with pytest.raises(MetadataError, match="gave no colour"):
        evaluate([det("circle", None)], m)


# --- Flow-GRPO partial credit ----------------------------------------------------------------------------


def test_partial_credit_count_term_is_clamped():
    m = counting("square", 3)
    five = [det("square", conf=0.95)] * 5
    result = evaluate(five, m)
    assert result.score == pytest.approx(1 - 2 / 3) and not result.correct and not result.strict_correct
    assert evaluate([det("square", conf=0.95)] * 7, m).score == 0.0  # 1 - 4/3 < 0, clamped
    assert evaluate([det("square", conf=0.95)] * 3, m).score == 1.0
    assert evaluate([det("square", conf=0.95)] * 2, m).score == pytest.approx(2 / 3)
    assert evaluate([], m).score == 0.0


def test_partial_credit_uses_all_kept_detections_and_one_zero_term():
    two = meta("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}])
    result = evaluate([det("circle"), det("circle"), det("square")], two)
    # GenEval: correct (top-1 circle exists). Flow-GRPO: circle term 1 - 1/1 = 0, square 1 -> 0.5.
    assert result.correct and not result.strict_correct and result.score == 0.5
    attr = meta(
        "color_attr",
        [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}],
    )
    # Terms: circle [count 1, colour 1], square [count 1, colour 0] -> 3/4.
    assert evaluate([det("circle", "red"), det("square", "red")], attr).score == 0.75
    # Count mismatch with a colour clause: circle [0, one zero term], square [1, 1] -> 2/4.
    assert evaluate([det("circle", "red")] * 2 + [det("square", "blue")], attr).score == 0.5
    colour_count = meta("colors", [{"class": "circle", "count": 2, "color": "red"}])
    assert evaluate([det("circle", "red"), det("circle", "blue")], colour_count).score == 0.75


def test_partial_credit_failed_position_is_one_zero_term():
    m = position("circle", "left of", "square")
    left, right = (0, 10, 10, 20), (20, 10, 30, 20)
    ok = evaluate([det("circle", box=left), det("square", box=right)], m)
    assert ok.score == 1.0 and ok.strict_correct
    # Terms: square [1], circle [1, 0] -> 2/3 (upstream appends 0 and 1 -> 3/4).
    bad = evaluate([det("circle", box=right), det("square", box=left)], m)
    assert bad.score == pytest.approx(2 / 3) and not bad.strict_correct
    # Two circles: circle [0, one zero term], square [1] -> 1/3.
    extra = evaluate([det("circle", box=left), det("circle", box=(0, 0, 5, 5)), det("square", box=right)], m)
    assert extra.score == pytest.approx(1 / 3)
    # Target missing: square [0], circle [1, 0] -> 1/3.
    assert evaluate([det("circle", box=left)], m).score == pytest.approx(1 / 3)


# --- aggregation ----------------------------------------------------------------------------------------


def result(tag, key, correct, score=None):
    return GenEvalResult(tag, key, key, correct, "", float(correct) if score is None else score, correct)


def test_summarize_follows_summary_scores_py():
    results = [
        result("single_object", "A", True),
        result("single_object", "A", False),
        result("single_object", "B", False),
        result("single_object", "B", False),
        result("counting", "C", True),
        result("counting", "C", False, score=0.5),
        result("counting", "C", True),
    ]
    s = summarize(results)
    assert (s.n_images, s.n_prompts) == (7, 3)
    assert s.image_accuracy == pytest.approx(3 / 7)
    assert s.prompt_accuracy == pytest.approx(2 / 3)  # a prompt counts when ANY of its images is correct
    assert s.task_accuracy == {"single_object": 0.25, "counting": pytest.approx(2 / 3)}
    assert list(s.task_accuracy) == ["single_object", "counting"]  # order of first appearance
    assert s.task_counts == {"single_object": (1, 4), "counting": (2, 3)}
    assert s.overall == pytest.approx((0.25 + 2 / 3) / 2)  # unweighted over tasks, not over images
    assert s.mean_score == pytest.approx(3.5 / 7)
    assert s.strict_image_accuracy == pytest.approx(3 / 7)
    assert s.missing_tasks == ("two_object", "colors", "position", "color_attr")
    text = format_summary(s)
    assert "% correct prompts: 66.67%" in text and "counting         = 66.67% (2 / 3)" in text
    assert "Overall score (avg. over tasks): 0.45833" in text
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_evaluate_result_groups_images_of_one_prompt():
    m = meta("single_object", [{"class": "circle", "count": 1}], prompt="a photo of a circle")
    results = [evaluate([det("circle")], m), evaluate([], dict(reversed(list(m.items()))))]
    assert results[0].prompt == "a photo of a circle" and results[0].prompt_key == results[1].prompt_key
    s = summarize(results)
    assert (s.n_prompts, s.prompt_accuracy, s.image_accuracy) == (1, 1.0, 0.5)


# --- bad metadata ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"include": [{"class": "circle", "count": 1}]}, "tag"),
        ({"tag": "single_object"}, "include"),
        ({"tag": "single_object", "include": []}, "include"),
        ({"tag": "counting", "include": [{"class": "circle", "count": 0}]}, "count"),
        ({"tag": "counting", "include": [{"class": "circle", "count": "2"}]}, "count"),
        ({"tag": "counting", "include": [{"count": 2}]}, "class"),
        ({"tag": "colors", "include": [{"class": "circle", "count": 1, "colour": "red"}]}, "colour"),
        (
            {"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]},
            "earlier",
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class": "a", "count": 1},
                    {"class": "b", "count": 1, "position": ["beside", 0]},
                ],
            },
            "beside",
        ),
        ({"tag": "counting", "include": [{"class": "a", "count": 1}], "exclude": {"class": "a"}}, "exclude"),
    ],
)
def test_bad_metadata_is_named(bad, message):
    with pytest.raises(MetadataError, match=message):
        evaluate([], bad)


def test_vocabulary_check_names_unknown_class_and_colour():
    m = meta("colors", [{"class": "cat", "count": 1, "color": "orange"}])
    with pytest.raises(MetadataError, match="unknown class 'cat'"):
        validate_metadata(m, classes={"circle"}, colors={"red"})
    with pytest.raises(MetadataError, match="unknown colour 'orange'"):
        validate_metadata(m, colors={"red"})
    validate_metadata(m)  # no vocabulary: only the schema is checked


@pytest.mark.skipif(not GENEVAL_METADATA.exists(), reason="GenEval's prompt file is not on this machine")
def test_real_geneval_metadata_follows_the_schema():
    for line in GENEVAL_METADATA.read_text().splitlines():
        validate_metadata(json.loads(line))


def test_rewards_never_import_flowalign_and_scorer_is_detector_agnostic():
    for folder in ("rewards/geneval", "rewards/shapes"):
        for path in (REPO / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                for name in names:
                    assert not name.startswith("flowalign"), f"{path} imports {name}"
                    if folder == "rewards/geneval":
                        assert not name.startswith("rewards.shapes"), f"{path} imports {name}"
