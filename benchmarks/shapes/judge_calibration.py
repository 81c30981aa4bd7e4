"""The shapes judge's calibration: its verdicts on the procedural suite, per task and per case kind.

Generates :func:`flowalign.worlds.shapes.calibration.calibration_suite` (positives: correct scenes drawn
with soft edges, blur, colour fringes, boundary noise, colour noise, +-15% scale, sub-pixel placement,
fragments and speckles; negatives: wrong shape / colour / count / position, merged and half-drawn
objects), judges every image with the shapes detector and GenEval's rules, and writes the confusion
table (``results.md``, ``results.json``) and a PNG of the misjudged images. Targets (issue 13): per task,
positives judged correct >= 97% and negatives judged incorrect >= 97%. Example:

    python benchmarks/shapes/judge_calibration.py --cases-per-task 200 --seed 0 --out benchmarks/results/judge_calibration
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

TARGET = 0.97


def judge_suite(cases, batch_size: int = 256):
    """GenEval verdicts of the shapes detector on each case (list of bools)."""
    import torch

    from rewards.geneval import evaluate
    from rewards.shapes import detect_batch

    verdicts = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        detections = detect_batch(torch.stack([c.image for c in chunk]))
        verdicts += [evaluate(d, c.metadata).correct for d, c in zip(detections, chunk)]
    return verdicts


def confusion(cases, verdicts) -> dict:
    """Per task: positives judged correct and negatives judged incorrect, with counts per case kind."""
    from rewards.geneval.scorer import TASKS

    table = {}
    for tag in TASKS:
        rows = [(c, v) for c, v in zip(cases, verdicts) if c.tag == tag]
        pos = [v for c, v in rows if c.positive]
        neg = [not v for c, v in rows if not c.positive]
        kinds = Counter(c.kind for c, _ in rows if not c.positive)
        kinds_ok = Counter(c.kind for c, v in rows if not c.positive and not v)
        perturb = Counter(p for c, _ in rows if c.positive for p in c.perturbations)
        perturb_ok = Counter(p for c, v in rows if c.positive and v for p in c.perturbations)
        table[tag] = {
            "positives": len(pos),
            "positives_correct": sum(pos),
            "negatives": len(neg),
            "negatives_incorrect": sum(neg),
            "negative_kinds": {k: [kinds_ok[k], n] for k, n in sorted(kinds.items())},
            "positive_perturbations": {k: [perturb_ok[k], n] for k, n in sorted(perturb.items())},
        }
    return table


def markdown(table: dict, command: str, seconds: float) -> str:
    from flowalign.eval.stats import wilson_interval

    lines = [
        "# Shapes judge calibration",
        "",
        f"Command: `{command}` ({seconds:.0f} s)",
        "",
        "Rows: the true verdict (by construction). Columns: the judge's verdict. Intervals: 95% Wilson.",
        "",
        "| task | positives judged correct | rate [95% CI] | negatives judged incorrect | rate [95% CI] | targets met |",
        "|---|---|---|---|---|---|",
    ]
    for tag, t in table.items():
        tp, p, tn, n = t["positives_correct"], t["positives"], t["negatives_incorrect"], t["negatives"]
        pos, neg = wilson_interval(tp, p), wilson_interval(tn, n)
        lo_p, hi_p, lo_n, hi_n = pos.low, pos.high, neg.low, neg.high
        met = "yes" if tp / p >= TARGET and tn / n >= TARGET else "**no**"
        lines.append(
            f"| {tag} | {tp} / {p} | {tp / p:.3f} [{lo_p:.3f}, {hi_p:.3f}] | {tn} / {n} | "
            f"{tn / n:.3f} [{lo_n:.3f}, {hi_n:.3f}] | {met} |"
        )
    lines += ["", "Confusion table (counts):", "", "| task | true correct: judged correct | judged incorrect | "
              "true incorrect: judged correct | judged incorrect |", "|---|---|---|---|---|"]  # fmt: skip
    for tag, t in table.items():
        tp, p, tn, n = t["positives_correct"], t["positives"], t["negatives_incorrect"], t["negatives"]
        lines.append(f"| {tag} | {tp} | {p - tp} | {n - tn} | {tn} |")
    lines += ["", "Negatives judged incorrect, per kind:", ""]
    for tag, t in table.items():
        kinds = ", ".join(f"{k} {ok}/{n}" for k, (ok, n) in t["negative_kinds"].items())
        lines.append(f"- {tag}: {kinds}")
    lines += ["", "Positives judged correct, per perturbation (a positive carries 1-6 of them):", ""]
    for tag, t in table.items():
        kinds = ", ".join(f"{k} {ok}/{n}" for k, (ok, n) in t["positive_perturbations"].items())
        lines.append(f"- {tag}: {kinds}")
    return "\n".join(lines) + "\n"


def error_grid(cases, verdicts, path: Path, max_images: int = 64) -> None:
    """The misjudged images (4x upscaled), labelled with their prompt and kind."""
    from PIL import Image, ImageDraw

    wrong = [c for c, v in zip(cases, verdicts) if v != c.positive][:max_images]
    cell, text = 32 * 4 + 8, 330
    canvas = Image.new("RGB", (2 * (cell + text), max(1, (len(wrong) + 1) // 2) * cell), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for k, case in enumerate(wrong):
        x, y = (k % 2) * (cell + text), (k // 2) * cell
        pixels = (case.image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(pixels).resize((128, 128), Image.NEAREST), (x + 4, y + 4))
        label = "positive judged incorrect" if case.positive else f"negative ({case.kind}) judged correct"
        draw.text((x + cell, y + 20), case.metadata["prompt"], fill=(230, 230, 230))
        draw.text((x + cell, y + 40), label, fill=(230, 120, 120))
        draw.text((x + cell, y + 60), ", ".join(case.perturbations), fill=(180, 180, 180))
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases-per-task", type=int, default=200, help="positives (and negatives) per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for results.md/json and errors.png")
    args = parser.parse_args()

    from flowalign.worlds.shapes.calibration import calibration_suite

    start = time.perf_counter()
    cases = calibration_suite(args.cases_per_task, args.seed)
    verdicts = judge_suite(cases)
    table = confusion(cases, verdicts)
    command = "python benchmarks/shapes/judge_calibration.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    text = markdown(table, command, time.perf_counter() - start)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(text)
        (out / "results.json").write_text(json.dumps({"command": command, "tasks": table}, indent=1) + "\n")
        error_grid(cases, verdicts, out / "errors.png")


if __name__ == "__main__":
    main()
