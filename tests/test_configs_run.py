"""Every shipped config under configs/ trains one iteration, checkpoints and (where it evaluates) evaluates,
on its model family's tiny random model.

Each config keeps all of its settings except what only points at the user's machine or scales the cost:

- ``model.path`` -> ``tiny-<family>`` (``model.resolution=32``; ``tiny-wan22`` for a Wan 2.2 config);
  ``tiny-*`` and the shipped ``shapes`` and ``moving_shapes`` models are kept as they are;
- batch sizes (``data.group_size``, ``data.groups_per_step``, ``grpo/nft.minibatch_size``,
  ``dpo.pairs_per_step``, ``sft.batch_size``, ``dmd.regression_pairs``) capped small;
- ``/path/...`` data files (train/eval prompts, DPO pair files) -> shipped files of the same kind or small
  files written to a tmp dir (image-to-video records with face pools: scikit-image's astronaut);
  ``/path/...`` weights (aesthetic head, CLIP, PickScore, Mask2Former, a face embedder) -> tiny random weights
  written once per module (tests/tiny_weights.py);
- ``train.steps=1``, ``train.output_dir=<tmp>``, ``train.log_with=[]``, ``train.progress=false``,
  ``train.checkpoint_every=1``; a config that evaluates does so once, after its iteration
  (``eval.every=1``, ``eval.at_start=false``);
- ``train.mixed_precision: fp16`` -> ``no``: the loop refuses fp16 without CUDA (accelerate would silently
  ignore it on the CPU); ``bf16`` is kept.

For time only (noted where applied): GenEval evaluations are measured on fewer images
(``eval.images_per_task`` lowered to ``eval.images_per_prompt``; ``eval.max_prompts`` capped for the
553-prompt GenEval file and the tmp prompt files). Sampling and evaluation step counts are kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from shipped_configs import CONFIG_IDS, CONFIGS, PLACEHOLDER_FILES
from tiny_weights import write_pair_file

from flowalign.config import load_config, to_yaml
from flowalign.train import train

ROOT = Path(__file__).resolve().parents[1]
GENEVAL_METADATA = "assets/geneval/evaluation_metadata.jsonl"  # real GenEval classes (COCO)
PLACEHOLDER = "/path/"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny models are overhead-bound: one intra-op thread runs them about as fast as several, and
    avoids the stalls of oversubscribed threads on a busy shared machine (observed: 4 s -> 120 s for one
    shapes config on 2 cores with another process running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each config is a run of its own, as `flowalign train` starts it in a fresh process. accelerate keeps
    one process-wide AcceleratorState and refuses a second Accelerator with another mixed_precision (a bf16
    config after a "no" one) in the same process, so the state is reset around every run (as accelerate's
    own test cases do)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# --- tiny weights and data files, each built once per module, only when a config asks for it ----------


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A transformers CLIPModel directory (aesthetic's CLIP, PickScore's model and processor)."""
    from tiny_weights import save_tiny_transformers_clip

    return save_tiny_transformers_clip(tmp_path_factory.mktemp("hf-clip"))


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    """An open_clip local-dir: the GenEval colour classifier's default backend is open_clip."""
    from tiny_weights import save_tiny_open_clip

    return save_tiny_open_clip(tmp_path_factory.mktemp("open-clip"))


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    from tiny_weights import PROJECTION_DIM, save_tiny_aesthetic_head

    # The head's input is the CLIP's projected embedding (16 for the tiny CLIP, 768 for ViT-L/14).
    return save_tiny_aesthetic_head(tmp_path_factory.mktemp("aesthetic") / "head.pth", PROJECTION_DIM)


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory):
    from tiny_weights import save_tiny_mask2former

    return save_tiny_mask2former(tmp_path_factory.mktemp("mask2former"))  # GenEval's 80 COCO labels


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    """Small prompt files standing in for the user's: plain prompts, and OCR prompts with quoted text."""
    directory = tmp_path_factory.mktemp("prompts")
    plain = ["a photo of a cat", "a red bicycle by a lake", "an astronaut riding a horse", "a bowl of fruit"]
    ocr = ['a sign that says "hello"', 'a poster reading "open 24 hours"', 'a mug with the word "flow"']
    (directory / "plain.txt").write_text("\n".join(plain) + "\n")
    (directory / "ocr.txt").write_text("\n".join(ocr) + "\n")
    return {"plain": directory / "plain.txt", "ocr": directory / "ocr.txt"}


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """A DPO pair file: two pairs of random 32x32 PNGs next to it (tests/test_dpo.py's layout)."""
    directory = tmp_path_factory.mktemp("pairs")
    write_pair_file(directory, ["a photo of a cat", "a red bicycle by a lake"])
    return directory / "pairs.jsonl"


@pytest.fixture(scope="module")
def identity_videos(tmp_path_factory):
    """IPRO's data: first frames with reference face pools (scikit-image's astronaut), and a tiny TorchScript
    face embedder for ArcFace."""
    pytest.importorskip("dlib")
    pytest.importorskip("skimage")
    from tiny_weights import save_tiny_face_embedder, write_identity_videos

    directory = tmp_path_factory.mktemp("identity")
    return write_identity_videos(directory), save_tiny_face_embedder(directory / "embedder.pt")


# --- per-config substitutions of the user's files ------------------------------------------------------


def _aesthetic(get) -> list[str]:
    return [
        f"reward.aesthetic.args.clip_path={get('hf_clip_dir')}",
        f"reward.aesthetic.args.head_path={get('aesthetic_head')}",
    ]


def _geneval_mask2former(get) -> list[str]:
    """The GenEval reward's and the evaluation's Mask2Former + CLIP colour classifier (open_clip backend,
    as the configs leave it), and GenEval metadata with real COCO classes for training prompts."""
    m2f, clip = get("mask2former_dir"), get("open_clip_dir")
    return [
        f"data.train_prompts={GENEVAL_METADATA}",
        f"reward.geneval.args.detector_kwargs.model_path={m2f}",
        f"reward.geneval.args.detector_kwargs.clip_path={clip}",
        f"eval.detector_args.model_path={m2f}",
        f"eval.detector_args.clip_path={clip}",
        "eval.max_prompts=2",  # for time: 2 of the 553 GenEval prompts (the file itself is kept)
    ]


FILES = {
    "backprop/sd15_aesthetic_alignprop.yaml": lambda get: [
        f"data.train_prompts={get('prompt_files')['plain']}",
        *_aesthetic(get),
    ],
    "backprop/sd35m_aesthetic_draft.yaml": lambda get: [
        f"data.train_prompts={get('prompt_files')['plain']}",
        *_aesthetic(get),
    ],
    "backprop/wan22_i2v_ipro.yaml": lambda get: [
        "model.path=tiny-wan22",  # the family's two-expert (Wan 2.2) tiny model
        f"data.train_prompts={get('identity_videos')[0]}",
        f"reward.identity.args.embedder_path={get('identity_videos')[1]}",
    ],
    "dmd/sd35m_4step.yaml": lambda get: [f"data.train_prompts={get('prompt_files')['plain']}"],
    "dmd/sd35m_4step_acdmd.yaml": lambda get: [f"data.train_prompts={get('prompt_files')['plain']}"],
    "dmd/sdxl_1step.yaml": lambda get: [f"data.train_prompts={get('prompt_files')['plain']}"],
    "dmd/sdxl_4step.yaml": lambda get: [f"data.train_prompts={get('prompt_files')['plain']}"],
    "dmd/wan21_i2v_4step.yaml": lambda get: [
        "data.train_prompts=assets/video/tiny/prompts.jsonl"
    ],  # first frames
    "dpo/sd15_diffusion_dpo.yaml": lambda get: [f"dpo.pairs={get('pair_file')}"],
    "dpo/sd35m_flow_dpo_online.yaml": _geneval_mask2former,
    "dpo/sdxl_diffusion_dpo.yaml": lambda get: [f"dpo.pairs={get('pair_file')}"],
    "grpo/flux_pref.yaml": lambda get: [
        f"data.train_prompts={get('prompt_files')['plain']}",
        f"eval.prompts={get('prompt_files')['plain']}",
        "eval.max_prompts=2",  # for time
        f"reward.winrate.args.judge_kwargs.model_path={get('hf_clip_dir')}",
        f"reward.winrate.args.judge_kwargs.processor_path={get('hf_clip_dir')}",
    ],
    "grpo/sd15_aesthetic_ddpo.yaml": lambda get: [
        f"data.train_prompts={get('prompt_files')['plain']}",
        *_aesthetic(get),
    ],
    "grpo/sd35m_geneval.yaml": _geneval_mask2former,
    "grpo/sd35m_ocr.yaml": lambda get: [
        f"data.train_prompts={get('prompt_files')['ocr']}",
        f"eval.prompts={get('prompt_files')['ocr']}",
        "eval.max_prompts=2",  # for time
    ],
    "nft/sd35m_geneval.yaml": _geneval_mask2former,
}


def _cap(overrides: list[str], key: str, value: int, cap: int) -> None:
    if value > cap:
        overrides.append(f"{key}={cap}")


def _overrides(config, get, output_dir: Path, name: str) -> list[str]:
    t, d, e = config.train, config.data, config.eval
    out = [
        f"train.output_dir={output_dir}",
        "train.steps=1",
        "train.log_with=[]",
        "train.progress=false",
        "train.checkpoint_every=1",
    ]
    if t.mixed_precision == "fp16":
        out.append("train.mixed_precision=no")  # the loop refuses fp16 without CUDA; bf16 is kept
    m = config.model
    if m.path not in ("shapes", "moving_shapes") and not m.path.startswith("tiny-"):
        out += [f"model.path=tiny-{m.family}", "model.resolution=32"]
    # Batch sizes. Online DPO mining several rank pairs per group keeps groups big enough for all of them.
    online_dpo = t.algorithm == "dpo" and config.dpo.pairs == "online"
    group = 2 * config.dpo.pairs_per_group if online_dpo else 2
    _cap(out, "data.group_size", d.group_size, group)
    _cap(out, "data.groups_per_step", d.groups_per_step, 1 if group > 2 else 2)
    _cap(out, "grpo.minibatch_size", config.grpo.minibatch_size, 2)
    _cap(out, "nft.minibatch_size", config.nft.minibatch_size, 2)
    _cap(out, "dpo.pairs_per_step", config.dpo.pairs_per_step, 2)
    _cap(out, "sft.batch_size", config.sft.batch_size, 4)
    _cap(out, "dmd.regression_pairs", config.dmd.regression_pairs, 8)
    if evaluates(config):
        out += ["eval.every=1", "eval.at_start=false"]
        if e.images_per_task is not None and e.images_per_task > e.images_per_prompt:
            # for time: one prompt per GenEval task (still every task) instead of 16 or 32 images per task
            out.append(f"eval.images_per_task={e.images_per_prompt}")
    out += FILES.get(name, lambda get: [])(get)
    return out


def evaluates(config) -> bool:
    return bool(config.eval.prompts) and config.eval.every > 0


def _loss_like(key: str) -> bool:
    return "loss" in key or key == "kl" or key.endswith("_kl") or key.startswith("kl_")


# What the overrides may change; every other setting must stay the config's own.
CHANGEABLE = {
    "model.path", "model.resolution",
    "data.train_prompts", "data.group_size", "data.groups_per_step",
    "grpo.minibatch_size", "nft.minibatch_size", "dpo.pairs_per_step", "dpo.pairs", "sft.batch_size",
    "dmd.regression_pairs",
    "eval.prompts", "eval.every", "eval.at_start", "eval.max_prompts", "eval.images_per_task",
    "train.steps", "train.output_dir", "train.log_with", "train.progress", "train.checkpoint_every",
    "train.mixed_precision",
}  # fmt: skip


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _changed(original, config) -> set[str]:
    before = _flat(OmegaConf.to_container(OmegaConf.structured(original)))
    after = _flat(OmegaConf.to_container(OmegaConf.structured(config)))
    return {k for k in before.keys() | after.keys() if before.get(k, "<unset>") != after.get(k, "<unset>")}


def _is_weight_path(key: str) -> bool:
    """A reward's or the evaluation detector's user weights (clip_path, head_path, model_path, ...)."""
    return key.endswith("_path") and (key.startswith("reward.") or key.startswith("eval.detector_args."))


# Configs that cannot run because of a product bug: {config: reason naming the bug}. Empty when all run.
XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_trains_one_iteration(path, tmp_path, request):
    name = str(path.relative_to(ROOT / "configs"))
    if name in XFAIL:
        pytest.xfail(XFAIL[name])
    files = PLACEHOLDER_FILES.get(name, [])
    original = load_config(path, files)
    output_dir = tmp_path / "run"
    config = load_config(path, files + _overrides(original, request.getfixturevalue, output_dir, name))
    assert PLACEHOLDER not in to_yaml(config), f"{name}: a /path/... placeholder was left unsubstituted"
    kept = {k for k in _changed(original, config) if k not in CHANGEABLE and not _is_weight_path(k)}
    assert not kept, f"{name}: the overrides changed settings they must keep: {sorted(kept)}"
    if config.train.mixed_precision != original.train.mixed_precision:
        assert (original.train.mixed_precision, config.train.mixed_precision) == ("fp16", "no")

    result = train(config)

    assert result.steps_done == 1 and not result.interrupted
    checkpoint = output_dir / "checkpoints" / "step-000001"
    assert (checkpoint / "trainable.safetensors").is_file(), f"no checkpoint in {checkpoint}"
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1]
    logged = {k: v for row in rows for k, v in row.items()}
    assert "skipped_nonfinite_reward" not in logged, logged
    losses = {k: v for k, v in logged.items() if _loss_like(k)}
    # An online-DPO iteration whose groups all tie under the reward mines no pair and logs no loss (the
    # random Mask2Former of the SD3.5 GenEval config detects nothing, so every strict reward is 0).
    assert losses or logged.get("skipped_no_pairs") == 1.0, f"no loss logged: {sorted(logged)}"
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    assert not bad, f"non-finite loss-like metrics: {bad}"
    if "skipped_updates" in logged:  # an optimizer step was due: its gradient was finite and applied
        assert logged["skipped_updates"] == 0.0 and math.isfinite(logged["grad_norm"]), logged
    if evaluates(original):
        assert any(k.startswith("eval/") for k in logged), f"no eval/ metric logged: {sorted(logged)}"
