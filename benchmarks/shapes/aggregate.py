"""Aggregate evidence runs: per recipe and guidance, the held-out gain pooled over training seeds, held
against a control that spent its minutes on something other than reward.

Each argument is the ``--out`` directory of ``benchmarks/shapes/evidence.py`` (one training seed of one
recipe); runs with the same config and overrides are seeds of one recipe. ``--control`` names the
evidence runs of the control (e.g. ``configs/sft/shapes.yaml``: continued supervised fine-tuning for the
same minutes). Per recipe, guidance and split (test, unseen) the table gives:

- the gain over the base pooled over seeds (:func:`flowalign.eval.stats.pooled_gain`: the mean of the
  per-seed gains, with the paired bootstrap interval over the images, resampled jointly across seeds) and
  whether its 95% interval excludes zero;
- the paired difference tuned - control on the same images (the mean over the recipe's seeds minus the
  mean over the control's) and whether it beats the control (its interval lies above zero);
- train minutes and CPU-minutes (wall minutes x torch threads), and the gain per CPU-minute with its
  interval (the gain's interval divided by the mean CPU-minutes);
- "shown": the effect is shown when, over at least two seeds, the gain's interval lies above zero and it
  beats the control (design.md, section 7).

The intervals are conditional on the trained models: they cover the evaluation's noise, not the spread of
training outcomes over seeds, which the per-seed gains show. Example:

    python benchmarks/shapes/aggregate.py benchmarks/results/shapes_grpo_seed0 benchmarks/results/shapes_grpo_seed1 \
        --control benchmarks/results/shapes_sft_seed0 --out benchmarks/results/shapes_evidence.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from flowalign.eval.compare import BenchmarkRun, load_run
from flowalign.eval.stats import pooled_gain


@dataclass(frozen=True)
class EvidenceRun:
    """One evidence run: its directory, recipe (config and overrides), train seed, minutes and
    ``evaluations`` (results.json's list, one per split and guidance)."""

    path: Path
    recipe: str
    seed: int
    train_minutes: float
    cpu_minutes: float
    evaluations: list[dict]

    def benchmarks(self, split: str, guidance: float) -> tuple[Path, Path] | None:
        """The (base, tuned) benchmark directories of ``split`` at ``guidance``; None if not evaluated."""
        for e in self.evaluations:
            if e["split"] == split and e["guidance"] == guidance:
                return self.path / e["base_dir"], self.path / e["tuned_dir"]
        return None


def load_evidence(directory: str | Path) -> EvidenceRun:
    """Read an evidence run's ``results.json``; ``SystemExit`` naming the directory if it is not one."""
    path = Path(directory)
    try:
        summary = json.loads((path / "results.json").read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"{str(path)!r} holds no results.json; pass --out directories of evidence.py."
        ) from None
    if "evaluations" not in summary:
        raise SystemExit(
            f"{path}/results.json predates per-image paired evaluations (no 'evaluations'); rerun "
            "benchmarks/shapes/evidence.py for it."
        )
    return EvidenceRun(
        path=path,
        recipe=" ".join([summary["config"], *map(shlex.quote, summary["overrides"])]),
        seed=summary["train_seed"],
        train_minutes=summary["train_minutes"],
        cpu_minutes=summary["cpu_minutes"],
        evaluations=summary["evaluations"],
    )


def aggregate(recipes: dict[str, list[EvidenceRun]], control: list[EvidenceRun]) -> list[dict]:
    """One row per recipe, guidance and split (see the module docstring); the control's own rows (its
    runs are ``control``) compare it with the base only."""
    rows = []
    for recipe, runs in recipes.items():
        guidances = sorted({e["guidance"] for e in runs[0].evaluations})
        for guidance in guidances:
            for split in ("test", "unseen"):
                dirs = [run.benchmarks(split, guidance) for run in runs]
                if any(d is None for d in dirs):
                    continue
                pairs = [(load_run(base), load_run(tuned)) for base, tuned in dirs]
                gain = pooled_gain([(b.verdicts, t.verdicts) for b, t in pairs])
                cpu = sum(r.cpu_minutes for r in runs) / len(runs)
                row = {
                    "recipe": recipe,
                    "seeds": [r.seed for r in runs],
                    "guidance": guidance,
                    "split": split,
                    "gain": gain.as_json(),
                    # Each seed alone, with its own paired interval (the pooled gain's per_seed, resolved).
                    "per_seed_gains": [
                        pooled_gain([(b.verdicts, t.verdicts)]).overall.as_json() for b, t in pairs
                    ],
                    "train_minutes": sum(r.train_minutes for r in runs) / len(runs),
                    "cpu_minutes": cpu,
                    "gain_per_cpu_minute": {
                        k: gain.overall.as_json()[k] / cpu for k in ("estimate", "low", "high")
                    },
                    "versus_control": "the control"
                    if runs is control
                    else _versus(control, split, guidance, [t for _, t in pairs]),
                }
                versus = row["versus_control"]
                row["shown"] = (
                    len(runs) >= 2 and gain.overall.low > 0 and isinstance(versus, dict) and versus["low"] > 0
                )
                rows.append(row)
    return rows


def _versus(
    control: list[EvidenceRun], split: str, guidance: float, tuned_runs: list[BenchmarkRun]
) -> dict | str:
    """tuned - control on the same images, pooled over both sets of seeds, or why it cannot be computed."""
    if not control:
        return "no control given"
    dirs = [run.benchmarks(split, guidance) for run in control]
    if any(d is None for d in dirs):
        return f"control not evaluated at guidance {guidance:g}"
    controls = [load_run(tuned) for _, tuned in dirs]
    different = controls[0].protocol.mismatch(tuned_runs[0].protocol)
    if different is not None:
        return f"control benchmarked differently ({different})"
    # Every (control, tuned) combination: their mean difference is mean(tuned) - mean(control).
    pairs = [(c.verdicts, t.verdicts) for t in tuned_runs for c in controls]
    return pooled_gain(pairs).as_json()["overall"]


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Held-out gains pooled over training seeds",
        "",
        f"Command: `{command}`",
        "",
        "Gain = tuned - base overall (mean over seeds) with its 95% paired bootstrap interval; vs control = "
        "tuned - control on the same images; shown = at least two seeds, gain interval above zero and beats "
        "the control. Intervals cover the evaluation noise given the trained models; the per-seed gains show "
        "the spread over training seeds.",
        "",
        "| recipe | seeds | guidance | split | gain [95% interval] | excludes 0 | vs control [95% interval] "
        "| beats control | train min (CPU-min) | gain per CPU-min [95% interval] | per-seed gains [95% interval] | shown |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, v, e = r["gain"]["overall"], r["versus_control"], r["gain_per_cpu_minute"]
        versus = v if isinstance(v, str) else f"{v['estimate']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
        beats = "n/a" if isinstance(v, str) else _yes(v["low"] > 0)
        lines.append(
            f"| `{r['recipe']}` | {len(r['seeds'])} | {r['guidance']:g} | {r['split']} | "
            f"{g['estimate']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] | {_yes(g['excludes_zero'])} | {versus} | "
            f"{beats} | {r['train_minutes']:.1f} ({r['cpu_minutes']:.1f}) | "
            f"{e['estimate']:+.4f} [{e['low']:+.4f}, {e['high']:+.4f}] | "
            + ", ".join(
                f"{x['estimate']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]" for x in r["per_seed_gains"]
            )
            + f" | **{_yes(r['shown'])}** |"
        )
    return "\n".join(lines) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", help="evidence.py --out directories (seeds of one or more recipes)"
    )
    parser.add_argument(
        "--control", nargs="*", default=[], help="evidence.py --out directories of the control"
    )
    parser.add_argument("--out", required=True, help="markdown file to write (and a .json next to it)")
    args = parser.parse_args(argv)

    recipes: dict[str, list[EvidenceRun]] = {}
    for directory in args.runs:
        run = load_evidence(directory)
        recipes.setdefault(run.recipe, []).append(run)
    control = [load_evidence(d) for d in args.control]
    if control:
        recipes.setdefault(f"control: {control[0].recipe}", control)
    command = "python benchmarks/shapes/aggregate.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    rows = aggregate(recipes, control)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, command))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
