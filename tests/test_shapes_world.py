"""The shapes world: sprites, renderer, exact detector, scene sampler and prompt splits."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from flowalign.worlds.shapes import (
    MIN_GAP,
    UNSEEN_PAIRS,
    Scene,
    SceneError,
    SceneObject,
    UnsatisfiablePromptError,
    canonical_key,
    color_attr_prompt,
    load_prompts,
    make_splits,
    position_prompt,
    render_scene,
    render_scenes,
    sample_scene,
    scene_detections,
    scene_from_detections,
    two_object_prompt,
    write_splits,
)
from flowalign.worlds.shapes.prompts import main as prompts_main
from rewards.base import RewardInputError
from rewards.geneval import TASKS, evaluate
from rewards.shapes import COLORS, SHAPES, SIZES, detect, detect_batch, sprite_mask

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "shapes" / "prompts"


@pytest.fixture(scope="module")
def splits():
    return make_splits(0)


def random_scene(rng: np.random.Generator, n_objects: int) -> Scene:
    """Any valid scene: random shapes, colours (same colours included), sizes and tight placements."""
    while True:
        placed: list[SceneObject] = []
        for _ in range(n_objects):
            size = int(rng.choice(SIZES))
            for _ in range(50):
                x, y = (int(v) for v in rng.integers(0, 32 - size + 1, size=2))
                obj = SceneObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), size, x, y)
                if all(_gap(obj, other) >= MIN_GAP for other in placed):
                    placed.append(obj)
                    break
        if len(placed) == n_objects:
            return Scene(tuple(placed))


def _gap(a: SceneObject, b: SceneObject) -> int:
    return max(b.x - (a.x + a.size), a.x - (b.x + b.size), b.y - (a.y + a.size), a.y - (b.y + b.size))


# --- sprites --------------------------------------------------------------------------------------------


def test_sprites_are_exact_binary_masks():
    areas = {(s, z): int(sprite_mask(s, z).sum()) for s in SHAPES for z in SIZES}
    assert areas == {
        ("circle", 9): 69,
        ("circle", 11): 97,
        ("square", 9): 81,
        ("square", 11): 121,
        ("triangle", 9): 41,
        ("triangle", 11): 61,
        ("diamond", 9): 41,
        ("diamond", 11): 61,
    }
    for shape in SHAPES:
        for size in SIZES:
            m = sprite_mask(shape, size)
            assert m.dtype == bool and m.shape == (size, size)
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()  # fills its box
            assert (m == m[:, ::-1]).all()  # left-right symmetric
            if shape != "triangle":
                assert (m == m[::-1]).all()
    tri = sprite_mask("triangle", 9)
    assert tri[0].sum() == 1 and tri[-1].all()  # apex on top, flat base
    assert sprite_mask("diamond", 9)[4].all() and sprite_mask("diamond", 9)[0].sum() == 1
    with pytest.raises(ValueError, match="'hexagon'"):
        sprite_mask("hexagon", 9)
    with pytest.raises(ValueError, match="10"):
        sprite_mask("circle", 10)


# --- renderer + detector --------------------------------------------------------------------------------


def test_render_is_binary_and_in_bounds():
    scene = Scene((SceneObject("circle", "yellow", 9, 0, 0), SceneObject("square", "cyan", 11, 21, 21)))
    image = render_scene(scene)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert set(image.unique().tolist()) == {0.0, 1.0}
    assert image[:, 0, 4].tolist() == [1.0, 1.0, 0.0] and image[:, 31, 31].tolist() == [0.0, 1.0, 1.0]
    assert image.sum() == 2 * 69 + 2 * 121
    assert torch.equal(render_scenes([scene, scene])[1], image)


def test_detect_render_roundtrip_is_exact():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, n) for n in range(5) for _ in range(100)]
    detections = detect_batch(render_scenes(scenes))
    for scene, dets in zip(scenes, detections):
        assert dets == scene_detections(scene)
        assert scene_from_detections(dets) == scene
        assert all(d.confidence == 1.0 for d in dets)
    assert detect(render_scene(scenes[-1])) == detections[-1]


def test_same_colour_objects_at_min_gap_stay_separate():
    scene = Scene(
        (
            SceneObject("square", "white", 9, 0, 0),
            SceneObject("square", "white", 9, 11, 0),  # 2 empty columns between them
            SceneObject("diamond", "white", 9, 22, 11),  # diagonal neighbour, 2 empty rows and columns
        )
    )
    assert scene_from_detections(detect(render_scene(scene))) == scene


def test_confidence_is_about_the_object_not_its_pixels():
    scene = Scene((SceneObject("triangle", "magenta", 11, 5, 7),))
    image = render_scene(scene)
    # Washed-out colours on the right side of the threshold do not change the verdict or the confidence.
    (washed,) = detect(image * 0.8 + 0.1)
    assert (washed.class_name, washed.color, washed.confidence) == ("triangle", "magenta", 1.0)
    # A soft or slightly irregular edge keeps it above GenEval's counting threshold 0.9.
    damaged = image.clone()
    damaged[:, 7 + 10, 5:8] = 0  # 3 base pixels missing
    (d,) = detect(damaged)
    assert d.class_name == "triangle" and d.confidence > 0.9 and d.pixel_count == 58
    # Half of it is no longer a whole triangle (below the detection threshold 0.3).
    half = image.clone()
    half[:, :, 11:] = 0
    assert detect(half) == [] and detect(half, min_confidence=0.0)[0].confidence < 0.3
    # Two same-colour objects drawn into one blob are not one object of either class.
    blob = render_scene(Scene((SceneObject("circle", "red", 11, 4, 4),)))
    blob = torch.maximum(blob, render_scene(Scene((SceneObject("circle", "red", 11, 9, 6),))))
    assert detect(blob) == []
    # A channel is on when value * 255 >= 128, also for uint8 images converted with / 255.
    for level, on in ((127, False), (128, True)):
        pixel = torch.zeros(3, 5, 5)
        pixel[0, 2, 2] = torch.tensor(level, dtype=torch.uint8).float() / 255
        assert len(detect(pixel, min_confidence=0.0)) == on
    # 0.51 is on, 0.5 is off.
    assert detect(image * 0.51)[0].color == "magenta" and detect(image * 0.5) == []
    assert detect(torch.zeros(3, 32, 32)) == []
    # Specks are dropped by min_confidence, kept (with confidence 0) when asked for.
    speck = torch.zeros(3, 32, 32)
    speck[0, 3, 3] = 1
    (kept,) = detect(speck, min_confidence=0.0)
    assert detect(speck) == [] and kept.pixel_count == 1 and kept.confidence == 0.0


def test_detections_are_sorted_by_confidence_then_position():
    image = render_scene(
        Scene((SceneObject("circle", "red", 9, 20, 2), SceneObject("square", "blue", 9, 2, 20)))
    )
    assert [d.class_name for d in detect(image)] == ["circle", "square"]  # reading order on ties
    image[:, 2, 23:27] = 0  # the circle's top edge flattened (4 pixels off)
    dets = detect(image)
    assert [d.class_name for d in dets] == ["square", "circle"] and dets[1].confidence < 1


@pytest.mark.parametrize(
    ("images", "call", "message"),
    [
        (torch.zeros(3, 32, 32), detect_batch, r"\[B, 3, H, W\].*use detect\(\)"),
        (torch.zeros(1, 3, 32, 32), detect, r"one image \[3, H, W\]"),
        (torch.zeros(2, 4, 32, 32), detect_batch, r"\(2, 4, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), detect_batch, "uint8"),
        (torch.full((1, 3, 8, 8), 1.5), detect_batch, r"\[0, 1\].*1\.5"),
        (torch.full((1, 3, 8, 8), -0.5), detect_batch, r"\[0, 1\].*-0\.5"),
        (torch.full((1, 3, 8, 8), float("nan")), detect_batch, r"\[0, 1\]"),
        (np.zeros((1, 3, 8, 8), dtype=np.float32), detect_batch, "torch.Tensor"),
    ],
)
def test_detector_rejects_bad_images(images, call, message):
    with pytest.raises(RewardInputError, match=message):
        call(images)


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ([SceneObject("hexagon", "red", 9, 0, 0)], "hexagon"),
        ([SceneObject("circle", "orange", 9, 0, 0)], "orange"),
        ([SceneObject("circle", "red", 10, 0, 0)], "size 10"),
        ([SceneObject("circle", "red", 11, 22, 0)], "inside"),
        ([SceneObject("circle", "red", 9, -1, 0)], "inside"),
        ([SceneObject("circle", "red", 9, 0.5, 0)], "integer"),
        ([SceneObject("circle", "red", 9, 0, 0), SceneObject("square", "red", 9, 10, 0)], "1 px apart"),
        ([SceneObject("circle", "red", 9, 0, 0), SceneObject("square", "red", 9, 5, 5)], "px apart"),
        ([SceneObject("circle", "red", 9, 11 * i % 33, 11 * (i // 3)) for i in range(5)], "at most 4"),
    ],
)
def test_invalid_scenes_are_named(objects, message):
    with pytest.raises(SceneError, match=message):
        Scene(tuple(objects))


def test_scene_is_order_independent():
    a, b = SceneObject("circle", "red", 9, 20, 0), SceneObject("square", "red", 9, 0, 20)
    assert Scene((a, b)) == Scene((b, a))


# --- sampler --------------------------------------------------------------------------------------------


def _scores(scenes, prompts):
    dets = detect_batch(render_scenes(scenes))
    return [evaluate(d, m) for d, m in zip(dets, prompts)]


def test_sampled_ground_truth_scores_correct_on_every_test_and_unseen_prompt(splits):
    rng = np.random.default_rng(1)
    prompts = [m for m in splits.test + splits.unseen for _ in range(4)]
    results = _scores([sample_scene(m, rng) for m in prompts], prompts)
    bad = [(r.prompt, r.reason) for r in results if not (r.correct and r.strict_correct and r.score == 1.0)]
    assert not bad


def test_grid_fallback_satisfies_every_prompt(splits):
    rng = np.random.default_rng(2)
    prompts = splits.test + splits.unseen + splits.train
    results = _scores([sample_scene(m, rng, max_tries=0) for m in prompts], prompts)
    assert all(r.correct for r in results)


def test_sampler_is_deterministic_and_takes_torch_generators(splits):
    m = splits.test[-1]
    a = [sample_scene(m, np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1]
    t = [sample_scene(m, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert t[0] == t[1]
    rng = np.random.default_rng(5)
    assert len({sample_scene(m, rng) for _ in range(10)}) > 5
    with pytest.raises(TypeError, match="Generator"):
        sample_scene(m, 5)


def test_distractors_use_unnamed_classes_and_keep_the_scene_correct():
    rng = np.random.default_rng(3)
    m = color_attr_prompt("circle", "red", "square", "blue")
    for _ in range(20):
        scene = sample_scene(m, rng, n_distractors=2)
        assert len(scene.objects) == 4
        assert Counter(o.shape for o in scene.objects)["circle"] == 1
        assert {o.shape for o in scene.objects} - {"circle", "square"} <= {"triangle", "diamond"}
        assert evaluate(detect(render_scene(scene)), m).correct


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"tag": "single_object", "include": [{"class": "cat", "count": 1}]}, "'cat'"),
        ({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "orange"}]}, "'orange'"),
        ({"tag": "counting", "include": [{"class": "circle", "count": 5}]}, "at most 4"),
        (
            {
                "tag": "counting",
                "include": [{"class": "circle", "count": 2}],
                "exclude": [{"class": "circle", "count": 2}],
            },
            "excludes 2",
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class": "square", "count": 1},
                    {"class": "circle", "count": 1, "position": ["left of", 0]},
                    {"class": "circle", "count": 1, "position": ["right of", 0]},
                ],
            },
            "no scene satisfies",
        ),
        ({"tag": "single_object", "include": "circle"}, "include"),
    ],
)
def test_unsatisfiable_prompts_are_named(metadata, message):
    with pytest.raises(UnsatisfiablePromptError, match=message):
        sample_scene(metadata, np.random.default_rng(0), max_tries=4)


# --- mutations of correct scenes fail -------------------------------------------------------------------


def _replace(scene: Scene, index: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return Scene(tuple(objects))


def _required(scene: Scene, metadata) -> list[int]:
    named = {c["class"] for c in metadata["include"]}
    return [i for i, o in enumerate(scene.objects) if o.shape in named]


def test_mutations_fail(splits):
    rng = np.random.default_rng(4)
    mutated, prompts = [], []
    for m in splits.test + splits.unseen:
        scene = sample_scene(m, rng, n_distractors=1)
        # Remove one required object.
        i = _required(scene, m)[int(rng.integers(len(_required(scene, m))))]
        mutated.append(Scene(scene.objects[:i] + scene.objects[i + 1 :]))
        prompts.append(m)
        # Swap a colour.
        for clause in m["include"]:
            if "color" in clause:
                j = next(k for k, o in enumerate(scene.objects) if o.shape == clause["class"])
                other = [c for c in COLORS if c != clause["color"]]
                mutated.append(_replace(scene, j, color=other[int(rng.integers(len(other)))]))
                prompts.append(m)
        # Mirror a position along its axis.
        if m["tag"] == "position":
            horizontal = m["include"][1]["position"][0] in ("left of", "right of")
            objects = tuple(
                dataclasses.replace(o, x=32 - o.x - o.size)
                if horizontal
                else dataclasses.replace(o, y=32 - o.y - o.size)
                for o in scene.objects
            )
            mutated.append(Scene(objects))
            prompts.append(m)
    # Add one object of the counted class (counts 2 and 3; four objects fill the scene).
    for m in splits.test + splits.train:
        if m["tag"] == "counting" and m["include"][0]["count"] < 4:
            mutated.append(_add_object(sample_scene(m, rng), m["include"][0]["class"], rng))
            prompts.append(m)
    assert len(prompts) > 2 * len(splits.test)
    passed = [(r.prompt, s) for r, s in zip(_scores(mutated, prompts), mutated) if r.correct]
    assert not passed


def _add_object(scene: Scene, shape: str, rng: np.random.Generator) -> Scene:
    for _ in range(2000):
        size = int(rng.choice(SIZES))
        x, y = (int(v) for v in rng.integers(0, 32 - size + 1, size=2))
        obj = SceneObject(shape, "white", size, x, y)
        if all(_gap(obj, other) >= MIN_GAP for other in scene.objects):
            return Scene(scene.objects + (obj,))
    raise AssertionError(f"no room for one more {shape} in {scene}")


# --- prompts and splits ---------------------------------------------------------------------------------

PHRASES = {
    "single_object": r"a photo of a (\w+)",
    "two_object": r"a photo of a (\w+) and a (\w+)",
    "counting": r"a photo of (two|three|four) (\w+)s",
    "colors": r"a photo of a (\w+) (\w+)",
    "position": r"a photo of a (\w+) (left of|right of|above|below) a (\w+)",
    "color_attr": r"a photo of a (\w+) (\w+) and a (\w+) (\w+)",
}


def test_split_sizes_and_phrasing(splits):
    sizes = {name: Counter(m["tag"] for m in prompts) for name, prompts in splits.as_dict().items()}
    expected = {
        "single_object": 2,
        "two_object": 3,
        "counting": 6,
        "colors": 12,
        "position": 12,
        "color_attr": 93,
    }
    assert sizes["train"] == expected and sizes["test"] == expected
    assert sizes["unseen"] == {"colors": 4, "color_attr": 66}
    for m in splits.train + splits.test + splits.unseen:
        keys = (
            ["tag", "include", "exclude", "prompt"]
            if m["tag"] == "counting"
            else ["tag", "include", "prompt"]
        )
        assert list(m) == keys  # GenEval's key order
        assert re.fullmatch(PHRASES[m["tag"]], m["prompt"]), m["prompt"]
        for clause in m["include"]:
            named = f"{clause['color']} {clause['class']}" if "color" in clause else clause["class"]
            assert named in m["prompt"]
    assert [m["tag"] for m in splits.test] == sorted((m["tag"] for m in splits.test), key=TASKS.index)


def test_splits_have_no_order_swapped_duplicates(splits):
    keys = {name: [canonical_key(m) for m in prompts] for name, prompts in splits.as_dict().items()}
    for name, ks in keys.items():
        assert len(ks) == len(set(ks)), f"duplicate inside {name}"
    assert not set(keys["train"]) & set(keys["test"])
    assert not (set(keys["train"]) | set(keys["test"])) & set(keys["unseen"])
    assert sum(len(set(k)) for k in keys.values()) == 326  # every distinct prompt of the world, once
    assert canonical_key(color_attr_prompt("circle", "red", "square", "blue")) == canonical_key(
        color_attr_prompt("square", "blue", "circle", "red")
    )
    assert canonical_key(position_prompt("circle", "left of", "square")) == canonical_key(
        position_prompt("square", "right of", "circle")
    )
    assert canonical_key(position_prompt("circle", "left of", "square")) != canonical_key(
        position_prompt("square", "left of", "circle")
    )
    assert canonical_key(two_object_prompt("circle", "square")) == canonical_key(
        two_object_prompt("square", "circle")
    )


def test_unseen_pairs_never_appear_in_train_or_test(splits):
    held_out = set(UNSEEN_PAIRS)

    def pairs(m):
        return {(c["class"], c["color"]) for c in m["include"] if "color" in c}

    for m in splits.train + splits.test:
        assert not pairs(m) & held_out, m["prompt"]
        assert not any(f"{color} {shape}" in m["prompt"] for shape, color in held_out)
    assert all(pairs(m) & held_out for m in splits.unseen)
    seen = set().union(*(pairs(m) for m in splits.train))
    assert seen == {(s, c) for s in SHAPES for c in COLORS} - held_out  # every other pair is trained on


def test_splits_are_deterministic_and_seeded(splits):
    assert make_splits(0) == splits
    assert make_splits(1).test != splits.test
    with pytest.raises(ValueError, match="'hexagon'"):
        make_splits(0, unseen_pairs=[("hexagon", "red")])


def test_shipped_prompt_files_match_the_generator(splits, tmp_path):
    prompts_main(["--out", str(tmp_path)])
    for name in ("train", "test", "unseen"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (ASSETS / f"{name}.jsonl").read_text()
        assert load_prompts(ASSETS / f"{name}.jsonl") == getattr(splits, name)
    assert write_splits(splits, tmp_path / "again")["test"].read_text() == (ASSETS / "test.jsonl").read_text()


def test_shipped_captions_are_the_pretraining_distribution_over_train_and_test_prompts(splits, tmp_path):
    """assets/shapes/prompts/captions.jsonl is what its command writes: captions drawn like the teacher's
    pretraining stream, every one a train or test prompt up to phrasing (both splits covered), none unseen."""
    from flowalign.worlds.shapes.data import main as captions_main

    captions_main(["--out", str(tmp_path / "captions.jsonl")])
    assert (tmp_path / "captions.jsonl").read_text() == (ASSETS / "captions.jsonl").read_text()
    captions = load_prompts(ASSETS / "captions.jsonl")
    keys = {canonical_key(m) for m in captions}
    train, test = ({canonical_key(m) for m in getattr(splits, n)} for n in ("train", "test"))
    assert len(captions) == 2048 and keys <= train | test and keys & train and keys & test
    assert not keys & {canonical_key(m) for m in splits.unseen}
    assert {m["tag"] for m in captions} == set(TASKS)
    for bad in ("zero", "0"):
        with pytest.raises(SystemExit):
            captions_main(["--out", str(tmp_path / "x.jsonl"), "--count", bad])
    assert not (tmp_path / "x.jsonl").exists()


def test_real_images_of_a_prompt_file_are_judged_correct_and_never_show_a_held_out_pair(splits, tmp_path):
    """``--render PROMPTS``: K rendered scenes per prompt (DMD2's real data for ``dmd.gan_real``), each one
    the exact detector and GenEval's rules judge correct for its prompt, none with a held-out (shape, colour)
    pair; a prompt file naming a held-out pair is refused."""
    from PIL import Image

    from flowalign.worlds.shapes.data import main as data_main

    out = tmp_path / "real.jsonl"
    data_main(["--render", str(ASSETS / "train.jsonl"), "--per-prompt", "3", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_prompt = {m["prompt"]: m for m in splits.train}
    assert len(lines) == 3 * len(splits.train) and Counter(x["prompt"] for x in lines) == Counter(
        {p: 3 for p in by_prompt}
    )
    held = set(UNSEEN_PAIRS)
    for line in lines:
        with Image.open(out.parent / line["image"]) as file:
            image = torch.from_numpy(np.asarray(file.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        detections = detect(image)
        assert evaluate(detections, by_prompt[line["prompt"]]).correct, line
        assert not any((d.class_name, d.color) in held for d in detections)
    with pytest.raises(SystemExit):
        data_main(["--render", str(ASSETS / "unseen.jsonl"), "--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


def test_shipped_real_images_are_what_their_command_writes(tmp_path):
    """assets/shapes/real/train.jsonl (configs/dmd/shapes_1step_gan_real.yaml's real data) is the command's
    output: the same lines and the same pixels."""
    from PIL import Image

    from flowalign.worlds.shapes.data import main as data_main

    shipped = REPO / "assets/shapes/real/train.jsonl"
    out = tmp_path / "train.jsonl"
    data_main(
        ["--render", str(ASSETS / "train.jsonl"), "--per-prompt", "8", "--seed", "0", "--out", str(out)]
    )
    assert out.read_text() == shipped.read_text()
    for line in out.read_text().splitlines():
        name = json.loads(line)["image"]
        with Image.open(out.parent / name) as a, Image.open(shipped.parent / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_load_prompts_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(
        {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "p"}
    )
    bad = json.dumps(
        {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "purple"}], "prompt": "p"}
    )
    path.write_text(good + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'purple'"):
        load_prompts(path)
