"""Pretrain the moving-shapes world's image-to-video model from scratch on procedurally generated videos.

``python -m flowalign.worlds.moving_shapes_pretrain --out runs/moving_shapes`` (the defaults are the shipped
model's recipe; run it again with the same ``--out`` to resume; ``--stop-at N`` / ``--time-limit S`` train
in parts).

**Objective**: conditional flow matching on the generated frames, as the shapes model
(:mod:`flowalign.worlds.shapes.pretrain`): for a true video's latent ``x0`` (:mod:`flowalign.models.moving_shapes`),
``x_sigma = (1 - sigma) x0 + sigma eps`` and the loss is the mean of ``|| v_theta - (eps - x0) ||^2`` over
frames 1..F-1 (frame 0 is given clean and its slot's velocity is exact). ``sigma`` is logit-normal
(SD3's ``rf/lognorm(0, 1)``). AdamW, warmup + cosine, gradient clipping, EMA (the exported weights),
caption dropout (the empty prompt, first frame kept) for classifier-free guidance.

**Data**: :class:`VideoStream` draws videos uniformly (:func:`flowalign.worlds.moving_shapes.sample_spec`)
and never one of the test split's (``assets/moving_shapes/prompts/test.jsonl``: same first frame, mover and
direction). Checkpoints, resume and export work as the shapes pretraining's (bitwise-exact resume);
``eval.jsonl`` records the periodic judge scores on the first ``eval_per_task`` test videos of each task.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowalign.models.moving_shapes import (
    MovingShapesAdapter,
    MovingShapesArchitecture,
    MovingShapesPipeline,
    build_moving_shapes_pipeline,
)
from flowalign.samplers.paths import FlowPath
from flowalign.worlds.moving_shapes import render_video, sample_spec, spec_record
from flowalign.worlds.shapes.pretrain import _resume, lr_factor, sample_sigmas, train_loop

__all__ = ["VideoPretrainConfig", "VideoStream", "main", "pretrain_video"]

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "moving_shapes" / "prompts"


@dataclass(frozen=True)
class VideoPretrainConfig:
    """Everything that determines the trained weights (``<out>/config.json``); fields as the shapes
    pretraining's :class:`~flowalign.worlds.shapes.pretrain.PretrainConfig`, plus ``eval_per_task`` test
    videos per task and the evaluation sampler's ``eval_steps`` / ``eval_guidance``."""

    steps: int = 4000
    batch_size: int = 32
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigma_shift: float = 1.0
    seed: int = 0
    architecture: MovingShapesArchitecture = field(default_factory=MovingShapesArchitecture)
    checkpoint_every: int = 250
    eval_every: int = 500
    log_every: int = 50
    eval_per_task: int = 24
    eval_steps: int = 10
    eval_guidance: float = 1.0
    keep_checkpoints: int = 2

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VideoPretrainConfig:
        data = dict(data)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown pretraining config keys {unknown}.")
        arch = {
            k: tuple(v) if isinstance(v, list) else v for k, v in (data.pop("architecture", {}) or {}).items()
        }
        return cls(architecture=MovingShapesArchitecture(**arch), **data)


def _key(record: dict[str, Any]) -> str:
    return json.dumps([record["scene"], record["mover"], record["direction"]])


def test_keys() -> set[str]:
    """The test split's videos (first frame, mover, direction), which training never draws."""
    path = PROMPTS_DIR / "test.jsonl"
    if not path.is_file():
        return set()
    return {_key(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}


class VideoStream:
    """An endless stream of true videos with their prompts, from one numpy generator (state saved as JSON)."""

    def __init__(self, seed: int, excluded: set[str] | None = None):
        self.rng = np.random.default_rng(seed)
        self.excluded = test_keys() if excluded is None else excluded

    def next_batch(self, n: int) -> tuple[list[str], torch.Tensor]:
        prompts, videos = [], []
        while len(videos) < n:
            spec = sample_spec(self.rng)
            record = spec_record(spec)
            if _key(record) in self.excluded:
                continue
            prompts.append(record["prompt"])
            videos.append(render_video(spec))
        return prompts, torch.stack(videos)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def video_flow_matching_loss(pipeline: MovingShapesPipeline, videos, prompts, sigmas, noise, unet=None):
    """Mean ``|| v_theta - (eps - x0) ||^2`` over the generated frames (frame 0 is the clean condition)."""
    path = FlowPath()
    x0 = pipeline.to_latents(videos)
    x_sigma = path.noised(x0, sigmas, noise)
    embeds = pipeline.encode_prompt(prompts)
    velocity = pipeline.velocity(unet or pipeline.unet, x_sigma, path.timestep(sigmas), x0[:, :, 0], embeds)
    return F.mse_loss(velocity[:, :, 1:], path.target(x0, noise, sigmas)[:, :, 1:])


def _trained(pipeline: MovingShapesPipeline) -> nn.ModuleDict:
    return nn.ModuleDict({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder})


def _pipeline_with(pipeline: MovingShapesPipeline, modules: nn.ModuleDict) -> MovingShapesPipeline:
    return MovingShapesPipeline(
        unet=modules["unet"], text_encoder=modules["text_encoder"], tokenizer=pipeline.tokenizer,
        scheduler=pipeline.scheduler, patch_size=pipeline.patch_size, num_frames=pipeline.num_frames,
    )  # fmt: skip


def _export(out: Path, pipeline: MovingShapesPipeline, ema: nn.ModuleDict) -> Path:
    final, tmp = out / "pipeline", out / "pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _pipeline_with(pipeline, ema).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def eval_records(per_task: int) -> list[dict[str, Any]]:
    """The first ``per_task`` test records of each task, with absolute image paths."""
    from flowalign.data.prompts import load_prompt_set

    chosen, seen = [], {}
    for record in load_prompt_set(PROMPTS_DIR / "test.jsonl"):
        tag = record.metadata["tag"]
        if seen.get(tag, 0) < per_task:
            chosen.append({"prompt": record.prompt, **record.metadata})
            seen[tag] = seen.get(tag, 0) + 1
    return chosen


def _evaluate(
    out: Path, pipeline, ema, config: VideoPretrainConfig, step: int, elapsed: float
) -> dict[str, Any]:
    from flowalign.eval.video import run_video_bench

    start = time.perf_counter()
    adapter = MovingShapesAdapter(_pipeline_with(pipeline, ema), cache_size=0)
    report = run_video_bench(
        adapter, eval_records(config.eval_per_task), steps=config.eval_steps, guidance=config.eval_guidance
    )
    row = {"step": step, "elapsed_s": round(elapsed, 1), "eval_s": round(time.perf_counter() - start, 1)}
    for metric, stats in report.stats.items():
        row[metric] = round(stats.overall.estimate, 4)
        row[f"{metric}_tasks"] = {k: round(t.accuracy.estimate, 4) for k, t in stats.tasks.items()}
    with (out / "eval.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    ema.train(False)
    return row


def pretrain_video(
    config: VideoPretrainConfig,
    out_dir: str | Path,
    *,
    stop_at: int | None = None,
    time_limit_s: float | None = None,
    progress: bool = True,
    should_stop=None,
) -> int:
    """Train (or resume) the run in ``out_dir``; returns the step reached. See the module docstring."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    if config_path.exists():
        if VideoPretrainConfig.from_json(json.loads(config_path.read_text())) != config:
            raise ValueError(
                f"{out} holds a run with a different config; resume with the same settings or use a new --out."
            )
    else:
        config_path.write_text(json.dumps(config.to_json(), indent=1) + "\n")
    pipeline = build_moving_shapes_pipeline(config.architecture, seed=config.seed)
    model = _trained(pipeline)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))
    generator = torch.Generator().manual_seed(config.seed + 1)
    stream = VideoStream(config.seed + 2)
    step, elapsed_before = _resume(out, model, ema, optimizer, scheduler, generator, stream)

    def loss_of_next_batch() -> torch.Tensor:
        prompts, videos = stream.next_batch(config.batch_size)
        drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        prompts = ["" if d else p for d, p in zip(drop.tolist(), prompts)]
        noise = torch.randn(
            (config.batch_size, *pipeline.to_latents(videos[:1]).shape[1:]), generator=generator
        )
        sigmas = sample_sigmas(config, config.batch_size, generator)
        return video_flow_matching_loss(pipeline, videos, prompts, sigmas, noise)

    def evaluate(step: int, elapsed: float) -> tuple[dict, str]:
        row = _evaluate(out, pipeline, ema, config, step, elapsed)
        return (
            row,
            f"step {step}: identity {row['identity']:.3f} motion {row['motion']:.3f} correct {row['correct']:.3f}",
        )

    step, _ = train_loop(
        config, out, loss_of_next_batch, (model, ema, optimizer, scheduler, generator, stream), step, elapsed_before,
        target=config.steps if stop_at is None else min(stop_at, config.steps),
        export=lambda: _export(out, pipeline, ema), evaluate=evaluate, desc="pretrain video", progress=progress,
        time_limit_s=time_limit_s, should_stop=should_stop,
    )  # fmt: skip
    return step


def write_split(name: str = "test", per_task: int = 96, seed: int = 1000) -> Path:
    """``assets/moving_shapes/prompts/<name>.jsonl`` and its first frames: ``per_task`` videos of each task.
    The shipped splits: ``test`` (96 per task, seed 1000; pretraining never draws them) and ``train`` (128 per
    task, seed 2000, none of them a test video) for alignment runs."""
    from flowalign.worlds.moving_shapes import write_prompt_set

    rng = np.random.default_rng(seed)
    excluded = test_keys() if name != "test" else set()
    specs = []
    for n in (1, 2):
        count = 0
        while count < per_task:
            spec = sample_spec(rng, n_objects=n)
            if _key(spec_record(spec)) in excluded:
                continue
            specs.append(spec)
            count += 1
    return write_prompt_set(PROMPTS_DIR, specs, name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory (resumed when it exists)")
    parser.add_argument("--stop-at", type=int, default=None, help="stop after this step (train in parts)")
    parser.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--steps", type=int, default=None, help="total steps (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = VideoPretrainConfig() if args.steps is None else VideoPretrainConfig(steps=args.steps)
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    step = pretrain_video(
        config, args.out, stop_at=args.stop_at, time_limit_s=args.time_limit, should_stop=lambda: stop["now"]
    )
    print(f"stopped at step {step} of {config.steps}; the EMA pipeline is in {Path(args.out) / 'pipeline'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
