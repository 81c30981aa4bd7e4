"""Typed training configs: YAML files plus dotted command-line overrides, validated by OmegaConf.

    config = load_config("configs/grpo/shapes.yaml", ["optim.lr=3e-4", "train.steps=20"])

Every section is a dataclass; an unknown key or a value of the wrong type is a :class:`ConfigError`
that names the key and the file (or the override). :func:`validate` adds the checks that span fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ALGORITHMS",
    "BackpropConfig",
    "Config",
    "ConfigError",
    "DMDConfig",
    "DPOConfig",
    "DataConfig",
    "EvalConfig",
    "GRPOConfig",
    "ModelConfig",
    "NFTConfig",
    "OptimConfig",
    "RewardSpec",
    "SFTConfig",
    "SamplingConfig",
    "TrainConfig",
    "load_config",
    "validate",
]

ALGORITHMS = ("grpo", "nft", "backprop", "dpo", "sft", "dmd")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and where it came from."""


@dataclass
class ModelConfig:
    """Which model to fine-tune and how.

    ``path``: a diffusers directory, a hub id, ``tiny-<family>``, or ``shapes`` (the shipped default).
    ``lora_rank``: 0 means full fine-tuning of the denoiser.
    ``num_frames`` (video models): frames per video (Wan: ``4k + 1``); None: the model's default.
    ``expert`` (Wan 2.2's two experts): ``high``, ``low`` or ``both``, the expert(s) that train (reward
    backprop through the last steps trains ``low``); None: ``high``.
    ``cpu_offload`` (Wan): keep the text encoder and the expert that does not train on the CPU while they
    idle (moved to the GPU when they run; values unchanged): -37 GiB per GPU on Wan 2.2 A14B.
    """

    path: str = "shapes"
    family: str | None = None
    dtype: str = "float32"
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    resolution: int | None = None
    num_frames: int | None = None
    expert: str | None = None
    cpu_offload: bool = False


@dataclass
class SamplingConfig:
    """Training rollouts.

    ``sde_window``: ``[start, size]`` of SDE steps (Flow-GRPO-Fast, MixGRPO); None = every step.
    ``sde_window_shift``: how far the window's start may move past ``start``. ``sde_window_mode``:
    ``random`` draws the shift per iteration uniformly from ``[0, sde_window_shift]`` (Flow-GRPO-Fast);
    ``sliding`` moves it one step every ``sde_window_interval`` iterations and wraps around (MixGRPO's
    sliding window, Li et al. 2025).
    ``dynamics``: the SDE of training rollouts (GRPO, NFT, online DPO; reward backprop samples with the
    ODE): ``flow_grpo``, ``cps`` or ``dance`` for flow models,
    ``ddim`` (DDIM with eta = ``noise_level``, DDPO) for diffusion models; None picks ``flow_grpo`` or
    ``ddim`` by the model's kind. A flow SDE named for a diffusion model (or ``ddim`` for a flow model) is
    an error when the model loads.
    ``train_steps``: how many of the window's SDE steps are trained each iteration (a random subset,
    DanceGRPO's timestep fraction); None = all except the last step of the schedule (Flow-GRPO).
    ``sigmas`` (flow models) / ``timesteps`` (diffusion models): explicit noise levels of the ``steps``
    sampling steps, as the stock pipeline's ``sigmas=`` / ``timesteps=`` argument (flow sigmas are shifted by
    the scheduler, as the pipeline shifts them); None: the scheduler's ``steps``-step schedule. For
    few-step students at chosen levels (DMD2's SDXL student: ``timesteps: [999, 749, 499, 249]``); sample
    them with ``flowalign sample --sigmas`` / ``--timesteps``.
    ``group_noise``: ``independent`` initial noise per sample (Flow-GRPO) or ``shared`` by the samples of a
    group (DanceGRPO, Xue et al. 2025, Sec. 3: "samples from the same prompt share the same initialization
    noise"), so that a group's reward differences come only from the SDE steps being trained. Needs SDE
    steps to make the group's samples differ (GRPO only).
    """

    steps: int = 10
    guidance: float = 1.0
    sigmas: list[float] | None = None
    timesteps: list[int] | None = None
    dynamics: str | None = None
    noise_level: float = 0.7
    sde_window: list[int] | None = None
    sde_window_shift: int = 0
    sde_window_mode: str = "random"
    sde_window_interval: int = 1
    train_steps: int | None = None
    reduction: str = "mean"
    group_noise: str = "independent"


@dataclass
class DataConfig:
    """Prompts: ``.txt`` (one per line), ``.jsonl`` with a ``prompt`` field, or GenEval metadata jsonl.

    ``balance_by``: a metadata key (``tag`` for GenEval tasks) whose values are drawn uniformly, then a
    prompt among those with the value (see :class:`flowalign.data.prompts.GroupSampler`); None draws
    prompts uniformly without replacement. ``balance_weights``: a weight for every value of ``balance_by``
    (e.g. ``{counting: 2, position: 2, color_attr: 2, colors: 1, single_object: 0, two_object: 0}``): the
    values are drawn in those proportions instead of uniformly.
    """

    train_prompts: str = "assets/shapes/prompts/train.jsonl"
    group_size: int = 8
    groups_per_step: int = 4
    balance_by: str | None = None
    balance_weights: dict[str, float] | None = None


@dataclass
class RewardSpec:
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class GRPOConfig:
    """Flow-GRPO / DDPO. ``kl_form``: ``flow_grpo`` or ``gaussian`` (see ``algorithms.grpo.step_kl``).

    ``skip_zero_advantage``: drop samples whose advantage is exactly 0 (every sample of a group scored the
    same) before minibatching. Without KL their clipped-ratio loss and its gradient are exactly 0, so this
    only saves their forward and backward passes (minibatch means then run over the informative samples).
    Single-process only: processes must run the same number of backward passes.
    """

    clip_range: float = 1e-4
    adv_clip: float = 5.0
    kl_beta: float = 0.0
    kl_form: str = "flow_grpo"
    std_scope: str = "group"
    multi_reward: str = "normalize_then_weight"
    guard: bool = False
    inner_epochs: int = 1
    minibatch_size: int = 8
    skip_zero_advantage: bool = False


@dataclass
class NFTConfig:
    """DiffusionNFT. The old (sampling) policy is an EMA of the trained one with decay
    ``min(old_decay_max, old_decay_rate * iteration)``, as in the reference."""

    beta: float = 1.0
    adv_clip: float = 5.0
    std_scope: str = "group"
    multi_reward: str = "normalize_then_weight"
    timesteps_per_sample: int = 2
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    minibatch_size: int = 8
    inner_epochs: int = 1


@dataclass
class BackpropConfig:
    """Reward backpropagation through the sampler.

    ``mode``: ``alignprop`` (random contiguous last-K, ``K ~ U{k_min..k}``), ``draft`` (DRaFT-K, last ``k``),
    ``draft_lv`` (DRaFT-LV: the last step re-noised ``lv_repeats`` times), ``refl`` (one step drawn from
    ``[k_min, k)``, reward on its x0 prediction), ``full`` (every step).
    ``kl_beta``: weight of the KL to the base over the differentiated steps; ``kl_form``: ``velocity``
    (``|v_theta - v_ref|^2``, DRaFT+) or ``ipro`` (``|v_theta - v_ref|^2 / (2 sigma_t^2)``, IPRO's multi-step
    KL; flow models).
    """

    mode: str = "alignprop"
    k: int = 1
    k_min: int = 1
    checkpoint: bool = True
    kl_beta: float = 0.0
    kl_form: str = "velocity"
    lv_repeats: int = 2


@dataclass
class DPOConfig:
    """Diffusion-DPO / Flow-DPO / InPO.

    ``pairs``: ``online`` (best vs worst of each group under the reward) or a pair-file jsonl (images; for an
    image-to-video model, videos with their first frame: :mod:`flowalign.data.pairs`).
    ``timesteps``: ``logit_normal`` (flow models, as flow_grpo's Flow-DPO) or ``uniform``.
    ``inversion``: InPO — noise the data by DDIM/flow inversion with ``inversion_steps`` steps.
    ``ref_refresh_every``: 0 keeps the reference fixed (the base model); N > 0 copies the trained weights
    into the reference every N steps (online DPO).
    ``pairs_per_group``: online pairs per group, the i-th best against the i-th worst (1: best vs worst,
    as Diffusion-DPO's and flow_grpo's online recipes).
    ``timesteps_per_pair``: noise levels drawn per pair and iteration, each followed by an optimizer step
    (1: the papers' recipe; more reuses each sampled pair, which pays when sampling dominates the cost).
    InPO inverts once per iteration, with the weights before that iteration's updates.
    ``latent_cache_size``: with a pair file, how many VAE latents of its images stay cached in CPU memory
    (least recently used dropped; 0: encode every time). Only the pairs' prompts and paths are held;
    images are read when a batch needs them.
    """

    beta: float = 100.0
    pairs: str = "online"
    pairs_per_step: int = 4
    min_gap: float = 0.0
    timesteps: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    inversion: bool = False
    inversion_steps: int = 10
    ref_refresh_every: int = 0
    pairs_per_group: int = 1
    timesteps_per_pair: int = 1
    latent_cache_size: int = 4096


@dataclass
class SFTConfig:
    """The control recipe (``train.algorithm: sft``): continued supervised fine-tuning of the shapes model
    with its own pretraining objective (rectified flow, the shipped model's sigma density and caption
    dropout) on fresh procedural scenes, through the same LoRA the reward recipes train
    (:mod:`flowalign.train.sft`). It samples no images, so it needs no reward; a ``reward`` section, if
    given, only scores the loop's evaluation of prompts without GenEval metadata, never a training batch.

    ``batch_size``: scenes per iteration over all processes (one optimizer step each); the default is
    pretraining's batch.
    """

    batch_size: int = 32


@dataclass
class DMDConfig:
    """Distribution-matching distillation (``train.algorithm: dmd``; :mod:`flowalign.train.dmd`): the trained
    model is a student of ``sampling.steps`` steps (1, 2, 4...: it samples with the stock scheduler at that
    step count and ``sampling.guidance``, usually 1), the teacher is the base model (LoRA disabled; a frozen
    copy when ``model.lora_rank: 0``) with classifier-free guidance ``real_guidance``, and the fake score is
    a second LoRA on the same frozen base (a full copy when ``lora_rank: 0``), initialised as the teacher.

    ``fake_updates``: fake-score optimizer steps per generator step (DMD2's two time-scale update rule:
    10 for SD1.5, 5 for SDXL), each on fresh student samples. ``fake_lr``: its learning rate (None:
    ``optim.lr``; betas, weight decay and gradient clipping are ``optim``'s).
    ``t_range``: the noise levels at which student samples are re-noised for the distribution-matching
    gradient, as fractions of the training horizon (flow: sigma; diffusion: ``t / num_train_timesteps``);
    DMD2 uses ``[0.02, 0.98]``. ``fake_t_range``: the same for the fake score's denoising loss (DMD2: all).
    ``normalize``: DMD2's per-sample normalisation of the gradient by ``mean |x - x0_teacher|``.
    ``regression_weight``: DMD's regression loss (Yin et al. 2024, DMD, Eq. 7-8; 0.25 there): the student's
    sample from a stored noise against the teacher's ODE sample from it (latent MSE), on a pool of
    ``regression_pairs`` pairs generated when training starts with ``teacher_steps`` teacher steps (None:
    the model's default). 0: DMD2's recipe, no regression. ``regression_loss``: its distance, ``mse`` (latents)
    or a perceptual one on the decoded images (:mod:`flowalign.algorithms.perceptual`): ``lpips``, DMD's
    LPIPS over VGG16 (``pip install 'flowalign[lpips]'``; torchvision's VGG16 weights), or ``shapes_lpips``,
    LPIPS's form over the shapes world's perception network (shapes-world images only). Image models only.
    ``reward_beta``: reward-tilted DMD (RTDMD): distil toward the teacher tilted by ``exp(beta * reward)``
    with the configured rewards, which must be differentiable; ``beta`` is relative to DMD2's normalised
    loss (RTDMD's weights amount to about 0.1). 0: no tilt, and no reward is needed (a ``reward`` section
    then only scores the evaluation of prompts without GenEval metadata).
    ``reward_margin``: RTDMD's backprop hinge in place of the linear tilt: ``beta * mean(max(0, margin -
    reward))`` (RTDMD: margin 3 on PickScore + CLIPScore + HPSv2, weight 1e-4 against DMD's 1e-3, i.e.
    ``reward_beta`` 0.1): a sample whose reward clears the margin is no longer pushed. None: the linear term.
    ``policy_weight``: RTDMD's path for any reward, differentiable or not (the GenEval judge): each generator
    step also draws SDE rollouts of the student (``sampling.dynamics``, RTDMD: ``cps`` with ``noise_level``
    0.9) in groups of ``data.group_size`` (RTDMD: 24), scores them, and adds ``policy_weight`` times Flow-GRPO's
    clipped policy-gradient loss on their stochastic steps (``grpo`` section: ``clip_range``, ``adv_clip``,
    ``multi_reward``, ``std_scope``) to the DMD loss. RTDMD weighs DMD 1e-3 against the policy loss, i.e.
    ``policy_weight`` 1000. One optimizer step per generator step (``grpo.inner_epochs`` / ``minibatch_size``
    are not used: the ratio is 1), and ``optim.max_grad_norm`` clips the sum, which the policy term
    dominates at such weights. 0: no policy gradient.
    ``init``: a checkpoint of an earlier ``dmd`` run with the same model settings to start from (RTDMD's cold
    start: a distilled student is aligned): its student weights and its fake score (and discriminator);
    the optimizers, the step count and the teacher (the base) start fresh. A checkpoint of another recipe
    (no fake score: supervised fine-tuning, a regression student) gives the student's weights only.
    ``gan_weight``: DMD2's GAN term for the generator (non-saturating; DMD2: 1e-3 for SD1.5, 5e-3 for
    SDXL). Its discriminator is a small head on the fake score's features at ``gan_layer`` (None: the UNet's
    ``mid_block`` or the transformer's middle block), trained with the fake score (weight
    ``gan_disc_weight``, DMD2's 1e-2) on the student's noised samples against "real" ones: by default the
    teacher's samples of the ``regression_pairs`` pool (no dataset is needed), or with ``gan_real`` the
    images of a dataset, as in DMD2 (real images let the student move past its teacher).
    ``gan_real``: a jsonl of real (caption, image) pairs for the discriminator, one
    ``{"prompt": ..., "image": "a.png"}`` per line, image paths relative to the file, RGB at the model's
    resolution (``python -m flowalign.worlds.shapes.data --render PROMPTS`` writes one for the shapes world).
    null: the teacher pool.
    ``divergence``: f-distill's weighting of the DMD gradient by ``h(r)`` of the density ratio the
    discriminator estimates (``rkl``: plain DMD; ``kl``, ``js``, ``sf``, ``neyman``, ``sh``, ``jf``; Xu et al.
    2025); anything but ``rkl`` trains the discriminator even with ``gan_weight: 0``. ``ratio_bins``: the
    density ratio is divided by its batch mean within this many equal bins of ``t_range`` (f-distill's
    per-noise-level normalisation; a sample alone in its bin gets ratio 1).
    ``ambient``: AC-DMD (RTDMD's ambient-consistent DMD; flow models, students of >= 2 steps): match the state
    each backward-simulation step reaches, at its noise level, to the teacher's marginal there, instead of
    the step's x0-prediction: the state is re-noised to a level above its own (within ``t_range``), the
    teacher's and the fake score's predictions are moved back to its level, and the fake score learns from
    the noisy states by RTDMD's ambient target. After the student's last step the state is its sample (plain
    DMD).
    ``consistency_weight``: the fake score's consistency regulariser (flow models; Daras et al. 2023; RTDMD's
    AC-DMD cold start: 0.01), added to its denoising loss: its x0-prediction at each noised input should be
    the mean of its x0-predictions after a stochastic move of that input to a level up to
    ``consistency_gap`` lower (RTDMD: 200 of 1000 timesteps, 0.2), by the two-sample estimator. The move is
    the flow's reverse Markov step (``consistency_eta: null``), under which the exact denoiser is
    consistent, or CPS at a fixed ``consistency_eta`` (RTDMD: 0.9), under which it is not. 0: off.
    """

    real_guidance: float = 1.5
    fake_updates: int = 5
    fake_lr: float | None = None
    t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])
    fake_t_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    normalize: bool = True
    regression_weight: float = 0.0
    regression_pairs: int = 1024
    regression_loss: str = "mse"
    teacher_steps: int | None = None
    reward_beta: float = 0.0
    reward_margin: float | None = None
    policy_weight: float = 0.0
    init: str | None = None
    gan_weight: float = 0.0
    gan_disc_weight: float = 1e-2
    divergence: str = "rkl"
    ratio_bins: int = 10
    gan_layer: str | None = None
    gan_real: str | None = None
    ambient: bool = False
    consistency_weight: float = 0.0
    consistency_gap: float = 0.2
    consistency_eta: float | None = None


@dataclass
class OptimConfig:
    """AdamW for the trained weights. The learning rate warms up linearly over ``warmup_steps`` optimizer
    steps and decays over the run's ``train.steps`` iterations by ``schedule`` (``constant``, ``linear`` or
    ``cosine``) to ``min_lr_ratio * lr`` (:mod:`flowalign.train.lr_schedule`). DMD's fake score has its own
    optimizer at ``dmd.fake_lr``, constant."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0


@dataclass
class EvalConfig:
    """Periodic evaluation with deterministic ODE sampling on held-out prompts (also before the first
    iteration of a fresh run when ``at_start``).

    ``max_prompts``: read only the first N prompts of the file (None: all of them).
    ``detector``: the GenEval detector that judges prompt files with GenEval metadata: ``shapes`` (the
    shapes world's, no weights), ``mask2former`` or ``owlv2`` (+ CLIP colour) from user weights given in
    ``detector_args`` (``model_path``, ``clip_path``, ...). The prompt file is checked against its
    vocabulary before training starts.
    ``images_per_prompt``: images per prompt; with ``images_per_task``, the fewest a prompt gets.
    ``images_per_task``: for GenEval prompt files, measure every task on exactly this many images (the
    same per-task balance as ``flowalign bench geneval``): per task, ``min(prompts of the task,
    images_per_task // images_per_prompt)`` prompts spread evenly over the file (of the first
    ``max_prompts``) share the images as evenly as possible. None: every prompt read, ``images_per_prompt``
    images each. The evaluation logs ``eval/geneval_overall`` with its 95% interval bounds
    ``eval/geneval_overall_lo`` and ``eval/geneval_overall_hi``.
    """

    prompts: str | None = "assets/shapes/prompts/test.jsonl"
    detector: str = "shapes"
    detector_args: dict[str, Any] = field(default_factory=dict)
    every: int = 10
    images_per_prompt: int = 2
    max_prompts: int | None = 32
    images_per_task: int | None = None
    steps: int | None = None
    guidance: float | None = None
    at_start: bool = True


@dataclass
class TrainConfig:
    """The loop.

    ``micro_batch_size``: the most samples (pairs, for DPO) one denoiser forward/backward call sees, in
    rollouts, decoding, log-prob recomputation and every recipe's loss (classifier-free guidance doubles
    a call's batch); a minibatch larger than it is processed in micro-batches whose gradients accumulate
    into one optimizer step, which gives the same update as one call. Rewards score in chunks of it too
    (unless ``reward.<name>.args.max_batch_size`` says otherwise). None: no micro-batching.
    ``checkpoint_every``: save a checkpoint every N iterations; the final one is always saved (0: only the
    final one). ``keep_checkpoints``: how many of the newest to keep (>= 1).
    ``overwrite``: a run that starts (no ``resume``) in an ``output_dir`` holding another run deletes that
    run first; without it such a start is refused (:mod:`flowalign.train.rundir`).
    ``allow_code``: let ``reward`` keys name code by dotted path (``package.module:ClassName``), which imports
    it; the target must still be a ``rewards.Reward`` subclass (or a ``@rewards.reward_factory`` function).
    Off: only registered names and installed entry points.
    ``sharding``: ``ddp`` (every process holds the whole model; accelerate's DDP) or ``fsdp`` (FSDP2: the
    denoiser's parameters, gradients, optimizer and EMA states sharded over the processes, on GPUs or CPU
    processes; :mod:`flowalign.train.sharding`). Evaluation splits its images over the processes either way.
    """

    algorithm: str = "grpo"
    steps: int = 50
    seed: int = 0
    output_dir: str = "runs/default"
    mixed_precision: str = "no"
    ema_decay: float | None = None
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: str | None = None
    max_minutes: float | None = None
    micro_batch_size: int | None = None
    sharding: str = "ddp"
    overwrite: bool = False
    allow_code: bool = False
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: dict[str, RewardSpec] = field(default_factory=dict)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    backprop: BackpropConfig = field(default_factory=BackpropConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _error(where: str, err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    message = str(err).splitlines()[0]
    return ConfigError(f"{where}: invalid key {key!r}: {message}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML) over the defaults, apply ``key=value`` overrides, validate, return a :class:`Config`."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        import yaml

        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _error(str(path), err) from None
        except yaml.YAMLError as err:  # not YAML, or a key given twice
            raise ConfigError(f"{path}: not a valid YAML config: {' '.join(str(err).split())}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4).")
        try:
            key, _, raw = item.partition("=")
            if _is_string_field(merged, key) and raw not in ("null", "~", ""):
                # A string field takes the text as written: YAML would read `no`/`off` as False.
                OmegaConf.update(merged, key, raw, merge=False)
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _error(f"override {item!r}", err) from None
    config: Config = OmegaConf.to_object(merged)
    sources = {item.partition("=")[0].lstrip("+"): f"override {item!r}" for item in overrides or []}
    validate(config, where=str(path) if path else "config", sources=sources)
    return config


def _is_string_field(merged, key: str) -> bool:
    from omegaconf.nodes import StringNode

    parent, _, leaf = key.rpartition(".")
    container = OmegaConf.select(merged, parent) if parent else merged
    if not OmegaConf.is_dict(container) or leaf not in container:
        return False
    return isinstance(container._get_node(leaf), StringNode)


def saved_setting(checkpoint: str | Path, key: str) -> Any:
    """The value of the dotted ``key`` (e.g. ``model.expert``) in the config a training checkpoint was written
    with (its ``state.json``), or None when the key, or the checkpoint's ``state.json``, is absent."""
    import json

    state = Path(checkpoint) / "state.json"
    if not state.is_file():
        return None
    return OmegaConf.select(OmegaConf.create(json.loads(state.read_text()).get("config") or "{}"), key)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _check_numbers(config: Config, fail) -> None:
    """Ranges of the numeric settings: a value outside its range would be silently reinterpreted (a negative
    clipping norm reverses the update, guidance below 1 turns CFG off, a zero epoch count trains nothing)."""

    def need(key: str, ok: bool, rule: str) -> None:
        if not ok:
            section, _, rest = key.partition(".")
            value = (
                getattr(getattr(config, section), rest, None)
                if section != "reward"
                else config.reward[rest.rsplit(".", 1)[0]].weight
            )
            fail(key, f"{rule}, got {value}")

    def finite(x) -> bool:
        return x is not None and math.isfinite(x)

    o, s, g, n, t, e = config.optim, config.sampling, config.grpo, config.nft, config.train, config.eval
    need("optim.lr", finite(o.lr) and o.lr >= 0, "must be a finite number >= 0 (0 trains nothing)")
    need(
        "optim.max_grad_norm",
        o.max_grad_norm > 0,
        "must be > 0 (inf: no clipping); a negative norm reverses the update",
    )
    need("optim.eps", finite(o.eps) and o.eps > 0, "must be a finite number > 0")
    need("optim.weight_decay", finite(o.weight_decay) and o.weight_decay >= 0, "must be a finite number >= 0")
    need(
        "optim.betas",
        len(o.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in o.betas),
        "must be two numbers in [0, 1)",
    )
    for key, value in (("sampling.guidance", s.guidance), ("eval.guidance", e.guidance)):
        if key == "eval.guidance" and value is None:
            continue
        need(
            key,
            finite(value) and value >= 1,
            "must be a finite number >= 1 (1: no guidance; below 1 it would be ignored)",
        )
    need("sampling.noise_level", finite(s.noise_level) and s.noise_level >= 0, "must be a finite number >= 0")
    need("grpo.clip_range", finite(g.clip_range) and g.clip_range > 0, "must be a finite number > 0")
    need("grpo.adv_clip", g.adv_clip > 0, "must be > 0 (inf: no clipping)")
    need("grpo.kl_beta", finite(g.kl_beta) and g.kl_beta >= 0, "must be a finite number >= 0")
    need("nft.adv_clip", n.adv_clip > 0, "must be > 0 (inf: no clipping)")
    need("nft.beta", finite(n.beta) and n.beta > 0, "must be a finite number > 0")
    for key, value in (("grpo.inner_epochs", g.inner_epochs), ("nft.inner_epochs", n.inner_epochs),
                       ("grpo.minibatch_size", g.minibatch_size), ("nft.minibatch_size", n.minibatch_size),
                       ("nft.timesteps_per_sample", n.timesteps_per_sample), ("dpo.pairs_per_step", config.dpo.pairs_per_step),
                       ("train.keep_checkpoints", t.keep_checkpoints)):  # fmt: skip
        need(key, value >= 1, "must be >= 1")
    need("train.checkpoint_every", t.checkpoint_every >= 0, "must be >= 0 (0: only the final checkpoint)")
    need(
        "backprop.kl_beta",
        finite(config.backprop.kl_beta) and config.backprop.kl_beta >= 0,
        "must be a finite number >= 0",
    )
    need("eval.every", e.every >= 0, "must be >= 0 (0: no evaluation)")
    if t.max_minutes is not None:
        need(
            "train.max_minutes",
            finite(t.max_minutes) and t.max_minutes > 0,
            "must be a finite number > 0 or null",
        )
    for name, spec in config.reward.items():
        need(
            f"reward.{name}.weight",
            finite(spec.weight) and spec.weight != 0,
            "must be a finite, non-zero number",
        )


def validate(config: Config, where: str = "config", sources: dict[str, str] | None = None) -> None:
    """Cross-field checks; raises :class:`ConfigError` naming the key and where its value came from: the
    command-line override that set it (``sources``: key -> description), else ``where`` (the file)."""

    def fail(key: str, message: str) -> None:
        # Blame the command-line override that set the key (or a section holding it), else the file.
        given = next(
            (
                src
                for k, src in (sources or {}).items()
                if k == key or key.startswith(k + ".") or k.startswith(key + ".")
            ),
            where,
        )
        raise ConfigError(f"{given}: invalid key {key!r}: {message}")

    t, s, d = config.train, config.sampling, config.data
    from flowalign.train.recipe import RECIPES  # recipes registered by user code count too

    known = (*ALGORITHMS, *sorted(set(RECIPES) - set(ALGORITHMS)))
    if t.algorithm not in known:
        fail("train.algorithm", f"{t.algorithm!r} is not one of {known} (register a recipe to add one)")
    if t.steps < 1:
        fail("train.steps", f"must be >= 1, got {t.steps}")
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        fail("train.mixed_precision", f"must be no, bf16 or fp16, got {t.mixed_precision!r}")
    if t.sharding not in ("ddp", "fsdp"):
        fail("train.sharding", f"must be ddp or fsdp, got {t.sharding!r}")
    if t.sharding == "fsdp" and config.model.expert == "both":
        fail(
            "train.sharding",
            "model.expert=both routes each sample to one expert, and FSDP would wait for gradients of an expert "
            "that another process did not run; use train.sharding=ddp, or train one expert",
        )
    if t.micro_batch_size is not None and t.micro_batch_size < 1:
        fail("train.micro_batch_size", f"must be >= 1 or null (no micro-batching), got {t.micro_batch_size}")
    if config.optim.warmup_steps < 0:
        fail(
            "optim.warmup_steps",
            f"must be >= 0 (optimizer steps of linear warmup), got {config.optim.warmup_steps}",
        )
    from flowalign.train.lr_schedule import SCHEDULES

    if config.optim.schedule not in SCHEDULES:
        fail("optim.schedule", f"must be one of {', '.join(SCHEDULES)}, got {config.optim.schedule!r}")
    if not 0 <= config.optim.min_lr_ratio <= 1:
        fail(
            "optim.min_lr_ratio",
            f"must be in [0, 1] (the decay's end as a fraction of optim.lr), got {config.optim.min_lr_ratio}",
        )
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        fail("train.ema_decay", f"must be in (0, 1), got {t.ema_decay}")
    _check_numbers(config, fail)
    if s.steps < (1 if t.algorithm == "dmd" else 2):
        least = "1 (a one-step student)" if t.algorithm == "dmd" else "2"
        fail("sampling.steps", f"must be >= {least}, got {s.steps}")
    if s.sigmas is not None and s.timesteps is not None:
        fail(
            "sampling.timesteps",
            "set sampling.sigmas (flow models) or sampling.timesteps (diffusion), not both",
        )
    from flowalign.samplers.schedules import check_levels

    for key, kind in (("sigmas", "flow"), ("timesteps", "diffusion")):
        if getattr(s, key) is not None:
            try:
                check_levels(getattr(s, key), s.steps, kind)
            except ValueError as err:
                fail(f"sampling.{key}", str(err))
    levels_key = "sigmas" if s.sigmas is not None else "timesteps" if s.timesteps is not None else None
    if levels_key and config.eval.steps is not None and config.eval.steps != s.steps:
        fail(
            "eval.steps",
            f"is {config.eval.steps}, but sampling.{levels_key} gives the {s.steps} steps' levels; evaluation "
            "samples with them: leave eval.steps unset",
        )
    if s.sde_window is not None:
        if len(s.sde_window) != 2:
            fail("sampling.sde_window", f"must be [start, size], got {s.sde_window}")
        start, size = s.sde_window
        if start < 0 or size < 1 or start + size + s.sde_window_shift > s.steps:
            fail(
                "sampling.sde_window",
                f"[{start}, {size}] shifted by up to {s.sde_window_shift} does not fit {s.steps} steps",
            )
    if s.dynamics is not None and s.dynamics not in ("flow_grpo", "cps", "dance", "ddim"):
        fail(
            "sampling.dynamics",
            f"must be flow_grpo, cps, dance (flow models) or ddim (diffusion), got {s.dynamics!r}",
        )
    if t.algorithm == "nft" and s.guidance != 1.0:
        fail(
            "sampling.guidance",
            f"DiffusionNFT samples and trains CFG-free, so sampling.guidance={s.guidance} would change nothing; set "
            "it to 1.0 (eval.guidance sets the guidance evaluation samples with)",
        )
    if s.group_noise not in ("independent", "shared"):
        fail("sampling.group_noise", f"must be independent or shared, got {s.group_noise!r}")
    if s.group_noise == "shared" and t.algorithm != "grpo":
        fail(
            "sampling.group_noise",
            f"shared initial noise needs SDE rollouts to make a group's samples differ; {t.algorithm} samples "
            "with the ODE, so its groups would be identical. Use independent.",
        )
    if s.sde_window_mode not in ("random", "sliding") or s.sde_window_interval < 1:
        fail("sampling.sde_window_mode", "must be random or sliding, with sde_window_interval >= 1")
    if s.reduction not in ("mean", "sum"):
        fail("sampling.reduction", f"must be mean or sum, got {s.reduction!r}")
    if d.group_size < 2 and t.algorithm in ("grpo", "nft"):
        fail("data.group_size", f"group-relative advantages need >= 2 samples per prompt, got {d.group_size}")
    if d.group_size < 1:
        fail("data.group_size", f"must be >= 1, got {d.group_size}")
    if d.balance_weights is not None:
        if d.balance_by is None:
            fail("data.balance_weights", "weighs the values of data.balance_by, which is not set (e.g. tag)")
        if any(not math.isfinite(w) or w < 0 for w in d.balance_weights.values()):
            fail("data.balance_weights", f"weights must be finite and >= 0, got {d.balance_weights}")
    b = config.backprop
    if b.mode not in ("alignprop", "draft", "draft_lv", "refl", "full"):
        fail("backprop.mode", f"must be alignprop, draft, draft_lv, refl or full, got {b.mode!r}")
    if b.kl_form not in ("velocity", "ipro"):
        fail("backprop.kl_form", f"must be velocity or ipro, got {b.kl_form!r}")
    if t.algorithm == "backprop" and b.mode in ("alignprop", "draft") and not 1 <= b.k_min <= b.k <= s.steps:
        fail(
            "backprop.k", f"need 1 <= k_min <= k <= sampling.steps ({s.steps}); got k_min={b.k_min}, k={b.k}"
        )
    if t.algorithm == "backprop" and b.mode == "refl" and not 0 <= b.k_min < b.k <= s.steps:
        fail("backprop.k", f"refl draws its step from [k_min, k) in [0, {s.steps}); got [{b.k_min}, {b.k})")
    if d.groups_per_step < 1:
        fail("data.groups_per_step", f"must be >= 1, got {d.groups_per_step}")
    for name in config.reward:
        if ("." in name or ":" in name) and not t.allow_code:
            fail(
                f"reward.{name}",
                "is a code path (importing it runs the code it names); set train.allow_code=true to allow it, or "
                "use a registered reward name",
            )
    tilted = t.algorithm == "dmd" and (config.dmd.reward_beta > 0 or config.dmd.policy_weight > 0)
    needs_reward = (t.algorithm not in ("sft", "dmd") or tilted) and not (
        t.algorithm == "dpo" and config.dpo.pairs != "online"
    )
    if not config.reward and needs_reward:
        fail("reward", "name at least one reward, e.g. reward: {geneval: {weight: 1.0}}")
    for section, scope in (("grpo", config.grpo.std_scope), ("nft", config.nft.std_scope)):
        if scope not in ("group", "global"):
            fail(f"{section}.std_scope", f"must be group or global, got {scope!r}")
    p = config.dpo
    if p.timesteps not in ("logit_normal", "uniform"):
        fail("dpo.timesteps", f"must be logit_normal or uniform, got {p.timesteps!r}")
    if p.beta <= 0:
        fail("dpo.beta", f"must be > 0, got {p.beta}")
    if p.latent_cache_size < 0:
        fail("dpo.latent_cache_size", f"must be >= 0 (0: no cache), got {p.latent_cache_size}")
    for key in ("pairs_per_group", "timesteps_per_pair", "inversion_steps"):
        if getattr(p, key) < 1:
            fail(f"dpo.{key}", f"must be >= 1, got {getattr(p, key)}")
    if t.algorithm == "dpo" and p.pairs == "online" and d.group_size < 2:
        fail("data.group_size", "online DPO mines pairs from groups: use group_size >= 2")
    if config.grpo.skip_zero_advantage and config.grpo.kl_beta > 0:
        fail(
            "grpo.skip_zero_advantage", "needs grpo.kl_beta=0: the KL term trains zero-advantage samples too"
        )
    if config.grpo.kl_form not in ("flow_grpo", "gaussian"):
        fail("grpo.kl_form", f"must be flow_grpo or gaussian, got {config.grpo.kl_form!r}")
    if config.sft.batch_size < 1:
        fail("sft.batch_size", f"must be >= 1 (scenes per iteration), got {config.sft.batch_size}")
    if t.algorithm == "dmd":
        _check_dmd(config, fail)
    ev = config.eval
    if ev.detector not in ("shapes", "mask2former", "owlv2"):
        fail("eval.detector", f"must be shapes, mask2former or owlv2, got {ev.detector!r}")
    if ev.detector != "shapes" and "model_path" not in ev.detector_args:
        fail(
            "eval.detector_args",
            f"{ev.detector} needs its weights: eval.detector_args.model_path=/path/to/model",
        )
    if ev.images_per_prompt < 1:
        fail("eval.images_per_prompt", f"must be >= 1, got {ev.images_per_prompt}")
    if ev.max_prompts is not None and ev.max_prompts < 1:
        fail("eval.max_prompts", f"must be >= 1 or null (every prompt of eval.prompts), got {ev.max_prompts}")
    if ev.images_per_task is not None and ev.images_per_task < ev.images_per_prompt:
        fail(
            "eval.images_per_task",
            f"must be >= eval.images_per_prompt ({ev.images_per_prompt}, the fewest images a prompt gets), got "
            f"{ev.images_per_task}; e.g. 16, or null for every prompt",
        )
    m = config.model
    if m.lora_rank < 0:
        fail("model.lora_rank", f"must be >= 0 (0 = full fine-tuning), got {m.lora_rank}")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        fail("model.dtype", f"must be float32, bfloat16 or float16, got {m.dtype!r}")
    if m.lora_rank == 0 and m.dtype != "float32":
        fail(
            "model.dtype",
            f"full fine-tuning (model.lora_rank=0) trains the denoiser's own weights, which must stay float32 "
            f"(Adam updates vanish in {m.dtype}); set model.dtype=float32 and train.mixed_precision=bf16 for "
            "bf16 compute, or train a LoRA",
        )
    if m.lora_rank == 0 and t.algorithm == "grpo" and config.grpo.kl_beta > 0:
        fail(
            "grpo.kl_beta",
            "the KL reference is the model with its LoRA disabled, and model.lora_rank=0 trains no LoRA; "
            "train a LoRA (model.lora_rank > 0) or set grpo.kl_beta=0",
        )
    if m.lora_rank == 0 and t.algorithm == "backprop" and config.backprop.kl_beta > 0:
        fail(
            "backprop.kl_beta",
            "the KL reference is the model with its LoRA disabled, and model.lora_rank=0 trains no LoRA; "
            "train a LoRA (model.lora_rank > 0) or set backprop.kl_beta=0",
        )


def _check_dmd(config: Config, fail) -> None:
    k, t = config.dmd, config.train
    if not (math.isfinite(k.real_guidance) and k.real_guidance >= 1):
        fail(
            "dmd.real_guidance",
            f"must be a finite number >= 1 (the teacher's CFG scale; 1: none), got {k.real_guidance}",
        )
    if k.fake_updates < 1:
        fail("dmd.fake_updates", f"must be >= 1 (fake-score steps per generator step), got {k.fake_updates}")
    if k.fake_lr is not None and not (math.isfinite(k.fake_lr) and k.fake_lr > 0):
        fail("dmd.fake_lr", f"must be a finite number > 0 or null (optim.lr), got {k.fake_lr}")
    if not (math.isfinite(k.regression_weight) and k.regression_weight >= 0):
        fail(
            "dmd.regression_weight",
            f"must be a finite number >= 0 (0: no regression), got {k.regression_weight}",
        )
    if k.regression_weight > 0 and k.regression_pairs < 1:
        fail("dmd.regression_pairs", f"must be >= 1 when dmd.regression_weight > 0, got {k.regression_pairs}")
    from flowalign.algorithms.perceptual import PERCEPTUAL_DISTANCES

    if k.regression_loss not in ("mse", *PERCEPTUAL_DISTANCES):
        fail(
            "dmd.regression_loss",
            f"must be one of mse, {', '.join(PERCEPTUAL_DISTANCES)}, got {k.regression_loss!r}",
        )
    if k.regression_loss != "mse" and k.regression_weight == 0:
        fail(
            "dmd.regression_loss", "has no effect without dmd.regression_weight > 0 (set both, or remove it)"
        )
    from flowalign.algorithms.dmd import F_DIVERGENCES

    if k.divergence not in F_DIVERGENCES:
        fail(
            "dmd.divergence", f"must be one of {sorted(F_DIVERGENCES)} (rkl: plain DMD), got {k.divergence!r}"
        )
    for key in ("gan_weight", "gan_disc_weight"):
        value = getattr(k, key)
        if not (math.isfinite(value) and value >= 0):
            fail(f"dmd.{key}", f"must be a finite number >= 0, got {value}")
    if k.ratio_bins < 1:
        fail("dmd.ratio_bins", f"must be >= 1, got {k.ratio_bins}")
    if (k.gan_weight > 0 or k.divergence != "rkl") and k.gan_disc_weight <= 0:
        fail("dmd.gan_disc_weight", "must be > 0: the GAN term and f-distill need a trained discriminator")
    discriminating = k.gan_weight > 0 or k.divergence != "rkl"
    if discriminating and k.gan_real is None and k.regression_pairs < 1:
        fail(
            "dmd.regression_pairs",
            "must be >= 1: the discriminator's real samples are this pool of teacher samples (or name a dataset "
            "of real images with dmd.gan_real)",
        )
    if k.gan_real is not None and not discriminating:
        fail(
            "dmd.gan_real",
            "names the discriminator's real images, and this run trains no discriminator: set dmd.gan_weight > 0 "
            "or an f-divergence (dmd.divergence), or remove dmd.gan_real",
        )
    if k.gan_real is not None and not Path(k.gan_real).is_file():
        fail("dmd.gan_real", f"{k.gan_real!r} is not a file (a jsonl of prompt/image pairs)")
    if not (math.isfinite(k.reward_beta) and k.reward_beta >= 0):
        fail("dmd.reward_beta", f"must be a finite number >= 0 (0: no reward tilt), got {k.reward_beta}")
    if k.ambient and config.sampling.steps < 2:
        fail(
            "dmd.ambient",
            "matches the states between a multi-step student's steps; a one-step student's only state is its "
            "sample (plain DMD): use sampling.steps >= 2 or remove dmd.ambient",
        )
    if not (math.isfinite(k.consistency_weight) and k.consistency_weight >= 0):
        fail(
            "dmd.consistency_weight",
            f"must be a finite number >= 0 (0: no consistency regulariser; RTDMD: 0.01), got {k.consistency_weight}",
        )
    if not (math.isfinite(k.consistency_gap) and 0.001 <= k.consistency_gap <= 1):
        fail(
            "dmd.consistency_gap",
            f"must be a noise-level gap in [0.001, 1] (RTDMD: 0.2), got {k.consistency_gap}",
        )
    if k.consistency_eta is not None and not (
        math.isfinite(k.consistency_eta) and 0 <= k.consistency_eta <= 1
    ):
        fail(
            "dmd.consistency_eta",
            f"must be in [0, 1] (CPS's noise fraction; RTDMD: 0.9) or null (the flow's posterior step), "
            f"got {k.consistency_eta}",
        )
    if k.reward_margin is not None and not math.isfinite(k.reward_margin):
        fail("dmd.reward_margin", f"must be a finite number or null (no hinge), got {k.reward_margin}")
    if k.reward_margin is not None and k.reward_beta == 0:
        fail(
            "dmd.reward_margin",
            "is the hinge of the reward tilt, which dmd.reward_beta=0 turns off: set dmd.reward_beta > 0 (RTDMD: 0.1) "
            "or remove dmd.reward_margin",
        )
    if not (math.isfinite(k.policy_weight) and k.policy_weight >= 0):
        fail(
            "dmd.policy_weight",
            f"must be a finite number >= 0 (0: no policy gradient), got {k.policy_weight}",
        )
    if k.init is not None and not (Path(k.init) / "trainable.safetensors").is_file():
        fail(
            "dmd.init",
            f"{k.init!r} is not a training checkpoint (no trainable.safetensors); pass <run>/checkpoints/step-N of a "
            "dmd run",
        )
    if k.policy_weight > 0:  # RTDMD's policy term: Flow-GRPO's loss on grouped SDE rollouts of the student
        if config.grpo.kl_beta > 0 and config.model.lora_rank == 0:
            fail(
                "grpo.kl_beta",
                "the KL reference is the model with its LoRA disabled, and model.lora_rank=0 trains no LoRA; the "
                "policy term's anchor is DMD itself: set grpo.kl_beta=0",
            )
        if config.grpo.skip_zero_advantage:
            fail(
                "grpo.skip_zero_advantage",
                "is not used by dmd.policy_weight's one-minibatch update; set it false",
            )
        if config.data.group_size < 2:
            fail(
                "data.group_size",
                f"dmd.policy_weight needs group-relative advantages, >= 2 samples per prompt, got "
                f"{config.data.group_size}",
            )
        if config.sampling.steps < 2:
            fail(
                "sampling.steps",
                "dmd.policy_weight trains the stochastic steps of the student's rollouts; a one-step student has "
                "none (its only step lands on the sample): use >= 2 steps",
            )
    if k.teacher_steps is not None and k.teacher_steps < 1:
        fail("dmd.teacher_steps", f"must be >= 1 or null (the model's default), got {k.teacher_steps}")
    for key in ("t_range", "fake_t_range"):
        span = getattr(k, key)
        if len(span) != 2 or not (0 <= span[0] < span[1] <= 1):
            fail(f"dmd.{key}", f"must be [low, high] with 0 <= low < high <= 1, got {list(span)}")
    if t.mixed_precision == "fp16":
        fail(
            "train.mixed_precision",
            "dmd steps two optimizers (student and fake score), which one fp16 gradient scaler cannot serve; "
            "use bf16",
        )
