"""Recipes whose iteration a test wraps: ``probe(fn, base)`` runs ``fn(recipe, step)`` as the iteration of a
``base`` recipe (``base.iteration(recipe, step)`` inside ``fn`` runs the real one; ``recipe.ctx`` is the
loop's context)."""

from __future__ import annotations

from flowalign.train.recipe import Recipe


def probe(fn, base: type[Recipe] = Recipe) -> Recipe:
    class Probe(base):
        def iteration(self, step: int) -> dict[str, float]:
            return fn(self, step)

    Probe.name = base.name
    return Probe()
