"""kill -9 during a checkpoint save, then resume: does the run end with the weights of an uninterrupted one?

Each trial starts ``flowalign train CONFIG`` (a checkpoint every iteration) in a fresh output directory,
waits until the save of a randomly chosen iteration has begun (its ``step-N.tmp`` folder exists), sleeps a
random 0-``--max-delay`` seconds more and sends SIGKILL. Then it does what a user would: ``train.resume=latest``
(or, when the kill left no valid checkpoint, a fresh start with ``train.overwrite=true``), and compares the
final checkpoint's weights and EMA with an uninterrupted run's, bit for bit. Recorded per trial: which save
was interrupted and how far it had got (files in the partial folder), what resume chose, whether a stale
lock or a partial folder was left and cleaned, and whether the weights are equal.

    python benchmarks/reliability/kill_during_save.py --trials 40 --out benchmarks/results/kill_during_save
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/grpo/tiny_sd3.yaml"
COMMON = [
    "train.checkpoint_every=1",
    "train.keep_checkpoints=10",
    "train.ema_decay=0.5",
    "grpo.minibatch_size=2",
]


def _train(
    out: Path, steps: int, *extra: str, wait: bool = True
) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flowalign", "train", CONFIG, f"train.output_dir={out}",
               f"train.steps={steps}", *COMMON, *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always"}
    if wait:
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def final_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    last = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))[-1]
    return {f.name: load_file(str(f)) for f in sorted(last.glob("*.safetensors"))}


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all((a[f][k] == b[f][k]).all() for k in a[f]) for f in a
    )


def trial(
    index: int,
    steps: int,
    max_delay: float,
    work: Path,
    reference: dict,
    rng: random.Random,
    target: int | None = None,
) -> dict:
    """One kill and recovery (see the module docstring); ``target``: the save to interrupt (default random)."""
    out = work / f"trial{index}"
    target = rng.randint(1, steps) if target is None else target
    delay = rng.uniform(0, max_delay)
    process = _train(out, steps, wait=False)
    tmp = out / "checkpoints" / f"step-{target:06d}.tmp"
    started = time.time()
    while not tmp.exists() and process.poll() is None and time.time() - started < 600:
        time.sleep(0.0005)
    time.sleep(delay)
    killed_while_running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = (
        sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else None
    )
    complete = sorted(p.name for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    lock_left = (out / "run.lock").exists()
    resumed = _train(out, steps, "train.resume=latest")
    mode = "resume"
    if resumed.returncode != 0 and "holds no valid checkpoint" in resumed.stderr:
        mode = "restart"
        resumed = _train(out, steps, "train.overwrite=true")
    record = {
        "trial": index, "target_save": target, "delay_s": round(delay, 4), "killed_while_running": killed_while_running,
        "partial_folder_files": partial, "complete_checkpoints_after_kill": complete, "stale_lock": lock_left,
        "recovery": mode, "recovery_status": resumed.returncode,
        "skipped_warnings": [line.strip() for line in resumed.stderr.splitlines() if "skipping checkpoint" in line],
        "resumed_from": next((line.split()[-1] for line in resumed.stdout.splitlines() if "resumed from step" in line), None),
    }  # fmt: skip
    if resumed.returncode == 0:
        record["orphans_left"] = sorted(p.name for p in (out / "checkpoints").glob("*.tmp"))
        record["equal_to_uninterrupted"] = equal(final_tensors(out), reference)
    else:
        record["error"] = resumed.stderr.strip().splitlines()[-1:] or [""]
        record["equal_to_uninterrupted"] = False
    shutil.rmtree(out, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3, help="iterations per run (a checkpoint after each)")
    parser.add_argument("--max-delay", type=float, default=0.05, help="seconds after the save began, at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for results.json, results.md and outcomes.png")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.time()
        done = _train(work / "reference", args.steps)
        if done.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{done.stderr}")
        reference = final_tensors(work / "reference")
        for index in range(args.trials):
            records.append(trial(index, args.steps, args.max_delay, work, reference, rng))
            r = records[-1]
            print(f"trial {index}: save {r['target_save']} +{r['delay_s']:.3f}s, partial {r['partial_folder_files']}, "
                  f"{r['recovery']} -> equal {r['equal_to_uninterrupted']}", flush=True)  # fmt: skip
        seconds = time.time() - started
    summary = {
        "command": "python benchmarks/reliability/kill_during_save.py " + " ".join(sys.argv[1:]),
        "config": CONFIG, "overrides": COMMON, "steps": args.steps, "trials": len(records), "seconds": round(seconds),
        "killed_during_save": sum(r["partial_folder_files"] is not None for r in records),
        "recovered": sum(r["recovery_status"] == 0 for r in records),
        "equal_to_uninterrupted": sum(r["equal_to_uninterrupted"] for r in records),
        "fell_back_past_a_bad_checkpoint": sum(bool(r["skipped_warnings"]) for r in records),
        "restarted_from_scratch": sum(r["recovery"] == "restart" for r in records),
        "stale_locks_broken": sum(r["stale_lock"] and r["recovery_status"] == 0 for r in records),
        "orphans_left_after_recovery": sum(bool(r.get("orphans_left")) for r in records),
        "records": records,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        (out / "results.md").write_text(_markdown(summary))
        _plot(records, out / "outcomes.png")


def _markdown(s: dict) -> str:
    n = s["trials"]
    rows = [
        ("killed while a checkpoint was being written", s["killed_during_save"]),
        ("recovered (resume, or a fresh start when no checkpoint was complete)", s["recovered"]),
        ("final weights and EMA bitwise equal to the uninterrupted run", s["equal_to_uninterrupted"]),
        ("resume skipped a damaged checkpoint with a warning", s["fell_back_past_a_bad_checkpoint"]),
        ("no complete checkpoint yet: fresh start with train.overwrite=true", s["restarted_from_scratch"]),
        ("stale run.lock of the killed process broken", s["stale_locks_broken"]),
        ("partial step-N.tmp folders left after recovery", s["orphans_left_after_recovery"]),
    ]
    lines = [
        "# kill -9 during a checkpoint save",
        "",
        f"Command: `{s['command']}` ({s['seconds']} s; `{s['config']}` with {' '.join(s['overrides'])}, "
        f"{s['steps']} iterations, a checkpoint after each)",
        "",
        "| outcome | trials |",
        "|---|---|",
        *(f"| {name} | {count} / {n} |" for name, count in rows),
        "",
        "Files in the partial folder when the process died (how far the save had got):",
        "",
    ]
    stages: dict[str, int] = {}
    for r in s["records"]:
        key = (
            ", ".join(r["partial_folder_files"])
            if r["partial_folder_files"]
            else "(save finished or not begun)"
        )
        stages[key] = stages.get(key, 0) + 1
    lines += [f"- {count} x {key}" for key, count in sorted(stages.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    progress = [len(r["partial_folder_files"] or []) for r in records]
    colours = ["tab:green" if r["equal_to_uninterrupted"] else "tab:red" for r in records]
    ax.scatter([r["delay_s"] * 1000 for r in records], progress, c=colours)
    ax.set_xlabel("kill, ms after the save began")
    ax.set_ylabel("files written in the partial folder")
    ax.set_title("green: final weights equal to the uninterrupted run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
