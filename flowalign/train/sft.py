"""The control recipe: continued supervised fine-tuning of the shapes model with its pretraining loss.

An alignment algorithm's effect on the shapes world is shown only when it beats this control, which spends
the same minutes on the same LoRA doing something other than reward (design section 7). One iteration is
one optimizer step of the objective the shipped model was pretrained with (rectified flow in SD3's
parameterization, Esser et al. 2024, Eq. 1-3): fresh scenes and GenEval-schema captions from
:class:`flowalign.worlds.shapes.data.SceneStream` (never a held-out (shape, colour) pair), captions dropped
to the empty prompt with the pretraining probability, ``sigma`` from the pretraining density, and
:func:`flowalign.worlds.shapes.pretrain.flow_matching_loss` through the loop's LoRA-adapted UNet.

Every draw comes from a generator keyed by ``(seed, iteration, sample)`` (:meth:`TrainContext.sample_generators`),
so a resumed run continues exactly and 1 or N processes train on the same global batch. The recipe samples
no images and uses no reward (see :class:`flowalign.config.SFTConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign.models import ModelAdapter
from flowalign.samplers.steps import randn
from flowalign.train.loop import TrainContext
from flowalign.train.recipe import Recipe, register_recipe
from flowalign.worlds.shapes.data import SceneStream
from flowalign.worlds.shapes.pretrain import PretrainConfig, flow_matching_loss, sample_sigmas

__all__ = ["PRETRAINING", "FlowMatchingBatch", "SFTRecipe", "check_shapes_model", "draw_batch"]

PRETRAINING = PretrainConfig()
"""The shipped model's pretraining recipe (its defaults; the stored run config is
``benchmarks/results/shapes_base/pretrain/config.json``): sigma density, caption dropout, task weights."""


@dataclass
class FlowMatchingBatch:
    """One process's share of an iteration's pretraining examples.

    Attributes:
        x0: ``[B, C, h, w]`` clean latents of the rendered scenes.
        captions: ``B`` captions, ``""`` where caption dropout replaced one by the empty prompt.
        sigmas: ``[B]`` noise levels in ``(0, 1)``.
        noise: ``[B, C, h, w]`` standard normal ``eps``.
    """

    x0: Tensor
    captions: list[str]
    sigmas: Tensor
    noise: Tensor


def check_shapes_model(model: ModelAdapter) -> None:
    """The control continues the shapes world's pretraining: refuse other families and non-float32 weights."""
    if model.family != "shapes":
        raise ValueError(
            f"train.algorithm=sft continues the shapes world's pretraining (its scenes and loss) and cannot train "
            f"a model of the {model.family!r} family; use model.path=shapes (or tiny-shapes), or a reward recipe."
        )
    if model.dtype != torch.float32:
        raise ValueError(
            f"train.algorithm=sft trains in float32 as the shapes model was pretrained, got model.dtype="
            f"{str(model.dtype).removeprefix('torch.')}; set model.dtype=float32 (train.mixed_precision for bf16)."
        )


def _sample_ids(ctx: TrainContext) -> torch.Tensor:
    """This process's contiguous block of the global batch's sample indices."""
    size, processes = ctx.config.sft.batch_size, ctx.accelerator.num_processes
    if size % processes:
        raise ValueError(
            f"sft.batch_size={size} must be divisible by the number of processes ({processes}) so that every "
            "process trains on an equal share; change sft.batch_size."
        )
    per = size // processes
    return torch.arange(ctx.accelerator.process_index * per, (ctx.accelerator.process_index + 1) * per)


def draw_batch(ctx: TrainContext, step: int) -> FlowMatchingBatch:
    """Iteration ``step``'s examples on this process; sample ``i`` of the global batch is the same whichever
    process draws it, and every draw is keyed by ``(seed, step, i, purpose)``."""
    ids = _sample_ids(ctx)

    def generators(purpose: str) -> list[torch.Generator]:
        return ctx.sample_generators(step, purpose, ids)

    seeds = [int(torch.randint(2**62, (1,), generator=g, device=g.device)) for g in generators("scene")]
    scenes = [SceneStream(seed, PRETRAINING.task_weights).next_batch(1) for seed in seeds]
    dropped = [
        float(torch.rand(1, generator=g, device=g.device)) < PRETRAINING.caption_dropout
        for g in generators("caption_dropout")
    ]
    x0 = ctx.model.encode_images(torch.cat([s.images for s in scenes]))
    return FlowMatchingBatch(
        x0=x0,
        captions=["" if drop else s.captions[0] for drop, s in zip(dropped, scenes)],
        sigmas=torch.cat([sample_sigmas(PRETRAINING, 1, g) for g in generators("sigma")]),
        noise=randn(x0.shape, generators("noise"), x0.device),
    )


@register_recipe("sft")
class SFTRecipe(Recipe):
    """The supervised control; no state beyond the trained weights."""

    def setup(self, ctx: TrainContext) -> None:
        check_shapes_model(ctx.model)
        super().setup(ctx)

    def iteration(self, step: int) -> dict[str, float]:
        """One optimizer step of the pretraining flow-matching loss on fresh scenes; logs ``loss``."""
        ctx = self.ctx
        batch = draw_batch(ctx, step)
        with ctx.clock("forward"):
            loss = flow_matching_loss(
                ctx.model.pipeline, batch.x0, batch.captions, batch.sigmas, batch.noise, unet=ctx.model.net
            )
        ctx.backward(loss)
        metrics = ctx.optimizer_step()
        metrics["loss"] = loss.item()
        return metrics
