"""Personal soups for a served run: the profile store, the soups users may have and the
posterior that the store's choices give (what the serve app's ``/v1/users`` endpoints
and users' chat requests call; blocking, so the app runs it in a thread)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from psoups_ray.errors import PsoupsError
from psoups_ray.personal.model import (
    Choice,
    Posterior,
    SoupSpace,
    candidate_soups,
    most_informative_pair,
    soup_total,
)
from psoups_ray.personal.spec import PersonalSpec
from psoups_ray.personal.store import ChoiceRecord, Profile, ProfileStore, Summary, sqlite_url
from psoups_ray.preferences import PreferenceSpace

PROFILES_PATH = "personal/profiles.sqlite"


def database_url(spec: PersonalSpec, run_location: str) -> str:
    """``spec.database``, else the SQLite file in a local run directory."""
    if spec.database:
        return spec.database
    if run_location.startswith("file://"):
        run_location = run_location[len("file://") :]
    if "://" in run_location:
        raise PsoupsError(
            f"personal.database: the run {run_location} is not a local directory, so the "
            "profiles cannot go in it; set personal.database (e.g. a PostgreSQL URL), or "
            "personal.enabled: false"
        )
    path = Path(run_location) / PROFILES_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    return sqlite_url(path)


class PersonalSoups:
    """Users' profiles and soups over ``poles`` (those a server has policies for)."""

    def __init__(
        self,
        space: PreferenceSpace,
        poles: Sequence[str],
        spec: PersonalSpec,
        tuned_weights: dict[str, dict[str, float]],
        store: ProfileStore,
    ):
        self.spec = spec
        self.soups = SoupSpace(space, soup_total(spec, tuned_weights), poles)
        self.store = store
        self.particles = Posterior(self.soups, spec).particles  # the prior's draw, shared

    @property
    def poles(self) -> list[str]:
        """The features' order: a feature vector has one normalised reward per pole."""
        return self.soups.poles

    def posterior(self, history: Sequence[ChoiceRecord]) -> Posterior:
        posterior = Posterior(self.soups, self.spec, self.particles)
        return posterior.update(
            [
                Choice(self._vector(c.chosen_features), self._vector(c.rejected_features))
                for c in history
            ]  # fmt: skip
        )

    def _vector(self, features: dict[str, float]) -> torch.Tensor:
        if set(features) != set(self.poles):
            raise PsoupsError(
                f"a stored choice was scored for the poles {sorted(features)}, but this server "
                f"serves {self.poles}: the profiles belong to another run's reward models "
                "(use a database of this run's own, or delete those users)"
            )
        return torch.tensor([float(features[pole]) for pole in self.poles])

    def summarize(self, history: Sequence[ChoiceRecord]) -> Summary:
        posterior = self.posterior(history)
        estimate = posterior.estimate()
        weights = {} if estimate is None else self.soups.as_weights(estimate)
        spread = posterior.uncertainty().tolist()
        return Summary(
            {pole: round(w, 6) for pole, w in weights.items()},
            {pole: round(s, 6) for pole, s in zip(self.poles, spread, strict=True)},
        )

    def record(
        self,
        user: str,
        prompt: str,
        chosen: str,
        rejected: str,
        features: Sequence[Sequence[float]],
    ) -> Profile:
        """Store that ``user`` preferred ``chosen`` to ``rejected`` (``features``: their
        two feature vectors) and the user's new summary, in one transaction."""
        chosen_features, rejected_features = (
            {pole: float(value) for pole, value in zip(self.poles, row, strict=True)}
            for row in features
        )
        record = ChoiceRecord(prompt, chosen, rejected, chosen_features, rejected_features, 0.0)
        return self.store.add_choice(user, record, self.summarize, self.spec.max_choices)

    def profile(self, user: str) -> Profile | None:
        return self.store.profile(user)

    def delete(self, user: str) -> bool:
        return self.store.delete(user)

    def candidates(self, user: str, seed: int) -> tuple[Posterior, list[dict[str, float]]]:
        """The user's posterior and the soups (as ``{pole: weight}``) to answer a question."""
        posterior = self.posterior(self.store.choices(user))
        generator = torch.Generator().manual_seed(seed)
        soups = candidate_soups(posterior, self.spec.candidates, generator)
        return posterior, [self.soups.as_weights(soup) for soup in soups]

    @staticmethod
    def pick(
        posterior: Posterior, features: Sequence[Sequence[float]], texts: Sequence[str]
    ) -> tuple[int, int]:
        """Of the candidates' answers (their texts and features), the pair to ask about:
        the most informative of the pairs of two different, non-empty answers (any pair
        when there is none)."""
        usable = torch.tensor(
            [[bool(a.strip() and b.strip()) and a != b for b in texts] for a in texts]
        )
        features = torch.tensor(features, dtype=torch.float)
        return most_informative_pair(posterior, features, usable)


def open_personal_soups(spec: PersonalSpec, catalog) -> PersonalSoups:
    """The personal soups of a serving catalog (:class:`~psoups_ray.serve.engine.SoupCatalog`):
    its poles with policies, its tuned weights, the store at ``spec.database``."""
    store = ProfileStore(database_url(spec, catalog.run.location))
    return PersonalSoups(catalog.space, catalog.poles, spec, catalog.tuned, store)
