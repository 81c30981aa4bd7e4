"""The command line as a user runs it: sample, optimize-noise, train (tiny components, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from flowalign.cli import main
from rewards import Reward, RewardOutput, register_reward

ROOT = Path(__file__).resolve().parents[1]


@register_reward("blueness_for_cli_test")
class Blueness(Reward):
    differentiable = True

    def score_batch(self, images, prompts, metadata):
        return RewardOutput(images[:, 2].flatten(1).mean(1) - images[:, :2].flatten(1).mean(1))


def test_sample_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--model",
                "tiny-sd3",
                "--prompt",
                "a red circle",
                "--prompt",
                "two squares",
                "--num-images",
                "3",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with Image.open(out) as image:
        assert image.size == (3 * 33 + 1, 2 * 33 + 1)  # 3 columns x 2 rows of 32 px with 1 px padding


def test_optimize_noise_improves_the_reward(tmp_path):
    out = tmp_path / "reno"
    code = main([
        "optimize-noise", "--model", "tiny-sd3", "--prompt", "a red circle", "--reward", "blueness_for_cli_test=1",
        "--steps", "2", "--iterations", "6", "--out", str(out), "--resolution", "32",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "trace.json").read_text())
    assert summary["best_reward"][0] > summary["initial_reward"][0]
    assert len(summary["trace"]) == 6
    for name in ("before.png", "after.png", "before_after.png", "trace.png"):
        assert (out / name).is_file()


def test_optimize_noise_rejects_non_differentiable_rewards(tmp_path, capsys):
    argv = ["optimize-noise", "--model", "tiny-sd3", "--prompt", "p", "--reward", "compressibility"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "needs differentiable rewards" in capsys.readouterr().err


def test_train_command_and_config_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["train", "configs/grpo/tiny_sd3.yaml", f"train.output_dir={tmp_path}", "train.steps=1"]) == 0
    assert "finished after 1 steps" in capsys.readouterr().out
    assert main(["train", "configs/grpo/tiny_sd3.yaml", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_bench_geneval_with_a_real_image_detector(tmp_path, capsys):
    """`--detector mask2former` on GenEval's own prompts (COCO classes) with tiny random weights: the shapes
    detector would refuse these prompts; the run writes a report that names its detector."""
    from tiny_weights import save_tiny_mask2former, save_tiny_open_clip

    mask2former = save_tiny_mask2former(tmp_path / "mask2former")
    clip = save_tiny_open_clip(tmp_path / "clip")
    common = ["bench", "geneval", "--model", "tiny-sd3", "--prompts", "assets/geneval/evaluation_metadata.jsonl",
              "--max-prompts", "2", "--images-per-prompt", "1", "--min-images-per-task", "0", "--steps", "2",
              "--resolution", "32", "--no-progress"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "shapes")]) == 2
    assert "pick a real-image detector with --detector" in capsys.readouterr().err
    assert main([*common, "--detector", "mask2former", "--detector-arg", f"model_path={mask2former}",
                 "--detector-arg", f"clip_path={clip}", "--out", str(tmp_path / "m2f")]) == 0  # fmt: skip
    results = json.loads((tmp_path / "m2f" / "results.json").read_text())
    assert results["model"]["detector"] == "mask2former" and results["n_images"] == 2
    assert "--detector mask2former" in results["command"]
    assert (
        main([*common, "--detector", "mask2former", "--detector-arg", "oops", "--out", str(tmp_path / "bad")])
        == 2
    )
    assert "--detector-arg 'oops' must look like KEY=VALUE" in capsys.readouterr().err


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    """A run directory in use is a ValueError deep in the loop: the command prints one line and exits 2;
    --debug raises it with its traceback."""
    from flowalign.train.rundir import RunDirError

    out = tmp_path / "run"
    args = ["train", "configs/grpo/tiny_sd3.yaml", f"train.output_dir={out}", "train.steps=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: train.output_dir=") and "--debug" in err
    with pytest.raises(RunDirError, match="already holds a run"):
        main([*args, "--debug"])
