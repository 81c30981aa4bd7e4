"""benchmarks/shapes/guidance_sweep.py: the teacher over guidance scales, paired with its default scale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/shapes/guidance_sweep.py"


def test_each_scale_is_paired_with_the_reference(tmp_path):
    out = tmp_path / "sweep"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--scales", "1.0", "1.5", "--steps", "2", "--splits", "test",
         "--max-prompts", "3", "--min-images-per-task", "0", "--out", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads((out / "results.json").read_text())["splits"]["test"]
    assert result["images"] == 12  # 3 prompts x GenEval's 4 images
    rows = result["rows"]
    assert "minus_reference" not in rows["1.5"]
    # Same prompts, same per-image noise: the paired difference's estimate is the difference of the overalls.
    assert rows["1"]["minus_reference"][0] == pytest.approx(rows["1"]["overall"] - rows["1.5"]["overall"])
    for scale in ("g1", "g1.5"):
        assert len(json.loads((out / "test" / scale / "results.json").read_text())["images"]) == 12
    assert (out / "overall.png").stat().st_size > 0


def test_the_reference_must_be_swept(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--scales", "2.0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert "--reference 1.5 must be one of --scales" in run.stderr


def test_a_scale_given_twice_is_refused(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--scales", "1.5", "1.5", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert "--scales: each scale once" in run.stderr
