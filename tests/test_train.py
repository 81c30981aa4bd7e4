"""The shared training loop and the online-RL recipes on tiny components: configs, parameter updates,
exact resume, SIGTERM, non-finite rewards."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from probes import probe as make_probe
from safetensors.torch import load_file
from shipped_configs import CONFIG_IDS, CONFIGS, PLACEHOLDER_FILES

from flowalign.config import ALGORITHMS, ConfigError, load_config
from flowalign.train import run_training, train
from flowalign.train.loop import build_reward
from flowalign.train.online import GRPORecipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_every_config_loads_and_validates(path):
    from rewards import resolve_reward_class

    config = load_config(path, PLACEHOLDER_FILES.get(str(path.relative_to(ROOT / "configs")), []))
    assert config.train.algorithm in ALGORITHMS
    for name in config.reward:
        resolve_reward_class(name)  # every reward a config names exists


def test_config_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lrr: 0.1}\nreward: {incompressibility: {}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lrr"):
        load_config(bad)
    bad.write_text("optim: {lr: fast}\nreward: {incompressibility: {}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lr"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"override 'train\.stepz=3'.*train\.stepz"):
        load_config(ROOT / "configs/grpo/tiny_sd3.yaml", ["train.stepz=3"])
    with pytest.raises(ConfigError, match="data.group_size"):
        load_config(ROOT / "configs/grpo/tiny_sd3.yaml", ["data.group_size=1"])
    with pytest.raises(ConfigError, match=r"data\.balance_weights.*balance_by, which is not set"):
        load_config(ROOT / "configs/grpo/tiny_sd3.yaml", ["data.balance_weights={a: 1}"])
    with pytest.raises(ConfigError, match=r"data\.balance_weights.*>= 0"):
        load_config(ROOT / "configs/grpo/shapes.yaml", ["data.balance_weights.counting=-1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def _config(path, tmp_path, *overrides):
    return load_config(ROOT / path, [f"train.output_dir={tmp_path}", *overrides])


def _lora_params(run_dir: Path) -> dict[str, torch.Tensor]:
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
    return load_file(str(checkpoint / "trainable.safetensors"))


@pytest.mark.parametrize(
    "path", ["configs/grpo/tiny_sd3.yaml", "configs/nft/tiny_sd3.yaml", "configs/grpo/tiny_sd_ddpo.yaml"]
)
def test_recipe_moves_trainable_parameters(path, tmp_path):
    config = _config(path, tmp_path, "train.steps=1", "train.checkpoint_every=1")
    result = train(config)
    assert result.steps_done == 1 and not result.interrupted
    params = _lora_params(tmp_path)
    lora_b = [v for k, v in params.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have moved"
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "step-000001" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_checkpoint_holds_the_ema_lora_next_to_the_trained_one(tmp_path):
    config = _config(
        "configs/grpo/tiny_sd3.yaml",
        tmp_path,
        "train.steps=2",
        "train.ema_decay=0.5",
        "train.checkpoint_every=2",
    )
    train(config)
    checkpoint = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]

    def norms(tensors):  # LoRA files and trainable tensors name parameters differently; compare values
        return sorted(round(float(v.float().norm()), 6) for v in tensors.values())

    lora = load_file(str(checkpoint / "lora" / "pytorch_lora_weights.safetensors"))
    lora_ema = load_file(str(checkpoint / "lora_ema" / "pytorch_lora_weights.safetensors"))
    assert norms(lora) == norms(load_file(str(checkpoint / "trainable.safetensors")))
    assert norms(lora_ema) == norms(load_file(str(checkpoint / "ema_ema.safetensors")))
    assert norms(lora_ema) != norms(lora)


def test_full_finetuning_checkpoint_holds_the_ema_under_the_denoisers_names(tmp_path):
    """Without a LoRA the EMA is also written as trainable_ema.safetensors, which --weights loads."""
    from flowalign.models import load_model

    config = _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=2", "model.lora_rank=0",
                     "grpo.kl_beta=0", "train.ema_decay=0.5", "train.checkpoint_every=2")  # fmt: skip
    train(config)
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    trained = load_file(str(checkpoint / "trainable.safetensors"))
    averaged = load_file(str(checkpoint / "trainable_ema.safetensors"))
    shadows = load_file(str(checkpoint / "ema_ema.safetensors"))
    model = load_model(config.model.path)
    order = [name for name, _ in model.denoiser.named_parameters() if name in trained]  # the EMA's order
    assert set(averaged) == set(trained) and len(shadows) == len(order)
    assert all(torch.equal(averaged[name], shadows[str(i)]) for i, name in enumerate(order))
    assert any(not torch.equal(averaged[name], trained[name]) for name in trained)
    model.load_weights(checkpoint / "trainable_ema.safetensors")
    own = model.denoiser.state_dict()
    assert all(torch.equal(own[name], averaged[name]) for name in averaged)


def test_first_update_is_on_policy_and_kl_starts_at_zero(tmp_path):
    seen = {}

    def probe(recipe, step):
        metrics = GRPORecipe.iteration(recipe, step)
        seen.update(metrics)
        return metrics

    config = _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "grpo.minibatch_size=4")
    run_training(config, make_probe(probe, GRPORecipe))
    assert seen["ratio"] == 1.0 and seen["clip_frac"] == 0.0 and seen["approx_kl"] == 0.0
    assert seen["kl"] == 0.0  # one minibatch: every KL is computed before the first update, LoRA B == 0


def test_resume_is_bitwise_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["grpo.minibatch_size=2", "train.checkpoint_every=2", "train.keep_checkpoints=5"]
    train(_config("configs/grpo/tiny_sd3.yaml", straight, "train.steps=4", *common))
    train(_config("configs/grpo/tiny_sd3.yaml", resumed, "train.steps=2", *common))
    train(_config("configs/grpo/tiny_sd3.yaml", resumed, "train.steps=4", "train.resume=latest", *common))
    a, b = _lora_params(straight), _lora_params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigterm_saves_and_stops(tmp_path):
    def interrupting(recipe, step):
        metrics = GRPORecipe.iteration(recipe, step)
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    config = _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=3", "train.checkpoint_every=0")
    result = run_training(config, make_probe(interrupting, GRPORecipe))
    assert result.interrupted and result.steps_done == 1
    assert (tmp_path / "checkpoints" / "step-000001" / "state.json").is_file()


def test_nonfinite_rewards_skip_the_update(tmp_path):
    from rewards import Reward, RewardOutput, register_reward

    @register_reward("nan_reward_for_test")
    class NaNReward(Reward):
        def score_batch(self, images, prompts, metadata):
            return RewardOutput(torch.full((images.shape[0],), float("nan")))

    config = _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "train.checkpoint_every=1")
    config.reward = {"nan_reward_for_test": config.reward["incompressibility"]}
    result = train(config)
    assert result.last_metrics["skipped_nonfinite_reward"] == 1.0
    assert all(v.abs().sum() == 0 for k, v in _lora_params(tmp_path).items() if "lora_B" in k)


def test_two_processes_give_the_same_advantages_as_one(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on a CPU-only machine (gloo) against one process,
    same global batch."""
    import subprocess
    import sys

    script = ROOT / "benchmarks" / "dist" / "advantage_equivalence.py"
    config = "configs/grpo/tiny_sd3.yaml"
    common = ["data.groups_per_step=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            str(script),
            config,
            str(tmp_path / "one.pt"),
            f"train.output_dir={tmp_path}/one",
            *common,
        ],
        check=True,
        cwd=ROOT,
        env=env,
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]  # fmt: skip
    subprocess.run(
        [*launch, str(script), config, str(tmp_path / "two.pt"), f"train.output_dir={tmp_path}/two", *common],
        check=True,
        cwd=ROOT,
        env=env,
    )
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    torch.testing.assert_close(one["images"], two["images"], rtol=0, atol=1e-5)
    for key in one["rewards"]:
        torch.testing.assert_close(one["rewards"][key], two["rewards"][key], rtol=0, atol=1e-6)
    torch.testing.assert_close(one["advantages"], two["advantages"], rtol=0, atol=1e-5)
    assert one["advantages"].abs().sum() > 0


def test_sde_window_random_and_sliding():
    from types import SimpleNamespace

    from flowalign.samplers import flow_schedule
    from flowalign.train.online import sampling_plan

    common = ["sampling.steps=8", "sampling.sde_window=[1,2]", "sampling.sde_window_shift=3"]
    schedule = flow_schedule(8)

    def starts(mode):
        config = load_config(
            ROOT / "configs/grpo/tiny_sd3.yaml",
            [*common, f"sampling.sde_window_mode={mode}", "sampling.sde_window_interval=2"],
        )
        ctx = SimpleNamespace(
            config=config,
            model=SimpleNamespace(kind="flow"),
            dynamics="flow_grpo",
            shared_generator=lambda s, p: torch.Generator().manual_seed(s),
        )
        plans = [sampling_plan(ctx, step, schedule) for step in range(10)]
        assert all(sum(p.sde) == 2 for p in plans)
        return [p.sde.index(True) for p in plans]

    assert starts("sliding") == [
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        1,
        1,
    ]  # MixGRPO: one step every 2 iterations, wrapping
    random_starts = starts("random")
    assert set(random_starts) <= {1, 2, 3, 4} and len(set(random_starts)) > 1  # Flow-GRPO-Fast


def test_pref_grpo_win_rate_reward_trains(tmp_path):
    config = _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "train.checkpoint_every=1")
    from flowalign.config import RewardSpec

    config.reward = {"winrate": RewardSpec(args={"judge": "incompressibility"})}
    result = train(config)
    assert 0.0 <= result.last_metrics["reward_winrate"] <= 1.0
    assert any(v.abs().sum() > 0 for k, v in _lora_params(tmp_path).items() if "lora_B" in k)


def test_training_evaluates_geneval_prompts_before_and_during(tmp_path):
    import json

    config = _config(
        "configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "eval.prompts=assets/shapes/prompts/test.jsonl",
        "eval.max_prompts=2", "eval.images_per_prompt=1", "eval.every=1", "eval.steps=2",
    )  # fmt: skip
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and 0.0 <= rows[0]["eval/geneval_overall"] <= 1.0
    assert rows[-1]["step"] == 1 and "eval/geneval_overall" in rows[-1]
    assert (tmp_path / "eval" / "step-000001" / "summary.md").is_file()
    # Later evaluations pair their images with the first one's (same prompts and noise).
    assert "eval/geneval_gain" not in rows[0]
    last = rows[-1]
    assert last["eval/geneval_gain"] == pytest.approx(
        last["eval/geneval_overall"] - rows[0]["eval/geneval_overall"]
    )
    assert last["eval/geneval_gain_lo"] <= last["eval/geneval_gain"] <= last["eval/geneval_gain_hi"]


def test_training_evaluation_measures_every_task_on_images_per_task(tmp_path):
    import json

    config = _config(
        "configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "eval.prompts=assets/shapes/prompts/test.jsonl",
        "eval.max_prompts=null", "eval.images_per_task=2", "eval.images_per_prompt=1", "eval.at_start=false",
        "eval.every=1", "eval.steps=2",
    )  # fmt: skip
    train(config)
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["eval/geneval_overall_lo"] <= row["eval/geneval_overall"] <= row["eval/geneval_overall_hi"]
    tasks = json.loads((tmp_path / "eval" / "step-000001" / "results.json").read_text())["stats"]["tasks"]
    assert {tag: (t["prompts"], t["images"]) for tag, t in tasks.items()} == dict.fromkeys(tasks, (2, 2))
    assert len(tasks) == 6
    with pytest.raises(ConfigError, match=r"eval\.images_per_task.*>= eval\.images_per_prompt \(2"):
        _config("configs/grpo/shapes.yaml", tmp_path, "eval.images_per_task=1")


def test_group_sampler_splits_the_global_batch_and_balances_tasks():
    from collections import Counter

    from flowalign.data.prompts import GroupSampler, PromptRecord

    records = [PromptRecord(f"p{i}", {"tag": "rare" if i < 2 else "common"}) for i in range(20)]
    # Plain sampling: an epoch is a permutation, so 20 groups over 5 iterations see every prompt once.
    plain = GroupSampler(records, group_size=2, groups_per_step=4, seed=3)
    assert sorted(i for it in range(5) for i in plain.global_indices(it)) == list(range(20))
    # Two processes hold contiguous halves of the same global batch.
    halves = [GroupSampler(records, 2, 4, seed=3, num_processes=2, process_index=k).batch(7) for k in (0, 1)]
    whole = plain.batch(7)
    assert halves[0].prompts + halves[1].prompts == whole.prompts
    # Balanced: each tag is drawn about half the time although "rare" is 10% of the set.
    balanced = GroupSampler(records, 2, 4, seed=3, balance_by="tag")
    tags = Counter(records[i].metadata["tag"] for it in range(500) for i in balanced.global_indices(it))
    assert abs(tags["rare"] / 2000 - 0.5) < 0.05
    assert balanced.global_indices(11) == GroupSampler(
        records, 2, 4, seed=3, balance_by="tag"
    ).global_indices(11)
    with pytest.raises(ValueError, match="balance_by='task'.*no metadata key"):
        GroupSampler(records, 2, 4, balance_by="task")
    # Weighted: "rare" drawn 3x as often as "common"; a weight of 0 never draws its value.
    weighted = GroupSampler(records, 2, 4, seed=3, balance_by="tag", balance_weights={"rare": 3, "common": 1})
    tags = Counter(records[i].metadata["tag"] for it in range(500) for i in weighted.global_indices(it))
    assert abs(tags["rare"] / 2000 - 0.75) < 0.05
    only = GroupSampler(records, 2, 4, seed=3, balance_by="tag", balance_weights={"rare": 0, "common": 1})
    assert all(i >= 2 for it in range(100) for i in only.global_indices(it))
    with pytest.raises(
        ValueError, match=r"must name every value.*missing \['common'\], unknown \['Common'\]"
    ):
        GroupSampler(records, 2, 4, balance_by="tag", balance_weights={"Common": 1, "rare": 1})
    with pytest.raises(ValueError, match="positive sum"):
        GroupSampler(records, 2, 4, balance_by="tag", balance_weights={"rare": 0, "common": 0})
    with pytest.raises(ValueError, match="balance_by, which is not set"):
        GroupSampler(records, 2, 4, balance_weights={"rare": 1})


@pytest.mark.parametrize("group_noise", ["independent", "shared"])
def test_group_noise_shares_the_initial_noise_within_a_group_only_when_asked(tmp_path, group_noise):
    from flowalign.train.online import sample_and_score

    seen = {}

    def probe(recipe, step):
        sampled = sample_and_score(recipe.ctx, step)
        seen["x0"], seen["groups"] = sampled.trajectory.latents[:, 0], sampled.batch.group_ids
        seen["final"] = sampled.trajectory.latents[:, -1]
        return {}

    config = _config(
        "configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", f"sampling.group_noise={group_noise}"
    )
    run_training(config, make_probe(probe, GRPORecipe))
    x0, groups, final = seen["x0"], seen["groups"], seen["final"]
    same_group = groups[0] == groups[1]
    assert same_group and groups[0] != groups[2]
    assert torch.equal(x0[0], x0[1]) == (group_noise == "shared")
    assert not torch.equal(x0[0], x0[2])
    assert not torch.equal(final[0], final[1])  # the SDE steps still make the group's samples differ


def test_shared_group_noise_is_rejected_for_ode_recipes(tmp_path):
    with pytest.raises(ConfigError, match="sampling.group_noise"):
        load_config(ROOT / "configs/nft/tiny_sd3.yaml", ["sampling.group_noise=shared"])


def test_skipping_zero_advantage_samples_leaves_the_update_unchanged(tmp_path, monkeypatch):
    """Zero-advantage samples carry no gradient (kl_beta=0): with one minibatch, Adam's first step is
    invariant to the loss's scale, so dropping them must give the same parameters."""
    import flowalign.train.online as online

    real = online.multi_reward_advantages

    def half_zero(*args, **kwargs):
        advantages = real(*args, **kwargs)
        advantages[: len(advantages) // 2] = 0.0  # the first group: every sample scored the same
        return advantages

    monkeypatch.setattr(online, "multi_reward_advantages", half_zero)
    seen = {}

    def probe(recipe, step):
        metrics = GRPORecipe.iteration(recipe, step)
        seen.update(metrics)
        return metrics

    params = {}
    for skip in (False, True):
        out = tmp_path / str(skip)
        overrides = ["train.steps=1", "train.checkpoint_every=1", "grpo.kl_beta=0", "grpo.minibatch_size=4"]
        overrides.append("optim.eps=1e-30")  # Adam's eps would break the scale invariance of tiny gradients
        run_training(
            _config("configs/grpo/tiny_sd3.yaml", out, *overrides, f"grpo.skip_zero_advantage={skip}"),
            make_probe(probe, GRPORecipe),
        )
        assert seen["informative_fraction"] == (0.5 if skip else 1.0)
        params[skip] = _lora_params(out)
    moved = [k for k in params[True] if "lora_B" in k and params[True][k].abs().sum() > 0]
    assert moved
    for key in params[True]:
        torch.testing.assert_close(params[True][key], params[False][key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="grpo.skip_zero_advantage"):
        load_config(ROOT / "configs/grpo/tiny_sd3.yaml", ["grpo.skip_zero_advantage=true"])  # kl_beta 0.01


def test_a_registered_recipe_runs_through_the_loop_and_resumes_its_state(tmp_path):
    """The loop knows no algorithm by name: a recipe registered by user code trains, its state is saved in
    checkpoints and given back on resume."""
    from flowalign.train import Recipe, register_recipe

    @register_recipe("counting_for_test")
    class Counting(Recipe):
        def setup(self, ctx):
            super().setup(ctx)
            self.count = torch.zeros(())

        def iteration(self, step):
            self.count += 1
            if step == 1:  # no update in this iteration
                return {"count": float(self.count)}
            loss = sum((p.float() - 1).square().sum() for p in self.ctx.trainable)
            self.ctx.backward(loss)
            return {"count": float(self.count), **self.ctx.optimizer_step()}

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"].clone()

    common = ["train.algorithm=counting_for_test", "train.checkpoint_every=1", "train.keep_checkpoints=5"]
    train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=2", *common))
    result = train(
        _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=3", "train.resume=latest", *common)
    )
    assert result.last_metrics["count"] == 3.0
    saved = load_file(str(tmp_path / "checkpoints" / "step-000003" / "recipe.safetensors"))
    assert float(saved["count"]) == 3.0
    with pytest.raises(ConfigError, match="train.algorithm.*register a recipe"):
        load_config(ROOT / "configs/grpo/tiny_sd3.yaml", ["train.algorithm=unregistered"])


def test_trainable_weights_and_adam_states_are_float32_over_a_bf16_base(tmp_path):
    """As diffusers' training scripts: the LoRA trains in float32 (no bf16 Adam states) while the frozen base
    stays in model.dtype."""
    from probes import probe as make_probe

    seen = {}

    def probe(recipe, step):
        metrics = GRPORecipe.iteration(recipe, step)
        model = recipe.ctx.model
        seen["trainable"] = {p.dtype for p in model.trainable_parameters()}
        seen["frozen"] = {p.dtype for p in model.denoiser.parameters() if not p.requires_grad}
        seen["adam"] = {
            v.dtype for s in recipe.ctx.optimizer.state.values() for k, v in s.items() if k != "step"
        }
        return metrics

    config = _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "model.dtype=bfloat16")
    run_training(config, make_probe(probe, GRPORecipe))
    assert seen == {"trainable": {torch.float32}, "frozen": {torch.bfloat16}, "adam": {torch.float32}}


def test_precision_combinations_that_cannot_work_are_refused(tmp_path):
    tiny = ROOT / "configs/grpo/tiny_sd3.yaml"
    with pytest.raises(ConfigError, match=r"model\.dtype.*full fine-tuning.*float32"):
        load_config(tiny, ["model.lora_rank=0", "model.dtype=bfloat16", "grpo.kl_beta=0"])
    with pytest.raises(ConfigError, match=r"grpo\.kl_beta.*LoRA disabled"):
        load_config(tiny, ["model.lora_rank=0"])
    with pytest.raises(ConfigError, match=r"model\.dtype.*float32, bfloat16 or float16"):
        load_config(tiny, ["model.dtype=float8"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            train(
                _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "train.mixed_precision=fp16")
            )


def test_fp16_overflow_lets_the_gradient_scaler_skip_the_step_and_holds_the_schedule():
    """With a gradient scaler the optimizer step is always called (the scaler skips an overflowing one and
    lowers its scale); the LR schedule advances only on real updates."""
    from types import SimpleNamespace

    from flowalign.train.loop import TrainContext

    calls = {"optimizer": 0, "scheduler": 0}
    optimizer = SimpleNamespace(step_was_skipped=True, zero_grad=lambda set_to_none: None)
    optimizer.step = lambda: calls.__setitem__("optimizer", calls["optimizer"] + 1)
    scheduler = SimpleNamespace(step=lambda: calls.__setitem__("scheduler", calls["scheduler"] + 1))
    accelerator = SimpleNamespace(
        scaler=object(), clip_grad_norm_=lambda params, norm: torch.tensor(float("inf"))
    )
    config = load_config(ROOT / "configs/grpo/tiny_sd3.yaml")
    model = SimpleNamespace(trainable_parameters=lambda: [])
    ctx = TrainContext(config, accelerator, model, None, optimizer, scheduler, None, None, None, Path("."))
    assert ctx.optimizer_step()["skipped_updates"] == 1.0 and calls == {"optimizer": 1, "scheduler": 0}
    optimizer.step_was_skipped = False
    accelerator.clip_grad_norm_ = lambda params, norm: torch.tensor(0.5)
    assert ctx.optimizer_step()["skipped_updates"] == 0.0 and calls == {"optimizer": 2, "scheduler": 1}


def test_options_that_would_be_dropped_are_errors_or_honoured(tmp_path):
    tiny = ROOT / "configs/grpo/tiny_sd3.yaml"
    assert load_config(tiny, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # not YAML's False
    with pytest.raises(ConfigError, match=r"sampling\.guidance.*CFG-free"):
        load_config(ROOT / "configs/nft/tiny_sd3.yaml", ["sampling.guidance=4.5"])
    with pytest.raises(ValueError, match=r"sampling\.dynamics=flow_grpo does not apply to a diffusion model"):
        train(
            _config(
                "configs/grpo/tiny_sd_ddpo.yaml", tmp_path, "train.steps=1", "sampling.dynamics=flow_grpo"
            )
        )
    with pytest.raises(ValueError, match=r"sampling\.dynamics=ddim does not apply to a flow model"):
        train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "sampling.dynamics=ddim"))


def test_two_runs_in_one_process_may_differ_in_mixed_precision(tmp_path):
    train(
        _config("configs/grpo/tiny_sd3.yaml", tmp_path / "a", "train.steps=1", "train.mixed_precision=bf16")
    )
    result = train(
        _config("configs/grpo/tiny_sd3.yaml", tmp_path / "b", "train.steps=1", "train.mixed_precision=no")
    )
    assert result.steps_done == 1


def test_evaluation_scores_a_groupwise_reward_by_its_pointwise_judge(tmp_path):
    """A win rate within a group has no per-image value (one image per prompt gives 0, several give a mean
    of 0.5 by construction): evaluation logs its judge's score instead."""
    from flowalign.config import RewardSpec
    from flowalign.train.evaluate import _pointwise_scores
    from rewards import load_reward

    config = load_config(ROOT / "configs/grpo/tiny_sd3.yaml")
    config.reward = {"winrate": RewardSpec(args={"judge": "compressibility"})}
    reward = build_reward(config, torch.device("cpu"))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = _pointwise_scores(reward, images, ["a", "b", "c"], None)
    expected = load_reward("compressibility")(images, ["a", "b", "c"]).scores.tolist()
    assert scores == {"winrate/compressibility": expected}


def test_accelerate_fsdp_launch_is_refused_and_shipped_accelerate_configs_parse(tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig

    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        ClusterConfig.from_yaml_file(str(path))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="train.sharding=fsdp"):
        train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1"))


def test_a_run_owns_its_output_directory(tmp_path):
    """A second run into a directory holding a run is refused (its checkpoints would be pruned, its config
    overwritten); train.overwrite=true deletes the old run first; a live holder's lock refuses, a dead
    holder's lock is broken."""
    import socket
    import subprocess

    from flowalign.train.rundir import RunDirError

    first = train(
        _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=2", "train.checkpoint_every=1")
    )
    assert first.steps_done == 2 and not (tmp_path / "run.lock").exists()
    with pytest.raises(
        RunDirError,
        match=r"already holds a run \(config\.yaml, metrics\.jsonl, checkpoints\).*train\.resume=latest.*train\.overwrite=true",
    ):
        train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "train.overwrite=true"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]

    other = tmp_path / "other"
    other.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (other / "run.lock").write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": 0})
        )
        with pytest.raises(RunDirError, match=rf"in use by the run with pid {holder.pid}"):
            train(_config("configs/grpo/tiny_sd3.yaml", other, "train.steps=1"))
    finally:
        holder.kill()
        holder.wait()
    assert (
        train(_config("configs/grpo/tiny_sd3.yaml", other, "train.steps=1")).steps_done == 1
    )  # stale lock broken


def test_resume_logs_each_step_once_and_the_final_weights_are_always_saved(tmp_path):
    train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=4", "train.checkpoint_every=2",
                  "train.keep_checkpoints=5"))  # fmt: skip
    step2 = tmp_path / "checkpoints" / "step-000002"
    train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=4", f"train.resume={step2}",
                  "train.checkpoint_every=2", "train.keep_checkpoints=5"))  # fmt: skip
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    only_final = tmp_path / "final"
    train(_config("configs/grpo/tiny_sd3.yaml", only_final, "train.steps=2", "train.checkpoint_every=0"))
    assert [p.name for p in (only_final / "checkpoints").iterdir()] == ["step-000002"]


def test_a_skipped_nonfinite_step_moves_neither_weights_nor_ema(tmp_path):
    """Reward backprop whose reward turns NaN at the second iteration: that step is skipped, and neither the
    weights nor the EMA (which trails the first update, so an EMA step would move it) change."""
    from rewards import Reward, RewardOutput, register_reward

    calls = {"n": 0}

    @register_reward("nan_second_time_for_test")
    class NaNSecondTime(Reward):
        differentiable = True

        def score_batch(self, images, prompts, metadata):
            calls["n"] += 1
            scale = 1.0 if calls["n"] == 1 else float("nan")
            return RewardOutput(images[:, 0].flatten(1).mean(1) * scale)

    from flowalign.config import RewardSpec

    config = _config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=2", "train.algorithm=backprop",
                     "backprop.mode=draft", "backprop.k=1", "sampling.steps=3", "data.group_size=1",
                     "train.ema_decay=0.5", "train.checkpoint_every=1", "train.keep_checkpoints=5")  # fmt: skip
    config.reward = {"nan_second_time_for_test": RewardSpec()}
    result = train(config)
    assert result.last_metrics["skipped_updates"] == 1.0
    first, second = (tmp_path / "checkpoints" / f"step-00000{i}" for i in (1, 2))
    for name in ("trainable", "ema_ema"):
        a, b = load_file(str(first / f"{name}.safetensors")), load_file(str(second / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _corrupt_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 100] = bytes(100)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,reason",
    [
        (
            lambda c: _corrupt_bytes(c / "trainable.safetensors"),
            "trainable.safetensors does not match its checksum",
        ),
        (
            lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]),
            "optimizer.pt has 100 bytes",
        ),
        (lambda c: (c / "ema_ema.safetensors").unlink(), "ema_ema.safetensors is missing"),
        (lambda c: (c / "state.json").write_text(""), "state.json does not read"),
        (lambda c: (c / "state.json").unlink(), "incomplete"),
        (
            lambda c: (c / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"x"),
            "lora/pytorch_lora_weights",
        ),
    ],
    ids=[
        "bytes-overwritten",
        "optimizer-truncated",
        "file-deleted",
        "state-empty",
        "unfinished",
        "lora-replaced",
    ],
)
def test_resume_skips_a_damaged_checkpoint_and_falls_back(tmp_path, damage, reason):
    """Checkpoints carry a manifest of checksums; resume=latest names and skips the newest if it does not
    verify, and resumes from the previous one, which then gives the weights of an undamaged run."""
    common = [
        "train.checkpoint_every=1",
        "train.keep_checkpoints=5",
        "train.ema_decay=0.5",
        "grpo.minibatch_size=2",
    ]
    straight = tmp_path / "straight"
    train(_config("configs/grpo/tiny_sd3.yaml", straight, "train.steps=3", *common))
    run = tmp_path / "run"
    train(_config("configs/grpo/tiny_sd3.yaml", run, "train.steps=2", *common))
    damage(run / "checkpoints" / "step-000002")
    with pytest.warns(UserWarning, match=rf"skipping checkpoint .*step-000002: .*{reason}"):
        train(_config("configs/grpo/tiny_sd3.yaml", run, "train.steps=3", "train.resume=latest", *common))
    a, b = _lora_params(straight), _lora_params(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_when_no_checkpoint_verifies_and_cleans_partial_saves(tmp_path):
    from flowalign.train.state import find_checkpoint

    common = ["train.checkpoint_every=1", "train.keep_checkpoints=5"]
    train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", *common))
    (tmp_path / "checkpoints" / "step-000007.tmp" / "lora").mkdir(parents=True)  # a save a kill interrupted
    _corrupt_bytes(tmp_path / "checkpoints" / "step-000001" / "trainable.safetensors")
    with (
        pytest.warns(UserWarning, match="step-000001"),
        pytest.raises(FileNotFoundError, match="holds no valid checkpoint"),
    ):
        find_checkpoint(tmp_path, "latest")
    with pytest.raises(FileNotFoundError, match="cannot be used: trainable.safetensors does not match"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-000001"))
    train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "train.steps=1", "train.overwrite=true", *common))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
