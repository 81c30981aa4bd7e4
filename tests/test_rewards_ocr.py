"""The ocr reward with the real offline RapidOCR models on PIL-rendered strings (needs flowalign[ocr])."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rewards import RewardInputError, load_reward
from rewards.ocr import edit_distance, ocr_reward_value, target_text


def render(text: str, size: tuple[int, int] = (320, 96)) -> torch.Tensor:
    """Black text on white, PIL's bundled font at 40 px."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, 24), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_edit_distance_and_flow_grpo_normalization():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert ocr_reward_value("Hello World", "hello world") == 1.0  # case and spaces ignored
    assert ocr_reward_value("xx HELLO yy", "hello") == 1.0  # target inside the reading: distance 0
    assert ocr_reward_value("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_reward_value("completely unrelated text", "abc") == 0.0  # distance clamped at len(target)
    assert ocr_reward_value("", "abcd") == 0.0
    assert target_text('A sign that says "Open 24 Hours" in neon') == "Open 24 Hours"
    assert target_text("no quotes", {"text": "HELLO"}) == "HELLO"
    with pytest.raises(RewardInputError, match="double quotes"):
        target_text("a sign with no quoted text")
    with pytest.raises(RewardInputError, match="empty"):
        target_text('a sign that says ""')


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr_onnxruntime")
    return load_reward("ocr")


def test_right_text_scores_high_and_wrong_text_low(ocr):
    images = torch.stack(
        [render("Hello World"), render("FLOW 2025"), render("Quiet Zebra"), torch.ones(3, 96, 320)]
    )
    prompts = [
        'a sign that says "Hello World"',
        'a poster reading "flow 2025"',
        'a sign that says "Hello World"',
        'a sign "abc"',
    ]
    out = ocr(images, prompts)
    assert out.scores[0] >= 0.9 and out.scores[1] >= 0.9
    assert out.scores[2] <= 0.5
    assert out.scores[3] == 0.0 and out.details["recognized"][3] == ""  # nothing to read
    assert out.details["target"][1] == "flow 2025"


def test_ocr_is_deterministic_batched_and_not_differentiable(ocr):
    images = torch.stack([render("Hello World"), render("Hello Word")]).requires_grad_(True)
    prompts = ['"Hello World"'] * 2
    first = ocr(images, prompts)
    chunked = load_reward("ocr", max_batch_size=1)(images, prompts)
    torch.testing.assert_close(first.scores, chunked.scores)
    assert not first.scores.requires_grad and not ocr.differentiable
    video = torch.stack([images.detach(), images.detach().flip(0)])  # [2, 2, 3, H, W]
    per_video = ocr(video, prompts)
    torch.testing.assert_close(per_video.scores, first.scores.mean().expand(2), atol=1e-6, rtol=0)
