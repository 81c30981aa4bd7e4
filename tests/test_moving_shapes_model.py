"""The moving-shapes image-to-video model: its adapter against its own pipeline, frame 0 exact, LoRA in the
stock loader, video rollouts, exact resume of its pretraining, and the video benchmark command."""

from __future__ import annotations

import json

import torch

from flowalign.data.prompts import load_image
from flowalign.models import load_model
from flowalign.models.moving_shapes import (
    TINY_VIDEO_ARCHITECTURE,
    MovingShapesPipeline,
    tiny_moving_shapes_pipeline,
)
from flowalign.samplers import SamplingPlan, generate, rollout, seeded_generators
from flowalign.samplers.rollout import denoise_step

PROMPTS = ["the red circle moves right", "the red circle moves up"]
FIRST = "assets/video/tiny/red_circle.png"


def _images(n=2):
    return load_image(FIRST).unsqueeze(0).expand(n, -1, -1, -1)


def test_adapter_reproduces_its_pipeline_and_frame_zero_is_the_given_frame():
    model = load_model("tiny-moving_shapes")
    for guidance in (1.0, 2.0):
        out = generate(
            model, PROMPTS, seeded_generators([0, 1], "cpu"), steps=4, guidance=guidance, images=_images()
        )
        pipe = tiny_moving_shapes_pipeline()
        pipe.set_progress_bar_config(disable=True)
        stock = torch.cat([
            pipe(PROMPTS[i], _images(1), num_inference_steps=4, guidance_scale=guidance, generator=torch.Generator().manual_seed(i))
            for i in range(2)
        ])  # fmt: skip
        assert out.images.shape == (2, 5, 3, 32, 32) and (out.images - stock).abs().max() <= 1e-5
        assert torch.equal(out.images[:, 0], _images())


def test_video_sde_rollout_log_probs_recompute_exactly():
    model = load_model("tiny-moving_shapes")
    cond = model.encode(PROMPTS, images=_images())
    schedule = model.schedule(4)
    plan = SamplingPlan.build(4, dynamics="flow_grpo", sde="all")
    x_T = model.initial_noise(2, 32, 32, seeded_generators([0, 1], "cpu"))
    traj = rollout(model, cond, x_T, schedule, plan, generator=seeded_generators([2, 3], "cpu"))
    assert traj.latents.shape == (2, 5, 12, 5, 16, 16) and traj.log_probs.shape == (2, 4)
    for k in range(4):
        step = denoise_step(
            model, traj.latents[:, k], k, cond, schedule, plan, prev_sample=traj.latents[:, k + 1]
        )
        assert torch.equal(step.log_prob, traj.log_probs[:, k])


def test_lora_loads_in_the_stock_loader_and_the_pipeline_saves_and_loads(tmp_path):
    model = load_model("tiny-moving_shapes")
    model.add_lora(rank=4)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    tuned = generate(
        model, PROMPTS[:1], seeded_generators([0], "cpu"), steps=3, guidance=1.0, images=_images(1)
    )
    model.save_lora(tmp_path / "lora")
    pipe = tiny_moving_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    stock = pipe(PROMPTS[0], _images(1), num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert (stock - tuned.images).abs().max() <= 1e-5
    tiny_moving_shapes_pipeline().save_pretrained(tmp_path / "model")
    again = load_model(tmp_path / "model")
    assert type(again.pipeline) is MovingShapesPipeline and again.family == "moving_shapes" and again.is_video


def test_pretraining_resumes_bitwise(tmp_path):
    from safetensors.torch import load_file

    from flowalign.worlds.moving_shapes_pretrain import VideoPretrainConfig, pretrain_video

    config = VideoPretrainConfig(
        steps=4,
        batch_size=2,
        warmup_steps=1,
        architecture=TINY_VIDEO_ARCHITECTURE,
        checkpoint_every=2,
        eval_every=0,
    )
    pretrain_video(config, tmp_path / "straight", progress=False)
    pretrain_video(config, tmp_path / "parts", stop_at=2, progress=False)
    pretrain_video(config, tmp_path / "parts", progress=False)
    a = load_file(str(tmp_path / "straight/checkpoints/step-0000004/ema.safetensors"))
    b = load_file(str(tmp_path / "parts/checkpoints/step-0000004/ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bench_video_reports_three_accuracies_with_intervals(tmp_path, capsys):
    from flowalign.cli import main

    assert (
        main(
            [
                "bench",
                "video",
                "--model",
                "tiny-moving_shapes",
                "--steps",
                "2",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["stats"]) == {"correct", "identity", "motion"}
    assert len(results["videos"]) == 192 and {v["tag"] for v in results["videos"]} == {"move", "move_stay"}
    move = results["stats"]["correct"]["tasks"]["move"]
    assert move["images"] == 96 and 0 <= move["accuracy_low"] <= move["accuracy"] <= move["accuracy_high"] > 0
    assert (tmp_path / "grids" / "move.png").is_file() and "identity" in (tmp_path / "summary.md").read_text()
    assert "flowalign bench video --model tiny-moving_shapes" in results["settings"]["command"]


def test_bench_compare_pairs_two_video_runs(tmp_path, capsys):
    from flowalign.cli import main

    common = ["bench", "video", "--model", "tiny-moving_shapes", "--no-progress"]
    for name, steps in (("a", "2"), ("b", "2"), ("c", "3")):
        assert main([*common, "--steps", steps, "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert (
        main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")])
        == 0
    )
    comparison = json.loads((tmp_path / "ab" / "comparison.json").read_text())
    for metric in ("correct", "identity", "motion"):
        d = comparison["metrics"][metric]["difference"]
        assert (d["estimate"], d["low"], d["high"], d["excludes_zero"]) == (0.0, 0.0, 0.0, False)
        # Each run's accuracy carries its own interval, the one its benchmark reported.
        own = json.loads((tmp_path / "a" / "results.json").read_text())["stats"][metric]["overall"]
        row = comparison["metrics"][metric]
        assert row["a_interval"] == row["b_interval"] == [own["low"], own["high"]]
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "they differ in steps (2 vs 3)" in capsys.readouterr().err
    # --across-samplers pairs them (a few-step student against its teacher): the same first frames and noise.
    out = tmp_path / "ac"
    assert (
        main(
            [
                "bench",
                "compare",
                str(tmp_path / "a"),
                str(tmp_path / "c"),
                "--across-samplers",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    c = json.loads((tmp_path / "c" / "results.json").read_text())["stats"]["correct"]["overall"]["estimate"]
    a = json.loads((tmp_path / "a" / "results.json").read_text())["stats"]["correct"]["overall"]["estimate"]
    assert json.loads((out / "comparison.json").read_text())["metrics"]["correct"]["b"] - c == 0.0
    assert json.loads((out / "comparison.json").read_text())["metrics"]["correct"]["a"] - a == 0.0


def test_bench_video_samples_at_given_levels_and_pairs_them_only_across_samplers(
    tmp_path, capsys, monkeypatch
):
    """``bench video --sigmas`` (a distilled student's own levels, which ``--weights`` of its checkpoint
    defaults to) reaches the sampler, is recorded with the replay command, and keeps the run from pairing
    with one at the scheduler's levels unless ``--across-samplers`` is given."""
    import flowalign.samplers
    from flowalign.cli import main

    calls, generate = [], flowalign.samplers.generate

    def recording(*args, **kwargs):
        calls.append(kwargs.get("levels"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(flowalign.samplers, "generate", recording)
    common = ["bench", "video", "--model", "tiny-moving_shapes", "--no-progress"]
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    assert set(calls) == {None}
    calls.clear()
    assert main([*common, "--sigmas", "1.0", "0.6", "--out", str(tmp_path / "s")]) == 0
    assert calls and all(levels == [1.0, 0.6] for levels in calls)
    settings = json.loads((tmp_path / "s" / "results.json").read_text())["settings"]
    assert (settings["steps"], settings["levels"]) == (2, [1.0, 0.6])
    assert "--steps 2 --sigmas 1.0 0.6 --guidance" in settings["command"]
    capsys.readouterr()
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "s")]) == 2
    assert "they differ in levels (None vs [1.0, 0.6])" in capsys.readouterr().err
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "s"), "--across-samplers"]) == 0


def test_noise_optimization_raises_a_video_reward_from_the_initial_video_noise(tmp_path):
    from flowalign.cli import main

    args = ["optimize-noise", "--model", "tiny-moving_shapes", "--image", FIRST, "--prompt", PROMPTS[0]]
    assert (
        main([*args, "--reward", "motion", "--iterations", "5", "--steps", "2", "--out", str(tmp_path)]) == 0
    )
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["best_reward"][0] > trace["initial_reward"][0]
    strip = load_image(tmp_path / "after.png")
    assert strip.shape == (3, 34, 5 * 33 + 1)  # one row: the video's 5 frames
