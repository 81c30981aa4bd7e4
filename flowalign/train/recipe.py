"""What a training recipe is: one algorithm family's iteration and the state it owns.

The loop (:func:`flowalign.train.loop.run_training`) knows no algorithm by name. It builds the
accelerator, the model, the optimizer, the prompt sampler and the rewards into a
:class:`~flowalign.train.loop.TrainContext`, hands it to the recipe's :meth:`Recipe.setup` once (after
accelerate has prepared the model, so state copied from parameters sees the prepared ones), then calls
:meth:`Recipe.iteration` once per step; checkpoints hold :meth:`Recipe.state_dict` next to the trained
weights and the optimizer, and resume gives it back through :meth:`Recipe.load_state_dict`. In the manner
of torchtune's recipes: a new algorithm is one class, registered under its ``train.algorithm`` name.

    from flowalign.train import Recipe, register_recipe

    @register_recipe("my_algo")
    class MyAlgo(Recipe):
        def setup(self, ctx):
            super().setup(ctx)
            self.old = EMA(ctx.trainable)                  # state this algorithm owns

        def iteration(self, step):
            sampled = generate(...)                        # flowalign.train.generation
            loss = ...
            self.ctx.backward(loss)
            return {"loss": loss.item(), **self.ctx.optimizer_step()}

        def state_dict(self):
            return prefixed("old", self.old.state_dict())

        def load_state_dict(self, state):
            self.old.load_state_dict(unprefixed("old", state))

(``train.algorithm`` accepts the built-in names, :data:`flowalign.config.ALGORITHMS`, and every registered
recipe.)
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from flowalign.models import ModelAdapter
    from flowalign.train.loop import TrainContext

__all__ = ["RECIPES", "Recipe", "prefixed", "recipe_class", "register_recipe", "unprefixed"]

RECIPES: dict[str, type[Recipe]] = {}
"""``train.algorithm`` name -> recipe class (filled by :func:`register_recipe`)."""


class Recipe(abc.ABC):
    """One algorithm family on the shared loop. Subclasses write :meth:`iteration` and, when they keep
    state across iterations (an old or reference policy, a pair cache), :meth:`setup`,
    :meth:`state_dict` and :meth:`load_state_dict`.

    Attributes:
        name: the ``train.algorithm`` value.
        ctx: the loop's :class:`~flowalign.train.loop.TrainContext`, set by :meth:`setup`.
    """

    name: ClassVar[str] = ""
    ctx: TrainContext

    def copy_models(self, model: ModelAdapter) -> None:
        """Called once with the model as loaded and adapted, before the loop shards it (``train.sharding:
        fsdp``) or wraps it, and before :meth:`setup`: copies of the denoiser a recipe keeps (DMD's teacher
        and fake score) are made here, since a sharded module cannot be copied. A recipe shards its copies
        itself in :meth:`setup` (:func:`flowalign.train.sharding.shard_denoiser`). Default: none."""
        return None

    def setup(self, ctx: TrainContext) -> None:
        """Called once before the first iteration (and before a resume loads the state)."""
        self.ctx = ctx

    @abc.abstractmethod
    def iteration(self, step: int) -> dict[str, float]:
        """Iteration ``step`` (0-based): sample, score, update. Returns the metrics to log. Every process
        must make the same number of collective calls (backward passes under DDP/FSDP, gathers)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors this recipe needs to continue exactly after a resume (flat names; saved with safetensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(
                f"recipe {self.name!r} keeps no state but the checkpoint holds {sorted(state)[:3]}; was it "
                "written by another train.algorithm?"
            )


def register_recipe(name: str):
    """Class decorator: make ``train.algorithm: <name>`` run this recipe."""

    def register(cls: type[Recipe]) -> type[Recipe]:
        cls.name = name
        RECIPES[name] = cls
        return cls

    return register


def recipe_class(name: str) -> type[Recipe]:
    """The recipe class registered as ``name`` (importing the built-in recipes first)."""
    import flowalign.train.backprop  # noqa: F401  (each module registers its recipes)
    import flowalign.train.dmd  # noqa: F401
    import flowalign.train.dpo  # noqa: F401
    import flowalign.train.online  # noqa: F401
    import flowalign.train.sft  # noqa: F401

    if name not in RECIPES:
        raise ValueError(f"train.algorithm: unknown recipe {name!r}; registered: {sorted(RECIPES)}.")
    return RECIPES[name]


def prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{"k": t}`` -> ``{"<prefix>.k": t}``: one recipe's several state parts in one flat dict."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``state`` under ``<prefix>.``, with the prefix removed."""
    head = prefix + "."
    return {k.removeprefix(head): v for k, v in state.items() if k.startswith(head)}
