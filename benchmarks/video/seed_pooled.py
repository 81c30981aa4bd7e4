"""Video students over several training seeds: the mean over the seeds of (student - reference), paired per video.

Each folder is a ``flowalign bench video`` output (its ``results.json``), all on the same first frames, seed and
so the same per-video noise; :func:`flowalign.eval.stats.pooled_gain` resamples the videos jointly across the
seeds. The references are usually the teacher at several step counts.

    python benchmarks/video/seed_pooled.py \\
        --students benchmarks/results/moving_shapes_dmd_4step/student_4step benchmarks/results/moving_shapes_dmd_4step/student_4step_seed1 \\
        --references benchmarks/results/moving_shapes_dmd_4step/teacher_10step_g1.5 benchmarks/results/moving_shapes_dmd_4step/teacher_4step_g1.5

``--pair BASE TUNED`` (once per seed) gives each seed its own reference instead: the mean over the seeds of
``TUNED - BASE``, e.g. one run's step-600 checkpoint against its own step-300 one.
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


def pooled_pairs(pairs: list[tuple[Path, Path]]):
    """The mean over seeds of ``tuned - base``, one ``(base, tuned)`` pair of bench folders per seed, overall, with
    its interval; folders that judge other videos than the first base are refused."""
    _, keys = verdicts(pairs[0][0])
    seeds = []
    for base, tuned in pairs:
        (base_verdicts, base_keys), (tuned_verdicts, tuned_keys) = verdicts(base), verdicts(tuned)
        for folder, folder_keys in ((base, base_keys), (tuned, tuned_keys)):
            if folder_keys != keys:
                raise ValueError(f"{folder} and {pairs[0][0]} judge different videos: not the same benchmark")
        seeds.append((base_verdicts, tuned_verdicts))
    return pooled_gain(seeds).overall


def pooled(students: list[Path], reference: Path):
    """The mean over ``students`` (one bench folder per seed) of (student - ``reference``), overall, with its
    interval; folders that judge other videos are refused."""
    return pooled_pairs([(reference, student) for student in students])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="+", type=Path, help="one bench folder per seed")
    parser.add_argument("--references", nargs="+", type=Path, help="bench folders to subtract")
    parser.add_argument(
        "--pair", nargs=2, type=Path, action="append", default=[], metavar=("BASE", "TUNED"),
        help="one seed's reference and student (repeat per seed): the mean of TUNED - BASE",
    )  # fmt: skip
    args = parser.parse_args()
    mixed = args.pair and (args.students or args.references)
    incomplete = not args.pair and not (args.students and args.references)
    if mixed or incomplete:
        sys.exit("error: give --students with --references, or --pair BASE TUNED once per seed, not both")
    try:
        if args.pair:
            gain = pooled_pairs(args.pair)
            print(f"mean over {len(args.pair)} seeds of TUNED - BASE:")
            for base, tuned in args.pair:
                print(f"  {tuned} - {base}")
            print(f"  = {gain.estimate:+.3f} [{gain.low:+.3f}, {gain.high:+.3f}]")
            return
        print(f"mean over {len(args.students)} seeds ({', '.join(str(s) for s in args.students)}) minus:")
        for reference in args.references:
            gain = pooled(args.students, reference)
            print(f"  {reference}: {gain.estimate:+.3f} [{gain.low:+.3f}, {gain.high:+.3f}]")
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
