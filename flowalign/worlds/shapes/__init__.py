"""The shapes world: scenes, their renderer, a prompt-satisfying scene sampler and GenEval-style prompts.

Example::

    import numpy as np
    from flowalign.worlds.shapes import colors_prompt, render_scene, sample_scene
    from rewards.geneval import evaluate
    from rewards.shapes import detect

    meta = colors_prompt("circle", "red")                    # GenEval metadata, "a photo of a red circle"
    scene = sample_scene(meta, np.random.default_rng(0))     # a Scene that satisfies it
    image = render_scene(scene)                              # [3, 32, 32] float32 in {0, 1}
    assert evaluate(detect(image), meta).correct

The sprites and the exact detector live in :mod:`rewards.shapes` (the judge), the scorer in
:mod:`rewards.geneval`.
"""

from flowalign.worlds.shapes.sampler import UnsatisfiablePromptError, as_numpy_generator, sample_scene
from flowalign.worlds.shapes.scene import (
    IMAGE_SIZE,
    MAX_OBJECTS,
    MIN_GAP,
    Scene,
    SceneError,
    SceneObject,
    box_gap,
    render_scene,
    render_scenes,
    scene_detections,
    scene_from_detections,
)

# The prompt helpers load on first use, so `python -m flowalign.worlds.shapes.prompts` runs the module once.
_PROMPT_NAMES = (
    "SPLITS",
    "UNSEEN_PAIRS",
    "PromptSplits",
    "canonical_key",
    "color_attr_prompt",
    "colors_prompt",
    "counting_prompt",
    "load_prompts",
    "make_splits",
    "position_prompt",
    "single_object_prompt",
    "two_object_prompt",
    "write_splits",
)


def __getattr__(name: str):
    if name in _PROMPT_NAMES:
        from flowalign.worlds.shapes import prompts

        return getattr(prompts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGE_SIZE",
    "MAX_OBJECTS",
    "MIN_GAP",
    "SPLITS",
    "UNSEEN_PAIRS",
    "PromptSplits",
    "Scene",
    "SceneError",
    "SceneObject",
    "UnsatisfiablePromptError",
    "as_numpy_generator",
    "box_gap",
    "canonical_key",
    "color_attr_prompt",
    "colors_prompt",
    "counting_prompt",
    "load_prompts",
    "make_splits",
    "position_prompt",
    "render_scene",
    "render_scenes",
    "sample_scene",
    "scene_detections",
    "scene_from_detections",
    "single_object_prompt",
    "two_object_prompt",
    "write_splits",
]
