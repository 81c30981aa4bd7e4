"""CLIP-family rewards (clip, pickscore, aesthetic, hpsv2) on tiny random CLIP models saved to tmp dirs.

The transformers backend needs no extra; the open_clip ones skip without ``flowalign[clip]``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_clip import IMAGE_SIZE, PROJECTION_DIM, save_tiny_open_clip, save_tiny_transformers_clip

from rewards import RewardWeightsError, load_reward
from rewards.aesthetic import AestheticMLP
from rewards.clip_models import ImagePreprocess, load_clip


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return save_tiny_transformers_clip(tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    pytest.importorskip("open_clip")
    return save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


def _quantized(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random images on the uint8 grid (k / 255), so a PIL round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=g).float() / 255


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


PROMPTS = ["a red cat", "a blue dog", "two green birds"]


def test_tensor_preprocessing_matches_the_clip_image_processor(hf_clip):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(hf_clip)
    towers = load_clip(hf_clip)
    for height, width, atol in [
        (IMAGE_SIZE, IMAGE_SIZE, 1e-6),
        (IMAGE_SIZE, 40, 1e-6),
        (64, 64, 0.03),
        (100, 80, 0.03),
    ]:
        images = _quantized(2, height, width)
        reference = processor(images=[_pil(x) for x in images], return_tensors="pt")["pixel_values"]
        # exact at the model's size (no resize); within ~1/255 of a pixel after a resize (PIL vs torch bicubic)
        torch.testing.assert_close(towers.preprocess(images), reference, atol=atol, rtol=0)


def test_clip_reward_equals_the_reference_computation(hf_clip):
    from transformers import CLIPModel, CLIPProcessor

    images = _quantized(3, IMAGE_SIZE, IMAGE_SIZE)
    out = load_reward("clip", clip_path=hf_clip)(images, PROMPTS)
    model = CLIPModel.from_pretrained(hf_clip).eval()
    processor = CLIPProcessor.from_pretrained(hf_clip)
    inputs = processor(text=PROMPTS, images=[_pil(x) for x in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_features = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    expected = (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=0)
    scaled = load_reward("clip", clip_path=hf_clip, scale="logit_scale", divisor=2.0)(images, PROMPTS)
    torch.testing.assert_close(
        scaled.scores, model.logit_scale.exp().item() * expected / 2, atol=1e-4, rtol=0
    )


def test_clip_reward_is_differentiable_deterministic_and_batch_invariant(hf_clip):
    images = _quantized(3, 40, 36).requires_grad_(True)
    reward = load_reward("clip", clip_path=hf_clip, max_batch_size=2)
    out = reward(images, PROMPTS)
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    out.scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    again = load_reward("clip", clip_path=hf_clip)(images.detach(), PROMPTS)
    torch.testing.assert_close(again.scores, out.scores.detach(), atol=1e-6, rtol=0)
    # text matters: swapping prompts changes the scores
    swapped = reward(images.detach(), PROMPTS[::-1]).scores
    assert not torch.allclose(swapped, out.scores.detach())


def test_clip_reward_in_bfloat16_keeps_float32_scores_and_gradients(hf_clip):
    images = _quantized(2, IMAGE_SIZE, IMAGE_SIZE).requires_grad_(True)
    reward = load_reward("clip", clip_path=hf_clip, dtype="bfloat16")
    assert next(reward.towers.model.parameters()).dtype == torch.bfloat16
    out = reward(images, PROMPTS[:2])
    assert out.scores.dtype == torch.float32
    reference = load_reward("clip", clip_path=hf_clip)(images.detach(), PROMPTS[:2]).scores
    torch.testing.assert_close(out.scores.detach(), reference, atol=0.02, rtol=0)
    out.scores.sum().backward()
    assert images.grad.dtype == torch.float32 and images.grad.abs().sum() > 0


def test_clip_reward_scores_video_as_the_mean_over_frames(hf_clip):
    reward = load_reward("clip", clip_path=hf_clip)
    video = _quantized(2 * 3, IMAGE_SIZE, IMAGE_SIZE).view(2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = reward(video, PROMPTS[:2])
    per_frame = reward(video.flatten(0, 1), [p for p in PROMPTS[:2] for _ in range(3)]).scores.view(2, 3)
    torch.testing.assert_close(out.scores, per_frame.mean(dim=1), atol=1e-6, rtol=0)


def test_pickscore_is_logit_scale_times_cosine(hf_clip):
    images = _quantized(2, IMAGE_SIZE, IMAGE_SIZE)
    cosine = load_reward("clip", clip_path=hf_clip)(images, PROMPTS[:2]).scores
    pick = load_reward("pickscore", model_path=hf_clip, processor_path=hf_clip)
    scale = pick.towers.logit_scale()
    torch.testing.assert_close(pick(images, PROMPTS[:2]).scores, scale * cosine, atol=1e-4, rtol=0)
    flow_grpo = load_reward("pickscore", model_path=hf_clip, divisor=26)(images, PROMPTS[:2]).scores
    torch.testing.assert_close(flow_grpo, scale * cosine / 26, atol=1e-5, rtol=0)


def _constant_head(embed_dim: int) -> dict[str, torch.Tensor]:
    """Constant weights: layer k has weight w_k * ones and bias b_k (sizes of the LAION head)."""
    sizes = [(1024, embed_dim), (128, 1024), (64, 128), (16, 64), (1, 16)]
    values = [(0.5, 0.25), (2**-10, -0.5), (2**-6, 0.5), (-(2**-3), 0.25), (0.25, 1.0)]  # exact in float32
    state = {}
    for index, ((rows, cols), (w, b)) in zip((0, 2, 4, 6, 7), zip(sizes, values)):
        state[f"layers.{index}.weight"] = torch.full((rows, cols), w)
        state[f"layers.{index}.bias"] = torch.full((rows,), b)
    return state


def _hand_computed_head(e_sum: float) -> float:
    """The constant head above applied to an embedding whose entries sum to ``e_sum`` (no activations)."""
    h0 = 0.5 * e_sum + 0.25  # every one of the 1024 units
    h1 = 1024 * 2**-10 * h0 - 0.5
    h2 = 128 * 2**-6 * h1 + 0.5
    h3 = 64 * -(2**-3) * h2 + 0.25
    return 16 * 0.25 * h3 + 1.0


def test_aesthetic_mlp_matches_hand_computation(tmp_path):
    head = tmp_path / "head.pth"
    torch.save(_constant_head(768), head)
    mlp = AestheticMLP(768)
    mlp.load_state_dict(torch.load(head, weights_only=True))
    mlp.eval()
    embedding = torch.zeros(1, 768)
    embedding[0, 3] = 1.0  # unit vector: entries sum to 1
    # h0 = 0.75 (x1024); h1 = 0.25 (x128); h2 = 1.0 (x64); h3 = -7.75 (x16); out = 16 * 0.25 * -7.75 + 1 = -30
    assert _hand_computed_head(1.0) == -30.0
    assert mlp(embedding).item() == -30.0
    assert list(dict(mlp.named_children())["layers"]._modules) == ["0", "1", "2", "3", "4", "5", "6", "7"]


def test_aesthetic_reward_end_to_end_with_a_hand_computed_head(tmp_path, hf_clip):
    from safetensors.torch import save_file

    head = tmp_path / "head.safetensors"
    save_file(_constant_head(PROJECTION_DIM), str(head))
    reward = load_reward("aesthetic", head_path=head, clip_path=hf_clip)
    images = _quantized(2, IMAGE_SIZE, IMAGE_SIZE).requires_grad_(True)
    out = reward(images, ["", ""])
    embedding = F.normalize(reward.towers.encode_images(images.detach()), dim=-1)
    expected = torch.tensor([_hand_computed_head(float(e.sum())) for e in embedding])
    torch.testing.assert_close(out.scores, expected, atol=1e-3, rtol=1e-5)
    out.scores.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(RewardWeightsError, match="layers.0.weight"):
        bad = tmp_path / "bad.safetensors"
        save_file({"weight": torch.zeros(2)}, str(bad))
        load_reward("aesthetic", head_path=bad, clip_path=hf_clip)


def test_clip_loading_errors(hf_clip, tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP backend"):
        load_reward("clip", clip_path=hf_clip, backend="jax")
    with pytest.raises(RewardWeightsError, match="not a loadable transformers CLIPModel"):
        load_reward("clip", clip_path=tmp_path)
    with pytest.raises(RewardWeightsError, match="hf download"):
        load_reward("clip", clip_path="openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match="scale"):
        load_reward("clip", clip_path=hf_clip, scale="huge")


def test_longest_side_preprocessing_pads_like_hpsv2():
    pre = ImagePreprocess(size=(8, 8), resize_mode="longest", mean=(0, 0, 0), std=(1, 1, 1))
    image = torch.ones(1, 3, 4, 8)  # wide: resized to 4 x 8 -> scale 1 -> unchanged
    assert pre(image).shape == (1, 3, 4, 8)
    image = torch.ones(1, 3, 8, 16)  # scale 0.5 -> 4 x 8, padded 2 rows top and bottom with 0
    out = pre(image)
    assert out.shape == (1, 3, 8, 8)
    assert out[0, :, :2].abs().sum() == 0 and out[0, :, 6:].abs().sum() == 0
    torch.testing.assert_close(out[0, :, 2:6], torch.ones(3, 4, 8))


def test_open_clip_backend_matches_open_clip_itself(open_clip_dir):
    import open_clip

    towers = load_clip(open_clip_dir, backend="open_clip")
    model = open_clip.create_model(f"local-dir:{open_clip_dir}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    transform = open_clip.image_transform(IMAGE_SIZE, is_train=False)
    images = _quantized(2, IMAGE_SIZE, IMAGE_SIZE)
    pixels = torch.stack([transform(_pil(x)) for x in images])
    torch.testing.assert_close(towers.preprocess(images), pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        expected_image = model.encode_image(pixels)
        expected_text = model.encode_text(tokenizer(PROMPTS[:2]))
    torch.testing.assert_close(towers.encode_images(images), expected_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(towers.encode_texts(PROMPTS[:2]), expected_text, atol=1e-5, rtol=0)


def test_open_clip_clip_reward_and_hpsv2(open_clip_dir):
    images = _quantized(2, 40, 32).requires_grad_(True)
    clip = load_reward("clip", clip_path=open_clip_dir, backend="open_clip")
    out = clip(images, PROMPTS[:2])
    out.scores.sum().backward()
    assert images.grad.abs().sum() > 0

    # HPSv2: an architecture name + checkpoint file is the usual path; here the local-dir config stands in
    # for ViT-H-14 and the tiny weights for HPS_v2_compressed.pt wrapped as {"state_dict": ...}.
    from safetensors.torch import load_file

    checkpoint = open_clip_dir / "hps.pt"
    torch.save({"state_dict": load_file(str(open_clip_dir / "open_clip_model.safetensors"))}, checkpoint)
    hps = load_reward("hpsv2", arch=open_clip_dir, checkpoint=checkpoint)
    assert hps.towers.preprocess.resize_mode == "longest"
    square = _quantized(2, IMAGE_SIZE, IMAGE_SIZE)
    # on square images resize-longest and resize-shortest agree, so HPSv2 equals the plain cosine
    torch.testing.assert_close(
        hps(square, PROMPTS[:2]).scores, clip(square, PROMPTS[:2]).scores, atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_reward("hpsv2", arch="ViT-Nope-99", checkpoint=checkpoint)
    with pytest.raises(RewardWeightsError, match="does not load into open_clip"):
        bad = open_clip_dir / "bad.pt"
        torch.save({"state_dict": {"visual.nope": torch.zeros(1)}}, bad)
        load_reward("hpsv2", arch=open_clip_dir, checkpoint=bad)


def test_named_open_clip_architecture_with_a_checkpoint(tmp_path):
    """The named-architecture path (HPSv2: ``ViT-H-14`` + checkpoint) with a small built-in architecture: a
    checkpoint that does not fit is reported with the architecture's name."""
    pytest.importorskip("open_clip")
    bad = tmp_path / "hps.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, bad)
    with pytest.raises(RewardWeightsError, match="does not load into open_clip ViT-B-32"):
        load_reward("clip", clip_path="ViT-B-32", backend="open_clip", checkpoint=bad)
