"""benchmarks/shapes/seed_pooled.py: one change over several training seeds, from stored verdict folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script


def _module():
    return load_script("benchmarks/shapes/seed_pooled.py")


def _write(folder: Path, correct: list[bool]) -> Path:
    """A verdict folder as distill_compare writes it: four prompts of two tasks, two images each."""
    images = [
        {"prompt_index": i // 2, "tag": "colors" if i < 4 else "counting", "correct": c}
        for i, c in enumerate(correct)
    ]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"images": images}))
    return folder


def test_per_seed_differences_flips_and_their_mean(tmp_path):
    teacher = [True] * 8
    pairs = []
    for seed, (base, tuned) in enumerate(
        [
            ([0, 0, 1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 0, 1, 0, 1]),
            ([1, 0, 1, 0, 1, 0, 1, 0], [1, 0, 1, 0, 1, 0, 0, 0]),
        ]
    ):
        _write(tmp_path / f"s{seed}" / "teacher", teacher)
        pairs.append(
            (_write(tmp_path / f"s{seed}" / "base", base), _write(tmp_path / f"s{seed}" / "tuned", tuned))
        )
    result = _module().pooled_split(pairs)
    # Seed 0: colors 0.5 -> 1.0, counting unchanged: overall (mean of tasks) +0.25. Seed 1: counting 0.5 ->
    # 0.25: overall -0.125. The mean over seeds: +0.0625.
    assert [d.overall.estimate for d in result["per_seed"]] == pytest.approx([0.25, -0.125])
    assert result["flips"] == [(2, 0), (0, 1)]
    assert result["pooled"].overall.estimate == pytest.approx(0.0625)
    assert result["pooled"].tasks["colors"].estimate == pytest.approx(0.25)


def test_folders_of_another_benchmark_are_refused(tmp_path):
    _write(tmp_path / "a" / "teacher", [True] * 8)
    _write(tmp_path / "b" / "teacher", [True] * 7 + [False])
    pairs = [
        (_write(tmp_path / "a" / "base", [True] * 8), _write(tmp_path / "a" / "tuned", [True] * 8)),
        (_write(tmp_path / "b" / "base", [True] * 8), _write(tmp_path / "b" / "tuned", [True] * 8)),
    ]
    with pytest.raises(ValueError, match="not the same benchmark"):
        _module().pooled_split(pairs)
