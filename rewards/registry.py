"""Find a reward by name, by dotted path, or through the ``flowalign.rewards`` entry-point group.

A dotted path (``package.module:ClassName``) imports and runs code named by whoever wrote the config or
the command line, so it is refused unless the caller opts in (``allow_code=True``; ``train.allow_code``,
``--allow-code``), and even then the target must be a :class:`~rewards.base.Reward` subclass, or a function
marked with :func:`reward_factory`, checked before anything is called.

Built-in rewards are listed here by import path, so importing :mod:`rewards` never imports an OCR engine,
a face model or CLIP; the module is imported when the reward is first asked for. A third-party package
exposes its rewards with an entry point::

    [project.entry-points."flowalign.rewards"]
    my_reward = "my_package.rewards:MyReward"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from rewards.base import Reward

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_rewards",
    "load_reward",
    "register_reward",
    "resolve_reward_class",
    "reward_factory",
]

ENTRY_POINT_GROUP = "flowalign.rewards"

# name -> "module:attribute"; imported on first use, so heavy optional dependencies stay unloaded.
_BUILTIN: dict[str, str] = {
    "aesthetic": "rewards.aesthetic:AestheticReward",
    "artifact": "rewards.artifact:ArtifactReward",
    "clip": "rewards.clip:ClipReward",
    "compressibility": "rewards.compressibility:CompressibilityReward",
    "geneval": "rewards.geneval_reward:GenEvalReward",
    "hpsv2": "rewards.hpsv2:HPSv2Reward",
    "identity": "rewards.identity:IdentityReward",
    "incompressibility": "rewards.compressibility:IncompressibilityReward",
    "motion": "rewards.video:MotionReward",
    "ocr": "rewards.ocr:OcrReward",
    "pickscore": "rewards.pickscore:PickScoreReward",
    "shapes_match": "rewards.shapes_match:ShapesMatchReward",
    "temporal_consistency": "rewards.video:TemporalConsistencyReward",
    "winrate": "rewards.winrate:WinRateReward",
}
_REGISTERED: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[type[Reward]], type[Reward]]:
    """Class decorator registering a reward under ``name`` for :func:`load_reward` in this process."""

    def decorate(cls: type[Reward]) -> type[Reward]:
        if name in _BUILTIN or name in _REGISTERED:
            raise ValueError(f"a reward named {name!r} is already registered; choose another name.")
        _REGISTERED[name] = cls
        return cls

    return decorate


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_rewards() -> list[str]:
    """Names :func:`load_reward` accepts: built-ins, registered classes and installed entry points."""
    return sorted({*_BUILTIN, *_REGISTERED, *_entry_points()})


def _import_attr(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward path {path!r} must look like 'package.module:ClassName'.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"cannot import module {module_name!r} for reward {path!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (reward {path!r}).") from err


def reward_factory(fn: Callable[..., Reward]) -> Callable[..., Reward]:
    """Mark a function that builds a :class:`~rewards.base.Reward`, so a dotted path may name it."""
    fn.is_reward_factory = True  # type: ignore[attr-defined]
    return fn


def resolve_reward_class(spec: str, allow_code: bool = False) -> Callable[..., Reward]:
    """The class (or factory) behind a reward name or dotted path, without instantiating it. A dotted path
    needs ``allow_code`` and must name a Reward subclass or a :func:`reward_factory` function."""
    if spec in _REGISTERED:
        return _REGISTERED[spec]
    if spec in _BUILTIN:
        return _import_attr(_BUILTIN[spec])
    eps = _entry_points()
    if spec in eps:
        return eps[spec].load()
    if "." in spec or ":" in spec:
        if not allow_code:
            raise ValueError(
                f"reward {spec!r} is a code path: importing it runs code the config or command line names. Opt "
                "in with train.allow_code=true (configs) or --allow-code (commands), or register the reward "
                f"under the {ENTRY_POINT_GROUP!r} entry-point group."
            )
        target = _import_attr(spec)
        is_reward_class = isinstance(target, type) and issubclass(target, Reward)
        if not (is_reward_class or getattr(target, "is_reward_factory", False)):
            raise ValueError(
                f"reward {spec!r} names a {type(target).__name__}, not a rewards.Reward subclass or a function "
                "marked with @rewards.reward_factory; it was not called."
            )
        return target
    raise ValueError(
        f"unknown reward {spec!r}. Known rewards: {', '.join(available_rewards())}. "
        "A reward of your own can be given as 'package.module:ClassName' or registered under the "
        f"{ENTRY_POINT_GROUP!r} entry-point group."
    )


def _accepted_arguments(factory: Any) -> set[str] | None:
    """The keyword arguments ``factory`` accepts, following ``**kwargs`` up a class's bases; None when it
    takes arbitrary keywords."""
    import inspect

    chain = (
        [c.__init__ for c in factory.__mro__ if "__init__" in vars(c)]
        if inspect.isclass(factory)
        else [factory]
    )
    names: set[str] = set()
    for function in chain:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names - {"self"}
    return None


def load_reward(spec: str, allow_code: bool = False, **kwargs: Any) -> Reward:
    """Instantiate a reward from a name or (with ``allow_code``) a dotted path; ``kwargs`` go to its
    constructor."""
    factory = resolve_reward_class(spec, allow_code=allow_code)
    accepted = _accepted_arguments(factory)
    unknown = sorted(set(kwargs) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(
            f"reward {spec!r} has no argument(s) {unknown}; its arguments are {sorted(accepted)} (config: "
            f"reward.{spec}.args; command line: --reward-arg {spec}.KEY=VALUE)."
        )
    reward = factory(**kwargs)
    if not isinstance(reward, Reward):
        raise TypeError(
            f"{spec!r} produced a {type(reward).__name__}, not a rewards.Reward; subclass rewards.Reward "
            "and implement score_batch(images, prompts, metadata)."
        )
    return reward
