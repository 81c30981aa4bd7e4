"""The Wan image-to-video adapter on tiny random components: faithfulness to the stock
``WanImageToVideoPipeline`` (Wan 2.1 with its CLIP image encoder, Wan 2.2 with two experts), LoRA on either
expert, video rollouts and log-probs, and bad inputs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flowalign.models import ModelLoadError, load_model
from flowalign.models.tiny import tiny_pipeline
from flowalign.samplers import SamplingPlan, generate, rollout
from flowalign.samplers.generate import seeded_generators

PROMPTS = ["a red ball", "blue square"]


def _first_frames(n=2, size=32, seed=0):
    torch.manual_seed(seed)
    u = (torch.rand(n, 3, size, size) * 255).to(torch.uint8)
    return u.float() / 255, [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u]


def _stock(pipeline, pil, prompt, seed, steps, guidance, output_type, **kwargs):
    return pipeline(
        image=pil, prompt=prompt, negative_prompt="blurry" if guidance > 1 else None, height=32, width=32,
        num_frames=5, num_inference_steps=steps, guidance_scale=guidance, output_type=output_type,
        generator=torch.Generator().manual_seed(seed), **kwargs,
    ).frames  # fmt: skip


@pytest.mark.parametrize("variant", ["wan", "wan22"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_rollout_reproduces_the_stock_pipeline(variant, guidance):
    """Same first frame, prompt, noise, steps and guidance: flowalign's latents and frames equal the stock
    pipeline's (one call per prompt, as it takes one image per call). With 3 steps the Wan 2.2 grid
    [1000, 751, 8.9] crosses the 900 boundary, so both experts run."""
    model = load_model(f"tiny-{variant}")
    images, pils = _first_frames()
    out = generate(
        model, PROMPTS, seeded_generators([0, 1], "cpu"), steps=3, guidance=guidance, images=images,
        negative_prompts="blurry" if guidance > 1 else None,
    )  # fmt: skip
    assert out.final.shape == (2, 16, 2, 4, 4) and out.images.shape == (2, 5, 3, 32, 32)
    stock = tiny_pipeline(variant)
    for i in range(2):
        latents = _stock(stock, pils[i], PROMPTS[i], i, 3, guidance, "latent")
        frames = _stock(stock, pils[i], PROMPTS[i], i, 3, guidance, "pt")
        assert (out.final[i] - latents[0]).abs().max() <= 1e-4
        assert (out.images[i] - frames[0]).abs().max() <= 1e-4


def test_the_low_noise_expert_has_its_own_guidance_and_mixed_batches_split_by_expert():
    model = load_model("tiny-wan22", guidance_2=2.0)
    images, pils = _first_frames(1)
    out = generate(
        model,
        PROMPTS[:1],
        seeded_generators([3], "cpu"),
        steps=3,
        guidance=5.0,
        images=images,
        negative_prompts="blurry",
    )
    stock = _stock(tiny_pipeline("wan22"), pils[0], PROMPTS[0], 3, 3, 5.0, "latent", guidance_scale_2=2.0)
    stock_same = _stock(tiny_pipeline("wan22"), pils[0], PROMPTS[0], 3, 3, 5.0, "latent")
    assert (out.final - stock).abs().max() <= 1e-4 and (stock - stock_same).abs().max() > 1e-3
    # One batch holding samples on both sides of the boundary = each sample predicted alone.
    cond = model.encode(PROMPTS, images=_first_frames()[0])
    x = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([950.0, 300.0])
    both = model.predict(x, t, cond, guidance=5.0)
    for i in range(2):
        alone = model.predict(x[i : i + 1], t[i : i + 1], cond.select([i]), guidance=5.0)
        torch.testing.assert_close(both[i : i + 1], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(model.predict(x[:1], t[1:], cond.select([0]), 5.0), both[:1], atol=1e-3)


@pytest.mark.parametrize("variant,expert", [("wan", "high"), ("wan22", "low"), ("wan22", "both")])
def test_a_lora_of_either_expert_or_both_loads_in_the_stock_pipeline(variant, expert, tmp_path):
    """A LoRA of one expert, or of both (the high-noise one's in the directory, the low-noise one's in its
    transformer_2/), reproduces the tuned samples in the stock pipeline and in a fresh flowalign model. The
    3-step grid crosses the boundary, so both experts run."""
    model = load_model(f"tiny-{variant}", expert=expert)
    model.add_lora(rank=4)
    images, pils = _first_frames(1)
    pipe = model.pipeline
    if expert == "both":
        assert {n.split(".")[0] for n, p in model.denoiser.named_parameters() if p.requires_grad} == {
            "transformer",
            "transformer_2",
        }
    else:
        assert model.denoiser is (pipe.transformer_2 if expert == "low" else pipe.transformer)
    assert model.trainable_parameters()
    with torch.no_grad():  # stand-in for training: non-zero LoRA B matrices
        gen = torch.Generator().manual_seed(5)
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    tuned = generate(model, PROMPTS[:1], seeded_generators([0], "cpu"), steps=3, guidance=1.0, images=images)
    with model.reference():
        base = generate(
            model, PROMPTS[:1], seeded_generators([0], "cpu"), steps=3, guidance=1.0, images=images
        )
    assert (tuned.final - base.final).abs().max() > 1e-3
    model.save_lora(tmp_path)
    stock = tiny_pipeline(variant)
    stock.load_lora_weights(str(tmp_path), **({"load_into_transformer_2": True} if expert == "low" else {}))
    if expert == "both":
        stock.load_lora_weights(str(tmp_path / "transformer_2"), load_into_transformer_2=True)
    assert (_stock(stock, pils[0], PROMPTS[0], 0, 3, 1.0, "latent") - tuned.final).abs().max() <= 1e-4
    again = load_model(f"tiny-{variant}")
    again.load_lora(tmp_path)
    assert again.expert == expert
    reloaded = generate(
        again, PROMPTS[:1], seeded_generators([0], "cpu"), steps=3, guidance=1.0, images=images
    )
    assert torch.equal(reloaded.final, tuned.final)


def test_video_rollouts_have_5d_states_and_exact_log_probs():
    """An SDE rollout over [B, 16, T, h, w] latents: states, means and per-step log-probs, reproducible,
    and the log-prob of a recorded step recomputed from its state is the recorded one (ratio 1)."""
    from flowalign.samplers.rollout import denoise_step

    model = load_model("tiny-wan")
    images, _ = _first_frames()
    cond = model.encode(PROMPTS, images=images)
    x_T = model.initial_noise(2, 32, 32, seeded_generators([0, 1], "cpu"))
    schedule = model.schedule(4)
    plan = SamplingPlan.build(4, dynamics="flow_grpo", sde="all")
    a = rollout(model, cond, x_T, schedule, plan, guidance=1.0, generator=seeded_generators([2, 3], "cpu"))
    b = rollout(model, cond, x_T, schedule, plan, guidance=1.0, generator=seeded_generators([2, 3], "cpu"))
    assert a.latents.shape == (2, 5, 16, 2, 4, 4) and a.means.shape == (2, 4, 16, 2, 4, 4)
    assert a.log_probs.shape == (2, 4) and a.images.shape == (2, 5, 3, 32, 32)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    for k in range(4):
        step = denoise_step(
            model, a.latents[:, k], k, cond, schedule, plan, 1.0, prev_sample=a.latents[:, k + 1]
        )
        assert torch.equal(step.log_prob, a.log_probs[:, k])


def test_decode_is_differentiable_and_encode_images_takes_videos():
    model = load_model("tiny-wan")
    latents = torch.randn(2, 16, 2, 4, 4, requires_grad=True)
    video = model.decode(latents)
    assert video.shape == (2, 5, 3, 32, 32) and 0 <= video.min() and video.max() <= 1
    video.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert model.encode_images(video.detach()).shape == (2, 16, 2, 4, 4)


def test_the_differentiable_decode_is_checkpointed_per_frame_with_the_stock_values_and_gradients():
    """checkpointed_decode (each latent frame's decoder call under checkpointing, its feature cache passed in
    and out) gives the stock AutoencoderKLWan decode's frames and gradients exactly (3 latent frames: the
    first chunk, and two that read the cache); model.decode uses it under gradient, the stock decode without."""
    from flowalign.models.wan import checkpointed_decode

    model = load_model("tiny-wan22")
    vae = model.pipeline.vae
    z = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    stock = vae.decode(z, return_dict=False)[0]
    ours = checkpointed_decode(vae, z)
    assert torch.equal(ours, stock)
    weights = torch.randn(stock.shape, generator=torch.Generator().manual_seed(1))
    (expected,) = torch.autograd.grad((stock * weights).sum(), z)
    (got,) = torch.autograd.grad((ours * weights).sum(), z)
    assert torch.equal(got, expected) and expected.abs().sum() > 0
    latents = z.detach().requires_grad_(True)
    with torch.no_grad():
        plain = model.decode(latents)
    assert torch.equal(model.decode(latents), plain)


def test_cpu_offload_keeps_the_samples_and_offloads_each_idle_module_once_done():
    """model.cpu_offload on Wan 2.2 (the low-noise expert trains): the same latents as without; the text
    encoder goes back to the CPU once the prompts are encoded and the frozen high-noise expert once the
    trained expert takes over (3 steps: one high, two low); the expert is fixed from then on."""
    images, _ = _first_frames()
    plain = generate(
        load_model("tiny-wan22", expert="low"), PROMPTS, seeded_generators([0, 1], "cpu"), steps=3, guidance=1.0,
        images=images,
    ).final  # fmt: skip
    model = load_model("tiny-wan22", expert="low")
    model.cpu_offload = True
    offloaded = []
    for name, hook in model._offload_hooks.items():
        hook.offload = lambda name=name, offload=hook.offload: (offloaded.append(name), offload())[1]
    out = generate(model, PROMPTS, seeded_generators([0, 1], "cpu"), steps=3, guidance=1.0, images=images)
    assert torch.equal(out.final, plain)
    assert offloaded == ["text_encoder", "transformer", "transformer"]
    with pytest.raises(ValueError, match="choose the expert before cpu_offload"):
        model.expert = "high"
    both = load_model("tiny-wan22", expert="both")
    both.cpu_offload = True
    assert list(both._offload_hooks) == ["text_encoder"]  # no expert idles


def test_bad_inputs_are_one_clear_error():
    model = load_model("tiny-wan")
    images, _ = _first_frames()
    with pytest.raises(ValueError, match="needs a conditioning first frame per prompt: pass images="):
        model.encode(PROMPTS)
    with pytest.raises(ValueError, match=r"images: got 1 conditioning images for 2 prompts"):
        model.encode(PROMPTS, images=images[:1])
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, H, W\]"):
        model.encode(PROMPTS, images=images[:, :1])
    with pytest.raises(ValueError, match="multiples of 16 for this model, got 24x24"):
        model.encode(PROMPTS, images=images[..., :24, :24])
    with pytest.raises(ValueError, match=r"Wan video models make 4k \+ 1 frames.*got 6; use 5 or 9"):
        model.num_frames = 6
    with pytest.raises(ValueError, match="num_frames: Wan video models make 4k"):
        load_model("tiny-wan", num_frames=8)
    with pytest.raises(ValueError, match="expert='low' trains transformer_2, which this model lacks"):
        load_model("tiny-wan", expert="low")
    with pytest.raises(ValueError, match=r"Wan takes videos \[B, F, 3, H, W\]"):
        model.encode_images(images)
    with pytest.raises(ValueError, match="images: this sd3 model is text-to-image"):
        load_model("tiny-sd3").encode(PROMPTS, images=images)
    cond = model.encode(PROMPTS, images=images)
    model.num_frames = 9
    with pytest.raises(ValueError, match=r"encode the images at the video's size and num_frames \(9\)"):
        model.predict(torch.randn(2, 16, 3, 4, 4), torch.tensor(500.0), cond)


def test_a_unipc_checkpoint_samples_with_euler_at_its_flow_shift_and_other_schedulers_are_refused(caplog):
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    from flowalign.models.wan import WanAdapter

    pipe = tiny_pipeline("wan")
    pipe.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
    )
    with caplog.at_level("WARNING"):
        model = WanAdapter(pipe, num_frames=5)
    assert "ships UniPCMultistepScheduler" in caplog.text
    assert type(model.pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert model.pipeline.scheduler.config.shift == 5.0
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ModelLoadError, match="scheduler is a DDIMScheduler"):
        WanAdapter(pipe, num_frames=5)


def test_flowalign_sample_writes_the_videos_as_a_gif_and_a_frame_strip(tmp_path):
    from torchvision.utils import make_grid

    from flowalign.cli import main
    from flowalign.data.prompts import load_image
    from flowalign.eval.geneval import image_seed

    first = "assets/video/tiny/red_circle.png"
    out = tmp_path / "v.gif"
    assert main(["sample", "--model", "tiny-wan", "--prompt", "the red circle moves right", "--image", first,
                 "--num-images", "2", "--steps", "2", "--frames", "9", "--out", str(out)]) == 0  # fmt: skip
    model = load_model("tiny-wan", num_frames=9)
    image = load_image(first).unsqueeze(0).expand(2, -1, -1, -1)
    videos = generate(
        model, ["the red circle moves right"] * 2, seeded_generators([image_seed(0, 0, j) for j in range(2)], "cpu"),
        steps=2, guidance=model.default_guidance, images=image,
    ).images  # fmt: skip
    strip = load_image(tmp_path / "v_frames.png")
    expected = make_grid(videos.flatten(0, 1), nrow=9, padding=1)
    assert strip.shape == expected.shape and (strip - expected).abs().max() <= 0.5 / 255 + 1e-6
    gif = Image.open(out)
    assert gif.n_frames == 9 and gif.size == (2 * 33 + 1, 33 + 1)  # make_grid: 1 px padding around each


def test_sample_command_errors_name_the_flag(capsys):
    from flowalign.cli import main

    first = "assets/video/tiny/red_circle.png"
    cases = [
        (["--model", "tiny-wan"], "--image: this image-to-video model needs a first frame"),
        (["--model", "tiny-wan", "--image", first, "--frames", "6"], "--frames: num_frames: Wan video models make 4k + 1"),
        (["--model", "tiny-wan", "--image", first, "--out", "x.png"], "a video model writes an animated GIF"),
        (["--model", "tiny-wan", "--image", first, "--height", "64"], "--height/--width: a video has its first frame's"),
        (["--model", "tiny-sd3", "--image", first], "--image: the sd3 model is text-to-image"),
        (["--model", "tiny-wan-t2v", "--image", first], "--image: the wan model is text-to-video and takes no first"),
        (["--model", "tiny-wan-t2v", "--frames", "4"], "--frames: num_frames: Wan video models make 4k + 1"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main(["sample", "--prompt", "a", "--steps", "1", *extra]) == 2
        assert message in capsys.readouterr().err


def test_a_first_frame_shared_by_several_samples_is_encoded_once_with_the_same_result():
    model = load_model("tiny-wan")
    images, _ = _first_frames(2)
    calls = []
    encode = model.pipeline.vae.encode
    model.pipeline.vae.encode = lambda x: calls.append(len(x)) or encode(x)
    grouped = model.encode(["a", "a", "b", "b"], images=images.repeat_interleave(2, 0))
    alone = model.encode(["a", "b"], images=images)
    assert calls == [2, 2]  # the two distinct frames, once per encode call
    for key in ("condition", "image_embeds"):
        assert torch.equal(grouped.embeds[key], alone.embeds[key].repeat_interleave(2, 0))


def _stock_t2v(pipeline, prompt, seed, guidance, output_type):
    return pipeline(
        prompt=prompt, negative_prompt="blurry" if guidance > 1 else None, height=32, width=32, num_frames=5,
        num_inference_steps=3, guidance_scale=guidance, output_type=output_type,
        generator=torch.Generator().manual_seed(seed),
    ).frames  # fmt: skip


@pytest.mark.parametrize("variant", ["wan-t2v", "wan22-t2v"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_text_to_video_reproduces_the_stock_pipeline(variant, guidance):
    """Wan text-to-video (``WanPipeline``; Wan 2.2's two experts switch at 875 on the grid [1000, 751, 8.9]):
    the same latents and frames as the stock pipeline, with no first frame."""
    model = load_model(f"tiny-{variant}")
    assert model.is_video and not model.takes_images
    out = generate(
        model, PROMPTS, seeded_generators([0, 1], "cpu"), steps=3, guidance=guidance, resolution=(32, 32),
        negative_prompts="blurry" if guidance > 1 else None,
    )  # fmt: skip
    assert out.final.shape == (2, 16, 2, 4, 4) and out.images.shape == (2, 5, 3, 32, 32)
    stock = tiny_pipeline(variant)
    for i in range(2):
        assert (out.final[i] - _stock_t2v(stock, PROMPTS[i], i, guidance, "latent")[0]).abs().max() <= 1e-4
        assert (out.images[i] - _stock_t2v(stock, PROMPTS[i], i, guidance, "pt")[0]).abs().max() <= 1e-4


def test_a_text_to_video_lora_of_both_experts_loads_in_the_stock_pipeline(tmp_path):
    model = load_model("tiny-wan22-t2v", expert="both")
    model.add_lora(rank=4)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    tuned = generate(
        model, PROMPTS[:1], seeded_generators([0], "cpu"), steps=3, guidance=1.0, resolution=(32, 32)
    )
    model.save_lora(tmp_path)
    stock = tiny_pipeline("wan22-t2v")
    stock.load_lora_weights(str(tmp_path))
    stock.load_lora_weights(str(tmp_path / "transformer_2"), load_into_transformer_2=True)
    assert (_stock_t2v(stock, PROMPTS[0], 0, 1.0, "latent") - tuned.final).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="this wan model is text-to-video and takes no conditioning image"):
        model.encode(PROMPTS[:1], images=_first_frames(1)[0])


def test_flowalign_sample_writes_text_to_video(tmp_path):
    from torchvision.utils import make_grid

    from flowalign.cli import main
    from flowalign.data.prompts import load_image
    from flowalign.eval.geneval import image_seed

    out = tmp_path / "v.gif"
    assert main(["sample", "--model", "tiny-wan-t2v", "--prompt", "a red ball", "--height", "32", "--width", "32",
                 "--steps", "2", "--frames", "5", "--num-images", "1", "--out", str(out)]) == 0  # fmt: skip
    model = load_model("tiny-wan-t2v")
    videos = generate(
        model, ["a red ball"], seeded_generators([image_seed(0, 0, 0)], "cpu"), steps=2,
        guidance=model.default_guidance, resolution=(32, 32),
    ).images  # fmt: skip
    strip = load_image(tmp_path / "v_frames.png")
    expected = make_grid(videos.flatten(0, 1), nrow=5, padding=1)
    assert strip.shape == expected.shape and (strip - expected).abs().max() <= 0.5 / 255 + 1e-6
    assert Image.open(out).n_frames == 5


def test_a_mixed_batch_is_reassembled_in_the_inputs_dtype():
    """route_experts: samples on either side of the boundary go to their expert and come back in order, in
    the inputs' dtype even when one expert answers in another (float32 under autocast, say)."""
    from flowalign.models.wan import route_experts

    inputs = torch.arange(4, dtype=torch.float32).view(4, 1)
    timestep = torch.tensor([950.0, 100.0, 990.0, 10.0])

    def call(name, x, t, kwargs):
        return (x * (10 if name == "transformer" else -1)).to(
            torch.float64 if name == "transformer" else torch.float32
        )

    out = route_experts(call, inputs, timestep, 900.0, {})
    assert out.dtype == torch.float32 and out.flatten().tolist() == [0.0, -1.0, 20.0, -3.0]


def test_the_video_benchmark_refuses_a_text_to_video_model(capsys):
    from flowalign.cli import main

    assert main(["bench", "video", "--model", "tiny-wan-t2v", "--out", "unused"]) == 2
    assert "the video benchmark needs an image-to-video model" in capsys.readouterr().err
