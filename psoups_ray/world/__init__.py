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

__all__ = [
    "WORLD_POLES",
    "PreferencePair",
    "TinyWorld",
    "Topic",
    "WorldExample",
    "check_attributes",
    "exhibited_poles",
    "satisfies",
]
