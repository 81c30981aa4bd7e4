"""benchmarks/video/seed_pooled.py: video students over seeds minus a reference, paired per video."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script


def _module():
    return load_script("benchmarks/video/seed_pooled.py")


def _bench(folder: Path, correct: list[int], order=None) -> Path:
    """A `flowalign bench video` folder: four first frames of two tasks, one video each (``order`` shuffles)."""
    videos = [
        {"prompt_index": i, "video": 0, "tag": "move" if i < 2 else "move_stay", "correct": bool(c)}
        for i, c in enumerate(correct)
    ]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"videos": [videos[i] for i in (order or range(4))]}))
    return folder


def test_the_mean_over_seeds_of_student_minus_reference(tmp_path):
    teacher = _bench(tmp_path / "teacher", [1, 0, 1, 0])
    seed0 = _bench(tmp_path / "s0", [1, 1, 1, 1])  # move 0.5 -> 1, move_stay 0.5 -> 1: +0.5
    seed1 = _bench(
        tmp_path / "s1", [0, 1, 0, 0], order=[3, 2, 1, 0]
    )  # move 0.5 -> 0.5, move_stay 0.5 -> 0: -0.25
    gain = _module().pooled([seed0, seed1], teacher)
    assert gain.estimate == pytest.approx(0.125)
    assert gain.low <= gain.estimate <= gain.high


def test_another_benchmarks_videos_are_refused(tmp_path):
    teacher = _bench(tmp_path / "teacher", [1, 0, 1, 0])
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(
        json.dumps({"videos": [{"prompt_index": 9, "video": 0, "tag": "move", "correct": True}]})
    )
    with pytest.raises(ValueError, match="judge different videos: not the same benchmark"):
        _module().pooled([other], teacher)


def test_pairs_give_each_seed_its_own_reference(tmp_path):
    base0 = _bench(tmp_path / "b0", [1, 0, 1, 0])
    tuned0 = _bench(tmp_path / "t0", [1, 1, 1, 1])  # +0.5 against its own base
    base1 = _bench(tmp_path / "b1", [0, 0, 0, 0])
    # move 0 -> 0.5, move_stay 0 -> 0: +0.25
    tuned1 = _bench(tmp_path / "t1", [1, 0, 0, 0], order=[3, 2, 1, 0])
    gain = _module().pooled_pairs([(base0, tuned0), (base1, tuned1)])
    assert gain.estimate == pytest.approx(0.375)
    assert gain.low <= gain.estimate <= gain.high
    assert _module().pooled([tuned0], base0).estimate == pytest.approx(0.5)


def test_the_command_line_takes_references_or_pairs_not_both(tmp_path, monkeypatch, capsys):
    base = _bench(tmp_path / "b", [1, 0, 1, 0])
    tuned = _bench(tmp_path / "t", [1, 1, 1, 1])
    module = _module()
    monkeypatch.setattr("sys.argv", ["seed_pooled.py", "--pair", str(base), str(tuned)])
    module.main()
    assert capsys.readouterr().out.splitlines()[-1].strip().startswith("= +0.500 [")
    for argv in (["--pair", str(base), str(tuned), "--students", str(tuned)], ["--students", str(tuned)], []):
        monkeypatch.setattr("sys.argv", ["seed_pooled.py", *argv])
        with pytest.raises(SystemExit, match="give --students with --references, or --pair"):
            module.main()
