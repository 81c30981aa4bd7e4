"""The one training loop every recipe shares: accelerate, optimizer, LR schedule, EMA, checkpoint/resume,
logging, evaluation, SIGTERM. A recipe (:class:`flowalign.train.recipe.Recipe`) does one iteration of its
algorithm (sample, score, update) and owns the state that algorithm needs; :func:`run_training` does
everything around it and knows no algorithm by name.

    flowalign train configs/grpo/shapes.yaml train.steps=20           # one process
    accelerate launch --multi_gpu --num_processes 2 -m flowalign train ...   # several processes (DDP;
                                            # gloo on a CPU-only machine; FSDP/DeepSpeed via accelerate config)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowalign.config import Config, to_yaml
from flowalign.data.prompts import GroupBatch, GroupSampler, condition_images, load_prompt_set
from flowalign.models import ModelAdapter, load_model
from flowalign.train.lr_schedule import RunSchedule
from flowalign.train.recipe import Recipe
from flowalign.train.state import EMA, find_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["TrainContext", "TrainResult", "build_reward", "mean_metrics", "reduce_metrics", "run_training"]


def build_reward(config: Config, device: torch.device):
    """The configured rewards as a :class:`rewards.WeightedReward` that keeps every part's scores (None when
    the recipe needs no reward, e.g. DPO on a pair file)."""
    from rewards import WeightedReward, load_reward

    if not config.reward:
        return None
    chunk = {"max_batch_size": config.train.micro_batch_size} if config.train.micro_batch_size else {}
    parts = {
        name: (
            load_reward(name, allow_code=config.train.allow_code, device=device, **{**chunk, **spec.args}),
            spec.weight,
        )
        for name, spec in config.reward.items()
    }
    return WeightedReward(parts)


@dataclass
class Clock:
    """Seconds spent per named phase within an iteration (model forward/backward vs everything else)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


@dataclass
class TrainContext:
    """What a recipe sees. ``generator(step, purpose)`` gives the seeded generator of one random draw of
    one iteration on this process, which is what makes resume exact.

    Attributes:
        ema: the average of the trained weights that evaluation and ``lora_ema/`` use (``train.ema_decay``;
            None when not kept). The loop updates it after every iteration that made an optimizer step.
        updates: optimizer updates applied so far in this process's run (skipped non-finite steps do not
            count); the EMA follows an iteration only when it applied one.
    """

    config: Config
    accelerator: Any
    model: ModelAdapter
    reward: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: GroupSampler
    ema: EMA | None
    clock: Clock
    output_dir: Path
    updates: int = 0

    def _seed(self, step: int, purpose: str, stream: int) -> torch.Generator:
        salt = sum(ord(c) * 31**i for i, c in enumerate(purpose)) % 1_000_003
        seed = ((self.config.train.seed * 1_000_003 + step) * 1_000_003 + salt) * 1_000_003 + stream
        return torch.Generator(self.model.device).manual_seed(seed % (2**63 - 1))

    def generator(self, step: int, purpose: str) -> torch.Generator:
        """The generator of one random draw of iteration ``step`` on this process."""
        return self._seed(step, purpose, self.accelerator.process_index)

    def shared_generator(self, step: int, purpose: str) -> torch.Generator:
        """A generator that draws the same on every process (choices all processes must agree on)."""
        return self._seed(step, purpose, 0)

    def sample_generators(
        self, step: int, purpose: str, group_ids: torch.Tensor, per_group: bool = False
    ) -> list[torch.Generator]:
        """One generator per sample, keyed by (global group, index in group): a sample's randomness is the
        same whichever process or batch it is drawn in, so runs on 1 or N processes draw the same samples.
        ``per_group``: the samples of a group get identically seeded generators (shared initial noise)."""
        seen: dict[int, int] = {}
        gens = []
        for g in group_ids.tolist():
            seen[g] = seen.get(g, -1) + 1
            gens.append(self._seed(step, purpose, 1_000 + g * 4096 + (0 if per_group else seen[g])))
        return gens

    @property
    def dynamics(self) -> str:
        """``sampling.dynamics`` resolved for the model's kind (see :func:`resolve_dynamics`)."""
        return resolve_dynamics(self.config.sampling.dynamics, self.model.kind)

    @property
    def levels(self) -> list[float] | None:
        """The explicit noise levels of the sampling schedule (``sampling.sigmas`` / ``sampling.timesteps``;
        see :func:`sampling_levels`), None for the scheduler's own."""
        return sampling_levels(self.config.sampling, self.model.kind)

    def encode(self, batch: GroupBatch, cfg: bool):
        """The batch's prompts encoded, with their conditioning first frames (the records' ``image`` fields)
        for an image-to-video model."""
        return self.encode_prompts(batch.prompts, batch.metadata, cfg)

    def encode_prompts(self, prompts: Sequence[str], metadata: Sequence[Mapping], cfg: bool):
        """``prompts`` encoded, with their records' (``metadata``) first frames for an image-to-video model."""
        images = condition_images(metadata, "data.train_prompts") if self.model.takes_images else None
        return self.model.encode(prompts, cfg=cfg, images=images)

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return self.model.trainable_parameters()

    def micro_batch(self, sync: bool):
        """The context of one micro-batch's forward and backward into an optimizer step's gradient. Without
        ``sync`` (a micro-batch before the step's last) the gradients stay on this process: DDP's ``no_sync``
        spans the forward, where DDP decides whether the backward all-reduces (around the backward alone it
        still does, every micro-batch), and FSDP2 skips the reduce-scatter."""
        if self.config.train.sharding == "fsdp":
            self.model.denoiser.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model.net)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """``accelerator.backward``; with ``sync=False`` (a backward that accumulates into the same
        optimizer step as a later one, within :meth:`micro_batch`) the gradients are not reduced over the
        processes yet."""
        if self.config.train.sharding == "fsdp":  # FSDP2: skip the reduce-scatter until the last backward
            self.model.denoiser.set_requires_gradient_sync(sync)
            context = contextlib.nullcontext()
        else:
            context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model.net)
        if not loss.requires_grad:
            raise RuntimeError(
                "the training loss carries no gradient: none of this iteration's trained steps ran a trained "
                "network (with two Wan experts, model.expert must be the one that runs the trained steps: 'low' "
                "for reward backprop through the last steps)."
            )
        with context, self.clock("backward"):
            self.accelerator.backward(loss)

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, zero, advance the LR schedule (:func:`clipped_step`); a non-finite gradient norm skips
        the update (and the schedule) and is reported, never applied. The schedule counts optimizer steps,
        whatever the number of processes and of steps per iteration."""
        norm, skipped = clipped_step(
            self.accelerator, self.optimizer, self.trainable, self.config.optim.max_grad_norm
        )
        if not skipped:
            self.scheduler.step()
        self.updates += 0 if skipped else 1  # the EMA follows real updates only (not a skipped NaN step)
        return {"grad_norm": norm if not skipped else float("nan"), "skipped_updates": float(skipped)}


def clipped_step(accelerator, optimizer, params, max_grad_norm: float) -> tuple[float, bool]:
    """Clip ``params``' gradient norm, step ``optimizer`` (an accelerate-prepared one) and zero the gradients;
    a non-finite norm skips the step. Returns ``(norm, skipped)``. Under fp16 mixed precision the gradient
    scaler decides: the step is always called, so that the scaler skips an overflowing step itself and lowers
    its scale (skipping the call would leave the scale too high forever)."""
    norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    if getattr(accelerator, "scaler", None) is not None:
        optimizer.step()
        skipped = bool(getattr(optimizer, "step_was_skipped", False)) or not math.isfinite(norm)
    else:
        skipped = not math.isfinite(norm)
        if not skipped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, skipped


def _reset_single_process_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state: a second run in the same (single, non-launched) process with
    another ``train.mixed_precision`` would be refused ("AcceleratorState has already been initialized").
    Forget the earlier run's state then; distributed runs are one run per process and are left alone."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if (
        state
        and state.get("_mixed_precision") not in (None, mixed_precision)
        and state.get("num_processes", 1) == 1
    ):
        AcceleratorState._reset_state(reset_partial_state=True)


def sampling_levels(sampling, kind: str) -> list[float] | None:
    """``sampling.sigmas`` for a flow model or ``sampling.timesteps`` for a diffusion model (the other is an
    error naming its key), None when neither is set."""
    wrong, right = ("timesteps", "sigmas") if kind == "flow" else ("sigmas", "timesteps")
    if getattr(sampling, wrong) is not None:
        raise ValueError(
            f"sampling.{wrong} does not apply to a {kind} model; give its noise levels as sampling.{right}."
        )
    return getattr(sampling, right)


def resolve_dynamics(dynamics: str | None, kind: str) -> str:
    """The rollout SDE: ``dynamics`` when it fits the model's ``kind`` (flow: ``flow_grpo``/``cps``/``dance``;
    diffusion: ``ddim``), the kind's default when None; otherwise an error naming ``sampling.dynamics``."""
    if dynamics is None:
        return "ddim" if kind == "diffusion" else "flow_grpo"
    if (kind == "diffusion") != (dynamics == "ddim"):
        allowed = "ddim" if kind == "diffusion" else "flow_grpo, cps or dance"
        raise ValueError(
            f"sampling.dynamics={dynamics} does not apply to a {kind} model; use {allowed} (or leave it unset)."
        )
    return dynamics


@dataclass
class TrainResult:
    steps_done: int
    output_dir: Path
    last_metrics: dict[str, float]
    interrupted: bool


def _named_trainable(model: ModelAdapter) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.denoiser.named_parameters() if p.requires_grad}


def _setup_model(config: Config, device: torch.device) -> ModelAdapter:
    m = config.model
    model = load_model(m.path, family=m.family, device=device, dtype=getattr(torch, m.dtype))
    sampling_levels(config.sampling, model.kind)
    _setup_video(config, model)
    if m.lora_rank > 0:
        model.add_lora(rank=m.lora_rank, alpha=m.lora_alpha, target_modules=m.lora_targets)
    else:
        model.set_full_finetuning()
    # As diffusers' training scripts: trainable weights (and so their gradients and Adam states) in float32
    # over a frozen base in model.dtype; peft casts a LoRA layer's input to its weights' dtype and the
    # output back. (Full fine-tuning in bf16/fp16 is refused by the config validator.)
    from diffusers.training_utils import cast_training_params

    cast_training_params(model.denoiser, dtype=torch.float32)
    model.set_gradient_checkpointing(m.gradient_checkpointing)
    model.set_attention_backend(m.attention)
    return model


VIDEO_ALGORITHMS = ("grpo", "nft", "backprop", "dpo", "dmd")


def _setup_video(config: Config, model: ModelAdapter) -> None:
    """Apply ``model.num_frames`` / ``model.expert`` to a video model; refuse them for an image model, and
    the recipes that do not train video models yet."""
    m = config.model
    for key in ("num_frames", "expert", "cpu_offload"):
        value = getattr(m, key)
        if value is None or value is False:
            continue
        if not model.is_video or (key != "num_frames" and not hasattr(model, key)):
            raise ValueError(
                f"model.{key}={value!r}: the {model.family} model has no such option; remove it."
            )
        try:
            setattr(model, key, value)
        except ValueError as err:
            raise ValueError(f"model.{key}: {err}") from None
    if model.is_video and config.train.algorithm not in VIDEO_ALGORITHMS:
        raise ValueError(
            f"train.algorithm={config.train.algorithm} does not train video models yet; use one of "
            f"{', '.join(VIDEO_ALGORITHMS)}."
        )
    if model.is_video and config.eval.prompts and config.eval.every > 0:
        raise ValueError(
            "eval.every: the in-training GenEval evaluation judges images, not videos; set eval.every: 0 for a "
            "video model."
        )


def _check_same_expert(checkpoint: Path, config: Config) -> None:
    """A resumed run trains the expert(s) its checkpoint trained: two Wan experts' weights have the same
    names, so a checkpoint of one would load into the other without complaint."""
    from flowalign.config import saved_setting

    before = saved_setting(checkpoint, "model.expert")
    if before != config.model.expert:
        raise ValueError(
            f"train.resume: checkpoint {checkpoint} trained model.expert={before}, this run sets model.expert="
            f"{config.model.expert}; set model.expert={before} to resume it."
        )


def _trackers(config: Config) -> list[str]:
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in config.train.log_with:
        if name not in modules:
            raise ValueError(f"train.log_with: unknown tracker {name!r}; use tensorboard and/or wandb.")
        if importlib.util.find_spec(modules[name]) is None:
            raise ImportError(
                f"train.log_with names {name} but it is not installed: pip install 'flowalign[{name}]'."
            )
    return list(config.train.log_with)


def run_training(config: Config, recipe: Recipe, evaluate: Callable | None = None) -> TrainResult:
    """Run ``config.train.steps`` iterations of ``recipe`` with everything around them."""
    from accelerate import Accelerator

    output_dir = Path(config.train.output_dir)
    trackers = _trackers(config)
    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "train.mixed_precision=fp16 needs a CUDA device: on the CPU accelerate runs neither fp16 autocast nor "
            "a gradient scaler, so the setting would be silently ignored; use bf16 or no."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            "accelerate was launched with FSDP (--use_fsdp or an fsdp_config): flowalign shards with FSDP2 itself; "
            "launch plain processes (configs/accelerate/fsdp.yaml) and set train.sharding=fsdp. (accelerate's plugin "
            "would wrap the model a second way, and on CPU it silently trains with DDP.)"
        )
    # cpu=True on a machine without CUDA makes `accelerate launch --multi_gpu --num_processes N` run N
    # gloo processes on the CPU (accelerate's own `--cpu --num_processes N` starts only one without mpirun).
    _reset_single_process_state(config.train.mixed_precision)
    from accelerate.utils import DistributedDataParallelKwargs

    # Both Wan experts train: each sample runs the expert of its noise level, so a process may leave one
    # expert unused in a step that another process used; DDP must then find the unused parameters.
    routed = config.model.expert == "both"
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        log_with=trackers or None,
        project_dir=str(output_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if routed else None,
    )
    from flowalign.train.rundir import RunDirError, claim, release

    # One run owns the output directory (train/rundir.py): the main process locks it, every process learns
    # the verdict, so a refused run stops everywhere with the same message.
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = claim(output_dir, resume=bool(config.train.resume), overwrite=config.train.overwrite)
        except RunDirError as err:
            refusal = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise RunDirError(refusal)
    try:
        return _run(config, recipe, evaluate, accelerator, output_dir, trackers)
    finally:
        release(lock)


def _run(
    config: Config, recipe: Recipe, evaluate, accelerator, output_dir: Path, trackers: list[str]
) -> TrainResult:
    """The body of :func:`run_training` once the output directory is this run's."""
    from accelerate.utils import set_seed

    # One seed on every process while initial weights are drawn (a LoRA's, DMD's discriminator head): FSDP2
    # shards each process's own copy without broadcasting it, so the copies must agree. Later randomness
    # comes from generators keyed by step and sample; the global RNG is made per-process again after setup.
    set_seed(config.train.seed)
    model = _setup_model(config, accelerator.device)
    recipe.copy_models(model)
    sharded = config.train.sharding == "fsdp"
    if sharded:
        from flowalign.train.sharding import shard_denoiser

        shard_denoiser(model.denoiser, accelerator.device.type, accelerator.num_processes)
    params = model.trainable_parameters()
    o = config.optim
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps
    )
    if sharded:  # FSDP2 is the model's parallelism: accelerate wraps only the optimizer
        wrapped, optimizer = None, accelerator.prepare(optimizer)
    else:
        wrapped, optimizer = accelerator.prepare(model.denoiser, optimizer)
    # Not prepared by accelerate: its wrapper steps a schedule once per process per call (warmup N times
    # too fast on N processes); ctx.optimizer_step advances it once per optimizer step instead.
    scheduler = RunSchedule(optimizer, o.warmup_steps, o.schedule, o.min_lr_ratio, config.train.steps)
    model.set_training_module(wrapped)
    ema = EMA(model.trainable_parameters()) if config.train.ema_decay is not None else None
    sampler = GroupSampler(
        load_prompt_set(config.data.train_prompts), config.data.group_size, config.data.groups_per_step,
        seed=config.train.seed, num_processes=accelerator.num_processes, process_index=accelerator.process_index,
        balance_by=config.data.balance_by, balance_weights=config.data.balance_weights,
    )  # fmt: skip
    ctx = TrainContext(
        config,
        accelerator,
        model,
        build_reward(config, accelerator.device),
        optimizer,
        scheduler,
        sampler,
        ema,
        Clock(),
        output_dir,
    )
    recipe.setup(ctx)
    if evaluate is not None and hasattr(evaluate, "setup"):
        evaluate.setup(ctx)
    if accelerator.num_processes > 1:
        set_seed(config.train.seed, device_specific=True)
    named = _named_trainable(model)
    start = 0
    if config.train.resume:
        checkpoint = find_checkpoint(output_dir, config.train.resume)
        _check_same_expert(checkpoint, config)
        state = load_checkpoint(
            checkpoint,
            named,
            optimizer,
            scheduler,
            ema,
            recipe,
            sharded_module=model.denoiser if sharded else None,
        )
        start = state["step"]
        if scheduler.resume_note:
            accelerator.print(scheduler.resume_note)
        if accelerator.is_main_process:
            from flowalign.train.rundir import trim_metrics

            trim_metrics(output_dir, start)  # the steps after the checkpoint are logged again
        accelerator.print(f"resumed from step {start}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(config))
    if trackers:
        accelerator.init_trackers("flowalign", config=_flat(asdict(config)))

    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process or sharded:  # sharded: every process gathers, the main one writes
            save_checkpoint(
                output_dir, step, named, optimizer, scheduler, ema, recipe, {"config": to_yaml(config)},
                keep=config.train.keep_checkpoints, lora_saver=model.save_lora if model.has_lora else None,
                write=accelerator.is_main_process, sharded_module=model.denoiser if sharded else None,
            )  # fmt: skip
        accelerator.wait_for_everyone()

    metrics: dict[str, float] = {}
    progress = tqdm(
        range(start, config.train.steps), initial=start, total=config.train.steps, desc="train",
        disable=not (config.train.progress and accelerator.is_local_main_process), dynamic_ncols=True,
    )  # fmt: skip
    wants_eval = evaluate is not None and config.eval.prompts and config.eval.every > 0
    if wants_eval and config.eval.at_start and start == 0:
        _log(ctx, evaluate(ctx, 0), 0)
    step = start
    started = time.time()
    try:
        for step in progress:
            ctx.clock = Clock()
            began = time.perf_counter()
            updates = ctx.updates
            lr = scheduler.at_iteration(step)
            metrics = recipe.iteration(step)
            if ema is not None and ctx.updates > updates:
                ema.update(config.train.ema_decay)
            elapsed = time.perf_counter() - began
            metrics["step_time"] = elapsed
            model_seconds = ctx.clock.seconds.get("forward", 0.0) + ctx.clock.seconds.get("backward", 0.0)
            metrics["model_time_share"] = model_seconds / elapsed if elapsed > 0 else 0.0
            metrics["lr"] = lr  # the rate of the iteration's first optimizer step
            done = step + 1
            if wants_eval and done % config.eval.every == 0:
                metrics.update(evaluate(ctx, done))
            _log(ctx, metrics, done)
            progress.set_postfix(
                {k: f"{metrics[k]:.3g}" for k in ("reward", "kl", "clip_frac", "step_time") if k in metrics}
            )
            out_of_time = (
                config.train.max_minutes is not None
                and (time.time() - started) / 60 >= config.train.max_minutes
            )
            out_of_time, stop["requested"] = _agree(accelerator, out_of_time, stop["requested"])
            if out_of_time and done < config.train.steps:
                checkpoint(done)
                accelerator.print(f"train.max_minutes reached: saved checkpoint at step {done} and stopped.")
                return TrainResult(done, output_dir, metrics, True)
            if stop["requested"]:
                checkpoint(done)
                accelerator.print(f"SIGTERM: saved checkpoint at step {done} and stopped.")
                return TrainResult(done, output_dir, metrics, True)
            every = config.train.checkpoint_every
            if done == config.train.steps or (every > 0 and done % every == 0):
                checkpoint(done)  # the final weights are always saved (checkpoint_every=0: only them)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if trackers:
            accelerator.end_training()
    return TrainResult(config.train.steps, output_dir, metrics, False)


def _agree(accelerator, *flags: bool) -> tuple[bool, ...]:
    """Each flag true on any process is true on all, so every process stops at the same step."""
    if accelerator.num_processes == 1:
        return flags
    votes = accelerator.reduce(
        torch.tensor([float(f) for f in flags], device=accelerator.device), reduction="sum"
    )
    return tuple(bool(v > 0) for v in votes.tolist())


def mean_metrics(rows: list[dict[str, torch.Tensor | float]]) -> dict[str, float]:
    """Per key, the mean over the rows that hold it (one row per minibatch or inner step)."""
    keys = {k for row in rows for k in row}
    return {k: float(sum(float(r[k]) for r in rows if k in r) / sum(k in r for r in rows)) for k in keys}


def reduce_metrics(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the processes that report it (one collective call on every process):
    a loss, KL or clip fraction then describes the whole global batch, not process 0's share."""
    clean = {k: float(v) for k, v in metrics.items()}
    if accelerator.num_processes == 1:
        return clean
    from accelerate.utils import gather_object

    return mean_metrics(gather_object([clean]))


def _log(ctx: TrainContext, metrics: dict[str, float], step: int) -> None:
    clean = reduce_metrics(ctx.accelerator, metrics)
    if ctx.config.train.log_with:
        ctx.accelerator.log(clean, step=step)
    if ctx.accelerator.is_main_process:
        with open(ctx.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return out
