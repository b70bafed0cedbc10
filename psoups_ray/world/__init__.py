"""The tiny world: a synthetic instruction world with program-checkable preference poles.

:class:`TinyWorld` generates prompts and responses whose expertise (P1), informativeness (P2)
and style (P3) poles vary independently; :func:`check_attributes` says which poles a text
exhibits. See DESIGN.md, "The embedded default: the tiny world".
"""

from psoups_ray.world.checkers import check_attributes, exhibited_poles, satisfies
from psoups_ray.world.generator import (
    WORLD_POLES,
    PreferencePair,
    TinyWorld,
    Topic,
    WorldExample,
)


def data_world(config) -> TinyWorld | None:
    """The world a run's data comes from: the tiny world when its base is the tiny world's
    model (trained on the world's text), None for a real model. Stages ask this, and the
    run's attribute judge (:func:`psoups_ray.judges.attributes.attribute_judge`), instead of
    asking which base the run has."""
    if not config.base.is_tiny:
        return None
    return TinyWorld(seed=config.world.seed, num_eval_prompts=config.world.num_eval_prompts)


__all__ = [
    "WORLD_POLES",
    "data_world",
    "PreferencePair",
    "TinyWorld",
    "Topic",
    "WorldExample",
    "check_attributes",
    "exhibited_poles",
    "satisfies",
]
