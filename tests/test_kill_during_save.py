"""kill -9 during a checkpoint save, then resume (issue 15): the run ends with the weights of an
uninterrupted one. The repeated stress run is benchmarks/reliability/kill_during_save.py (results in
benchmarks/results/kill_during_save/); the slow test repeats it."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "reliability"))

import kill_during_save as stress  # noqa: E402


def test_a_kill_in_the_middle_of_a_save_is_recovered_exactly(tmp_path):
    assert stress._train(tmp_path / "reference", 2).returncode == 0
    reference = stress.final_tensors(tmp_path / "reference")
    # Killed as soon as the save's step-000002.tmp folder appears (a save takes tens of milliseconds here).
    record = stress.trial(0, 2, 0.0, tmp_path, reference, random.Random(0), target=2)
    assert record["killed_while_running"], record
    assert record["recovery"] == "resume" and record["recovery_status"] == 0, record
    assert record["resumed_from"] == "1" and record["stale_lock"] and record["orphans_left"] == [], record
    assert record["equal_to_uninterrupted"], record


@pytest.mark.slow
def test_many_kills_during_saves_are_all_recovered_exactly(tmp_path):
    assert stress._train(tmp_path / "reference", 3).returncode == 0
    reference = stress.final_tensors(tmp_path / "reference")
    rng = random.Random(1)
    records = [stress.trial(i, 3, 0.05, tmp_path, reference, rng) for i in range(12)]
    assert all(r["recovery_status"] == 0 and r["equal_to_uninterrupted"] for r in records), records
