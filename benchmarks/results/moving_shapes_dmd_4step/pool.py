"""The mean over the two seeds' students of (student - reference), paired per video.

python benchmarks/results/moving_shapes_dmd_4step/pool.py
"""

import json
from pathlib import Path

from flowalign.eval.stats import Verdicts, pooled_gain

OUT = Path(__file__).resolve().parent


def verdicts(name: str) -> Verdicts:
    videos = json.loads((OUT / name / "results.json").read_text())["videos"]
    videos = sorted(videos, key=lambda v: (v["prompt_index"], v["video"]))
    return Verdicts.from_images(
        [v["prompt_index"] for v in videos], [v["tag"] for v in videos], [v["correct"] for v in videos]
    )


for reference in ("teacher_10step_g1.5", "teacher_4step_g1.5", "teacher_4step_g1.0"):
    gain = pooled_gain([(verdicts(reference), verdicts(s)) for s in ("student_4step", "student_4step_seed1")])
    print(reference, f"{gain.overall.estimate:+.3f} [{gain.overall.low:+.3f}, {gain.overall.high:+.3f}]")
