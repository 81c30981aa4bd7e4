"""Pretrain the shapes world's text-to-image flow model from scratch on procedurally generated scenes.

``python -m flowalign.worlds.shapes.pretrain --out runs/shapes`` (the defaults are the shipped model's recipe) (run it again with the same
``--out`` to resume; ``--stop-at N`` or ``--time-limit S`` to train in parts).

**Objective** (rectified flow / conditional flow matching; Liu et al. 2022, Lipman et al. 2022, in the
parameterization of SD3, Esser et al. 2024, Eq. 1-3): for a pixel-space latent ``x0`` (see
:mod:`flowalign.models.shapes`), ``eps ~ N(0, I)`` and ``sigma ~ p(sigma)``,
``x_sigma = (1 - sigma) x0 + sigma eps`` and the loss is ``|| v_theta(x_sigma, 1000 sigma, c) - (eps - x0) ||^2``
(mean over pixels and batch). ``sigma`` is drawn from the logit-normal ``sigmoid(N(m, s^2))`` (SD3's
"rf/lognorm(0, 1)", its best sampler in Table 1) or uniformly (``--sigma-sampling uniform``): see the
model card for which one the shipped model uses and the measurement that chose it.

**Recipe pieces**: AdamW with linear warmup and cosine decay to ``min_lr_ratio``; gradient-norm clipping;
EMA of the weights with the usual ``min(decay, (1 + n) / (10 + n))`` warm-up; caption dropout (the
caption replaced by the empty prompt) so that classifier-free guidance works (Ho & Salimans 2022).

**Data**: :class:`flowalign.worlds.shapes.data.SceneStream` (GenEval-schema captions from the world's
templates, scenes from :func:`sample_scene`; never a held-out (shape, colour) pair).

**Checkpoints** ``<out>/checkpoints/step-<N>/`` hold the weights and the EMA (safetensors), the optimizer
and LR-schedule state (``torch.load(weights_only=True)``), the torch generator state, the data stream's
numpy state and the step; they are written to a temporary directory and renamed into place. Resuming
continues exactly: ``N`` steps in one go and ``N/2`` + resume + ``N/2`` give bitwise-identical weights on a
CPU. SIGTERM/SIGINT save a checkpoint and exit. ``<out>/pipeline/`` is the EMA model exported with
``save_pretrained`` at every checkpoint; ``log.jsonl`` and ``eval.jsonl`` record the losses and the periodic
GenEval evaluations (:func:`flowalign.eval.geneval.run_geneval` on a fixed subset of the test prompts).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flowalign.models.shapes import ShapesAdapter, ShapesArchitecture, ShapesPipeline, build_shapes_pipeline
from flowalign.samplers.paths import FlowPath
from flowalign.samplers.schedules import shift_sigmas
from flowalign.worlds.shapes.data import SceneStream

__all__ = ["PretrainConfig", "PretrainResult", "main", "pretrain"]

_PROMPTS_DIR = Path(__file__).resolve().parents[3] / "assets" / "shapes" / "prompts"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the trained weights (saved as ``<out>/config.json``).

    Attributes:
        steps: total optimizer steps (the LR schedule's horizon).
        batch_size: images per step.
        lr, min_lr_ratio, warmup_steps: AdamW peak LR, cosine floor (fraction of ``lr``), linear warmup.
        weight_decay, beta1, beta2, grad_clip: AdamW and gradient-norm clipping.
        ema_decay: EMA decay (with warm-up).
        caption_dropout: probability of training a sample on the empty prompt.
        sigma_sampling: ``"logit_normal"`` (``sigmoid(N(logit_mean, logit_std^2))``) or ``"uniform"``.
        sigma_shift: SD3's timestep shift applied to the drawn sigmas, ``s' = k s / (1 + (k - 1) s)``
            (Esser et al. 2024, Eq. 23): ``k > 1`` trains more at high noise.
        task_weights: sampling weight of each GenEval task (TASKS order), None = uniform.
        seed: seeds the model init, the data stream and the training generator.
        architecture: the network sizes.
        checkpoint_every, eval_every, log_every: in steps (0 disables eval).
        eval_prompts_per_task, eval_images_per_prompt: the quick evaluation's subset of the test split.
        eval_steps, eval_guidance: its sampler settings (None: the adapter's defaults).
        keep_checkpoints: how many recent checkpoints to keep.
    """

    steps: int = 8000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    sigma_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigma_shift: float = 3.0
    task_weights: tuple[float, ...] | None = None
    seed: int = 0
    architecture: ShapesArchitecture = field(default_factory=ShapesArchitecture)
    checkpoint_every: int = 500
    eval_every: int = 1000
    log_every: int = 50
    eval_prompts_per_task: int = 4
    eval_images_per_prompt: int = 4
    eval_steps: int | None = None
    eval_guidance: float | None = None
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.sigma_sampling not in ("logit_normal", "uniform"):
            raise ValueError(
                f"sigma_sampling must be 'logit_normal' or 'uniform', got {self.sigma_sampling!r}."
            )
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}.")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PretrainConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown pretraining config keys {unknown}; known keys: {sorted(known)}.")
        arch = data.pop("architecture", {}) or {}
        arch = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
        if data.get("task_weights") is not None:
            data["task_weights"] = tuple(data["task_weights"])
        return cls(architecture=ShapesArchitecture(**arch), **data)


@dataclass
class PretrainResult:
    """The outcome of :func:`pretrain`: ``step`` reached, ``finished`` (all ``config.steps`` done), the
    exported ``pipeline_dir``, the session's and the run's cumulative wall time, the last evaluation."""

    step: int
    finished: bool
    pipeline_dir: Path | None
    session_time_s: float
    total_time_s: float
    last_eval: dict[str, Any] | None


# --- pieces -------------------------------------------------------------------------------------------


def sample_sigmas(config: PretrainConfig, batch: int, generator: torch.Generator) -> Tensor:
    """``[batch]`` training noise levels in ``(0, 1)`` on the generator's device (see the module docstring)."""
    device = generator.device
    if config.sigma_sampling == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=device)
    else:
        normal = torch.randn(batch, generator=generator, device=device)
        sigmas = torch.sigmoid(config.logit_mean + config.logit_std * normal)
    return shift_sigmas(sigmas, config.sigma_shift) if config.sigma_shift != 1 else sigmas


def flow_matching_loss(
    pipeline: ShapesPipeline,
    x0: Tensor,
    captions: list[str],
    sigmas: Tensor,
    noise: Tensor,
    unet: nn.Module | None = None,
) -> Tensor:
    """``mean || v_theta(x_sigma, 1000 sigma, c) - (eps - x0) ||^2`` with ``x_sigma = (1 - sigma) x0 + sigma eps``.

    ``unet``: the velocity network to call, ``pipeline.unet`` by default; the training loop passes its
    accelerate-prepared wrapper of the same (LoRA-adapted) UNet (:mod:`flowalign.train.sft`)."""
    path = FlowPath()
    x_sigma = path.noised(x0, sigmas, noise)
    embeds = pipeline.encode_prompt(captions)
    net = pipeline.unet if unet is None else unet
    velocity = net(x_sigma, path.timestep(sigmas), encoder_hidden_states=embeds, return_dict=False)[0]
    return F.mse_loss(velocity, path.target(x0, noise, sigmas))


def lr_factor(config: PretrainConfig, step: int) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``config.steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _trained(pipeline: ShapesPipeline) -> nn.ModuleDict:
    return nn.ModuleDict({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder})


@torch.no_grad()
def _ema_update(ema: nn.ModuleDict, model: nn.ModuleDict, decay: float) -> None:
    ema_params = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)


def _eval_prompts(per_task: int) -> list[dict[str, Any]]:
    from flowalign.worlds.shapes.prompts import load_prompts

    prompts = load_prompts(_PROMPTS_DIR / "test.jsonl")
    chosen, seen = [], {}
    for m in prompts:  # the first `per_task` prompts of each task, in file order
        if seen.get(m["tag"], 0) < per_task:
            chosen.append(m)
            seen[m["tag"]] = seen.get(m["tag"], 0) + 1
    return chosen


def evaluate_pipeline(pipeline: ShapesPipeline, config: PretrainConfig, progress: bool = False):
    """The quick evaluation: :func:`run_geneval` on the fixed test subset (returns its report)."""
    from flowalign.eval.geneval import run_geneval

    adapter = ShapesAdapter(pipeline, cache_size=0)
    return run_geneval(
        adapter, _eval_prompts(config.eval_prompts_per_task), images_per_prompt=config.eval_images_per_prompt,
        steps=config.eval_steps, guidance=config.eval_guidance, seed=0, progress=progress,
    )  # fmt: skip


# --- checkpoints ----------------------------------------------------------------------------------------


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def _save_checkpoint(
    out: Path, step: int, model, ema, optimizer, scheduler, generator, stream, elapsed: float, keep: int
):
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
        },
        tmp / "optimizer.pt",
    )
    (tmp / "state.json").write_text(
        json.dumps({"step": step, "elapsed_s": elapsed, "data_rng": stream.state()})
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _export(out: Path, pipeline: ShapesPipeline, ema: nn.ModuleDict) -> Path:
    """Save the EMA weights as a diffusers pipeline directory ``<out>/pipeline`` (atomically)."""
    exported = ShapesPipeline(
        unet=ema["unet"], text_encoder=ema["text_encoder"], tokenizer=pipeline.tokenizer,
        scheduler=pipeline.scheduler, patch_size=pipeline.patch_size,
    )  # fmt: skip
    final, tmp = out / "pipeline", out / "pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    exported.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _resume(out: Path, model, ema, optimizer, scheduler, generator, stream) -> tuple[int, float]:
    """Load the run's latest checkpoint into the training state (in place); returns ``(step, elapsed_s)``,
    ``(0, 0.0)`` for a fresh run. Shared with the moving-shapes video pretraining."""
    checkpoints = _checkpoints(out)
    if not checkpoints:
        return 0, 0.0
    ckpt = checkpoints[-1]
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    ema.load_state_dict(load_file(ckpt / "ema.safetensors"))
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["lr_scheduler"])
    generator.set_state(opt_state["generator"])
    state = json.loads((ckpt / "state.json").read_text())
    stream.set_state(state["data_rng"])
    print(
        f"resumed from {ckpt} (step {state['step']}, {state['elapsed_s'] / 60:.1f} min trained)",
        file=sys.stderr,
    )
    return state["step"], state["elapsed_s"]


def _update(loss: Tensor, model, ema, optimizer, scheduler, config, step: int) -> Tensor:
    """One optimizer step on ``loss`` (gradient clipping, a non-finite loss or norm is an error), the LR
    schedule and the EMA (with its warm-up); returns the gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    if not torch.isfinite(loss) or not torch.isfinite(grad_norm):
        raise FloatingPointError(
            f"non-finite loss {loss.item()} or gradient norm at step {step}; lower --lr."
        )
    optimizer.step()
    scheduler.step()
    _ema_update(ema, model, min(config.ema_decay, (2 + step) / (11 + step)))
    return grad_norm


def train_loop(
    config,
    out: Path,
    loss_of_next_batch,
    state,
    step: int,
    elapsed_before: float,
    *,
    target: int,
    export,
    evaluate,
    desc: str,
    progress: bool,
    time_limit_s: float | None,
    should_stop,
) -> tuple[int, dict | None]:
    """The pretraining loop shared by the shapes and moving-shapes models: from ``step`` to ``target``, each
    step ``loss_of_next_batch()`` and :func:`_update`; ``log.jsonl`` every ``log_every`` steps; a checkpoint
    (and ``export()``) every ``checkpoint_every`` steps and when stopping (``target``, ``time_limit_s``,
    ``should_stop()``); ``evaluate(step, elapsed) -> (row, text)`` every ``eval_every`` steps and at the end.
    ``state`` is ``(model, ema, optimizer, scheduler, generator, stream)``. Returns the step reached and the
    last evaluation's row."""
    from tqdm.auto import tqdm

    model, ema, optimizer, scheduler, generator, stream = state
    session_start = time.perf_counter()
    last_eval = None
    loss_sum, loss_n = 0.0, 0
    bar = tqdm(total=config.steps, initial=step, desc=desc, unit="step", disable=not progress, mininterval=5)
    try:
        with (out / "log.jsonl").open("a") as log:
            while step < target:
                loss = loss_of_next_batch()
                grad_norm = _update(loss, model, ema, optimizer, scheduler, config, step)
                step += 1
                loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
                bar.update(1)
                elapsed = elapsed_before + time.perf_counter() - session_start
                if step % config.log_every == 0:
                    row = {"step": step, "loss": loss_sum / loss_n, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm), "elapsed_s": round(elapsed, 1)}  # fmt: skip
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                    loss_sum, loss_n = 0.0, 0
                stopping = (
                    step >= target
                    or (time_limit_s is not None and time.perf_counter() - session_start >= time_limit_s)
                    or (should_stop is not None and should_stop())
                )
                if step % config.checkpoint_every == 0 or stopping:
                    _save_checkpoint(
                        out,
                        step,
                        model,
                        ema,
                        optimizer,
                        scheduler,
                        generator,
                        stream,
                        elapsed,
                        config.keep_checkpoints,
                    )
                    if export is not None:
                        export()
                if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                    last_eval, text = evaluate(step, elapsed)
                    bar.write(text)
                if stopping:
                    break
    finally:
        bar.close()
    return step, last_eval


# --- the loop -----------------------------------------------------------------------------------------


def pretrain(
    config: PretrainConfig,
    out_dir: str | Path,
    *,
    stop_at: int | None = None,
    time_limit_s: float | None = None,
    progress: bool = True,
    export: bool = True,
    should_stop=None,
) -> PretrainResult:
    """Train (or resume) the run in ``out_dir`` up to ``config.steps`` steps (see the module docstring).

    ``stop_at``: stop after this step (a checkpoint is written), to train in parts. ``time_limit_s``: stop
    (with a checkpoint) once this session has run that long. ``should_stop()``: polled after every step
    (the CLI's signal handler). A run directory holding a different config is an error.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    if config_path.exists():
        stored = PretrainConfig.from_json(json.loads(config_path.read_text()))
        if stored != config:
            diff = {
                k: (v, config.to_json()[k]) for k, v in stored.to_json().items() if config.to_json()[k] != v
            }
            raise ValueError(
                f"{out} holds a run with a different config ({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in diff.items())}); "
                "resume with the same settings or choose a new --out."
            )
    else:
        config_path.write_text(json.dumps(config.to_json(), indent=1) + "\n")

    torch.set_num_threads(2)
    pipeline = build_shapes_pipeline(config.architecture, seed=config.seed)
    model = _trained(pipeline)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))
    generator = torch.Generator().manual_seed(config.seed + 1)
    stream = SceneStream(config.seed + 2, config.task_weights)
    step, elapsed_before = _resume(out, model, ema, optimizer, scheduler, generator, stream)

    def loss_of_next_batch() -> Tensor:
        batch = stream.next_batch(config.batch_size)
        drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        captions = ["" if d else c for d, c in zip(drop.tolist(), batch.captions)]
        x0 = pipeline.to_latents(batch.images)
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = sample_sigmas(config, config.batch_size, generator)
        return flow_matching_loss(pipeline, x0, captions, sigmas, noise)

    def evaluate(step: int, elapsed: float) -> tuple[dict, str]:
        row = _evaluate(out, pipeline, ema, config, step, elapsed)
        return row, f"step {step}: eval overall {row['overall']:.3f} {row['task_accuracy']}"

    session_start = time.perf_counter()
    step, last_eval = train_loop(
        config, out, loss_of_next_batch, (model, ema, optimizer, scheduler, generator, stream), step, elapsed_before,
        target=config.steps if stop_at is None else min(stop_at, config.steps),
        export=(lambda: _export(out, pipeline, ema)) if export else None, evaluate=evaluate, desc="pretrain",
        progress=progress, time_limit_s=time_limit_s, should_stop=should_stop,
    )  # fmt: skip
    session = time.perf_counter() - session_start
    return PretrainResult(
        step=step,
        finished=step >= config.steps,
        pipeline_dir=(out / "pipeline") if export else None,
        session_time_s=session,
        total_time_s=elapsed_before + session,
        last_eval=last_eval,
    )


def _evaluate(
    out: Path, pipeline: ShapesPipeline, ema: nn.ModuleDict, config: PretrainConfig, step: int, elapsed: float
) -> dict:
    evaluated = ShapesPipeline(
        unet=ema["unet"], text_encoder=ema["text_encoder"], tokenizer=pipeline.tokenizer,
        scheduler=pipeline.scheduler, patch_size=pipeline.patch_size,
    )  # fmt: skip
    start = time.perf_counter()
    report = evaluate_pipeline(evaluated, config)
    row = {
        "step": step, "elapsed_s": round(elapsed, 1), "overall": report.summary.overall,
        "task_accuracy": {k: round(v, 4) for k, v in report.summary.task_accuracy.items()},
        "image_accuracy": report.summary.image_accuracy, "eval_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    with (out / "eval.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


# --- command line -------------------------------------------------------------------------------------

_SCALARS = {
    f.name: f for f in dataclasses.fields(PretrainConfig) if f.name not in ("architecture", "task_weights")
}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_args(args: argparse.Namespace, stored: PretrainConfig | None) -> PretrainConfig:
    """The run's config: the stored one (when resuming) or the defaults, with the flags given applied."""
    base = (stored or PretrainConfig()).to_json()
    for name in _SCALARS:
        value = getattr(args, name)
        if value is not None:
            base[name] = value
    if args.task_weights is not None:
        base["task_weights"] = [float(v) for v in args.task_weights.split(",")]
    for item in args.arch or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--arch takes KEY=VALUE (e.g. block_out_channels=[32,64,96]), got {item!r}.")
        if key not in {f.name for f in dataclasses.fields(ShapesArchitecture)}:
            raise ValueError(
                f"unknown --arch key {key!r}; known: {[f.name for f in dataclasses.fields(ShapesArchitecture)]}."
            )
        base["architecture"][key] = _parse_value(value)
    return PretrainConfig.from_json(base)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flowalign.worlds.shapes.pretrain --out DIR [options]`` (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory (resumed if it holds checkpoints)")
    parser.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="stop (with a checkpoint) after this many minutes"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--task-weights", default=None, help="comma-separated weights of the six GenEval tasks"
    )
    parser.add_argument("--arch", action="append", help="architecture override KEY=VALUE (repeatable)")
    for name, f in _SCALARS.items():
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], None)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind or _parse_value, default=None,
                            help=f"default {f.default!r}")  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    stored = None
    if (out / "config.json").exists():
        stored = PretrainConfig.from_json(json.loads((out / "config.json").read_text()))
    try:
        config = config_from_args(args, stored)
    except (TypeError, ValueError) as err:
        parser.error(str(err))

    stop = {"flag": False}

    def handle(signum, frame):  # finish the step, checkpoint, exit
        stop["flag"] = True

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    result = pretrain(
        config, out, stop_at=args.stop_at,
        time_limit_s=None if args.time_limit is None else args.time_limit * 60,
        progress=not args.no_progress, should_stop=lambda: stop["flag"],
    )  # fmt: skip
    state = "finished" if result.finished else "stopped (resume with the same --out)"
    print(
        f"{state} at step {result.step}; {result.total_time_s / 60:.1f} min of training in total; model: {result.pipeline_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
