"""The preference space: dimensions, poles, preference prompts and combinations.

A *dimension* (``P1`` expertise) has two or more *poles* (``P1A`` elementary,
``P1B`` PhD); a pole carries the preference prompt appended to a user's
instruction. A *combination* picks at most one pole per dimension and is
written ``P1A+P2B+P3A``. Parsing, validation and canonical ordering of
combinations live here and nowhere else.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from psoups_ray.errors import PsoupsError

POLE_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"
_POLE_ID_RE = re.compile(POLE_ID_PATTERN)


class CombinationError(PsoupsError, ValueError):
    """A combination string or pole list that does not fit the preference space."""


class PoleSpec(BaseModel):
    """One pole of a dimension, as declared in a config file."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    id: str = Field(pattern=POLE_ID_PATTERN)
    """Short unique id used in combination strings, e.g. ``P1A``."""
    name: str = Field(min_length=1)
    """Human-readable name, e.g. ``elementary``."""
    prompt: str = Field(min_length=1)
    """Preference prompt appended to the user's instruction for this pole."""


class DimensionSpec(BaseModel):
    """One preference dimension with its mutually exclusive poles."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    id: str = Field(pattern=POLE_ID_PATTERN)
    """Short unique id of the dimension, e.g. ``P1``."""
    name: str = Field(min_length=1)
    """Human-readable name, e.g. ``expertise``."""
    poles: list[PoleSpec] = Field(min_length=2)
    """The dimension's poles (at least two)."""


class PreferenceSpaceSpec(BaseModel):
    """The declared preference space (the ``preferences`` config section)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    dimensions: list[DimensionSpec] = Field(
        default_factory=lambda: list(PAPER_DIMENSIONS), min_length=1
    )
    """Preference dimensions; defaults to the P-Soups paper's three (expertise,
    informativeness, style) with the published preference prompts."""
    combinations: list[str] | None = None
    """Combinations to tune and evaluate (e.g. ``P1A+P2B+P3A``). Default: every
    combination of one pole per dimension (the paper's 8)."""

    @model_validator(mode="after")
    def _check_ids(self) -> PreferenceSpaceSpec:
        space = PreferenceSpace.from_spec(self)  # raises on duplicate ids
        for combo in self.combinations or []:
            space.parse(combo)
        return self


def _shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters: messages stay readable for any input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Pole:
    id: str
    name: str
    prompt: str
    dimension: str  # id of the dimension it belongs to


@dataclass(frozen=True)
class Dimension:
    id: str
    name: str
    poles: tuple[Pole, ...]


@dataclass(frozen=True, order=False)
class Combination:
    """A canonical combination: pole ids in dimension order, at most one per dimension."""

    poles: tuple[str, ...]

    def __str__(self) -> str:
        return "+".join(self.poles)

    def __iter__(self):
        return iter(self.poles)

    def __len__(self) -> int:
        return len(self.poles)


class PreferenceSpace:
    """Validated, indexed view of a :class:`PreferenceSpaceSpec`."""

    def __init__(self, dimensions: Sequence[Dimension]):
        self.dimensions: tuple[Dimension, ...] = tuple(dimensions)
        self._poles: dict[str, Pole] = {}
        self._dimension_order: dict[str, int] = {}
        seen_dimensions: set[str] = set()
        for index, dimension in enumerate(self.dimensions):
            if dimension.id in seen_dimensions:
                raise CombinationError(f"dimension id {dimension.id!r} is declared twice")
            seen_dimensions.add(dimension.id)
            self._dimension_order[dimension.id] = index
            for pole in dimension.poles:
                if pole.id in self._poles or pole.id in seen_dimensions:
                    raise CombinationError(f"pole id {pole.id!r} is declared twice")
                self._poles[pole.id] = pole
        self._by_lower = {pole_id.lower(): pole_id for pole_id in self._poles}

    @classmethod
    def from_spec(cls, spec: PreferenceSpaceSpec) -> PreferenceSpace:
        return cls(
            [
                Dimension(
                    id=dim.id,
                    name=dim.name,
                    poles=tuple(Pole(p.id, p.name, p.prompt, dim.id) for p in dim.poles),
                )
                for dim in spec.dimensions
            ]
        )

    @classmethod
    def default(cls) -> PreferenceSpace:
        return cls.from_spec(PreferenceSpaceSpec())

    @property
    def pole_ids(self) -> list[str]:
        return list(self._poles)

    def pole(self, pole_id: str) -> Pole:
        spelled = pole_id.strip().lower() if isinstance(pole_id, str) else None
        canonical = self._by_lower.get(spelled)
        if canonical is None:
            raise CombinationError(
                f"unknown pole {_shown(pole_id)}; known poles: {', '.join(self._poles)}"
            )
        return self._poles[canonical]

    def dimension_of(self, pole_id: str) -> Dimension:
        return self.dimensions[self._dimension_order[self.pole(pole_id).dimension]]

    def opposite_poles(self, pole_id: str) -> list[str]:
        """The other poles of ``pole_id``'s dimension."""
        pole = self.pole(pole_id)
        return [p.id for p in self.dimension_of(pole.id).poles if p.id != pole.id]

    def combination(self, pole_ids: Iterable[str]) -> Combination:
        """Validate and canonicalise a collection of pole ids."""
        poles = [self.pole(pole_id) for pole_id in pole_ids]
        if not poles:
            raise CombinationError("a combination needs at least one pole, e.g. 'P1A+P2B'")
        by_dimension: dict[str, Pole] = {}
        for pole in poles:
            other = by_dimension.get(pole.dimension)
            if other is not None:
                if other.id == pole.id:
                    raise CombinationError(f"pole {pole.id!r} appears twice in the combination")
                raise CombinationError(
                    f"poles {other.id!r} and {pole.id!r} both belong to dimension "
                    f"{pole.dimension!r}; a combination takes at most one pole per dimension"
                )
            by_dimension[pole.dimension] = pole
        ordered = sorted(by_dimension.values(), key=lambda p: self._dimension_order[p.dimension])
        return Combination(tuple(p.id for p in ordered))

    def parse(self, text: str) -> Combination:
        """Parse ``"P2B+P1A"`` (any order or case, spaces allowed) into a canonical combination."""
        if not isinstance(text, str) or not text.strip():
            raise CombinationError(
                f"empty combination {_shown(text)}; write poles joined by '+', e.g. 'P1A+P2B+P3A'"
            )
        parts = [part.strip() for part in text.split("+")]
        if any(not part for part in parts):
            raise CombinationError(
                f"malformed combination {_shown(text)}: empty pole between '+' signs"
            )
        return self.combination(parts)

    def full_combinations(self) -> list[Combination]:
        """Every combination with exactly one pole per dimension, in canonical order."""
        return [
            Combination(tuple(pole.id for pole in choice))
            for choice in itertools.product(*(dim.poles for dim in self.dimensions))
        ]

    def preference_prompt(self, combination: Combination) -> str:
        """The preference prompts of the combination's poles, joined in canonical order."""
        return " ".join(self.pole(pole_id).prompt for pole_id in combination)

    def to_dict(self) -> dict:
        return {
            "dimensions": [
                {
                    "id": dim.id,
                    "name": dim.name,
                    "poles": [{"id": p.id, "name": p.name, "prompt": p.prompt} for p in dim.poles],
                }
                for dim in self.dimensions
            ]
        }


PAPER_DIMENSIONS: tuple[DimensionSpec, ...] = (
    DimensionSpec(
        id="P1",
        name="expertise",
        poles=[
            PoleSpec(
                id="P1A",
                name="elementary",
                prompt="Generate a response that can be easily understood by an elementary "
                "school student.",
            ),
            PoleSpec(
                id="P1B",
                name="phd",
                prompt="Generate a response that only a PhD Student in that specific field "
                "could understand.",
            ),
        ],
    ),
    DimensionSpec(
        id="P2",
        name="informativeness",
        poles=[
            PoleSpec(
                id="P2A",
                name="concise",
                prompt="Generate a response that is concise and to the point, without being "
                "verbose.",
            ),
            PoleSpec(
                id="P2B",
                name="informative",
                prompt="Generate a response that is very informative, without missing any "
                "background information.",
            ),
        ],
    ),
    DimensionSpec(
        id="P3",
        name="style",
        poles=[
            PoleSpec(
                id="P3A",
                name="friendly",
                prompt="Generate a response that is friendly, witty, funny, and humorous, "
                "like a close friend.",
            ),
            PoleSpec(
                id="P3B",
                name="unfriendly",
                prompt="Generate a response in an unfriendly manner.",
            ),
        ],
    ),
)
"""The paper's preference space (Jang et al. 2023, Table 1) with its published prompts.
The paper also published P3C ("...in a sassy manner.") and P3D ("...in a sarcastic
manner."); declare them in a config's ``preferences`` section to use them."""
