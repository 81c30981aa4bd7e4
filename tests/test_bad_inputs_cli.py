"""A corpus of bad inputs through the commands (issue 15): command-line values, prompt files, model and
LoRA directories, images and rewards. Each case runs ``flowalign ...`` in process and asserts one line on
stderr, exit status 2 and a message that names the problem; cases marked ``before_load`` must fail before
any model loads (``load_model`` raises if it is reached). The config-value corpus is
``tests/test_bad_inputs.py``; the image conversion rules are checked at the end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.cli import main
from rewards.images import ImageLoadError, load_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Every bad (and good) input file the cases name, under one directory ``F``."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.txt").write_text("")
    circle = {
        "prompt": "a photo of a circle",
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
    }
    (d / "bad.jsonl").write_text(json.dumps(circle) + "\n{not json\n")
    (d / "noprompt.jsonl").write_text('{"text": "a"}\n')
    (d / "notag.jsonl").write_text('{"prompt": "a photo of a circle"}\n')
    hexagon = {"prompt": "a hexagon", "tag": "single_object", "include": [{"class": "hexagon", "count": 1}]}
    (d / "hexagon.jsonl").write_text(json.dumps(hexagon) + "\n")
    circle = {
        "prompt": "a photo of a circle",
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
    }
    (d / "circle.jsonl").write_text(json.dumps(circle) + "\n")
    (d / "two.txt").write_text("a photo of a circle\na photo of a square\n")
    (d / "mixed.jsonl").write_text(json.dumps(circle | {"file": "a.png"}) + "\n" + json.dumps(circle) + "\n")
    (d / "named_missing.jsonl").write_text(json.dumps(circle | {"file": "nope.png"}) + "\n")
    for name in (
        "imgs",
        "transparent",
        "large",
        "corrupt",
        "fake",
        "float",
        "emptydir",
        "no_class",
        "badjson",
    ):
        (d / name).mkdir()
    Image.new("RGB", (32, 32)).save(d / "imgs/a.png")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:4, :4, 3] = 0
    Image.fromarray(rgba, "RGBA").save(d / "transparent/a.png")
    Image.new("RGB", (40, 30)).save(d / "large/a.png")
    Image.new("RGB", (32, 32)).save(d / "corrupt/a.png")
    data = (d / "corrupt/a.png").read_bytes()
    (d / "corrupt/a.png").write_bytes(data[: len(data) // 2])
    (d / "fake/a.png").write_text("not an image")
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), "F").save(d / "float/a.tiff")
    (d / "float/a.tiff").rename(d / "float/a.png")
    (d / "no_class/model_index.json").write_text('{"transformer": ["diffusers", "X"]}')
    (d / "badjson/model_index.json").write_text('{"_class_name": ')
    (d / "lora").mkdir()
    (d / "lora/pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 64)
    (d / "config.yaml").write_text("train: [unclosed\n")
    (d / "a_file").write_text("")
    from safetensors.torch import save_file

    save_file({"not_a_layer.weight": torch.zeros(2)}, str(d / "alien.safetensors"))
    return d


SAMPLE = ["sample", "--prompt", "a photo of a circle"]
BENCH = ["bench", "geneval", "--out", "{F}/bench_out"]
SCORE = ["score", "{F}/imgs", "--prompts", "{F}/circle.jsonl"]
NOISE = ["optimize-noise", "--prompt", "a photo of a circle", "--reward", "shapes_match"]
PLAN = ["plan", str(ROOT / "configs/grpo/tiny_sd3.yaml")]

# (id, argv, what the one-line message must match, fails before any model loads)
CASES = [
    # sampling options, every generating command
    ("sample-guidance-nan", [*SAMPLE, "--guidance", "nan"], r"--guidance must be a finite number >= 1", True),
    ("sample-guidance-below-1", [*SAMPLE, "--guidance", "0.5"], r"--guidance .*>= 1.*got 0\.5", True),
    ("sample-guidance-inf", [*SAMPLE, "--guidance", "inf"], r"--guidance .*got inf", True),
    ("sample-guidance-negative", [*SAMPLE, "--guidance", "-3"], r"--guidance", True),
    ("sample-steps-0", [*SAMPLE, "--steps", "0"], r"--steps must be an integer >= 1, got 0", True),
    ("sample-steps-negative", [*SAMPLE, "--steps", "-2"], r"--steps .*got -2", True),
    (
        "sample-sigmas-vs-steps",
        [*SAMPLE, "--steps", "4", "--sigmas", "1", "0.5"],
        r"--steps 4 but 2 --sigmas",
        True,
    ),
    ("sample-sigmas-increasing", [*SAMPLE, "--sigmas", "0.5", "1"], r"--sigmas: .*strictly decreasing", True),
    ("sample-sigmas-above-1", [*SAMPLE, "--sigmas", "2", "1"], r"--sigmas: .*\(0, 1\]", True),
    (
        "bench-timesteps-too-large",
        [*BENCH, "--timesteps", "1000", "500"],
        r"--timesteps: .*\[0, 1000\)",
        True,
    ),
    (
        "sample-timesteps-for-a-flow-model",
        [*SAMPLE, "--timesteps", "999", "499"],
        r"--timesteps is for diffusion models; this is a flow model: use --sigmas",
        False,
    ),
    (
        "noise-sigmas-and-timesteps",
        [*NOISE, "--sigmas", "1", "--timesteps", "999"],
        r"not allowed with argument",
        True,
    ),
    ("sample-num-images-0", [*SAMPLE, "--num-images", "0"], r"--num-images .*>= 1", True),
    ("sample-height-0", [*SAMPLE, "--height", "0"], r"--height .*>= 1", True),
    ("sample-width-negative", [*SAMPLE, "--width", "-32"], r"--width", True),
    (
        "sample-out-is-a-directory",
        [*SAMPLE, "--out", "{F}/emptydir"],
        r"--out .*emptydir' is a directory",
        True,
    ),
    (
        "sample-out-no-image-suffix",
        [*SAMPLE, "--out", "{F}/grid"],
        r"--out .*grid' must end with \.png",
        True,
    ),
    (
        "bench-out-is-a-file",
        ["bench", "geneval", "--out", "{F}/a_file"],
        r"--out .*a_file' exists and is not a directory",
        True,
    ),
    (
        "noise-out-is-a-file",
        [*NOISE, "--out", "{F}/a_file"],
        r"--out .*a_file' exists and is not a directory",
        True,
    ),
    (
        "score-out-is-a-directory",
        [*SCORE, "--reward", "geneval", "--out", "{F}/emptydir"],
        r"--out .*is a directory",
        True,
    ),
    ("sample-device-unknown", [*SAMPLE, "--device", "tpu"], r"--device 'tpu' is not a torch device", True),
    ("sample-device-cuda-index", [*SAMPLE, "--device", "cuda:7"], r"--device 'cuda:7'", True),
    (
        "score-device-unknown",
        [*SCORE, "--reward", "geneval", "--device", "gpu0"],
        r"--device 'gpu0' is not a torch device",
        True,
    ),
    ("sample-micro-batch-0", [*SAMPLE, "--micro-batch-size", "0"], r"--micro-batch-size", True),
    ("bench-guidance-inf", [*BENCH, "--guidance", "inf"], r"--guidance", True),
    ("bench-steps-0", [*BENCH, "--steps", "0"], r"--steps", True),
    ("bench-resolution-0", [*BENCH, "--resolution", "0"], r"--resolution", True),
    ("bench-batch-size-0", [*BENCH, "--batch-size", "0"], r"--batch-size", True),
    ("bench-max-prompts-0", [*BENCH, "--max-prompts", "0"], r"--max-prompts", True),
    ("bench-images-per-prompt-0", [*BENCH, "--images-per-prompt", "0"], r"--images-per-prompt", True),
    (
        "bench-min-images-negative",
        [*BENCH, "--min-images-per-task", "-1"],
        r"--min-images-per-task.*>= 0",
        True,
    ),
    ("noise-lr-nan", [*NOISE, "--lr", "nan"], r"--lr must be a finite number >= 0", True),
    ("noise-lr-negative", [*NOISE, "--lr", "-1"], r"--lr", True),
    ("noise-grad-clip-0", [*NOISE, "--grad-clip", "0"], r"--grad-clip must be a finite number > 0", True),
    ("noise-reg-weight-negative", [*NOISE, "--reg-weight", "-0.1"], r"--reg-weight", True),
    ("noise-iterations-0", [*NOISE, "--iterations", "0"], r"--iterations", True),
    ("noise-steps-0", [*NOISE, "--steps", "0"], r"--steps", True),
    ("noise-guidance-below-1", [*NOISE, "--guidance", "0.9"], r"--guidance", True),
    ("noise-not-differentiable", [*NOISE[:-1], "geneval"], r"needs differentiable rewards.*geneval", True),
    ("plan-gpu-memory-0", [*PLAN, "--gpu-memory", "0"], r"--gpu-memory must be a finite number > 0", True),
    ("plan-gpu-memory-nan", [*PLAN, "--gpu-memory", "nan"], r"--gpu-memory", True),
    ("plan-processes-0", [*PLAN, "--processes", "0"], r"--processes", True),
    ("plan-extra-gb-negative", [*PLAN, "--extra-gb", "-1"], r"--extra-gb", True),
    ("plan-config-missing", ["plan", "{F}/none.yaml"], r"config file .*none\.yaml.* does not exist", True),
    ("train-config-missing", ["train", "{F}/none.yaml"], r"config file .*none\.yaml.* does not exist", True),
    ("train-config-bad-yaml", ["train", "{F}/config.yaml"], r"config\.yaml", True),
    ("train-unknown-key", ["train", PLAN[1], "optim.lrr=1"], r"optim\.lrr", True),
    (
        "train-output-dir-unwritable",
        ["train", PLAN[1], "train.output_dir={F}/a_file/run"],
        r"train\.output_dir=.*a_file/run' cannot be created",
        True,
    ),
    ("train-override-no-equals", ["train", PLAN[1], "optim.lr"], r"optim\.lr", True),
    # prompt files
    ("score-prompts-missing", [*SCORE[:3], "{F}/none.jsonl", "--reward", "geneval"], r"none\.jsonl", True),
    (
        "score-prompts-empty",
        [*SCORE[:3], "{F}/empty.txt", "--reward", "geneval"],
        r"empty\.txt.* no prompts",
        True,
    ),
    (
        "score-prompts-bad-json",
        [*SCORE[:3], "{F}/bad.jsonl", "--reward", "geneval"],
        r"bad\.jsonl:2: not valid JSON",
        True,
    ),
    (
        "score-prompts-no-prompt",
        [*SCORE[:3], "{F}/noprompt.jsonl", "--reward", "geneval"],
        r"noprompt\.jsonl:1:.*'prompt'",
        True,
    ),
    (
        "score-count-mismatch",
        [*SCORE[:3], "{F}/two.txt", "--reward", "geneval"],
        r"1 images .* but 2 prompts",
        True,
    ),
    (
        "score-named-missing",
        [*SCORE[:3], "{F}/named_missing.jsonl", "--reward", "geneval"],
        r"nope\.png.* does not exist",
        True,
    ),
    (
        "score-mixed-file-keys",
        [*SCORE[:3], "{F}/mixed.jsonl", "--reward", "geneval"],
        r'every prompts\.jsonl line names .*"file" or none',
        True,
    ),
    (
        "score-metadata-missing",
        [*SCORE[:3], "{F}/notag.jsonl", "--reward", "geneval"],
        r"geneval: sample 0.*needs a string 'tag'",
        True,
    ),
    (
        "bench-prompts-missing",
        [*BENCH, "--prompts", "{F}/none.jsonl"],
        r"prompt file .*none\.jsonl.* not found",
        True,
    ),
    (
        "bench-prompts-no-tag",
        [*BENCH, "--prompts", "{F}/notag.jsonl"],
        r"notag\.jsonl:1: not a GenEval prompt.*'tag'",
        True,
    ),
    (
        "bench-prompts-unknown-class",
        [*BENCH, "--prompts", "{F}/hexagon.jsonl"],
        r"hexagon\.jsonl:1:.*unknown class 'hexagon'",
        True,
    ),
    ("bench-prompts-bad-json", [*BENCH, "--prompts", "{F}/bad.jsonl"], r"bad\.jsonl:2", True),
    ("bench-prompts-empty", [*BENCH, "--prompts", "{F}/empty.txt"], r"empty\.txt", True),
    ("bench-detector-unknown", [*BENCH, "--detector", "yolo"], r"--detector: invalid choice: 'yolo'", True),
    (
        "bench-detector-arg-malformed",
        [*BENCH, "--detector-arg", "oops"],
        r"--detector-arg 'oops' must look like KEY=VALUE",
        True,
    ),
    (
        "bench-compare-no-results",
        ["bench", "compare", "{F}/emptydir", "{F}/emptydir"],
        r"emptydir' holds no results\.json",
        True,
    ),
    # model and LoRA directories
    (
        "model-missing",
        [*SAMPLE, "--model", "{F}/nomodel"],
        r"model directory .*nomodel' does not exist",
        False,
    ),
    (
        "model-not-a-pipeline",
        [*SAMPLE, "--model", "{F}/emptydir"],
        r"emptydir' has no model_index\.json",
        False,
    ),
    (
        "model-index-bad-json",
        [*SAMPLE, "--model", "{F}/badjson"],
        r"badjson/model_index\.json is not valid JSON",
        False,
    ),
    ("model-index-no-class", [*SAMPLE, "--model", "{F}/no_class"], r"no_class/model_index\.json", False),
    ("model-family-unknown", [*SAMPLE, "--family", "sd4"], r"unknown model family 'sd4'", False),
    ("model-tiny-unknown", [*SAMPLE, "--model", "tiny-nosuch"], r"tiny", False),
    ("lora-missing", [*SAMPLE, "--lora", "{F}/nolora"], r"LoRA directory .*nolora' does not exist", False),
    (
        "weights-missing",
        [*SAMPLE, "--weights", "{F}/emptydir"],
        r"weights .*emptydir': no such file .*trainable\.safetensors",
        False,
    ),
    (
        "weights-of-another-model",
        [*SAMPLE, "--weights", "{F}/alien.safetensors"],
        r"do not fit this shapes model's .*1 unknown tensors",
        False,
    ),
    ("lora-empty-dir", [*SAMPLE, "--lora", "{F}/emptydir"], r"emptydir' holds no \.safetensors file", False),
    (
        "lora-corrupt-file",
        [*SAMPLE, "--lora", "{F}/lora"],
        r"pytorch_lora_weights\.safetensors' cannot be read",
        False,
    ),
    # images
    (
        "image-transparent",
        ["score", "{F}/transparent", "--prompts", "{F}/circle.jsonl", "--reward", "geneval"],
        r"transparent/a\.png' has transparent pixels.*--background",
        True,
    ),
    (
        "image-too-large",
        [
            "score",
            "{F}/large",
            "--prompts",
            "{F}/circle.jsonl",
            "--reward",
            "geneval",
            "--max-pixels",
            "1000",
        ],
        r"a\.png' is 40x30 = 1200 pixels, over the limit of 1000",
        True,
    ),
    (
        "image-truncated",
        ["score", "{F}/corrupt", "--prompts", "{F}/circle.jsonl", "--reward", "geneval"],
        r"corrupt/a\.png' cannot be read",
        True,
    ),
    (
        "image-not-an-image",
        ["score", "{F}/fake", "--prompts", "{F}/circle.jsonl", "--reward", "geneval"],
        r"fake/a\.png' cannot be read",
        True,
    ),
    (
        "image-float-pixels",
        ["score", "{F}/float", "--prompts", "{F}/circle.jsonl", "--reward", "geneval"],
        r"floating-point pixels",
        True,
    ),
    (
        "image-background-unknown",
        [*SCORE, "--reward", "geneval", "--background", "purple"],
        r"background 'purple' is not a colour",
        True,
    ),
    (
        "image-background-out-of-range",
        [*SCORE, "--reward", "geneval", "--background", "0,0,300"],
        r"background '0,0,300'",
        True,
    ),
    (
        "images-dir-missing",
        ["score", "{F}/noimgs", "--prompts", "{F}/circle.jsonl", "--reward", "geneval"],
        r"IMAGES_DIR .*noimgs' is not a directory",
        True,
    ),
    ("score-max-pixels-0", [*SCORE, "--reward", "geneval", "--max-pixels", "0"], r"--max-pixels", True),
    ("score-batch-size-0", [*SCORE, "--reward", "geneval", "--batch-size", "0"], r"--batch-size", True),
    # rewards
    ("reward-unknown", [*SCORE, "--reward", "nosuch"], r"unknown reward 'nosuch'.*Known rewards", True),
    (
        "reward-weight-nan",
        [*SCORE, "--reward", "geneval=nan"],
        r"weight of 'geneval' must be a finite nonzero number",
        True,
    ),
    ("reward-weight-zero", [*SCORE, "--reward", "geneval=0"], r"weight of 'geneval'.*got 0\.0", True),
    ("reward-weight-inf", [*SCORE, "--reward", "geneval=inf"], r"weight of 'geneval'", True),
    (
        "reward-weight-not-a-number",
        [*SCORE, "--reward", "geneval=high"],
        r"NAME=WEIGHT with a number weight",
        True,
    ),
    (
        "reward-given-twice",
        [*SCORE, "--reward", "geneval", "--reward", "geneval=2"],
        r"given more than once",
        True,
    ),
    (
        "reward-arg-malformed",
        [*SCORE, "--reward", "geneval", "--reward-arg", "bad"],
        r"--reward-arg 'bad' must look like NAME\.KEY=VALUE",
        True,
    ),
    (
        "reward-arg-unknown-key",
        [*SCORE, "--reward", "geneval", "--reward-arg", "geneval.nosuch=1"],
        r"reward 'geneval' has no argument\(s\) \['nosuch'\]; its arguments are",
        True,
    ),
    (
        "reward-arg-other-reward",
        [*SCORE, "--reward", "geneval", "--reward-arg", "ocr.lang=en"],
        r"reward\(s\) \['ocr'\] that are not among",
        True,
    ),
    (
        "reward-code-path-refused",
        [*SCORE, "--reward", "rewards.aesthetic:AestheticReward"],
        r"code path.*--allow-code",
        True,
    ),
    ("reward-code-path-not-a-reward", [*SCORE, "--allow-code", "--reward", "os:system"], r"os:system", True),
]


@pytest.mark.parametrize("argv,message,before_load", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_command_line_inputs_are_one_clear_line(files, monkeypatch, capsys, argv, message, before_load):
    import flowalign.models
    import flowalign.train.loop  # binds load_model at import: imported (and patched) here, so nothing leaks

    if before_load:

        def refuse(*args, **kwargs):
            raise AssertionError("the model was loaded before the bad input was refused")

        monkeypatch.setattr(flowalign.models, "load_model", refuse)
        monkeypatch.setattr(flowalign.train.loop, "load_model", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FLOWALIGN_DEBUG", raising=False)
    try:
        status = main([a.replace("{F}", str(files)) for a in argv])
    except SystemExit as exit:  # argparse's own refusal (a choice or type it knows): usage, then one line
        status = exit.code
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    # One line (a model that loads may print its progress bars first), no traceback.
    last = err.splitlines()[-1]
    argparse_error = re.match(r"usage: flowalign", err) and re.match(r"flowalign [\w -]+: error: ", last)
    assert (last.startswith("error: ") or argparse_error) and "Traceback" not in err, err
    assert not before_load or argparse_error or err.count("\n") == 0, err
    assert re.search(message, last), err


def test_the_corpus_covers_every_class_of_input():
    """At least 100 bad inputs with the config-value corpus, and every class the issue names."""
    from test_bad_inputs import CASES as CONFIG_CASES

    assert len(CASES) + len(CONFIG_CASES) >= 100
    ids = " ".join(c[0] for c in CASES)
    for kind in ("sample", "bench", "noise", "plan", "train", "prompts", "model", "lora", "image", "reward"):
        assert kind in ids, kind


# --- image conversion: explicit, exact ----------------------------------------------------------------------


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.shape == (3, 1, 5)
    expected = torch.tensor([0, 255, 256, 32768, 65535], dtype=torch.float64) / 65535
    assert torch.allclose(image[0, 0].double(), expected, atol=1e-7)
    assert torch.equal(image[0], image[2])


def test_transparency_is_composited_on_the_background_given_or_refused(tmp_path):
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with pytest.raises(ImageLoadError, match=r"has transparent pixels \(66\.7% of them\)"):
        load_image(tmp_path / "a.png")
    white = load_image(tmp_path / "a.png", background="white")
    a = 128 / 255
    expected = torch.tensor([[1.0, 1.0, 1 - a], [0.0, 1.0, 1 - a], [0.0, 1.0, 1.0]]).reshape(3, 1, 3)
    assert torch.allclose(white, expected, atol=1e-6)
    grey = load_image(tmp_path / "a.png", background="10,20,30")
    assert torch.allclose(grey[:, 0, 1], torch.tensor([10, 20, 30]) / 255.0, atol=1e-6)
    # Fully opaque RGBA is just RGB.
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    assert torch.equal(
        load_image(tmp_path / "b.png"), torch.from_numpy(rgba[..., :3]).permute(2, 0, 1) / 255.0
    )


def test_the_size_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("decoded an image over the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError, match=r"64x64 = 4096 pixels, over the limit of 4095"):
        load_image(tmp_path / "a.png", max_pixels=4095)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width x height`` RGB pixels (its data is one row): enough for Image.open."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x00" * 3 * width)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")
    )


def test_huge_and_odd_images_are_one_clear_error(tmp_path):
    _png_header_only(tmp_path / "huge.png", 20000, 20000)  # over Pillow's own bomb limit, too
    with pytest.raises(ImageLoadError, match=r"huge\.png' is 20000x20000 = 400000000 pixels, over the limit"):
        load_image(tmp_path / "huge.png")
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "t16.png", transparency=0)
    with pytest.raises(ImageLoadError, match="16-bit with a transparent colour"):
        load_image(tmp_path / "t16.png")
    Image.fromarray(np.array([[200]], dtype=np.int32), "I").save(tmp_path / "i32.tiff")
    with pytest.raises(ImageLoadError, match="32-bit integer pixels"):
        load_image(tmp_path / "i32.tiff")
