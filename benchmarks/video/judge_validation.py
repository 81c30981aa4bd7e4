"""The moving-shapes judge's validation: its (identity, motion) verdicts on built videos whose verdicts are
known by construction, per kind, with 95% Wilson intervals.

Builds :func:`flowalign.worlds.moving_shapes.validation_suite` (true videos and eight kinds of wrong ones;
``--perturbation soft``: blur and colour noise on exact renders; ``full``: the shapes judge's calibration
perturbations on every frame -- +-15% object scale, sub-pixel placement, blur or colour fringes, boundary
noise, colour noise, fragments, speckles), judges every video with :func:`judge_video`, and writes
``results.md``, ``results.json`` and ``errors.png`` (the misjudged videos' frame strips). Example:

    python benchmarks/video/judge_validation.py --per-kind 100 --seed 0 --perturbation full --out benchmarks/results/moving_shapes_judge/full
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=100, help="videos of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--perturbation", choices=("soft", "full"), default="full")
    parser.add_argument("--out", default=None, help="directory for results.md/json and errors.png")
    args = parser.parse_args()

    import torch
    from torchvision.utils import save_image

    from flowalign.eval.stats import wilson_interval
    from flowalign.worlds.moving_shapes import NEGATIVE_KINDS, judge_video, validation_suite

    start = time.perf_counter()
    cases = validation_suite(args.per_kind, args.seed, args.perturbation)
    rows, wrong = {}, []
    for kind, spec, video, identity, motion in cases:
        verdict = judge_video(video, spec)
        agrees = (verdict.identity, verdict.motion) == (identity, motion)
        row = rows.setdefault(
            kind, {"videos": 0, "agree": 0, "correct_agree": 0, "built": [identity, motion], "reasons": []}
        )
        row["videos"] += 1
        row["agree"] += agrees
        row["correct_agree"] += verdict.correct == (identity and motion)
        if not agrees:
            row["reasons"].append(verdict.reason)
            wrong.append(video)
    seconds = time.perf_counter() - start
    command = "python benchmarks/video/judge_validation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"# Moving-shapes judge validation ({args.perturbation} perturbations)",
        "",
        f"Command: `{command}` ({seconds:.0f} s). A video agrees when the judge's (identity, motion) equals the built one.",
        "",
        "| kind | built (identity, motion) | agree | rate [95% Wilson] |",
        "|---|---|---|---|",
    ]
    total = sum(r["videos"] for r in rows.values())
    agree = sum(r["agree"] for r in rows.values())
    for kind in ("true", *NEGATIVE_KINDS):
        r = rows[kind]
        ci = wilson_interval(r["agree"], r["videos"])
        lines.append(
            f"| {kind} | {tuple(r['built'])} | {r['agree']} / {r['videos']} | {r['agree'] / r['videos']:.3f} "
            f"[{ci.low:.3f}, {ci.high:.3f}] |"
        )
    ci = wilson_interval(agree, total)
    lines += ["", f"All: {agree} / {total} = {agree / total:.3f} [{ci.low:.3f}, {ci.high:.3f}].", ""]
    # The benchmark's verdict, correct = identity and motion: true videos judged correct, wrong ones incorrect.
    true_ok, true_n = rows["true"]["correct_agree"], rows["true"]["videos"]
    wrong_ok = sum(r["correct_agree"] for k, r in rows.items() if k != "true")
    wrong_n = sum(r["videos"] for k, r in rows.items() if k != "true")
    for what, ok, n in (
        ("true videos judged correct", true_ok, true_n),
        ("wrong videos judged incorrect", wrong_ok, wrong_n),
    ):
        ci = wilson_interval(ok, n)
        lines.append(f"- {what}: {ok} / {n} = {ok / n:.3f} [{ci.low:.3f}, {ci.high:.3f}]")
    lines.append("")
    misjudged = [(kind, reason) for kind, r in rows.items() for reason in r["reasons"]]
    if misjudged:
        lines += ["Misjudged (kind: the judge's reason), in `errors.png` row by row:", ""]
        lines += [f"- {kind}: {reason or 'judged correct'}" for kind, reason in misjudged]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(text)
        (out / "results.json").write_text(json.dumps({"command": command, "kinds": rows}, indent=1) + "\n")
        if wrong:
            frames = torch.stack(wrong[:32]).flatten(0, 1)
            save_image(torch.nn.functional.interpolate(frames, scale_factor=4), out / "errors.png", nrow=5)


if __name__ == "__main__":
    main()
