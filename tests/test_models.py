"""Model adapters on tiny random diffusers components: faithfulness to the stock pipelines, LoRA, errors."""

from __future__ import annotations

import pytest
import torch

from flowalign.models import ModelLoadError, load_model
from flowalign.models.flux import pack_latents, unpack_latents
from flowalign.models.tiny import tiny_pipeline
from flowalign.samplers import SamplingPlan, rollout

FAMILIES = ["sd3", "flux", "sd", "sdxl"]
PROMPTS = ["a red circle", "two blue squares"]


def _plan(model, steps, **kwargs):
    return SamplingPlan.build(steps, dynamics="ddim" if model.kind == "diffusion" else "flow_grpo", **kwargs)


def _sample(model, latents, steps=4, guidance=3.0, plan=None, generator=None):
    cond = model.encode(PROMPTS)
    schedule = model.schedule(steps, latents.shape[1:])
    return rollout(
        model,
        cond,
        latents,
        schedule,
        plan or SamplingPlan.ode(steps),
        guidance=guidance,
        generator=generator,
    )


def _stock_images(pipeline, family, latents, steps=4, guidance=3.0):
    kwargs = dict(
        prompt=PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="pt",
        height=32,
        width=32,
    )
    if family == "flux":
        kwargs["latents"] = pack_latents(latents)
    else:
        kwargs["latents"] = latents
    if family in ("sd", "sdxl"):
        kwargs["eta"] = 0.0
    return pipeline(**kwargs).images


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, load_model(f"tiny-{request.param}")


def test_rollout_reproduces_stock_pipeline(family_model):
    family, model = family_model
    latents = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(0))
    ours = _sample(model, latents).images
    stock = _stock_images(tiny_pipeline(family), family, latents)
    assert ours.shape == stock.shape == (2, 3, 32, 32)
    assert (ours - stock).abs().max() <= 1e-4


def test_rollout_shapes_and_determinism(family_model):
    family, model = family_model
    latents = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(1))
    plan = _plan(model, 4, sde="all")
    a = _sample(model, latents, plan=plan, generator=torch.Generator().manual_seed(2))
    b = _sample(model, latents, plan=plan, generator=torch.Generator().manual_seed(2))
    c = _sample(model, latents, plan=plan, generator=torch.Generator().manual_seed(3))
    assert a.latents.shape == (2, 5, *latents.shape[1:])
    assert (
        a.log_probs.shape == (2, 4) and a.means.shape == (2, 4, *latents.shape[1:]) and a.stds.shape == (2, 4)
    )
    assert a.images.shape == (2, 3, 32, 32) and a.images.min() >= 0 and a.images.max() <= 1
    assert torch.equal(a.images, b.images) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents[:, -1], c.latents[:, -1])


def test_encode_cache_is_exact_and_batched(family_model):
    _, model = family_model
    model._cache.clear()
    fresh = model.encode(PROMPTS)
    cached = model.encode(list(reversed(PROMPTS)))
    for key, value in fresh.embeds.items():
        assert torch.equal(cached.embeds[key], value.flip(0))
    uncached = model.__class__(model.pipeline, cache_size=0).encode(PROMPTS)
    for key, value in fresh.embeds.items():
        assert torch.equal(uncached.embeds[key], value)


def test_lora_saved_by_flowalign_loads_in_stock_pipeline(family_model, tmp_path):
    family, _ = family_model
    model = load_model(f"tiny-{family}")
    model.add_lora(rank=4)
    trainable = model.trainable_parameters()
    assert trainable and all("lora_" in n for n, p in model.denoiser.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in model.denoiser.parameters()) / 2
    latents = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(4))
    base = _sample(model, latents).images
    with torch.no_grad():  # stand-in for training: give the LoRA B matrices non-zero weights
        gen = torch.Generator().manual_seed(5)
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    tuned = _sample(model, latents).images
    assert (tuned - base).abs().max() > 1e-3
    with model.reference():
        torch.testing.assert_close(_sample(model, latents).images, base, rtol=0, atol=1e-6)
    model.save_lora(tmp_path)
    stock = tiny_pipeline(family)
    stock.load_lora_weights(str(tmp_path))
    assert (_stock_images(stock, family, latents) - tuned).abs().max() <= 1e-4


def test_full_finetuning_and_gradient_checkpointing(family_model):
    family, _ = family_model
    model = load_model(f"tiny-{family}")
    model.set_full_finetuning()
    assert len(model.trainable_parameters()) == len(list(model.denoiser.parameters()))
    latents = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(6))
    plan = _plan(model, 3, sde="none", grad="last_k", k=2)

    def grads():
        model.denoiser.zero_grad()
        _sample(model, latents, steps=3, plan=plan).images.mean().backward()
        return [p.grad.clone() for p in model.trainable_parameters() if p.grad is not None]

    plain = grads()
    model.set_gradient_checkpointing(True)
    checkpointed = grads()
    model.set_gradient_checkpointing(False)
    assert plain and len(plain) == len(checkpointed)
    assert max((a - b).abs().max().item() for a, b in zip(plain, checkpointed)) <= 1e-6


def test_decode_is_differentiable_and_encode_images_roundtrips_shapes(family_model):
    _, model = family_model
    latents = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(7)).requires_grad_()
    images = model.decode(latents)
    images.sum().backward()
    assert latents.grad.abs().sum() > 0
    encoded = model.encode_images(images.detach())
    assert encoded.shape == latents.shape


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 4, 8, 6)
    assert torch.equal(unpack_latents(pack_latents(x), 8, 6), x)


def test_bad_input_errors(tmp_path):
    model = load_model("tiny-sd3")
    cond = model.encode(PROMPTS)
    t = torch.full((3,), 500.0)
    with pytest.raises(ValueError, match="cond holds 2 prompts but x_t has 3 samples"):
        model.predict(torch.zeros(3, 4, 16, 16), t, cond)
    with pytest.raises(TypeError, match="float64"):
        model.predict(torch.zeros(2, 4, 16, 16, dtype=torch.float64), t[:2], cond)
    with pytest.raises(TypeError, match="floating-point"):
        model.predict(torch.zeros(2, 4, 16, 16, dtype=torch.long), t[:2], cond)
    with pytest.raises(ValueError, match="meta but the model is on cpu"):
        model.predict(torch.zeros(2, 4, 16, 16, device="meta"), t[:2], cond)
    with pytest.raises(ValueError, match="encode the prompts with cfg=True"):
        model.predict(torch.zeros(2, 4, 16, 16), t[:2], model.encode(PROMPTS, cfg=False), guidance=4.0)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.initial_noise(1, 30, 32)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="unknown model family 'sd4'"):
        load_model("tiny-sd3", family="sd4")
    with pytest.raises(ModelLoadError, match="unknown tiny model"):
        load_model("tiny-sd9")
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="CUDA devices only|pip install"):
        model.set_attention_backend("xformers")
    with pytest.raises(ValueError, match="'sdpa' or 'xformers'"):
        model.set_attention_backend("flash9")
    with pytest.raises(ValueError, match="has no LoRA adapter"):
        model.save_lora(tmp_path / "lora")
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        with model.reference():
            pass


def test_load_from_saved_directory(tmp_path):
    tiny_pipeline("sd").save_pretrained(tmp_path / "sd")
    model = load_model(tmp_path / "sd")
    assert model.family == "sd" and model.prediction_type == "epsilon"
    latents = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(8))
    reference = load_model("tiny-sd")
    torch.testing.assert_close(_sample(model, latents).images, _sample(reference, latents).images)


def _modified(family, scheduler=None, vae=None):
    """A tiny pipeline whose scheduler / VAE config carry extra options."""
    pipeline = tiny_pipeline(family)
    if scheduler:
        config = {k: v for k, v in pipeline.scheduler.config.items() if not k.startswith("_")}
        pipeline.scheduler = type(pipeline.scheduler).from_config({**config, **scheduler})
    if vae:
        pipeline.vae.register_to_config(**vae)
    return pipeline


@pytest.mark.parametrize(
    "family,scheduler,vae",
    [
        ("sd3", {"shift_terminal": 0.1}, None),
        ("flux", {"shift_terminal": 0.2}, None),
        ("sd", {"clip_sample": True, "clip_sample_range": 0.5}, None),
        ("sdxl", None, {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [0.5, 1.5, 0.8, 1.2]}),
    ],
    ids=["sd3-shift_terminal", "flux-shift_terminal", "sd-clip_sample", "sdxl-latents_mean_std"],
)
def test_scheduler_and_vae_options_are_implemented_as_the_stock_pipeline_does(family, scheduler, vae):
    from flowalign.models import ADAPTERS

    model = ADAPTERS[family](_modified(family, scheduler, vae))
    latents = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(11))
    stock = _stock_images(_modified(family, scheduler, vae), family, latents)
    plain = _sample(load_model(f"tiny-{family}"), latents).images
    assert (_sample(model, latents).images - stock).abs().max() <= 1e-4
    assert (plain - stock).abs().max() > 1e-3  # the option matters: ignoring it would fail the line above
    if vae:  # encode_images as diffusers' SDXL training scripts: (z - mean) * scaling_factor / std
        images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        scaling = model.pipeline.vae.config.scaling_factor
        z = ADAPTERS[family](_modified(family)).encode_images(images) / scaling
        mean, std = (torch.tensor(vae[k]).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
        torch.testing.assert_close(model.encode_images(images), (z - mean) * scaling / std)


def test_options_flowalign_does_not_implement_are_errors(tmp_path):
    from flowalign.models import ADAPTERS

    with pytest.raises(ModelLoadError, match=r"VAE config sets shift_factor=0\.1"):
        ADAPTERS["sd"](_modified("sd", vae={"shift_factor": 0.1}))
    model = ADAPTERS["flux"](_modified("flux", scheduler={"use_karras_sigmas": True}))
    with pytest.raises(ModelLoadError, match="use_karras_sigmas=True"):
        model.schedule(4, model.latent_shape(32, 32))
    with pytest.raises(ValueError, match="takes no negative prompts"):
        load_model("tiny-flux").encode(PROMPTS, negative_prompts="blurry")
    tiny_pipeline("sd3").save_pretrained(tmp_path / "sd3")
    assert load_model(tmp_path / "sd3", max_sequence_length=77).max_sequence_length == 77


def test_models_import_nothing_from_rewards():
    """The dependency rule (design section 2): model adapters import nothing from `rewards`; the shapes
    model's words equal the sprites' vocabulary, in order (the shipped tokenizer's ids depend on it)."""
    import ast
    from pathlib import Path

    from flowalign.models.shapes import COLOR_WORDS, SHAPE_WORDS
    from rewards.shapes.sprites import COLORS, SHAPES

    for path in (Path(__file__).resolve().parents[1] / "flowalign" / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                )
                assert not any(n == "rewards" or n.startswith("rewards.") for n in names), (path.name, names)
    assert SHAPE_WORDS == SHAPES and COLOR_WORDS == tuple(COLORS)


def test_a_lora_of_another_model_or_a_corrupt_file_is_an_error_naming_the_file(tmp_path):
    sd3 = load_model("tiny-sd3")
    sd3.add_lora(rank=4)
    sd3.save_lora(tmp_path / "sd3_lora")
    with pytest.raises(
        ModelLoadError, match=r"sd3_lora.*(does not fit this sd model|of its \d+ LoRA tensors apply)"
    ):
        load_model("tiny-sd").load_lora(tmp_path / "sd3_lora")
    fresh = load_model("tiny-sd3")
    fresh.load_lora(tmp_path / "sd3_lora")  # the right model: loads
    assert fresh.has_lora
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"broken/pytorch_lora_weights\.safetensors' cannot be read"):
        load_model("tiny-sd3").load_lora(broken)


def test_a_broken_model_index_is_one_error_naming_the_file(tmp_path):
    for text, message in [("{not json", "is not valid JSON"), ('{"other": 1}', "has no '_class_name'"),
                          ('{"_class_name": 3}', "must be a pipeline class name")]:  # fmt: skip
        (tmp_path / "model_index.json").write_text(text)
        with pytest.raises(ModelLoadError, match=rf"model_index\.json.*{message}"):
            load_model(tmp_path)
