"""One recipe change measured over several training seeds, from committed verdicts (issue 16).

Each ``--pair BASE TUNED`` is one seed's two students, ``BASE`` without the change and ``TUNED`` with it,
trained with the same seed, as folders of per-image verdicts written by ``distill_compare.py`` (``{split}``
in the path). For every split it reports each seed's paired difference ``TUNED - BASE`` and the mean over
seeds (:func:`flowalign.eval.stats.pooled_gain`: images resampled jointly across seeds), overall and per
task. The seed-to-seed spread of the change is in the per-seed column; the pooled interval covers the
evaluation noise given the trained students.

    python benchmarks/shapes/seed_pooled.py \\
        --pair 'benchmarks/results/shapes_dmd_ambient/{split}/ac_dmd' \\
               'benchmarks/results/shapes_dmd_consistency/{split}/consistency' \\
        --pair 'benchmarks/results/shapes_dmd_seed_spread/{split}/ac_dmd_seed1' \\
               'benchmarks/results/shapes_dmd_consistency_seed1/{split}/consistency_seed1' \\
        --out benchmarks/results/shapes_dmd_consistency_pooled

All folders must hold the same benchmark: their teachers' verdicts (``DIR/../teacher``) are checked equal,
image for image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_compare import stored_verdicts  # noqa: E402
from distill_evidence import write_results  # noqa: E402

from flowalign.eval.stats import paired_comparison, pooled_gain  # noqa: E402


def _cell(interval) -> str:
    return f"{interval.estimate:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"


def pooled_split(pairs: list[tuple[Path, Path]]) -> dict:
    """Per-seed paired differences and their mean over seeds for one split's ``(base, tuned)`` folders."""
    folders = [folder for pair in pairs for folder in pair]
    teachers = [stored_verdicts(folder.parent / "teacher") for folder in folders]
    for folder, teacher in zip(folders, teachers, strict=True):
        if not np.array_equal(teacher.correct, teachers[0].correct):
            raise ValueError(
                f"--pair: the teacher's verdicts next to {folder} differ from those next to {folders[0]}: "
                "not the same benchmark, so the seeds cannot be pooled"
            )
    verdicts = [(stored_verdicts(base), stored_verdicts(tuned)) for base, tuned in pairs]
    per_seed = [paired_comparison(base, tuned) for base, tuned in verdicts]
    pooled = pooled_gain(verdicts)
    flips = [(int((t.correct & ~b.correct).sum()), int((b.correct & ~t.correct).sum())) for b, t in verdicts]
    return {
        "pairs": [[str(b), str(t)] for b, t in pairs],
        "per_seed": per_seed,
        "pooled": pooled,
        "flips": flips,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pair", nargs=2, action="append", required=True, metavar=("BASE", "TUNED"),
        help="one seed's students without and with the change: verdict folders with {split} in the path",
    )  # fmt: skip
    parser.add_argument("--splits", nargs="+", default=["test", "unseen"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    bad = [p for pair in args.pair for p in pair if "{split}" not in p]
    if bad:
        sys.exit(f"--pair: every folder needs {{split}} in its path; got {bad}")
    command = "python " + " ".join(sys.argv)
    lines = ["# One change over several training seeds (shapes world)", "", f"Command: `{command}`", ""]
    out: dict = {"command": command, "splits": {}}
    for split in args.splits:
        pairs = [(Path(b.format(split=split)), Path(t.format(split=split))) for b, t in args.pair]
        try:
            result = pooled_split(pairs)
        except (ValueError, FileNotFoundError) as error:
            sys.exit(str(error))
        pooled = result["pooled"]
        lines += [
            f"## {split}",
            "",
            "| seed pair | tuned minus base [95%] | images up / down |",
            "|---|---|---|",
        ]
        for (base, tuned), diff, (up, down) in zip(pairs, result["per_seed"], result["flips"], strict=True):
            lines.append(f"| `{base.name}` -> `{tuned.name}` | {_cell(diff.overall)} | {up} / {down} |")
        seeds = f"{len(pairs)} seed" + ("s" if len(pairs) > 1 else "")
        lines.append(f"| **mean over {seeds}** | **{_cell(pooled.overall)}** | |")
        lines += ["", "| task | mean over seeds [95%] |", "|---|---|"]
        lines += [f"| {tag} | {_cell(i)} |" for tag, i in pooled.tasks.items()]
        lines.append("")
        out["splits"][split] = {
            "pairs": result["pairs"],
            "per_seed": [d.overall.as_json(difference=True) for d in result["per_seed"]],
            "flips_up_down": result["flips"],
            "pooled": pooled.as_json(),
        }
    lines.append(
        "Differences are paired bootstraps over prompts on the same images' seeds; the mean over seeds "
        "resamples the images jointly for every seed (`flowalign.eval.stats.pooled_gain`)."
    )
    write_results(args.out, out, lines)


if __name__ == "__main__":
    main()
