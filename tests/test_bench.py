"""The GenEval benchmark runner: an oracle generator scores 1.0, outputs are written, bad input is rejected."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flowalign.cli import main as cli_main
from flowalign.eval.geneval import (
    balanced_images_per_prompt,
    balanced_subset,
    image_seed,
    judge_images,
    run_geneval,
    write_report,
)
from flowalign.models import load_model
from flowalign.models.base import Cond
from flowalign.samplers import flow_schedule
from flowalign.samplers.steps import randn
from flowalign.worlds.shapes import load_prompts, render_scene, sample_scene
from rewards.geneval import TASKS

ROOT = Path(__file__).resolve().parents[1]
TEST_PROMPTS = ROOT / "assets" / "shapes" / "prompts" / "test.jsonl"


class OracleGenerator:
    """A "model" whose ODE flows exactly to a rendered ground-truth scene of the prompt.

    Its velocity is the conditional flow-matching target towards the scene, ``v = (x - x0) / sigma`` (for
    ``x_sigma = (1 - sigma) x0 + sigma eps``, ``v = eps - x0``), so Euler steps land on ``x0`` exactly.
    """

    kind = "flow"
    prediction_type = "flow"
    default_steps = 3
    default_guidance = 1.0
    default_resolution = 32
    device = torch.device("cpu")

    def __init__(self, prompts):
        rng = np.random.default_rng(0)
        self.targets = {m["prompt"]: render_scene(sample_scene(m, rng)) * 2 - 1 for m in prompts}

    def schedule(self, num_steps, latent_shape=None, levels=None):
        return flow_schedule(num_steps)

    def latent_shape(self, height, width):
        return (3, height, width)

    def initial_noise(self, batch, height, width, generator=None):
        return randn((batch, 3, height, width), generator, self.device)  # one generator or one per sample

    def encode(self, prompts, negative_prompts=None, cfg=True):
        return Cond({"index": torch.zeros(len(prompts))}, None, list(prompts))

    def predict(self, x_t, timestep, cond, guidance=1.0):
        x0 = torch.stack([self.targets[p] for p in cond.prompts])
        sigma = (timestep.float() / 1000).view(-1, 1, 1, 1)
        return (x_t - x0) / sigma

    def decode(self, latents):
        return (latents / 2 + 0.5).clamp(0, 1)


class NoiseGenerator(OracleGenerator):
    """A "model" whose velocity is 0: its images are its initial noise, so they show which noise each
    image was given."""

    def predict(self, x_t, timestep, cond, guidance=1.0):
        return torch.zeros_like(x_t)


@pytest.fixture(scope="module")
def test_prompts():
    return load_prompts(TEST_PROMPTS)


def test_oracle_generator_scores_one_on_every_task(test_prompts):
    report = run_geneval(OracleGenerator(test_prompts), test_prompts, images_per_prompt=2, progress=False)
    s = report.summary
    assert s.overall == 1.0 and s.image_accuracy == 1.0 and s.prompt_accuracy == 1.0
    assert list(s.task_accuracy) == list(TASKS)
    assert s.n_images == 2 * len(test_prompts) and s.n_prompts == len(test_prompts)
    assert [(r.prompt_index, r.image_index) for r in report.records[:3]] == [(0, 0), (0, 1), (1, 0)]
    # Saved images judged again give the same report (benchmarks/shapes/rejudge.py); another detector does not.
    again = judge_images(report.images, test_prompts, report.config)
    assert again.records == report.records and again.stats.as_json() == report.stats.as_json()
    blind = judge_images(report.images, test_prompts, report.config, detector=lambda x: [[] for _ in x])
    assert blind.summary.overall == 0.0
    with pytest.raises(ValueError, match="images for"):
        judge_images(report.images[:-1], test_prompts, report.config)


def test_a_detector_that_sees_nothing_scores_zero(test_prompts):
    prompts = test_prompts[:5]
    report = run_geneval(
        OracleGenerator(prompts), prompts, images_per_prompt=1, detector=lambda images: [[] for _ in images],
        progress=False,
    )  # fmt: skip
    assert report.summary.overall == 0.0


def test_outputs_written(test_prompts, tmp_path):
    prompts = [m for m in test_prompts if m["tag"] == "colors"][:3] + [
        m for m in test_prompts if m["tag"] == "position"
    ][:3]
    report = run_geneval(OracleGenerator(prompts), prompts, images_per_prompt=3, progress=False)
    paths = write_report(report, tmp_path / "out", command="flowalign bench geneval --out out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["command"] == "flowalign bench geneval --out out"
    assert results["config"]["images_per_prompt"] == [3] * 6 and len(results["images"]) == 18
    assert results["summary"]["overall"] == 1.0
    assert results["stats"]["tasks"]["colors"] == {
        "prompts": 3, "images_per_prompt": 3, "images": 9, "correct": 9, "accuracy": 1.0,
        "accuracy_low": pytest.approx(0.7008, abs=1e-4), "accuracy_high": 1.0,
    }  # fmt: skip
    assert "Wilson" in results["stats"]["interval_method"]
    assert all(image["correct"] and image["detections"] for image in results["images"])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| colors | 3 | 3 | 9 | 9 | 1.000 | [0.701, 1.000] |" in summary and "**overall**" in summary
    assert "Intervals: 95% intervals: per task the Wilson score interval" in summary
    for tag in ("colors", "position"):
        assert paths[f"grid_{tag}"].exists() and paths[f"grid_{tag}"].stat().st_size > 100


def test_balanced_counts_measure_every_task_on_96_images(test_prompts):
    tags = [p["tag"] for p in test_prompts]
    counts = balanced_images_per_prompt(tags)
    per_prompt = dict(zip(tags, counts))
    assert per_prompt == {
        "single_object": 48, "two_object": 32, "counting": 16, "colors": 8, "position": 8, "color_attr": 4
    }  # fmt: skip
    assert all(sum(n for t, n in zip(tags, counts) if t == tag) >= 96 for tag in TASKS)
    assert balanced_images_per_prompt(tags, min_images_per_task=0) == [4] * len(tags)  # GenEval's protocol
    subset = balanced_subset(tags, 16, images_per_prompt=2)  # the shapes configs' training evaluation
    assert {tag: sum(n for i, n in subset if tags[i] == tag) for tag in TASKS} == dict.fromkeys(TASKS, 16)
    assert min(n for _, n in subset) == 2 and len(subset) == 2 + 3 + 6 + 8 + 8 + 8
    chosen = [i for i, _ in subset if tags[i] == "color_attr"]  # spread over the task, not its first 8
    assert chosen[-1] - chosen[0] > 80


def test_unequal_image_counts_extend_the_same_images_and_grid(test_prompts, tmp_path):
    from PIL import Image

    prompts = test_prompts[:2]
    model = NoiseGenerator(prompts)
    few = run_geneval(model, prompts, images_per_prompt=[1, 2], progress=False)
    more = run_geneval(model, prompts, images_per_prompt=[2, 3], progress=False)
    assert [(r.prompt_index, r.image_index) for r in few.records] == [(0, 0), (1, 0), (1, 1)]
    assert torch.equal(few.images[0], more.images[0])  # image (0, 0)
    assert torch.equal(few.images[1:], more.images[2:4])  # images (1, 0), (1, 1)
    assert not torch.equal(more.images[0], more.images[1])
    many = run_geneval(OracleGenerator(prompts), prompts, images_per_prompt=[40, 1], progress=False)
    paths = write_report(many, tmp_path / "out", max_grid_columns=16)
    assert Image.open(paths["grid_single_object"]).width < 17 * 38 + 8 * 60  # 16 columns, then the text
    with pytest.raises(ValueError, match="2 counts for 3 prompts"):
        run_geneval(model, test_prompts[:3], images_per_prompt=[1, 2], progress=False)


def test_sampling_is_deterministic_and_independent_of_batch_size(test_prompts):
    model = load_model("tiny-shapes")
    prompts = test_prompts[:3]
    a = run_geneval(model, prompts, images_per_prompt=2, steps=2, guidance=2.0, batch_size=6, progress=False)
    b = run_geneval(model, prompts, images_per_prompt=2, steps=2, guidance=2.0, batch_size=6, progress=False)
    c = run_geneval(model, prompts, images_per_prompt=2, steps=2, guidance=2.0, batch_size=4, progress=False)
    assert torch.equal(a.images, b.images)
    assert torch.allclose(a.images, c.images, atol=1e-5)
    first = model.initial_noise(1, 32, 32, torch.Generator().manual_seed(image_seed(0, 0, 0)))
    assert not torch.equal(
        first, model.initial_noise(1, 32, 32, torch.Generator().manual_seed(image_seed(0, 0, 1)))
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, "prompts is empty"),
        ({"prompts": "assets/shapes/prompts/test.jsonl"}, "load_prompts"),
        ({"images_per_prompt": 0}, "images_per_prompt must be a positive integer"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"guidance": float("nan")}, "guidance"),
        (
            {
                "prompts": [
                    {
                        "tag": "colors",
                        "prompt": "a photo of a red cat",
                        "include": [{"class": "cat", "count": 1}],
                    }
                ]
            },
            "prompt 0",
        ),
    ],
)
def test_bad_input_is_a_clear_error(test_prompts, kwargs, message):
    args = {"prompts": test_prompts[:2], **kwargs}
    with pytest.raises(ValueError, match=message):
        run_geneval(OracleGenerator(test_prompts), progress=False, **args)


def test_cli_bench_geneval(tmp_path):
    out = tmp_path / "bench"
    code = cli_main(
        ["bench", "geneval", "--model", "tiny-shapes", "--prompts", str(TEST_PROMPTS), "--max-prompts", "3",
         "--images-per-prompt", "1", "--min-images-per-task", "0", "--steps", "2", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("flowalign bench geneval --model tiny-shapes")
    assert "--steps 2" in results["command"] and "--min-images-per-task 0" in results["command"]
    assert len(results["images"]) == 3
    assert (out / "summary.md").exists() and list((out / "grids").glob("*.png"))


def test_cli_bench_compare(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    code = cli_main(
        ["bench", "geneval", "--model", "tiny-shapes", "--prompts", str(TEST_PROMPTS), "--max-prompts", "6",
         "--images-per-prompt", "1", "--min-images-per-task", "4", "--steps", "2", "--out", str(a), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "single_object" in printed and "img/prompt" in printed and "95% interval" in printed
    assert "Wilson" in printed and "overall (mean of tasks)" in printed
    results = json.loads((a / "results.json").read_text())
    assert results["config"]["images_per_prompt"] == [2, 2, 2, 2, 2, 4]  # >= 4 images per task
    # B: the same run with every two_object image judged correct.
    b.mkdir()
    for image in results["images"]:
        if image["tag"] == "two_object":
            image["correct"] = True
    two_object_a = results["summary"]["task_accuracy"]["two_object"]
    results["summary"]["task_accuracy"]["two_object"] = 1.0
    (b / "results.json").write_text(json.dumps(results))
    assert cli_main(["bench", "compare", str(a), str(a)]) == 0
    assert "| **overall** |" in capsys.readouterr().out
    assert cli_main(["bench", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert comparison["tasks"]["two_object"]["estimate"] == pytest.approx(1.0 - two_object_a)
    assert comparison["tasks"]["counting"] == {
        "estimate": 0.0, "low": 0.0, "high": 0.0, "excludes_zero": False, "a_only": 0, "b_only": 0, "mcnemar_p": 1.0
    }  # fmt: skip
    assert "B - A" in (tmp_path / "cmp" / "comparison.md").read_text()
    results["config"]["guidance"] = 4.5
    (b / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert cli_main(["bench", "compare", str(a), str(b)]) == 2
    assert re.search(r"differ in guidance \(1.5 vs 4.5\)", capsys.readouterr().err)
    # A few-step student against its teacher: other steps and guidance, the same prompts and noise.
    results["config"]["steps"] = 4
    (b / "results.json").write_text(json.dumps(results))
    assert (
        cli_main(["bench", "compare", str(a), str(b), "--across-samplers", "--out", str(tmp_path / "x")]) == 0
    )
    across = json.loads((tmp_path / "x" / "comparison.json").read_text())
    assert across["tasks"]["two_object"]["estimate"] == pytest.approx(1.0 - two_object_a)
    results["config"]["seed"] = 1  # other noise: never paired
    (b / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert cli_main(["bench", "compare", str(a), str(b), "--across-samplers"]) == 2
    assert "differ in seed (0 vs 1)" in capsys.readouterr().err


def test_cli_rejects_a_missing_prompt_file(tmp_path, capsys):
    argv = ["bench", "geneval", "--model", "tiny-shapes", "--prompts", "nope.jsonl", "--out", str(tmp_path)]
    assert cli_main(argv) == 2
    assert "not found" in capsys.readouterr().err
