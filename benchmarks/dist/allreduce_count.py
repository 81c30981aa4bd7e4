"""How often DDP reduces the gradients in one optimizer step of each micro-batched recipe: once per optimizer
step (per gradient bucket), however many micro-batches the step accumulates. DDP decides at the forward
whether the next backward all-reduces, so a micro-batch before the step's last runs its forward and backward
inside ``TrainContext.micro_batch`` (DDP's ``no_sync``); ``no_sync`` around the backward alone would still
reduce every micro-batch. Each case runs one iteration with and without micro-batches of one sample and
writes the reductions counted before each optimizer step (the student's, and DMD's fake score's and
discriminator head's) to ``OUT/<case>.json``; ``tests/test_distributed.py`` compares them.

    accelerate launch --multi_gpu --num_processes 2 benchmarks/dist/allreduce_count.py OUT [CASE ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "dist"))

CASES: dict[str, tuple[str, list[str]]] = {
    "grpo": ("configs/grpo/tiny_sd3.yaml", ["train.steps=1", "grpo.minibatch_size=2"]),
    "nft": ("configs/nft/tiny_sd3.yaml", ["train.steps=1", "nft.minibatch_size=2"]),
    "dpo_online": ("configs/dpo/tiny_sd3_online.yaml", ["train.steps=1"]),
    "alignprop": ("configs/grpo/tiny_sd3.yaml", ["train.steps=1", "train.algorithm=backprop",
                                                 "backprop.mode=alignprop", "backprop.k=2", "sampling.steps=3",
                                                 "data.group_size=1", "data.groups_per_step=4"]),
    "dmd": ("configs/dmd/tiny_sd3_fdistill.yaml", ["train.steps=1", "data.groups_per_step=4",
                                                   "dmd.regression_weight=0.5", "dmd.fake_updates=1"]),
}  # fmt: skip


def count(path: str, overrides: list[str], out: Path) -> list[dict[str, int]]:
    """The reductions of each network counted before each optimizer step of one training run."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    import recipe_equivalence  # noqa: F401  (registers the test reward)
    from flowalign.config import RewardSpec, load_config
    from flowalign.train import recipe
    from flowalign.train.loop import run_training

    config = load_config(
        ROOT / path, [*overrides, f"train.output_dir={out}", "train.checkpoint_every=0", "train.progress=false",
                      "train.log_with=[]", "eval.prompts=null"],
    )  # fmt: skip
    if config.train.algorithm != "dmd":
        config.reward = {"smooth_red_for_equivalence": RewardSpec()}
    counts: dict[str, int] = {}
    steps: list[dict[str, int]] = []
    trainer = recipe(config.train.algorithm)
    setup = trainer.setup

    def counting(name: str):
        def hook(group, bucket):
            counts[name] = counts.get(name, 0) + 1
            return allreduce_hook(group, bucket)

        return hook

    def counted_setup(ctx) -> None:
        setup(ctx)
        networks = {
            "student": ctx.model.net,
            "fake": getattr(trainer, "fake", None),
            "head": getattr(trainer, "head", None),
        }
        for name, network in networks.items():
            if hasattr(network, "register_comm_hook"):
                network.register_comm_hook(None, counting(name))
        step = ctx.optimizer_step

        def counted_step():
            steps.append(dict(counts))
            counts.clear()
            return step()

        ctx.optimizer_step = counted_step
        if config.train.algorithm == "dmd":  # the fake score steps its own optimizer first
            fake_step = trainer.fake_optimizer.step

            def counted_fake_step(*args, **kwargs):
                steps.append({k: v for k, v in counts.items() if k != "student"})
                for k in ("fake", "head"):
                    counts.pop(k, None)
                return fake_step(*args, **kwargs)

            trainer.fake_optimizer.step = counted_fake_step

    trainer.setup = counted_setup
    run_training(config, trainer)
    return steps


def main() -> None:
    out, *names = sys.argv[1:]
    from accelerate import PartialState

    PartialState(cpu=True)
    for name in names or list(CASES):
        path, overrides = CASES[name]
        result = {
            micro: count(path, [*overrides, f"train.micro_batch_size={micro}"], Path(out) / f"{name}_{micro}")
            for micro in ("null", "1")
        }
        if PartialState().is_main_process:
            (Path(out) / f"{name}.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
