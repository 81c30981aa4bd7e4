"""The reward protocol, registry, composition, win rate, GenEval reward, artifact classifier and the
``flowalign score`` command. Needs no optional extra; every test is seeded and offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import rewards
from rewards import (
    MissingExtraError,
    Reward,
    RewardInputError,
    RewardOutput,
    RewardWeightsError,
    WeightedReward,
    available_rewards,
    load_reward,
    parse_reward_spec,
    register_reward,
)
from rewards.registry import _REGISTERED, ENTRY_POINT_GROUP

# ------------------------------------------------------------------ small rewards with known answers


class MeanPixel(Reward):
    """Differentiable: the mean pixel value (records the chunks it was called with)."""

    name = "mean-pixel"
    differentiable = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.calls: list[int] = []
        self.grad_enabled: list[bool] = []

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        self.calls.append(images.shape[0])
        self.grad_enabled.append(torch.is_grad_enabled())
        flat = images.flatten(1)
        return RewardOutput(flat.mean(dim=1), details={"first": [p[:1] for p in prompts]})


class NonDiffMeanPixel(MeanPixel):
    name = "mean-pixel-nodiff"
    differentiable = False


class FixedScores(Reward):
    """Returns metadata["score"] for each sample."""

    name = "fixed"

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return RewardOutput(torch.tensor([float(m["score"]) for m in metadata]))


def _images(batch: int = 4, size: int = 8, seed: int = 0) -> Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ protocol


def test_differentiable_reward_passes_gradients_to_images():
    images = _images().requires_grad_(True)
    reward = MeanPixel()
    out = reward(images, ["a"] * 4)
    out.scores.sum().backward()
    assert reward.grad_enabled == [True]
    torch.testing.assert_close(images.grad, torch.full_like(images, 1 / (3 * 8 * 8)))


def test_non_differentiable_reward_runs_without_grad():
    images = _images().requires_grad_(True)
    reward = NonDiffMeanPixel()
    out = reward(images, ["a"] * 4)
    assert reward.grad_enabled == [False]
    assert not out.scores.requires_grad


def test_instance_differentiable_flag_is_honoured():
    reward = MeanPixel()
    reward.differentiable = False
    reward(_images().requires_grad_(True), ["a"] * 4)
    assert reward.grad_enabled == [False]


def test_max_batch_size_chunks_and_merges_in_order():
    images = _images(batch=7)
    whole = MeanPixel()(images, [str(i) for i in range(7)])
    chunked_reward = MeanPixel(max_batch_size=3)
    chunked = chunked_reward(images, [str(i) for i in range(7)])
    assert chunked_reward.calls == [3, 3, 1]
    torch.testing.assert_close(chunked.scores, whole.scores)
    assert chunked.details["first"] == [str(i) for i in range(7)]


def test_dtype_and_device_placement():
    reward = MeanPixel(dtype="bfloat16", device="cpu")
    assert reward.dtype == torch.bfloat16 and reward.device == torch.device("cpu")
    out = reward(_images().double(), ["a"] * 4)
    assert out.scores.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        MeanPixel(dtype="float13")
    with pytest.raises(ValueError, match="max_batch_size"):
        MeanPixel(max_batch_size=0)


def test_groupwise_reward_sees_one_group_per_call():
    class GroupSize(Reward):
        name = "group-size"
        groupwise = True

        def __init__(self):
            super().__init__()
            self.groups: list[list[str]] = []

        def score_batch(self, images, prompts, metadata):
            self.groups.append(prompts)
            return RewardOutput(torch.full((len(prompts),), float(len(prompts))))

    prompts = ["a", "b", "a", "c", "a", "b"]
    reward = GroupSize()
    assert reward(_images(batch=6), prompts).scores.tolist() == [3, 2, 3, 1, 3, 2]
    assert reward.groups == [["a", "a", "a"], ["b", "b"], ["c"]]
    reward = GroupSize()
    out = reward(_images(batch=6), prompts, group_ids=torch.tensor([0, 0, 1, 1, 1, 0]))
    assert out.scores.tolist() == [3] * 6
    assert reward.groups == [["a", "b", "b"], ["a", "c", "a"]]


@pytest.mark.parametrize(
    ("images", "prompts", "match"),
    [
        (torch.rand(2, 3, 4, 4) * 2, ["a", "b"], r"\[0, 1\]"),
        (torch.rand(2, 3, 4, 4) - 1, ["a", "b"], r"\[0, 1\]"),
        (torch.full((2, 3, 4, 4), float("nan")), ["a", "b"], r"\[0, 1\]"),
        (torch.rand(3, 4, 4), ["a"], "shape"),
        (torch.rand(2, 4, 4, 4), ["a", "b"], "shape"),
        (torch.rand(2, 3, 4, 4), ["a"], "2 images but 1 prompts"),
        ((torch.rand(2, 3, 4, 4) * 255).to(torch.uint8), ["a", "b"], "float"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(images, prompts, match):
    with pytest.raises(RewardInputError, match=match):
        MeanPixel()(images, prompts)


def test_metadata_count_mismatch():
    with pytest.raises(RewardInputError, match="metadata"):
        MeanPixel()(_images(batch=2), ["a", "b"], [{}])


def test_video_input_is_accepted():
    video = torch.rand(2, 5, 3, 8, 8)
    out = load_reward("compressibility")(video, ["a", "b"])
    assert out.scores.shape == (2,)


# ------------------------------------------------------------------ registry


def test_every_builtin_is_listed_and_resolves():
    names = available_rewards()
    for name in ["aesthetic", "artifact", "clip", "compressibility", "geneval", "hpsv2", "identity",
                 "incompressibility", "ocr", "pickscore", "winrate"]:  # fmt: skip
        assert name in names
        cls = rewards.resolve_reward_class(name)
        assert issubclass(cls, Reward) and cls.name == name


def test_registry_by_name_dotted_path_and_register():
    assert isinstance(load_reward("compressibility"), Reward)
    assert isinstance(load_reward("rewards.compressibility:CompressibilityReward", allow_code=True), Reward)
    assert isinstance(load_reward("rewards.compressibility.IncompressibilityReward", allow_code=True), Reward)
    with pytest.raises(ValueError, match=r"is a code path.*train\.allow_code=true.*--allow-code"):
        load_reward("rewards.compressibility:CompressibilityReward")
    # Opting in still names only rewards: torch.hub.load (which would run a repository's hubconf.py) is
    # refused before it is called.
    with pytest.raises(ValueError, match=r"names a function, not a rewards\.Reward subclass.*was not called"):
        load_reward("torch.hub:load", allow_code=True, repo_or_dir="/nonexistent", model="x", source="local")
    try:
        register_reward("test-fixed")(FixedScores)
        assert "test-fixed" in available_rewards()
        assert isinstance(load_reward("test-fixed"), FixedScores)
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test-fixed")(FixedScores)
    finally:
        _REGISTERED.pop("test-fixed", None)


def test_unknown_reward_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*compressibility"):
        load_reward("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward("no_such_module:Reward", allow_code=True)
    with pytest.raises(ValueError, match="not a rewards.Reward subclass"):
        load_reward("collections:OrderedDict", allow_code=True)


def test_entry_point_from_an_installed_distribution(tmp_path, monkeypatch):
    """A third-party package exposes a reward through the flowalign.rewards entry-point group."""
    package = tmp_path / "thirdparty_reward"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import torch\nfrom rewards import Reward, RewardOutput\n\n"
        "class Brightness(Reward):\n    name = 'brightness'\n    differentiable = True\n\n"
        "    def score_batch(self, images, prompts, metadata):\n"
        "        return RewardOutput(images.mean(dim=(1, 2, 3)))\n"
    )
    dist = tmp_path / "thirdparty_reward-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-reward\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nbrightness = thirdparty_reward:Brightness\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "brightness" in available_rewards()
    reward = load_reward("brightness")
    images = torch.full((2, 3, 4, 4), 0.25)
    assert reward(images, ["a", "b"]).scores.tolist() == [0.25, 0.25]


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    # A None entry in sys.modules makes `import name` raise ImportError, as if it were not installed.
    for module in ("rapidocr_onnxruntime", "dlib", "face_recognition_models", "open_clip", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=r"pip install 'flowalign\[ocr\]'"):
        load_reward("ocr")
    with pytest.raises(MissingExtraError, match=r"pip install 'flowalign\[face\]'"):
        load_reward("identity")
    with pytest.raises(MissingExtraError, match=r"pip install 'flowalign\[clip\]'"):
        load_reward("hpsv2", arch="ViT-H-14", checkpoint=__file__)
    with pytest.raises(MissingExtraError, match=r"pip install 'flowalign\[face\]'"):
        load_reward("identity", backend="onnx", detector="none", embedder_path=__file__)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("clip", {}, "no clip_path given"),
        ("clip", {"clip_path": "/nonexistent/clip"}, "is not a directory"),
        ("aesthetic", {}, "no head_path given"),
        ("aesthetic", {"head_path": "/nonexistent/head.pth", "clip_path": "/x"}, "does not exist"),
        ("pickscore", {}, "no clip_path given"),
        ("hpsv2", {}, "no checkpoint given"),
        ("artifact", {}, "no weights_path given"),
        ("artifact", {"weights_path": "/nonexistent.safetensors"}, "does not exist"),
    ],
)
def test_missing_weights_path_is_a_clear_error(name, kwargs, match):
    with pytest.raises(RewardWeightsError, match=match):
        load_reward(name, **kwargs)


# ------------------------------------------------------------------ composition


def test_weighted_reward_keeps_parts_and_weights_exactly():
    images = _images(batch=3)
    meta_a = [{"score": s} for s in (1.0, 2.0, 6.0)]
    a, b = FixedScores(), MeanPixel()
    combo = WeightedReward({"a": (a, 2.0), "b": (b, -1.0)})
    out = combo(images, ["p"] * 3, meta_a)
    mean = images.flatten(1).mean(dim=1)
    torch.testing.assert_close(out.components["a"], torch.tensor([1.0, 2.0, 6.0]))
    torch.testing.assert_close(out.components["b"], mean)
    torch.testing.assert_close(out.scores, 2 * torch.tensor([1.0, 2.0, 6.0]) - mean)
    assert combo.weights == {"a": 2.0, "b": -1.0}
    assert out.details["b.first"] == ["p"] * 3


def test_weighted_reward_normalization_per_reward_batch_and_group():
    images = _images(batch=4)
    meta = [{"score": s} for s in (1.0, 3.0, 10.0, 30.0)]
    combo = WeightedReward({"a": (FixedScores(), 1.0)}, normalize=True)
    out = combo(images, ["p"] * 4, meta)
    x = torch.tensor([1.0, 3.0, 10.0, 30.0])
    torch.testing.assert_close(out.scores, (x - 11.0) / (x.std(unbiased=False) + 1e-6))
    torch.testing.assert_close(out.components["a"], x)  # raw scores kept
    grouped = WeightedReward({"a": (FixedScores(), 1.0)}, normalize=["a"], normalize_within="group")
    out = grouped(images, ["p", "p", "q", "q"], meta)
    torch.testing.assert_close(out.scores, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    # only the named part is normalized
    partial = WeightedReward({"a": (FixedScores(), 1.0), "b": (FixedScores(), 1.0)}, normalize=["b"])
    out = partial(images, ["p"] * 4, meta)
    torch.testing.assert_close(out.scores, x + (x - 11.0) / (x.std(unbiased=False) + 1e-6))
    with pytest.raises(ValueError, match="unknown parts"):
        WeightedReward({"a": (FixedScores(), 1.0)}, normalize=["z"])


def test_weighted_reward_gradients_flow_through_differentiable_parts():
    images = _images(batch=2).requires_grad_(True)
    combo = WeightedReward({"d": (MeanPixel(), 3.0), "n": (FixedScores(), 1.0)})
    assert not combo.differentiable
    out = combo(images, ["a", "b"], [{"score": 1}, {"score": 2}])
    out.scores.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 3 / (3 * 8 * 8)))


def test_reward_specs_and_from_specs():
    assert parse_reward_spec("ocr") == ("ocr", 1.0)
    assert parse_reward_spec("aesthetic=0.5") == ("aesthetic", 0.5)
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_reward_spec("ocr=heavy")
    combo = WeightedReward.from_specs(
        ["compressibility=2", "incompressibility"], {"compressibility": {"quality": 50}}
    )
    assert combo.weights == {"compressibility": 2.0, "incompressibility": 1.0}
    assert combo.parts["compressibility"][0].quality == 50
    with pytest.raises(ValueError, match="more than once"):
        WeightedReward.from_specs(["ocr", "ocr=2"])
    with pytest.raises(ValueError, match="not among"):
        WeightedReward.from_specs(["compressibility"], {"ocr": {}})


# ------------------------------------------------------------------ win rate


def test_win_rate_from_a_pointwise_reward_is_exact():
    from rewards.winrate import WinRateReward

    reward = WinRateReward(FixedScores())
    scores = [3.0, 1.0, 3.0, 0.0, 5.0, 5.0]
    prompts = ["a", "a", "a", "a", "b", "b"]
    out = reward(_images(batch=6), prompts, [{"score": s} for s in scores])
    # group a: 3 beats 1 and 0, ties the other 3 -> (2 + 0.5) / 3; 1 beats 0 -> 1/3; 0 -> 0
    expected = [2.5 / 3, 1 / 3, 2.5 / 3, 0.0, 0.5, 0.5]
    torch.testing.assert_close(out.scores, torch.tensor(expected))
    assert out.details["comparisons"].tolist() == [3, 3, 3, 3, 1, 1]
    # Win rates of a group sum to G / 2.
    assert out.scores[:4].sum().item() == pytest.approx(2.0)


def test_win_rate_tie_margin_and_singleton_group():
    from rewards.winrate import WinRateReward

    out = WinRateReward(FixedScores(), tie_margin=0.5)(
        _images(batch=3), ["a", "a", "b"], [{"score": s} for s in (1.0, 1.4, 9.0)]
    )
    assert out.scores.tolist() == [0.5, 0.5, 0.0]  # singleton group: no comparison -> 0, as in Pref-GRPO


def test_win_rate_with_a_pairwise_judge():
    from rewards.winrate import PairwiseJudge, WinRateReward

    class Brighter(PairwiseJudge):
        def __init__(self):
            self.calls = 0

        def compare(self, a, b, prompts, metadata):
            self.calls += 1
            ma, mb = a.mean(dim=(1, 2, 3)), b.mean(dim=(1, 2, 3))
            return torch.where(ma > mb, 1.0, torch.where(ma < mb, 0.0, 0.5))

    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.2, 0.8, 0.5, 0.5)])
    judge = Brighter()
    out = WinRateReward(judge)(images, ["p"] * 4)
    torch.testing.assert_close(out.scores, torch.tensor([0.0, 1.0, 1.5 / 3, 1.5 / 3]))
    assert judge.calls == 1
    symmetric = WinRateReward(judge, symmetric=True)(images, ["p"] * 4)
    torch.testing.assert_close(symmetric.scores, out.scores)
    assert judge.calls == 3

    class Broken(PairwiseJudge):
        def compare(self, a, b, prompts, metadata):
            return torch.full((len(prompts),), 2.0)

    with pytest.raises(RuntimeError, match=r"outside \[0, 1\]"):
        WinRateReward(Broken())(images, ["p"] * 4)


def test_win_rate_by_name_through_the_registry():
    reward = load_reward("winrate", judge="compressibility")
    assert reward.groupwise
    flat, noisy = torch.zeros(3, 16, 16), torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = reward(torch.stack([flat, noisy]), ["p", "p"])
    assert out.scores.tolist() == [1.0, 0.0]  # the flat image compresses better


# ------------------------------------------------------------------ GenEval reward (shapes detector)


def _render(objects: list[tuple[str, str, int, int]], size: int = 32) -> Tensor:
    from rewards.shapes import color_rgb, sprite_mask

    image = torch.zeros(3, size, size)
    for shape, color, x, y in objects:
        mask = torch.from_numpy(sprite_mask(shape, 9).copy()).bool()
        for c, v in enumerate(color_rgb(color)):
            image[c, y : y + 9, x : x + 9][mask] = float(v)
    return image


def test_geneval_reward_strict_and_partial_on_shapes():
    meta = {
        "tag": "counting",
        "prompt": "a photo of two circles",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
    }
    two = _render([("circle", "red", 2, 2), ("circle", "blue", 18, 18)])
    one = _render([("circle", "red", 2, 2)])
    three = _render([("circle", "red", 2, 2), ("circle", "blue", 18, 18), ("circle", "green", 18, 2)])
    images = torch.stack([two, one, three])
    strict = load_reward("geneval")(images, ["p"] * 3, [meta] * 3)
    assert strict.scores.tolist() == [1.0, 0.0, 0.0]
    partial = load_reward("geneval", mode="partial")(images, ["p"] * 3, [meta] * 3)
    assert partial.scores.tolist() == [1.0, 0.5, 0.5]
    assert partial.details["correct"] == [True, False, False]
    assert "expected circle>=2, found 1" in partial.details["reason"][1]


def test_geneval_reward_with_a_detector_object():
    from rewards.geneval import Detection
    from rewards.shapes import COLORS, SHAPES, ShapesDetector, detect_batch

    images = torch.stack([_render([("square", "green", 5, 5)]), _render([])])
    shapes = ShapesDetector()
    assert (
        shapes(images) == detect_batch(images) and shapes.classes == SHAPES and shapes.colors == tuple(COLORS)
    )

    class Fixed:
        classes, colors = None, None

        def __call__(self, images):
            return [[Detection("dog", None, (0, 0, 4, 4), 0.9)] for _ in range(len(images))]

    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert load_reward("geneval", detector=Fixed())(images, ["a dog"] * 2, [meta] * 2).scores.tolist() == [
        1.0,
        1.0,
    ]


def test_geneval_reward_rejects_missing_metadata_and_video():
    reward = load_reward("geneval")
    with pytest.raises(RewardInputError, match="sample 0"):
        reward(torch.zeros(1, 3, 32, 32), ["p"])
    with pytest.raises(RewardInputError, match="unknown class"):
        reward(
            torch.zeros(1, 3, 32, 32),
            ["p"],
            [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}],
        )
    with pytest.raises(RewardInputError, match="video"):
        reward(torch.zeros(1, 2, 3, 32, 32), ["p"], [{}])
    with pytest.raises(ValueError, match="mode"):
        load_reward("geneval", mode="fuzzy")


# ------------------------------------------------------------------ artifact classifier


def _artifact_data(n: int = 24, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Clean: smooth colour gradients; artifact: the same with salt-and-pepper blotches."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, 32)
    clean = []
    for _ in range(n):
        c = torch.rand(3, 1, 1, generator=g)
        clean.append((c * ramp.view(1, 1, 32) + (1 - c) * ramp.view(1, 32, 1)).clamp(0, 1))
    clean_t = torch.stack(clean)
    noise = (torch.rand(clean_t.shape, generator=g) < 0.15).float()
    artifact = torch.where(noise.bool(), torch.rand(clean_t.shape, generator=g), clean_t)
    return clean_t, artifact


def test_artifact_classifier_trains_saves_loads_and_is_differentiable(tmp_path):
    from rewards.artifact import ArtifactConfig, train_artifact_classifier

    clean, artifact = _artifact_data()
    out = tmp_path / "artifact.safetensors"
    _, report = train_artifact_classifier(
        clean, artifact, out, ArtifactConfig(image_size=32, hidden=16), epochs=150
    )
    assert report.train_accuracy == 1.0 and report.val_accuracy == 1.0
    reward = load_reward("artifact", weights_path=out)
    test_clean, test_artifact = _artifact_data(n=6, seed=1)
    images = torch.cat([test_clean, test_artifact]).requires_grad_(True)
    scored = reward(images, [""] * 12)
    assert (scored.scores[:6] > 0.5).all() and (scored.scores[6:] < 0.5).all()
    scored.scores.sum().backward()
    assert images.grad.abs().sum() > 0
    again = load_reward("artifact", weights_path=out)(images.detach(), [""] * 12)
    torch.testing.assert_close(again.scores, scored.scores.detach())  # deterministic


def test_artifact_training_command_from_folders(tmp_path, capsys):
    from PIL import Image

    from rewards.artifact import main

    clean, artifact = _artifact_data(n=10)
    for folder, images in (("clean", clean), ("bad", artifact)):
        (tmp_path / folder).mkdir()
        for i, image in enumerate(images):
            array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(array).save(tmp_path / folder / f"{i:02d}.png")
    out = tmp_path / "w.safetensors"
    args = ["train", "--clean", str(tmp_path / "clean"), "--artifact", str(tmp_path / "bad"), "--out", str(out),
            "--image-size", "32", "--epochs", "100"]  # fmt: skip
    assert main(args) == 0
    assert "train accuracy" in capsys.readouterr().out
    assert load_reward("artifact", weights_path=out)(clean[:2], ["", ""]).scores.shape == (2,)
    with pytest.raises(RewardWeightsError, match="not an artifact classifier|not a safetensors"):
        bogus = tmp_path / "bogus.safetensors"
        bogus.write_bytes(b"not a tensor file")
        load_reward("artifact", weights_path=bogus)


# ------------------------------------------------------------------ the score command


def test_score_command_by_order_and_by_file_name(tmp_path, capsys):
    from PIL import Image

    from flowalign.cli import main

    images_dir = tmp_path / "images"
    images_dir.mkdir()
    two = _render([("circle", "red", 2, 2), ("circle", "blue", 18, 18)])
    one = _render([("circle", "red", 2, 2)])
    for name, image in (("a.png", two), ("b.png", one)):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(
            images_dir / name
        )
    meta = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
    }
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": "two circles", **meta}) for _ in range(2)))
    out = tmp_path / "scores.json"
    code = main(["score", str(images_dir), "--prompts", str(prompts), "--reward", "geneval=2",
                 "--reward", "compressibility=0.1", "--reward-arg", "geneval.mode=partial", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "geneval" in printed and "a.png" in printed and "mean" in printed
    result = json.loads(out.read_text())
    assert [r["scores"]["geneval"] for r in result["images"]] == [1.0, 0.5]
    assert result["rewards"] == {"geneval": 2.0, "compressibility": 0.1}
    first = result["images"][0]
    assert first["total"] == pytest.approx(2 * 1.0 + 0.1 * first["scores"]["compressibility"], rel=1e-5)

    # by file name (several samples of one prompt named explicitly), and a txt prompt file
    prompts.write_text(json.dumps({"prompt": "two circles", "files": ["b.png", "a.png"], **meta}))
    assert (
        main(["score", str(images_dir), "--prompts", str(prompts), "--reward", "geneval", "--out", str(out)])
        == 0
    )
    assert [r["file"] for r in json.loads(out.read_text())["images"]] == ["b.png", "a.png"]
    txt = tmp_path / "prompts.txt"
    txt.write_text("one\ntwo\n")
    assert main(["score", str(images_dir), "--prompts", str(txt), "--reward", "compressibility"]) == 0

    txt.write_text("only one prompt\n")
    capsys.readouterr()
    assert main(["score", str(images_dir), "--prompts", str(txt), "--reward", "compressibility"]) == 2
    assert "2 images" in capsys.readouterr().err
    argv = [
        "score",
        str(images_dir),
        "--prompts",
        str(txt),
        "--reward",
        "compressibility",
        "--reward-arg",
        "oops",
    ]
    assert main(argv) == 2
    assert "NAME.KEY=VALUE" in capsys.readouterr().err
    assert main(["score", str(images_dir), "--prompts", str(prompts), "--reward", "nope"]) == 2
    assert "error:" in capsys.readouterr().err  # one line, not a traceback
    with pytest.raises(ValueError, match="unknown reward"):
        main(["score", str(images_dir), "--prompts", str(prompts), "--reward", "nope", "--debug"])


def test_rewards_package_never_imports_flowalign():
    import ast

    root = Path(rewards.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("flowalign"), f"{path} imports {name}"
