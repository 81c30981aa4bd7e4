"""The video rewards on hand-built videos: exact values, gradients, and images refused."""

from __future__ import annotations

import pytest
import torch

from rewards.base import RewardInputError
from rewards.registry import load_reward
from rewards.video import subject_consistency
from rewards.weights import RewardWeightsError


def _video(frames=4, size=16):
    return torch.zeros(2, frames, 3, size, size)


def test_motion_is_the_mean_absolute_frame_difference():
    video = _video()
    video[1, 1:, 0, :4, :4] = 1.0  # sample 1: a 4x4 red square appears in frame 1 and stays
    out = load_reward("motion")(video, ["a", "b"])
    expected = (4 * 4 / (3 * 16 * 16)) / 3  # one of the 3 consecutive differences has 16 changed values
    torch.testing.assert_close(out.scores, torch.tensor([0.0, expected]))
    near = load_reward("motion", target=expected)(video, ["a", "b"])
    torch.testing.assert_close(near.scores, torch.tensor([-expected, 0.0]))
    moving = video.clone().requires_grad_()
    load_reward("motion")(moving, ["a", "b"]).scores.sum().backward()
    assert moving.grad.abs().sum() > 0


def test_subject_consistency_is_vbench_formula_on_hand_built_features():
    # frames' features e0, e1, e0: t=1: prev 0, first 0 -> 0; t=2: prev 0, first 1 -> 0.5; mean 0.25.
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    torch.testing.assert_close(subject_consistency(features), torch.tensor([0.25, 1.0]))
    anti = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # a negative cosine counts as 0, as VBench clamps it
    torch.testing.assert_close(subject_consistency(anti), torch.tensor([0.0]))


def test_temporal_consistency_scores_a_still_video_one_and_a_changing_one_lower():
    reward = load_reward("temporal_consistency")
    video = _video(size=32)
    video[:, :, 2, 8:20, 8:20] = 1.0  # a blue square in every frame
    video[1, 2:, :, 8:20, 8:20] = torch.tensor([1.0, 1.0, 0.0]).view(
        3, 1, 1
    )  # sample 1: turns yellow at frame 2
    scores = reward(video, ["a", "b"]).scores
    torch.testing.assert_close(scores[0], torch.tensor(1.0))
    assert scores[1] < 0.99
    moving = video.clone().requires_grad_()
    reward(moving, ["a", "b"]).scores[1].backward()
    assert moving.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["motion", "temporal_consistency"])
def test_video_rewards_refuse_images(name):
    with pytest.raises(
        RewardInputError, match=rf"{name}: scores videos \[B, T, 3, H, W\] with T >= 2 frames"
    ):
        load_reward(name)(torch.zeros(2, 3, 16, 16), ["a", "b"])


def test_bad_options_are_one_line():
    with pytest.raises(ValueError, match="target is a mean frame difference in"):
        load_reward("motion", target=2.0)
    with pytest.raises(ValueError, match="features must be 'random_conv' or 'clip'"):
        load_reward("temporal_consistency", features="dino")
    with pytest.raises(RewardWeightsError, match="no clip_path given"):
        load_reward("temporal_consistency", features="clip")
