"""Video students over several training seeds: the mean over the seeds of (student - reference), paired per video.

Each folder is a ``flowalign bench video`` output (its ``results.json``), all on the same first frames, seed and
so the same per-video noise; :func:`flowalign.eval.stats.pooled_gain` resamples the videos jointly across the
seeds. The references are usually the teacher at several step counts.

    python benchmarks/video/seed_pooled.py \\
        --students benchmarks/results/moving_shapes_dmd_4step/student_4step benchmarks/results/moving_shapes_dmd_4step/student_4step_seed1 \\
        --references benchmarks/results/moving_shapes_dmd_4step/teacher_10step_g1.5 benchmarks/results/moving_shapes_dmd_4step/teacher_4step_g1.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flowalign.eval.stats import Verdicts, pooled_gain  # noqa: E402


def verdicts(folder: Path) -> tuple[Verdicts, list[tuple[int, int]]]:
    """A benchmark folder's per-video verdicts (``correct``), and the (prompt, video) keys they are ordered by."""
    videos = json.loads((folder / "results.json").read_text())["videos"]
    videos = sorted(videos, key=lambda v: (v["prompt_index"], v["video"]))
    keys = [(v["prompt_index"], v["video"]) for v in videos]
    return Verdicts.from_images(
        [k[0] for k in keys], [v["tag"] for v in videos], [v["correct"] for v in videos]
    ), keys


def pooled(students: list[Path], reference: Path):
    """The mean over ``students`` (one bench folder per seed) of (student - ``reference``), overall, with its
    interval; folders that judge other videos are refused."""
    base, keys = verdicts(reference)
    seeds = []
    for folder in students:
        student, student_keys = verdicts(folder)
        if student_keys != keys:
            raise ValueError(f"{folder} and {reference} judge different videos: not the same benchmark")
        seeds.append((base, student))
    return pooled_gain(seeds).overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="+", type=Path, required=True, help="one bench folder per seed")
    parser.add_argument("--references", nargs="+", type=Path, required=True, help="bench folders to subtract")
    args = parser.parse_args()
    print(f"mean over {len(args.students)} seeds ({', '.join(str(s) for s in args.students)}) minus:")
    for reference in args.references:
        try:
            gain = pooled(args.students, reference)
        except ValueError as error:
            sys.exit(f"error: {error}")
        print(f"  {reference}: {gain.estimate:+.3f} [{gain.low:+.3f}, {gain.high:+.3f}]")


if __name__ == "__main__":
    main()
