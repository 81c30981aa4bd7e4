"""The identity reward with the real offline dlib face models on scikit-image's astronaut photo (needs
flowalign[face] and scikit-image), and the differentiable torch-embedder backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewards import RewardInputError, RewardWeightsError, load_reward

skimage_data = pytest.importorskip("skimage.data")


def _tensor(array) -> torch.Tensor:
    image = torch.from_numpy(array.copy()).float() / 255
    return image.permute(2, 0, 1) if image.ndim == 3 else image.expand(3, *image.shape)


def _resize(image: torch.Tensor, size: int = 256) -> torch.Tensor:
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0].clamp(0, 1)


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    return _tensor(skimage_data.astronaut())  # [3, 512, 512], Eileen Collins' face near (175..266, 76..167)


@pytest.fixture(scope="module")
def dlib_reward(astronaut):
    pytest.importorskip("dlib")
    pytest.importorskip("face_recognition_models")
    return load_reward("identity", reference=astronaut[None])


def test_same_face_transformed_scores_far_above_faceless_images(dlib_reward, astronaut):
    crop = _resize(astronaut[:, 20:300, 90:370])  # the face, cropped and rescaled
    shifted = _resize(torch.roll(astronaut, shifts=(25, -30), dims=(1, 2)))
    smaller = _resize(F.pad(_resize(astronaut, 384), (64, 64, 64, 64)))  # shrunk inside a black frame
    coffee = _resize(_tensor(skimage_data.coffee()))
    rocket = _resize(_tensor(skimage_data.rocket()))
    images = torch.stack([crop, shifted, smaller, coffee, rocket])
    out = dlib_reward(images, [""] * 5)
    assert (out.scores[:3] > 0.95).all(), out.scores
    assert out.details["no_face"] == [False, False, False, True, True]
    # a face-less image gets the documented no_face_score (-1) and a flag, and NaN similarities
    assert out.scores[3:].tolist() == [-1.0, -1.0]
    assert torch.isnan(out.details["max_similarity"][3:]).all()
    torch.testing.assert_close(out.details["max_similarity"][:3], out.scores[:3])


def test_pool_max_and_mean_and_per_sample_reference(dlib_reward, astronaut, tmp_path):
    from PIL import Image

    flipped = astronaut.flip(-1)
    pool = torch.stack([astronaut, flipped])
    reward = load_reward("identity", reference=pool, pool_reduce="mean")
    out = reward(astronaut[None], [""])
    assert out.details["max_similarity"][0] >= out.details["mean_similarity"][0]
    torch.testing.assert_close(out.scores, out.details["mean_similarity"])
    # reference from files in metadata overrides the default pool
    path = tmp_path / "ref.png"
    Image.fromarray((astronaut.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    by_meta = load_reward("identity")(astronaut[None], [""], [{"reference": str(path)}])
    assert by_meta.scores[0] > 0.99
    with pytest.raises(RewardInputError, match="no reference face"):
        load_reward("identity")(astronaut[None], [""])
    with pytest.raises(RewardInputError, match="no face found in reference"):
        load_reward("identity", reference=_tensor(skimage_data.coffee())[None])


def test_video_averages_over_frames_with_a_face(dlib_reward, astronaut):
    face = _resize(astronaut)
    empty = _resize(_tensor(skimage_data.coffee()))
    video = torch.stack([torch.stack([face, empty, face]), torch.stack([empty, empty, empty])])
    out = dlib_reward(video, ["", ""])
    assert out.details["face_frames"] == [[True, False, True], [False, False, False]]
    assert out.details["no_face"] == [False, True]
    single = dlib_reward(face[None], [""]).scores[0]
    assert out.scores[0] == pytest.approx(float(single), abs=1e-6)  # empty frame not averaged in
    assert out.scores[1] == -1.0


class TinyEmbedder(nn.Module):
    """A fixed random conv embedder standing in for an ArcFace network."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, kernel_size=8, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def test_torch_embedder_is_differentiable_from_state_dict_and_torchscript(tmp_path):
    torch.manual_seed(0)
    module = TinyEmbedder()
    weights = tmp_path / "embedder.pt"
    torch.save(module.state_dict(), weights)
    scripted = tmp_path / "embedder.torchscript"
    torch.jit.script(module).save(str(scripted))
    g = torch.Generator().manual_seed(0)
    faces = torch.rand(3, 3, 64, 64, generator=g)
    reference = faces[:1]
    by_class = load_reward(
        "identity",
        reference=reference,
        backend="torch",
        detector="none",
        embedder_path=weights,
        embedder_class=f"{__name__}:TinyEmbedder",
        input_size=32,
    )
    assert by_class.differentiable
    images = faces.clone().requires_grad_(True)
    out = by_class(images, [""] * 3)
    assert out.scores[0].item() == pytest.approx(1.0, abs=1e-5)  # the reference itself
    out.scores.sum().backward()
    assert images.grad[1:].abs().sum() > 0
    by_script = load_reward(
        "identity",
        reference=reference,
        backend="torch",
        detector="none",
        embedder_path=scripted,
        input_size=32,
    )
    torch.testing.assert_close(by_script(faces, [""] * 3).scores, out.scores.detach(), atol=1e-5, rtol=0)
    by_module = load_reward(
        "identity", reference=reference, backend="torch", detector="none", embedder=module, input_size=32
    )
    torch.testing.assert_close(by_module(faces, [""] * 3).scores, out.scores.detach(), atol=1e-5, rtol=0)
    with pytest.raises(RewardWeightsError, match="not a TorchScript archive"):
        load_reward("identity", reference=reference, backend="torch", detector="none", embedder_path=weights)
    with pytest.raises(RewardWeightsError, match="no embedder_path given"):
        load_reward("identity", backend="torch", detector="none")


def test_onnx_embedder(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    module = TinyEmbedder().eval()
    path = tmp_path / "embedder.onnx"
    torch.onnx.export(
        module,
        torch.rand(1, 3, 32, 32),
        str(path),
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
        dynamo=False,
    )
    faces = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    onnx = load_reward(
        "identity", reference=faces[:1], backend="onnx", detector="none", embedder_path=path, input_size=32
    )
    torch_ = load_reward(
        "identity", reference=faces[:1], backend="torch", detector="none", embedder=module, input_size=32
    )
    torch.testing.assert_close(
        onnx(faces, ["", ""]).scores, torch_(faces, ["", ""]).scores, atol=1e-4, rtol=0
    )


def test_identity_argument_errors():
    with pytest.raises(ValueError, match="backend"):
        load_reward("identity", backend="magic")
    with pytest.raises(ValueError, match="pool_reduce"):
        load_reward(
            "identity", backend="torch", detector="none", embedder=TinyEmbedder(), pool_reduce="median"
        )
