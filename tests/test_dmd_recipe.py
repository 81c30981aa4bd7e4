"""The DMD2 recipe (``train.algorithm: dmd``, issue 16): three networks on one frozen base, exact resume,
its config checks, and a student that samples with the stock step count."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowalign.config import ConfigError, load_config
from flowalign.models import load_model
from flowalign.train import train
from flowalign.train.dmd import noise_levels, routed, shared_copy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _config(path: str, out: Path, *overrides: str):
    return load_config(ROOT / path, [f"train.output_dir={out}", *overrides])


def test_fake_score_shares_the_frozen_base_and_starts_as_the_teacher():
    model = load_model("tiny-sd3")
    model.add_lora(rank=4)
    fake = shared_copy(model.denoiser)
    base = dict(model.denoiser.named_parameters())
    copied = dict(fake.named_parameters())
    assert base.keys() == copied.keys()
    for name, param in base.items():
        if "lora_" in name:  # its own tensors, same values
            assert copied[name] is not param and torch.equal(copied[name], param)
        else:  # the very same frozen tensors: no second copy of the base in memory
            assert copied[name] is param
    x = torch.randn(2, *model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    cond = model.encode(["a red circle", "a blue square"], cfg=True)
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad(), model.reference():
        teacher = model.predict(x, t, cond, 2.0)
    with torch.no_grad(), routed(model, fake):
        as_fake = model.predict(x, t, cond, 2.0)
    assert torch.equal(teacher, as_fake)  # B = 0: the fake score is the teacher before its first update
    with torch.no_grad():
        next(p for n, p in fake.named_parameters() if "lora_B" in n).add_(1.0)
        with routed(model, fake):
            moved = model.predict(x, t, cond, 2.0)
        student = model.predict(x, t, cond, 2.0)
    assert not torch.equal(moved, teacher)  # routed() really predicts through the fake score's own LoRA
    assert torch.equal(student, teacher)  # and changing that LoRA leaves the student (and teacher) alone
    with (
        torch.no_grad()
    ):  # the same LoRA values in the model's own adapter give exactly the routed prediction
        for name, param in model.denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(copied[name])
        assert torch.equal(model.predict(x, t, cond, 2.0), moved)


def test_noise_levels_cover_the_range_in_each_parameterisation():
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    flow = load_model("tiny-sd3")
    level, timestep = noise_levels(flow, gens, (0.25, 0.5))
    assert 0.25 <= level.min() and level.max() <= 0.5 and torch.allclose(timestep, 1000 * level)
    diffusion = load_model("tiny-sd")
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    level, timestep = noise_levels(diffusion, gens, (0.02, 0.98))
    assert timestep.min() >= 20 and timestep.max() <= 979 and torch.equal(timestep, timestep.round())
    table = diffusion.pipeline.scheduler.alphas_cumprod
    assert torch.equal(level, table[timestep.long()])


@pytest.mark.parametrize(
    "path, extra",
    [
        ("configs/dmd/tiny_sd3.yaml", []),
        ("configs/dmd/tiny_sd.yaml", []),
        ("configs/dmd/tiny_wan_i2v.yaml", []),  # video, with regression pairs and the GAN term
        ("configs/dmd/tiny_wan_i2v.yaml", ["model.path=tiny-wan22", "model.expert=both", "dmd.gan_weight=0"]),
    ],
    ids=["sd3-lora", "sd-full", "wan-i2v", "wan22-both-experts"],
)
def test_resume_is_bitwise_exact_for_student_and_fake_score(path, extra, tmp_path):
    """LoRA student (fake score = second LoRA) and full fine-tuning (teacher and fake score = copies), on
    image and video models."""
    common = ["train.checkpoint_every=1", "train.keep_checkpoints=5", *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(path, straight, "train.steps=3", *common))
    train(_config(path, resumed, "train.steps=2", *common))
    train(_config(path, resumed, "train.steps=3", "train.resume=latest", *common))
    for name in ("trainable.safetensors", "recipe.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step-000003" / name))
        b = load_file(str(resumed / "checkpoints" / "step-000003" / name))
        assert a.keys() == b.keys() and a, name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    recipe = load_file(str(straight / "checkpoints" / "step-000003" / "recipe.safetensors"))
    assert any(k.startswith("fake_adam.") for k in recipe)  # the fake score's Adam moments are saved too


def test_the_teacher_stays_the_base_model_while_the_student_trains(tmp_path):
    """Full fine-tuning: the teacher is a frozen copy of the weights before training."""
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    recipe = DMDRecipe()
    run_training(_config("configs/dmd/tiny_sd.yaml", tmp_path, "train.steps=2"), recipe)
    base = load_model("tiny-sd").denoiser.state_dict()
    teacher = recipe.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in base.items())
    trained = recipe.ctx.model.denoiser.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in base.items())


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.algorithm=grpo"], "sampling.steps"),  # a one-step rollout is a dmd student only
        (["dmd.real_guidance=0.5"], "dmd.real_guidance"),
        (["dmd.fake_updates=0"], "dmd.fake_updates"),
        (["dmd.fake_lr=-1"], "dmd.fake_lr"),
        (["dmd.t_range=[0.5,0.2]"], "dmd.t_range"),
        (["dmd.fake_t_range=[0,1.5]"], "dmd.fake_t_range"),
        (["dmd.regression_weight=-1"], "dmd.regression_weight"),
        (["dmd.regression_weight=0.25", "dmd.regression_pairs=0"], "dmd.regression_pairs"),
        (["dmd.regression_loss=vgg"], "dmd.regression_loss"),
        (["dmd.regression_loss=lpips", "dmd.regression_weight=0"], "dmd.regression_loss"),
        (["dmd.teacher_steps=0"], "dmd.teacher_steps"),
        (["dmd.divergence=tv"], "dmd.divergence"),
        (["dmd.gan_weight=-1"], "dmd.gan_weight"),
        (["dmd.divergence=js", "dmd.gan_disc_weight=0"], "dmd.gan_disc_weight"),
        (["dmd.reward_beta=nan"], "dmd.reward_beta"),
        (["dmd.policy_weight=-1"], "dmd.policy_weight"),
        (["dmd.init=/nowhere/step-000001"], "dmd.init"),
        (
            [
                "dmd.policy_weight=1",
                "reward={compressibility: {weight: 1}}",
                "data.group_size=2",
                "sampling.steps=2",
                "grpo.kl_beta=0.1",
            ],
            "grpo.kl_beta",
        ),
        (["sampling.steps=2", "sampling.timesteps=[999,499]", "eval.steps=4"], "eval.steps"),
        (
            ["dmd.policy_weight=1000", "reward={compressibility: {weight: 1}}", "data.group_size=1"],
            "data.group_size",
        ),
        (
            ["dmd.policy_weight=1000", "reward={compressibility: {weight: 1}}", "data.group_size=4"],
            "sampling.steps",
        ),
        (["dmd.policy_weight=1000", "data.group_size=4", "sampling.steps=2"], "reward"),
        (["train.mixed_precision=fp16"], "train.mixed_precision"),
        (["dmd.reward_margin=0.9"], "dmd.reward_margin"),
        (["dmd.ambient=true"], "dmd.ambient"),
        (["dmd.consistency_weight=-1"], "dmd.consistency_weight"),
        (["dmd.consistency_gap=0"], "dmd.consistency_gap"),
        (["dmd.consistency_eta=1.5"], "dmd.consistency_eta"),
        (["dmd.gan_real=assets/shapes/prompts/train.jsonl"], "dmd.gan_real"),  # no discriminator to feed
        (["dmd.gan_weight=1e-3", "dmd.gan_real=no/such/real.jsonl"], "dmd.gan_real"),
        (["dmd.gan_weight=1e-3", "dmd.regression_pairs=0"], "dmd.regression_pairs"),
    ],
)
def test_bad_dmd_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=f"invalid key '{key}'"):
        load_config(ROOT / "configs/dmd/tiny_sd.yaml", overrides)


def test_regression_pairs_are_the_teachers_samples_and_vanish_for_a_student_equal_to_it(tmp_path):
    """DMD's regression term: the pool holds the teacher's ODE samples from stored noise (the same after a
    restart), and a one-step student that is still the one-step teacher has zero regression loss (to rounding)."""
    from flowalign.samplers import generate
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    overrides = ["sampling.steps=1", "dmd.real_guidance=1.0", "dmd.regression_weight=0.25",
                 "dmd.regression_pairs=6", "dmd.teacher_steps=1", "train.steps=1"]  # fmt: skip
    recipe = DMDRecipe()
    result = run_training(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "a", *overrides), recipe)
    # zero up to float32 rounding: the pool's batch and the student's differ in layout, and on some CPUs
    # (an AMD EPYC: 5.5e-15) matmuls round differently by batch size
    assert result.last_metrics["loss_regression"] < 1e-12
    prompts, noise, targets, _ = recipe.pairs
    assert len(prompts) == noise.shape[0] == targets.shape[0] == 6
    model = load_model("tiny-sd3")
    expected = generate(model, prompts, noise, steps=1, guidance=1.0, resolution=32, decode=False).final
    assert torch.allclose(targets, expected, atol=1e-6)
    again = DMDRecipe()
    run_training(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "b", *overrides), again)
    assert (
        again.pairs[0] == prompts
        and torch.equal(again.pairs[1], noise)
        and torch.equal(again.pairs[2], targets)
    )


def test_a_perceptual_regression_is_the_distance_of_the_decoded_student_and_teacher_samples(tmp_path):
    """``dmd.regression_loss: shapes_lpips``: the first step's regression loss is the mean ShapesLPIPS of the
    (still teacher-equal) one-step student's decoded sample and the teacher's 2-step sample of the pool's one
    pair (drawn twice); on another model family it is refused, naming the option."""
    from flowalign.algorithms.perceptual import ShapesLPIPS
    from flowalign.samplers import generate
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    overrides = ["sampling.steps=1", "dmd.real_guidance=1.0", "dmd.regression_weight=0.25",
                 "dmd.regression_pairs=1", "dmd.teacher_steps=2", "dmd.regression_loss=shapes_lpips",
                 "data.groups_per_step=2", "train.steps=1", "eval.every=0"]  # fmt: skip
    recipe = DMDRecipe()
    result = run_training(_config("configs/dmd/shapes_1step.yaml", tmp_path / "a", *overrides), recipe)
    prompts, noise, targets, _ = recipe.pairs
    model = load_model("shapes")
    student = generate(model, prompts, noise, steps=1, guidance=1.0, decode=False).final
    expected = ShapesLPIPS()(model.decode(student), model.decode(targets)).mean().item()
    assert expected > 1e-3  # one step is not two
    assert result.last_metrics["loss_regression"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="dmd.regression_loss=shapes_lpips compares shapes-world images"):
        run_training(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "b", *overrides[:-3]), DMDRecipe())


def test_an_image_to_video_student_regresses_on_the_teachers_videos_from_its_records_first_frames(tmp_path):
    """Video DMD (Wan 2.1 image-to-video): the regression pool holds the teacher's videos from stored noise and
    each prompt record's first frame, and a one-step student that is still the one-step teacher has zero
    regression loss."""
    from flowalign.data.prompts import condition_images
    from flowalign.samplers import generate
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    overrides = ["sampling.steps=1", "dmd.real_guidance=1.0", "dmd.regression_pairs=3", "dmd.teacher_steps=1",
                 "dmd.gan_weight=0", "train.steps=1"]  # fmt: skip
    recipe = DMDRecipe()
    result = run_training(_config("configs/dmd/tiny_wan_i2v.yaml", tmp_path, *overrides), recipe)
    assert result.last_metrics["loss_regression"] < 1e-12
    prompts, noise, targets, metadata = recipe.pairs
    assert noise.ndim == 5 and noise.shape == targets.shape and len(prompts) == len(metadata) == 3
    model = load_model("tiny-wan")
    model.num_frames = 5
    cond = model.encode(prompts, cfg=False, images=condition_images(metadata))
    expected = generate(model, None, noise, cond=cond, steps=1, guidance=1.0, decode=False).final
    assert torch.allclose(targets, expected, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.path=tiny-wan22", "model.expert=high"],
            r"model\.expert=high: DMD distils the whole sampler",
        ),
        (
            ["dmd.gan_real=assets/shapes/real/train.jsonl"],
            r"dmd\.gan_real holds images; the wan model makes videos",
        ),
        (
            ["dmd.regression_loss=lpips"],
            r"dmd\.regression_loss=lpips compares images; the wan model makes videos",
        ),
        (
            ["model.path=tiny-wan22", "model.expert=both"],
            r"dmd\.gan_weight: the discriminator reads one network",
        ),
    ],
)
def test_video_settings_dmd_cannot_train_name_their_key(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(_config("configs/dmd/tiny_wan_i2v.yaml", tmp_path, *overrides))


def test_the_student_lora_samples_with_its_own_step_count_in_the_stock_pipeline_and_the_cli(tmp_path):
    """The student's LoRA is saved in diffusers format: the stock pipeline loads it and, with the student's 2
    steps, draws what flowalign's sampler draws; ``flowalign sample`` and ``flowalign optimize-noise`` run it
    with ``--lora --steps 2``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowalign.cli import main
    from flowalign.models.tiny import tiny_pipeline
    from flowalign.samplers import generate, seeded_generators

    train(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "run", "train.steps=2", "optim.lr=0.05"))
    lora = tmp_path / "run" / "checkpoints" / "step-000002" / "lora"
    model = load_model("tiny-sd3")
    model.load_lora(lora)
    ours = generate(
        model, ["a red circle"], seeded_generators([3], "cpu"), steps=2, guidance=1.0, resolution=32
    )
    base = load_model("tiny-sd3")
    untrained = generate(
        base, ["a red circle"], seeded_generators([3], "cpu"), steps=2, guidance=1.0, resolution=32
    )
    assert not torch.allclose(ours.images, untrained.images, atol=1e-4)  # the LoRA changes the samples
    stock = tiny_pipeline("sd3")
    assert isinstance(stock.scheduler, FlowMatchEulerDiscreteScheduler)
    stock.load_lora_weights(str(lora))
    latents = model.initial_noise(1, 32, 32, seeded_generators([3], "cpu"))
    images = stock(
        "a red circle", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, latents=latents,
        output_type="pt",
    ).images  # fmt: skip
    assert torch.allclose(images.float(), ours.images, atol=1e-4)
    _register_blueness()
    reno = tmp_path / "reno"
    code = main(["optimize-noise", "--model", "tiny-sd3", "--lora", str(lora), "--steps", "2", "--guidance", "1",
                 "--prompt", "a red circle", "--reward", "blueness_for_dmd_test=1", "--iterations", "4",
                 "--resolution", "32", "--out", str(reno)])  # fmt: skip
    assert code == 0 and (reno / "trace.json").is_file()  # ReNO on the few-step student
    out = tmp_path / "sample.png"
    code = main(["sample", "--model", "tiny-sd3", "--lora", str(lora), "--steps", "2", "--guidance", "1",
                 "--prompt", "a red circle", "--height", "32", "--width", "32", "--out", str(out)])  # fmt: skip
    assert code == 0 and out.is_file()


def test_a_student_at_given_sigmas_samples_at_them_in_the_stock_pipeline_and_the_cli(tmp_path, capsys):
    """``sampling.sigmas``: the student trains and is evaluated at its own noise levels; the stock pipeline
    with ``sigmas=`` and ``flowalign sample --sigmas`` draw what flowalign's sampler draws. Without
    ``--steps`` / ``--sigmas`` / ``--guidance`` the CLI samples the student as it was distilled (said in one
    line); another step count is used with a warning naming ``--steps``."""
    from flowalign.cli import main
    from flowalign.models.tiny import tiny_pipeline
    from flowalign.samplers import generate, seeded_generators

    sigmas = ["sampling.sigmas=[1.0,0.4]"]
    train(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "run", "train.steps=2", "optim.lr=0.05", *sigmas))
    lora = tmp_path / "run" / "checkpoints" / "step-000002" / "lora"
    model = load_model("tiny-sd3")
    model.load_lora(lora)
    noise = seeded_generators([3], "cpu")
    ours = generate(model, ["a red circle"], noise, steps=2, guidance=1.0, resolution=32, levels=[1.0, 0.4])
    default = generate(
        model, ["a red circle"], seeded_generators([3], "cpu"), steps=2, guidance=1.0, resolution=32
    )
    assert not torch.allclose(ours.images, default.images, atol=1e-3)  # other levels, other images
    stock = tiny_pipeline("sd3")
    stock.load_lora_weights(str(lora))
    latents = model.initial_noise(1, 32, 32, seeded_generators([3], "cpu"))
    images = stock(
        "a red circle", sigmas=[1.0, 0.4], guidance_scale=1.0, height=32, width=32, latents=latents,
        output_type="pt",
    ).images  # fmt: skip
    assert torch.allclose(images.float(), ours.images, atol=1e-4)
    out = tmp_path / "sample.png"
    code = main(["sample", "--model", "tiny-sd3", "--lora", str(lora), "--sigmas", "1.0", "0.4", "--guidance", "1",
                 "--prompt", "a red circle", "--num-images", "1", "--height", "32", "--width", "32",
                 "--out", str(out)])  # fmt: skip
    from PIL import Image

    from flowalign.eval.geneval import image_seed

    saved = torch.from_numpy(np.array(Image.open(out).convert("RGB"))).permute(2, 0, 1).float() / 255
    first = generate(
        model, ["a red circle"], seeded_generators([image_seed(0, 0, 0)], "cpu"), steps=2, guidance=1.0,
        resolution=32, levels=[1.0, 0.4],
    ).images[0]  # fmt: skip
    assert code == 0 and (saved - first).abs().max() <= 1 / 255 + 1e-6  # one image: no grid padding
    capsys.readouterr()
    plain = tmp_path / "plain.png"  # no --sigmas, --steps or --guidance: the student's own settings
    code = main(["sample", "--model", "tiny-sd3", "--lora", str(lora), "--prompt", "a red circle", "--num-images", "1",
                 "--height", "32", "--width", "32", "--out", str(plain)])  # fmt: skip
    said = capsys.readouterr().err
    assert code == 0 and "is a 2-step DMD student" in said and "with --sigmas 1 0.4 --guidance 1;" in said
    assert np.array_equal(np.array(Image.open(plain)), np.array(Image.open(out)))
    code = main(["sample", "--model", "tiny-sd3", "--lora", str(lora), "--steps", "2", "--prompt", "a red circle",
                 "--num-images", "1", "--height", "32", "--width", "32", "--out", str(plain)])  # fmt: skip
    assert code == 0 and "with --sigmas 1 0.4" in capsys.readouterr().err  # its step count: its levels
    assert np.array_equal(np.array(Image.open(plain)), np.array(Image.open(out)))
    other = tmp_path / "three.png"
    code = main(["sample", "--model", "tiny-sd3", "--lora", str(lora), "--steps", "3", "--prompt", "a red circle",
                 "--num-images", "1", "--height", "32", "--width", "32", "--out", str(other)])  # fmt: skip
    said = capsys.readouterr().err
    assert code == 0 and "warning: --steps 3:" in said and "2-step DMD student" in said
    assert "with --guidance 1;" in said  # the guidance still defaults to the student's
    assert not np.array_equal(np.array(Image.open(other)), np.array(Image.open(out)))
    # bench geneval records the student's levels under the flow model's flag, and its command replays the run
    import shlex

    bench = ["bench", "geneval", "--model", "tiny-sd3", "--lora", str(lora), "--max-prompts", "2",
             "--images-per-prompt", "1", "--min-images-per-task", "0", "--resolution", "32", "--no-progress"]  # fmt: skip
    assert main([*bench, "--out", str(tmp_path / "bench")]) == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert "--steps 2 --guidance 1.0 --sigmas 1.0 0.4 " in results["command"]
    replay = shlex.split(results["command"].replace(str(tmp_path / "bench"), str(tmp_path / "again")))
    assert main(replay[1:]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert [i["correct"] for i in again["images"]] == [i["correct"] for i in results["images"]]
    assert again["config"]["levels"] == results["config"]["levels"] == [1.0, 0.4]


def test_a_student_samples_at_the_size_it_was_distilled_at(tmp_path, capsys):
    """``model.resolution`` of a student's run is the default image size of ``sample`` (``--height`` and
    ``--width``) and ``bench geneval`` (``--resolution``), said in the student's line; another size is kept
    with a warning naming the option."""
    from PIL import Image

    from flowalign.cli import main

    train(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "run", "train.steps=1", "model.resolution=16"))
    lora = str(tmp_path / "run" / "checkpoints" / "step-000001" / "lora")
    sample = [
        "sample",
        "--model",
        "tiny-sd3",
        "--lora",
        lora,
        "--prompt",
        "a red circle",
        "--num-images",
        "1",
    ]
    capsys.readouterr()
    assert main([*sample, "--out", str(tmp_path / "own.png")]) == 0
    said = capsys.readouterr().err
    assert Image.open(tmp_path / "own.png").size == (16, 16) and "--height 16 --width 16;" in said
    assert main([*sample, "--height", "32", "--width", "32", "--out", str(tmp_path / "other.png")]) == 0
    said = capsys.readouterr().err
    assert Image.open(tmp_path / "other.png").size == (32, 32)
    assert (
        "warning: --height 32 --width 32: --lora" in said and "distilled at 16x16 (model.resolution)" in said
    )
    bench = ["bench", "geneval", "--model", "tiny-sd3", "--lora", lora, "--max-prompts", "1", "--images-per-prompt",
             "1", "--min-images-per-task", "0", "--no-progress", "--out", str(tmp_path / "bench")]  # fmt: skip
    assert main(bench) == 0
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["config"]["resolution"] == 16


@pytest.mark.parametrize("levels", [[999, 749, 499, 249], [399]], ids=["4-step", "1-step-at-399"])
def test_given_timesteps_sample_as_the_stock_euler_scheduler_does(levels):
    """A diffusion model at explicit ``timesteps`` (DMD2's SDXL students: 999, 749, 499, 249, and the one-step
    student called once at 399): flowalign's DDIM steps between them draw what the stock pipeline with
    ``EulerDiscreteScheduler`` and ``timesteps=`` draws (deterministic Euler in ``sigma`` is DDIM)."""
    from diffusers import EulerDiscreteScheduler

    from flowalign.models.tiny import tiny_pipeline
    from flowalign.samplers import generate, seeded_generators

    model = load_model("tiny-sd")
    ours = generate(
        model, ["a red circle"], seeded_generators([5], "cpu"), steps=len(levels), guidance=1.0, levels=levels
    )
    stock = tiny_pipeline("sd")
    # "leading": Euler then starts from sqrt(sigma_max^2 + 1) x noise, the DDIM start; with "linspace" or
    # "trailing" it uses sigma_max, 0.2% less at t = 999 (a 2e-3 relative difference in the samples).
    stock.scheduler = EulerDiscreteScheduler.from_config(stock.scheduler.config, timestep_spacing="leading")
    latents = model.initial_noise(1, 32, 32, seeded_generators([5], "cpu"))
    images = stock(
        "a red circle", timesteps=levels, guidance_scale=1.0, height=32, width=32, latents=latents,
        output_type="pt",
    ).images  # fmt: skip
    assert torch.allclose(images.float(), ours.images, atol=1e-4)


def test_a_one_step_flow_student_below_the_top_level_is_called_there_on_pure_noise():
    """DMD2's one-step SDXL student takes pure noise but is called at timestep 399 (``sdxl_1step.yaml``); on
    a flow model ``sampling.sigmas: [s]`` with one step is the same: the sample is ``z - sigma v(z, sigma)`` at
    the scheduler's shifted level ``sigma = k s / (1 + (k - 1) s)``, and the stock pipeline's ``sigmas=[s]``
    draws it."""
    from flowalign.models.tiny import tiny_pipeline
    from flowalign.samplers import generate, seeded_generators

    model = load_model("tiny-sd3")
    z = model.initial_noise(1, 32, 32, seeded_generators([3], "cpu"))
    ours = generate(model, ["a red circle"], z.clone(), steps=1, guidance=1.0, resolution=32, levels=[0.4])
    schedule = model.schedule(1, model.latent_shape(32, 32), levels=[0.4])
    k = model.pipeline.scheduler.config.shift
    sigma = float(schedule.sigmas[0])
    assert k != 1 and sigma == pytest.approx(k * 0.4 / (1 + (k - 1) * 0.4), rel=1e-6)
    v = model.predict(z, schedule.timesteps[:1], model.encode(["a red circle"], cfg=False))
    assert torch.allclose(ours.final, z - sigma * v, atol=1e-5)
    stock = tiny_pipeline("sd3")
    images = stock(
        "a red circle", sigmas=[0.4], guidance_scale=1.0, height=32, width=32, latents=z, output_type="pt"
    ).images
    assert torch.allclose(images.float(), ours.images, atol=1e-4)


def test_a_full_weight_student_is_sampled_with_weights(tmp_path):
    """A ``lora_rank: 0`` student (one step, epsilon-prediction UNet): ``flowalign sample --weights CKPT``
    and ``bench geneval --weights`` sample the trained denoiser, not the base."""
    from PIL import Image

    from flowalign.cli import main
    from flowalign.eval.geneval import image_seed
    from flowalign.samplers import generate, seeded_generators

    train(_config("configs/dmd/tiny_sd.yaml", tmp_path / "run", "train.steps=1", "optim.lr=0.05"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    student, base = load_model("tiny-sd"), load_model("tiny-sd")
    student.load_weights(checkpoint)
    first = lambda m: generate(  # noqa: E731
        m, ["a red circle"], seeded_generators([image_seed(0, 0, 0)], "cpu"), steps=1, guidance=1.0
    ).images[0]
    ours = first(student)
    assert (ours - first(base)).abs().max() > 1e-3  # the trained weights change the sample
    out = tmp_path / "s.png"
    code = main(["sample", "--model", "tiny-sd", "--weights", str(checkpoint), "--steps", "1", "--guidance", "1",
                 "--prompt", "a red circle", "--num-images", "1", "--out", str(out)])  # fmt: skip
    saved = torch.from_numpy(np.array(Image.open(out).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert code == 0 and (saved - ours).abs().max() <= 1 / 255 + 1e-6
    bench = tmp_path / "bench"
    code = main(["bench", "geneval", "--model", "tiny-sd", "--weights", str(checkpoint), "--steps", "1",
                 "--guidance", "1", "--max-prompts", "2", "--min-images-per-task", "0", "--images-per-prompt", "1",
                 "--no-progress", "--out", str(bench)])  # fmt: skip
    assert code == 0 and "--weights" in (bench / "results.json").read_text()


def test_without_model_the_checkpoints_own_model_is_loaded(tmp_path, capsys):
    """``--weights`` / ``--lora`` without ``--model`` load the model the checkpoint's run trained (its
    ``state.json``), said in one line; a run's model that no longer loads is one error naming ``--model``; a
    weight file outside a checkpoint keeps the default model."""
    import json
    import shutil

    from PIL import Image

    from flowalign.cli import main

    train(_config("configs/dmd/tiny_sd.yaml", tmp_path / "run", "train.steps=1", "optim.lr=0.05"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    common = ["--steps", "1", "--guidance", "1", "--prompt", "a red circle", "--num-images", "1"]
    named, inferred = tmp_path / "named.png", tmp_path / "inferred.png"
    assert (
        main(["sample", "--model", "tiny-sd", "--weights", str(checkpoint), *common, "--out", str(named)])
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--weights",
                str(checkpoint / "trainable.safetensors"),
                *common,
                "--out",
                str(inferred),
            ]
        )
        == 0
    )
    said = capsys.readouterr().err
    assert (
        f"--model tiny-sd: the model of the --weights checkpoint's run, {checkpoint / 'state.json'}" in said
    )
    assert np.array_equal(np.array(Image.open(named)), np.array(Image.open(inferred)))
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    state = json.loads((moved / "state.json").read_text())
    state["config"] = state["config"].replace("path: tiny-sd", f"path: {tmp_path / 'gone'}")
    (moved / "state.json").write_text(json.dumps(state))
    assert main(["sample", "--weights", str(moved), *common, "--out", str(inferred)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--model {tmp_path / 'gone'} (the model of the --weights checkpoint's run" in error
    assert "Pass --model." in error
    loose = tmp_path / "loose.safetensors"  # no state.json beside it: the default model, shapes
    shutil.copy(checkpoint / "trainable.safetensors", loose)
    assert main(["sample", "--weights", str(loose), *common, "--out", str(inferred)]) == 2
    assert "trained for another model" in capsys.readouterr().err


def test_levels_of_the_other_kind_are_refused_when_the_model_loads(tmp_path):
    config = _config("configs/dmd/tiny_sd3.yaml", tmp_path / "run", "sampling.timesteps=[999,499]")
    with pytest.raises(
        ValueError, match=r"sampling\.timesteps does not apply to a flow model.*sampling\.sigmas"
    ):
        train(config)


def _register_blueness():
    """A differentiable reward for the tilt tests: the mean blue channel (registered once per process)."""
    from rewards import Reward, RewardOutput, register_reward
    from rewards.registry import _REGISTERED

    if "blueness_for_dmd_test" in _REGISTERED:
        return

    @register_reward("blueness_for_dmd_test")
    class Blueness(Reward):
        differentiable = True

        def score_batch(self, images, prompts, metadata):
            return RewardOutput(images[:, 2].mean(dim=(1, 2)))


def test_a_reward_tilt_moves_the_student_toward_higher_reward(tmp_path):
    """RTDMD with a differentiable reward: one generator step with a large beta raises the student's reward on
    fixed noise above the untrained model's, many times more than the same step without the tilt moves it."""
    from flowalign.samplers import generate, seeded_generators
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    _register_blueness()

    def blueness_after(beta: float, out: Path) -> float:
        overrides = ["train.steps=1", "dmd.fake_updates=1", "optim.lr=0.05", f"dmd.reward_beta={beta}",
                     "reward={blueness_for_dmd_test: {weight: 1.0}}"]  # fmt: skip
        recipe = DMDRecipe()
        result = run_training(_config("configs/dmd/tiny_sd3.yaml", out, *overrides), recipe)
        assert ("reward" in result.last_metrics) == (beta > 0)
        with torch.no_grad():
            images = generate(recipe.ctx.model, ["a red circle"] * 8, seeded_generators(range(8), "cpu"),
                              steps=2, guidance=1.0, resolution=32).images  # fmt: skip
        return images[:, 2].mean().item()

    with torch.no_grad():
        base = generate(load_model("tiny-sd3"), ["a red circle"] * 8, seeded_generators(range(8), "cpu"),
                        steps=2, guidance=1.0, resolution=32).images[:, 2].mean().item()  # fmt: skip
    plain = blueness_after(0.0, tmp_path / "plain") - base
    tilted = blueness_after(100.0, tmp_path / "tilted") - base
    # measured: plain -3e-5, tilted +7e-4 (the tiny random model's images move little per step)
    assert tilted > 0 and tilted > 5 * abs(plain)


def test_the_reward_hinge_is_plain_dmd_above_its_margin_and_the_linear_tilt_below_it(tmp_path):
    """``dmd.reward_margin`` (RTDMD's backprop hinge) in the recipe: with the margin below every reward
    (blueness is in [0, 1]) one generator step trains exactly the weights of plain DMD; with it above every
    reward, exactly those of the linear tilt with the same beta."""
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    _register_blueness()

    def weights(out: Path, *overrides: str) -> list[torch.Tensor]:
        common = [
            "train.steps=1",
            "dmd.fake_updates=1",
            "optim.lr=0.05",
            "reward={blueness_for_dmd_test: {weight: 1.0}}",
        ]
        recipe = DMDRecipe()
        run_training(_config("configs/dmd/tiny_sd3.yaml", out, *common, *overrides), recipe)
        return [p.detach().clone() for p in recipe.ctx.model.trainable_parameters()]

    plain = weights(tmp_path / "plain", "dmd.reward_beta=0")
    cleared = weights(tmp_path / "cleared", "dmd.reward_beta=100", "dmd.reward_margin=-1")
    linear = weights(tmp_path / "linear", "dmd.reward_beta=100")
    below = weights(tmp_path / "below", "dmd.reward_beta=100", "dmd.reward_margin=2")
    assert all(torch.equal(a, b) for a, b in zip(plain, cleared, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(linear, below, strict=True))
    assert max((a - b).abs().max().item() for a, b in zip(plain, linear, strict=True)) > 1e-4


def test_rtdmds_policy_term_is_flow_grpos_gradient_scaled_and_micro_batching_leaves_it(tmp_path):
    """RTDMD's path for rewards without gradients (``dmd.policy_weight``): CPS rollouts of the 2-step
    student in groups of 4, a reward declared non-differentiable, group advantages. The gradient the term
    adds is exactly ``policy_weight`` times Flow-GRPO's clipped loss on the same rollouts' stochastic step
    (its whole batch in one call), although it is accumulated over micro-batches of 3; the ratio is 1 (on
    policy); and the full generator step is the DMD step plus this term."""
    from flowalign.train import online
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training
    from rewards import Reward, RewardOutput, register_reward
    from rewards.registry import _REGISTERED

    if "blueness_without_gradient" not in _REGISTERED:

        @register_reward("blueness_without_gradient")
        class Blueness(Reward):
            differentiable = False

            def score_batch(self, images, prompts, metadata):
                return RewardOutput(images[:, 2].mean(dim=(1, 2)).detach())

    weight, seen = 1000.0, {}

    def grads(ctx):
        out = [p.grad.detach().clone() for p in ctx.trainable]
        ctx.optimizer.zero_grad(set_to_none=True)
        return out

    class Probe(DMDRecipe):
        def iteration(self, step):
            ctx, fakes = self.ctx, self.ctx.config.dmd.fake_updates
            batch = ctx.sampler.batch(step * (fakes + 1) + fakes)  # the generator step's batch
            ctx.optimizer.zero_grad(set_to_none=True)
            seen["metrics"] = self._policy_gradient(step, batch)
            seen["lora"] = [
                n for n, p in ctx.model.denoiser.named_parameters() if p.requires_grad and "lora_" in n
            ]
            seen["term"] = grads(ctx)
            sampled = online.sample_and_score(ctx, step, advantage=ctx.config.grpo, batch=batch)
            traj = sampled.trajectory
            trained = online._trained_steps(ctx, step, traj)
            assert trained == [0]  # CPS: the last step lands deterministically, the first is trained
            everything = torch.arange(traj.latents.shape[0])
            loss, _ = online._grpo_loss_at(ctx, traj, everything, 0, 0, sampled.cond, sampled.advantages)
            loss.backward()
            seen["grpo"] = grads(ctx)
            return {}

    overrides = ["train.steps=1", "dmd.fake_updates=1", f"dmd.policy_weight={weight}",
                 "reward={blueness_without_gradient: {weight: 1.0}}", "data.group_size=4", "data.groups_per_step=3",
                 "sampling.dynamics=cps", "sampling.noise_level=0.9", "train.micro_batch_size=3"]  # fmt: skip
    run_training(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "probe", *overrides), Probe())
    assert seen["metrics"]["policy_ratio"] == 1.0 and seen["metrics"]["advantage_abs"] > 0.5
    assert (
        len(seen["term"]) == len(seen["grpo"]) == len(seen["lora"]) > 0
    )  # one gradient per trained LoRA tensor
    for term, grpo in zip(seen["term"], seen["grpo"], strict=True):
        # float32 sums over micro-batches, amplified by the CPS log-prob's 1 / std^2: equal to 1e-3 in norm
        assert (term - weight * grpo).norm() <= 1e-3 * (weight * grpo).norm() + 1e-8
    assert any(g.abs().max() > 0 for g in seen["grpo"])

    class Recording(DMDRecipe):  # the generator's gradient when the optimizer steps
        def setup(self, ctx):
            super().setup(ctx)
            original = ctx.optimizer_step

            def step():
                seen[self] = [p.grad.detach().clone() for p in ctx.trainable]
                return original()

            ctx.optimizer_step = step

    with_term, without = Recording(), Recording()
    run_training(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "a", *overrides), with_term)
    run_training(
        _config("configs/dmd/tiny_sd3.yaml", tmp_path / "b", *overrides, "dmd.policy_weight=0"), without
    )
    # the whole generator step is the plain DMD step plus the term (the same batch and draws)
    for a, b, term in zip(seen[with_term], seen[without], seen["term"], strict=True):
        assert (a - b - term).norm() <= 1e-3 * term.norm() + 1e-6


@pytest.mark.parametrize(
    "path", ["configs/dmd/tiny_sd3.yaml", "configs/dmd/tiny_sd.yaml"]
)  # LoRA, full weights
def test_a_run_starts_from_a_distilled_student_and_its_fake_score(path, tmp_path, capsys):
    """``dmd.init`` (RTDMD's cold start): the new run's student and fake score are the checkpoint's, bitwise,
    its teacher is still the base, and its optimizers start fresh. A checkpoint without a fake score (another
    recipe's) gives the student only, the fake score starting as the teacher, said in one line."""
    from safetensors.torch import load_file

    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    train(_config(path, tmp_path / "cold", "train.steps=2", "optim.lr=0.05"))
    checkpoint = tmp_path / "cold" / "checkpoints" / "step-000002"
    seen = {}

    class Probe(DMDRecipe):
        def iteration(self, step):
            ctx = self.ctx
            seen["student"] = {
                n: p.detach().clone() for n, p in ctx.model.denoiser.named_parameters() if p.requires_grad
            }
            seen["fake"] = [p.detach().clone() for p in self.fake_params]
            seen["moments"] = len(self._adam_state) + len(ctx.optimizer.state)
            seen["ema"] = [s.clone() for s in ctx.ema.shadow] if ctx.ema is not None else None
            seen["x"] = x = torch.randn(
                1, *ctx.model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0)
            )
            cond = ctx.model.encode(["a red circle"], cfg=False)
            with self._teaching():
                seen["teacher"] = ctx.model.predict(x, torch.full((1,), 500.0), cond, 1.0)
            return {}

    warm = _config(path, tmp_path / "warm", "train.steps=1", f"dmd.init={checkpoint}", "train.ema_decay=0.9")
    probe = Probe()
    run_training(warm, probe)
    # the EMA restarts from the loaded student (the loop's own EMA object, updated in place)
    assert all(torch.equal(s, seen["student"][n]) for n, s in zip(seen["student"], seen["ema"], strict=True))
    student = load_file(str(checkpoint / "trainable.safetensors"))
    fake = load_file(str(checkpoint / "recipe.safetensors"))
    assert seen["student"].keys() == student.keys()
    assert all(torch.equal(seen["student"][k], v) for k, v in student.items())
    assert all(torch.equal(p, fake[f"fake.{i}"]) for i, p in enumerate(seen["fake"]))
    assert seen["moments"] == 0
    base = load_model(path.split("/")[-1].split(".")[0].replace("_", "-"))
    with torch.no_grad():
        expected = base.predict(
            seen["x"], torch.full((1,), 500.0), base.encode(["a red circle"], cfg=False), 1.0
        )
    assert torch.equal(seen["teacher"], expected)  # the teacher is the base, not the loaded student
    alone = tmp_path / "student_only"  # the student's weights without a recipe state: another recipe's
    alone.mkdir()
    (alone / "trainable.safetensors").write_bytes((checkpoint / "trainable.safetensors").read_bytes())
    capsys.readouterr()
    run_training(_config(path, tmp_path / "warm2", "train.steps=1", f"dmd.init={alone}"), Probe())
    assert f"note: dmd.init {str(alone)!r} holds no fake score" in capsys.readouterr().out
    assert all(torch.equal(seen["student"][k], v) for k, v in student.items())
    started = seen["fake"]
    run_training(_config(path, tmp_path / "plain", "train.steps=1"), Probe())  # a run without dmd.init
    assert all(torch.equal(p, q) for p, q in zip(started, seen["fake"], strict=True))  # the teacher's
    assert not all(torch.equal(p, fake[f"fake.{i}"]) for i, p in enumerate(started))  # not the trained one
    if path.endswith("tiny_sd3.yaml"):  # a checkpoint of another LoRA rank: same names, other shapes
        with pytest.raises(ValueError, match=r"dmd\.init .*shapes differ"):
            train(
                _config(
                    path, tmp_path / "other", "train.steps=1", f"dmd.init={checkpoint}", "model.lora_rank=8"
                )
            )
        with pytest.raises(ValueError, match=r"hold a LoRA .*--lora <checkpoint>/lora"):
            load_model("tiny-sd3").load_weights(checkpoint)


def test_a_reward_tilt_needs_a_differentiable_reward(tmp_path):
    from flowalign.config import ConfigError

    with pytest.raises(ValueError, match="compressibility.*not"):
        train(_config("configs/dmd/tiny_sd3.yaml", tmp_path, "dmd.reward_beta=0.1",
                      "reward={compressibility: {weight: 1.0}}"))  # fmt: skip
    with pytest.raises(ConfigError, match="invalid key 'reward'"):
        load_config(ROOT / "configs/dmd/tiny_sd3.yaml", ["dmd.reward_beta=0.1"])


@pytest.mark.parametrize(
    "path, overrides",
    [
        ("configs/dmd/tiny_sd3_fdistill.yaml", []),  # transformer: the middle block's image tokens
        (
            "configs/dmd/tiny_sd.yaml",
            ["dmd.divergence=kl", "dmd.gan_weight=1e-3", "dmd.regression_pairs=8", "dmd.teacher_steps=2"],
        ),  # full fine-tuning, UNet mid_block  # fmt: skip
    ],
)
def test_the_discriminator_trains_with_the_fake_score_and_resumes_exactly(path, overrides, tmp_path):
    """DMD2's GAN head and f-distill: the head trains in the fake score's optimizer (its weights and Adam
    moments are in the checkpoint and resume bitwise), the discriminator loss starts at 2 log 2 (an untrained
    head cannot tell the teacher's samples from the student's), and no regression is computed unasked."""
    import math

    common = ["train.checkpoint_every=1", "train.keep_checkpoints=5", *overrides]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(_config(path, straight, "train.steps=3", *common))
    train(_config(path, resumed, "train.steps=2", *common))
    train(_config(path, resumed, "train.steps=3", "train.resume=latest", *common))
    for name in ("trainable.safetensors", "recipe.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step-000003" / name))
        b = load_file(str(resumed / "checkpoints" / "step-000003" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    import json

    first = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss_gan_disc"] - 2 * math.log(2)) < 0.1
    assert "loss_regression" not in result.last_metrics and "f_weight_max" in result.last_metrics
    assert "loss_gan_gen" in result.last_metrics


def test_the_discriminator_can_learn_from_real_images_instead_of_the_teacher(tmp_path):
    """``dmd.gan_real`` (DMD2's real data): the discriminator's real side is the dataset's captions and its
    images encoded by the model, exactly; no teacher pool is built when no regression asks for one; the head
    starts unable to tell them from the student's samples (loss 2 log 2). A wrong-sized image is one error
    naming the key, file and line."""
    import json

    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training
    from flowalign.worlds.shapes.data import write_real_images

    real = tmp_path / "data" / "real.jsonl"
    assert write_real_images(ROOT / "assets/shapes/prompts/train.jsonl", real, per_prompt=1, seed=0) == 128
    seen = {}

    class Recording(DMDRecipe):
        def _real_images(self):
            seen["real"] = super()._real_images()
            return seen["real"]

    common = ["train.steps=1", "dmd.regression_weight=0", f"dmd.gan_real={real}"]
    recipe = Recording()
    run_training(_config("configs/dmd/tiny_sd3_fdistill.yaml", tmp_path / "run", *common), recipe)
    captions, latents, _ = seen["real"]
    lines = [json.loads(line) for line in real.read_text().splitlines()]
    assert captions == [line["prompt"] for line in lines] and recipe.pairs is None
    from flowalign.data.prompts import load_image

    model = load_model("tiny-sd3")
    images = torch.stack([load_image(real.parent / line["image"]) for line in lines[:4]])
    assert torch.allclose(latents[:4], model.encode_images(images), atol=1e-5)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss_gan_disc"] - 2 * math.log(2)) < 0.1

    from PIL import Image

    Image.new("RGB", (16, 16)).save(real.parent / "real_images" / "000003.png")
    with pytest.raises(ValueError, match=r"dmd.gan_real: .*real.jsonl:4: 'real_images/000003.png' is 16x16"):
        train(_config("configs/dmd/tiny_sd3_fdistill.yaml", tmp_path / "bad", *common))


def test_the_generators_gan_term_reaches_the_student_but_not_the_critic(tmp_path):
    """DMD2's generator GAN term runs the fake score and its head as fixed functions (DMD2 freezes them for
    the generator's turn): at the generator's optimizer step they hold no gradient, while the term changes the
    student's gradient. (Under DDP the bare modules run: their parameters after the discriminator's layer get
    no gradient, which the wrapper would wait for; ``tests/test_distributed.py``, case ``dmd_fdistill``.)"""
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    seen = {}

    class Recording(DMDRecipe):
        def setup(self, ctx):
            super().setup(ctx)
            original = ctx.optimizer_step

            def step():
                seen[self] = [p.grad.detach().clone() for p in ctx.trainable]
                seen[self, "critic"] = [p.grad for p in self.fake_params]
                return original()

            ctx.optimizer_step = step

    common = ["train.steps=1", "dmd.fake_updates=1", "dmd.gan_layer=transformer_blocks.0"]
    with_term, without = Recording(), Recording()
    run_training(
        _config("configs/dmd/tiny_sd3_fdistill.yaml", tmp_path / "a", *common, "dmd.gan_weight=1"), with_term
    )
    run_training(
        _config("configs/dmd/tiny_sd3_fdistill.yaml", tmp_path / "b", *common, "dmd.gan_weight=0"), without
    )
    assert all(grad is None for grad in seen[with_term, "critic"] + seen[without, "critic"])
    assert any(not torch.equal(a, b) for a, b in zip(seen[with_term], seen[without], strict=True))


def test_f_distill_bins_a_diffusion_models_ratios_by_their_place_in_t_range(tmp_path):
    """f-distill's per-bin normalisation reads each re-noising draw's place in ``dmd.t_range``: for a
    diffusion model its timestep over the last one, not its level ``alphas_cumprod[t]`` (which runs the other
    way and leaves the range)."""
    from flowalign.train import dmd as dmd_module
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    drawn, binned = [], []
    levels_of, weight_of = dmd_module.noise_levels, dmd_module.f_divergence_weight

    def recording_levels(model, gens, span, floor=None):
        level, timestep = levels_of(model, gens, span, floor)
        if list(span) == [0.3, 0.7]:  # the generator's draws (the fake score's span is [0, 1])
            drawn.append(timestep)
        return level, timestep

    def recording_weight(logits, divergence, *, t, t_range, bins):
        binned.append(t)
        return weight_of(logits, divergence, t=t, t_range=t_range, bins=bins)

    patch = pytest.MonkeyPatch()
    patch.setattr(dmd_module, "noise_levels", recording_levels)
    patch.setattr(dmd_module, "f_divergence_weight", recording_weight)
    overrides = ["train.steps=1", "dmd.fake_updates=1", "dmd.divergence=js", "dmd.ratio_bins=4",
                 "dmd.t_range=[0.3,0.7]", "data.groups_per_step=4"]  # fmt: skip
    try:
        run_training(_config("configs/dmd/tiny_sd.yaml", tmp_path / "run", *overrides), DMDRecipe())
    finally:
        patch.undo()
    (t,) = binned
    assert torch.equal(t, torch.cat(drawn) / 999) and bool(((0.3 <= t) & (t <= 0.7)).all())


def test_a_non_finite_fake_score_gradient_skips_its_update(tmp_path):
    """A NaN in the fake score's gradient skips that update, reported as ``fake_skipped_updates``, as the
    generator's optimizer step does: the fake score keeps its weights and Adam state."""
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    seen = []

    class Poisoned(DMDRecipe):
        def setup(self, ctx):
            super().setup(ctx)
            self.fake_params[0].register_hook(lambda grad: grad * float("nan"))

        def _fake_update(self, step, j):
            before = [p.detach().clone() for p in self.fake_params]
            metrics = super()._fake_update(step, j)
            seen.append(
                (metrics, all(torch.equal(a, p) for a, p in zip(before, self.fake_params, strict=True)))
            )
            return metrics

    result = run_training(
        _config("configs/dmd/tiny_sd3.yaml", tmp_path / "run", "train.steps=1", "dmd.fake_updates=2"),
        Poisoned(),
    )
    assert [(m["fake_skipped_updates"], unchanged) for m, unchanged in seen] == [(1.0, True), (1.0, True)]
    assert result.last_metrics["fake_skipped_updates"] == 1.0


def test_captioned_images_are_read_a_chunk_at_a_time(tmp_path):
    """``dmd.gan_real``'s images are read (and then encoded) ``chunk`` lines at a time, so that a large
    dataset is never held as pixels at once: the chunks are the whole file's images, in order."""
    from PIL import Image

    from flowalign.data.prompts import load_captioned_images

    lines = []
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"prompt": f"caption {i}", "image": f"{i}.png"}))
    (tmp_path / "real.jsonl").write_text("\n".join(lines) + "\n")
    chunks = list(load_captioned_images(tmp_path / "real.jsonl", 8, chunk=2))
    ((captions, whole),) = load_captioned_images(tmp_path / "real.jsonl", 8)
    assert [len(c) for c, _ in chunks] == [2, 2, 1] and sum((c for c, _ in chunks), []) == captions
    assert torch.equal(torch.cat([images for _, images in chunks]), whole) and whole.shape == (5, 3, 8, 8)


def test_micro_batching_leaves_the_update_unchanged(tmp_path):
    """f-distill + GAN + regression with micro-batches of one sample give the update of the whole batch: the
    f-distill weights are normalised over the whole batch, and the second (gradient) pass redraws the very
    samples the first pass scored."""
    common = ["train.steps=1", "train.checkpoint_every=1", "dmd.regression_weight=0.5"]
    train(_config("configs/dmd/tiny_sd3_fdistill.yaml", tmp_path / "whole", *common))
    train(
        _config("configs/dmd/tiny_sd3_fdistill.yaml", tmp_path / "micro", "train.micro_batch_size=1", *common)
    )
    for name in ("trainable.safetensors", "recipe.safetensors"):
        a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-000001" / name))
        b = load_file(str(tmp_path / "micro" / "checkpoints" / "step-000001" / name))
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-4), (name, key)


def test_the_gradient_pass_redoes_only_the_last_step_of_the_samples_the_first_pass_scored(tmp_path):
    """The generator's second pass (with gradient) gives exactly the samples the first pass scored, from the
    stored state of their last student step: one denoiser call per micro-batch, not the k steps before it."""
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    drawn, calls = {"scored": [], "trained": []}, []

    class Recording(DMDRecipe):
        def _rollout(self, step, purpose, cond, gens, grad):
            traj = super()._rollout(step, purpose, cond, gens, grad)
            if purpose == "student" and not isinstance(gens, torch.Tensor):  # the generator's samples
                drawn["scored"].append(traj.final.detach().clone())
            return traj

        def _last_step_again(self, state, cond):
            predict = self.ctx.model.predict
            self.ctx.model.predict = lambda *a, **k: calls.append(1) or predict(*a, **k)
            try:
                x, x0 = super()._last_step_again(state, cond)
            finally:
                del self.ctx.model.predict
            drawn["trained"].append(x.detach().clone())
            assert x.requires_grad and x is x0  # matched on x0-predictions without dmd.ambient
            return x, x0

    run_training(_config("configs/dmd/tiny_sd3.yaml", tmp_path, "train.steps=1", "train.micro_batch_size=1"),
                 Recording())  # fmt: skip
    assert len(drawn["scored"]) == len(drawn["trained"]) == len(calls) == 2
    for scored, trained in zip(drawn["scored"], drawn["trained"]):
        assert torch.equal(scored, trained)


def test_ac_dmd_matches_each_state_at_its_level_and_needs_a_flow_model(tmp_path):
    """``dmd.ambient`` in the recipe: every backward-simulation state it matches is the rollout's state after
    step k at the schedule's level sigma_{k+1} (the sample itself, at 0, after the last step), re-noised to a
    level above its own within ``t_range``; the gradient pass redoes that state exactly; the fake score's
    target is the ambient one. A diffusion model is refused with a line naming the key."""
    from flowalign.algorithms.dmd import ambient_velocity_target
    from flowalign.train import dmd as dmd_module
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    seen, redone, targets = [], [], []

    class Recording(DMDRecipe):
        def _matched(self, traj):
            x, level = super()._matched(traj)
            k = traj.plan.stop_after
            assert torch.equal(x, traj.latents[:, k + 1])
            assert torch.equal(level, torch.full_like(level, float(traj.schedule.sigmas[k + 1])))
            seen.append((k, level[0].item(), x.clone()))
            return x, level

        def _last_step_again(self, state, cond):
            x, x0 = super()._last_step_again(state, cond)
            redone.append(x.detach().clone())
            return x, x0

    levels_of = dmd_module.noise_levels

    def recording_levels(model, gens, span, floor=None):
        level, timestep = levels_of(model, gens, span, floor)
        assert floor is not None and bool(
            (level >= torch.clamp(floor + 0.01, min=span[0], max=span[1]) - 1e-6).all()
        )
        assert bool((level <= span[1] + 1e-6).all())
        return level, timestep

    def recording_target(x_s, sigma_s, sigma_e, noise):
        targets.append(float(sigma_s.max()))
        return ambient_velocity_target(x_s, sigma_s, sigma_e, noise)

    overrides = ["train.steps=3", "dmd.ambient=true", "dmd.fake_updates=1", "train.micro_batch_size=1"]
    patch = pytest.MonkeyPatch()
    patch.setattr(dmd_module, "noise_levels", recording_levels)
    patch.setattr(dmd_module, "ambient_velocity_target", recording_target)
    try:
        result = run_training(
            _config("configs/dmd/tiny_sd3.yaml", tmp_path / "flow", *overrides), Recording()
        )
    finally:
        patch.undo()
    assert all(math.isfinite(v) for v in result.last_metrics.values())
    assert {k for k, _, _ in seen} == {0, 1}, "both steps of the 2-step student were drawn"
    assert any(level > 0 for _, level, _ in seen) and any(level == 0 for _, level, _ in seen)
    # per iteration: the fake update's states, then the generator's two micro-batches, then those redone
    assert len(seen) == 3 * 3 and len(redone) == 3 * 2 and len(targets) == 3
    for i in range(3):
        assert torch.equal(seen[3 * i + 1][2], redone[2 * i]) and torch.equal(
            seen[3 * i + 2][2], redone[2 * i + 1]
        )
    with pytest.raises(ValueError, match="dmd.ambient.*diffusion"):
        run_training(_config("configs/dmd/tiny_sd.yaml", tmp_path / "sd", "sampling.steps=2", "dmd.ambient=true"),
                     DMDRecipe())  # fmt: skip
    # a state at 0.75 cannot be re-noised above itself below 0.7: refused before training, naming the key
    high = ["sampling.sigmas=[1.0,0.5]", "dmd.t_range=[0.02,0.7]"]  # 0.5 is 0.75 after tiny-sd3's shift
    with pytest.raises(
        ValueError, match=r"^dmd.t_range=\[0.02, 0.7\]: .* reach 0.75; raise the upper end to at least 0.76"
    ):
        run_training(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "high", *overrides, *high), DMDRecipe())


def test_the_fake_scores_consistency_term_moves_its_inputs_down_and_keeps_micro_batching_exact(tmp_path):
    """``dmd.consistency_weight``: each fake-score input at level t is moved twice, with independent noises, to
    one lower level t - delta (delta in steps of 0.001 up to ``dmd.consistency_gap``, at least 0) from the
    fake score's own detached x0-prediction there, which is the estimator's anchor (with gradient); the update
    is the same with micro-batches of one sample; a diffusion model is refused naming the key."""
    from flowalign.algorithms.dmd import consistency_loss, consistency_step
    from flowalign.train import dmd as dmd_module
    from flowalign.train.dmd import DMDRecipe
    from flowalign.train.loop import run_training

    steps, losses = [], []

    def recording_step(x_t, x0, level, to, noise, eta=None):
        steps.append((x_t.clone(), x0.clone(), level.clone(), to.clone(), noise.clone(), eta))
        return consistency_step(x_t, x0, level, to, noise, eta)

    def recording_loss(anchor, first, second):
        losses.append((anchor, first, second))
        return consistency_loss(anchor, first, second)

    overrides = [
        "train.steps=1",
        "dmd.fake_updates=1",
        "dmd.consistency_weight=0.5",
        "dmd.consistency_gap=0.05",
    ]
    patch = pytest.MonkeyPatch()
    patch.setattr(dmd_module, "consistency_step", recording_step)
    patch.setattr(dmd_module, "consistency_loss", recording_loss)
    try:
        result = run_training(
            _config("configs/dmd/tiny_sd3.yaml", tmp_path / "rec", *overrides, "train.micro_batch_size=1"),
            DMDRecipe(),
        )
    finally:
        patch.undo()
    assert math.isfinite(result.last_metrics["loss_consistency"])
    assert len(steps) == 2 * 2 and len(losses) == 2  # two samples, each moved twice
    for i, (anchor, first, second) in enumerate(losses):
        assert anchor.requires_grad and first.requires_grad and second.requires_grad
        a, b = steps[2 * i], steps[2 * i + 1]
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
        assert torch.equal(a[1], anchor.detach()) and torch.equal(b[1], anchor.detach())
        first, second = a[4].flatten(), b[4].flatten()  # independent standard normal draws: uncorrelated
        assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.3
        assert abs(float(first.std()) - 1) < 0.3 and abs(float(second.std()) - 1) < 0.3
        level, to = float(a[2][0]), float(a[3][0])
        assert to >= 0 and (
            to == 0 or round((level - to) * 1000, 3) == pytest.approx(round((level - to) * 1000))
        )
        assert 0 < level - to <= 0.05 + 1e-6 and a[5] is None
    common = ["train.checkpoint_every=1", *overrides]
    train(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "whole", *common))
    train(_config("configs/dmd/tiny_sd3.yaml", tmp_path / "micro", "train.micro_batch_size=1", *common))
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-000001" / "recipe.safetensors"))
    b = load_file(str(tmp_path / "micro" / "checkpoints" / "step-000001" / "recipe.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-4), key
    with pytest.raises(ValueError, match="dmd.consistency_weight.*diffusion"):
        run_training(
            _config("configs/dmd/tiny_sd.yaml", tmp_path / "sd", "dmd.consistency_weight=0.01"), DMDRecipe()
        )


def test_the_lr_schedule_warms_up_per_update_decays_per_iteration_and_resumes_exactly(tmp_path, capsys):
    """optim.schedule=cosine to optim.min_lr_ratio over train.steps, times the warmup: each iteration logs
    the rate of its update, lr * min(1, (i + 1) / 2) * (0.1 + 0.9 * (1 + cos(pi * i / 4)) / 2) (one
    optimizer step per DMD iteration); a run resumed at step 2 ends with the same weights, and one resumed
    with a longer train.steps says that its schedule changed."""
    from flowalign.train.lr_schedule import decay_factor

    common = ["train.checkpoint_every=1", "train.keep_checkpoints=5", "optim.lr=1e-3", "optim.warmup_steps=2",
              "optim.schedule=cosine", "optim.min_lr_ratio=0.1"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config("configs/dmd/tiny_sd3.yaml", straight, "train.steps=4", *common))
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in rows if "lr" in row]
    expected = [
        1e-3 * min(1, (i + 1) / 2) * (0.1 + 0.9 * (1 + math.cos(math.pi * i / 4)) / 2) for i in range(4)
    ]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert decay_factor("linear", 0.5, 0.2) == pytest.approx(0.6) and decay_factor("constant", 0.9, 0.0) == 1
    shutil.copytree(straight, resumed)
    for late in ("step-000003", "step-000004"):
        shutil.rmtree(resumed / "checkpoints" / late)
    train(_config("configs/dmd/tiny_sd3.yaml", resumed, "train.steps=4", "train.resume=latest", *common))
    a = load_file(str(straight / "checkpoints" / "step-000004" / "trainable.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert "LR schedule" not in capsys.readouterr().out
    train(_config("configs/dmd/tiny_sd3.yaml", resumed, "train.steps=5", "train.resume=latest", *common))
    assert "note: resumed with another LR schedule (train.steps changed)" in capsys.readouterr().out
