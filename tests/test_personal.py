"""Personal soups' model: the soups a user may have, the posterior over a user's weights
from pairwise choices, and the active questions."""

from __future__ import annotations

import math
import random

import pytest
import torch

from psoups_ray.errors import PsoupsError
from psoups_ray.personal.model import (
    Choice,
    PersonalSpec,
    Posterior,
    SoupSpace,
    candidate_soups,
    most_informative_pair,
    soup_total,
)
from psoups_ray.preferences import PreferenceSpace

SPACE = PreferenceSpace.default()  # P1, P2, P3: two poles each


def _valid(soups: SoupSpace, rows: torch.Tensor) -> bool:
    on_simplex = torch.allclose(rows.sum(dim=1), torch.ones(len(rows))) and (rows >= 0).all()
    one_pole_each = all(
        int((rows[:, columns] > 0).sum(dim=1).max()) <= 1 for columns in soups.dimensions
    )
    return bool(on_simplex) and one_pole_each


@pytest.mark.parametrize("resolution, count", [(1, 6), (2, 18), (4, 66), (10, 402)])
def test_the_grid_walks_every_soup_of_the_space(resolution, count):
    soups = SoupSpace(SPACE)
    grid = soups.grid(resolution)
    assert len(grid) == count == 4 * resolution**2 + 2  # the octahedron's lattice points
    assert _valid(soups, grid)
    assert len({tuple(row.tolist()) for row in grid}) == count
    assert (grid * resolution - (grid * resolution).round()).abs().max() < 1e-6


def test_prior_draws_are_soups_with_every_support_pattern():
    soups = SoupSpace(SPACE)
    rows = soups.sample(4000, 1 / 3, torch.Generator().manual_seed(0))
    assert _valid(soups, rows)
    patterns = {tuple((row > 0).int().tolist()) for row in rows}
    assert len(patterns) == 3**3 - 1  # per dimension A, B or neither; never nothing at all
    # A user leans to neither pole of a dimension a third of the time (a little less:
    # a draw that leans nowhere is given one pole).
    neither = sum(
        float((rows[:, cols] == 0).all(dim=1).float().mean()) for cols in soups.dimensions
    )
    assert 0.25 < neither / 3 < 0.34


def test_project_keeps_what_a_pole_has_over_its_opposite():
    soups = SoupSpace(SPACE)
    mean = soups.vector({"P1A": 0.3, "P1B": 0.1, "P2B": 0.2, "P3A": 0.2, "P3B": 0.2})
    projected = soups.project(mean)
    assert soups.as_weights(projected) == pytest.approx({"P1A": 0.5, "P2B": 0.5})
    assert soups.project(torch.zeros(6)).sum() == 0
    scaled = SoupSpace(SPACE, total=2.0)
    assert scaled.as_weights(projected) == pytest.approx({"P1A": 1.0, "P2B": 1.0})
    with pytest.raises(ValueError, match="unknown poles P9"):
        soups.vector({"P9": 1.0})


def test_the_total_is_set_apart_from_the_choices():
    tuned = {"P1A+P2A+P3A": {"P1A": 1.0, "P2A": 0.5, "P3A": 0.5}, "x": {"P1B": 3.0}}
    assert soup_total(PersonalSpec(), tuned) == pytest.approx(2.5)
    assert soup_total(PersonalSpec(), {}) == 1.0
    assert soup_total(PersonalSpec(total=1.5), tuned) == 1.5


def _simulated_choices(soups, truth, count, beta, seed):
    """Choices of a user with weights ``truth`` between answers with random features."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    choices = []
    for _ in range(count):
        a, b = torch.randn(2, len(soups.poles), generator=generator)
        p_a = 1 / (1 + math.exp(-beta * float(truth @ (a - b))))
        choices.append(Choice(a, b) if rng.random() < p_a else Choice(b, a))
    return choices


def test_the_posterior_finds_a_users_weights_and_narrows():
    soups = SoupSpace(SPACE)
    spec = PersonalSpec(beta=4.0)
    truth = soups.vector({"P1A": 0.7, "P3B": 0.3})  # leans to neither pole of P2
    posterior = Posterior(soups, spec)
    assert posterior.estimate() is None  # no choice yet: the default soup
    prior_spread = posterior.uncertainty().sum()
    choices = _simulated_choices(soups, truth, 60, spec.beta, seed=1)
    posterior.update(choices[:10])
    early = float((posterior.estimate() - truth).abs().sum())
    posterior.update(choices[10:])
    assert posterior.choices == 60
    estimate = posterior.estimate()
    assert _valid(soups, estimate[None])
    late = float((estimate - truth).abs().sum())
    assert late < 0.3 and late < early, (early, late, soups.as_weights(estimate))
    assert posterior.uncertainty().sum() < prior_spread / 3
    assert posterior.effective_size() < spec.particles / 10
    # A function of the choices alone: another replica rebuilds the same posterior.
    again = Posterior(soups, spec).update(choices)
    assert torch.allclose(again.estimate(), estimate, atol=1e-6)


def test_information_gain_is_highest_where_the_posterior_is_unsure():
    soups = SoupSpace(SPACE)
    posterior = Posterior(soups, PersonalSpec(beta=4.0))

    def contrast(pole: int, size: float) -> list[list[float]]:
        a = [0.0] * 6
        a[pole], a[pole + 1] = size, -size
        return [a, [-x for x in a]]

    answers = torch.tensor(
        [*contrast(0, 1.0), *contrast(2, 1.0), *contrast(2, 0.1), contrast(2, 0.1)[1]]
    )  # P1A, P1B, P2A, P2B clearly; P2A, P2B barely; the last again
    gain = posterior.information_gain(answers)
    assert torch.allclose(gain, gain.T, atol=1e-6) and (gain.diagonal() == 0).all()
    assert float(gain[5, 6]) == 0  # identical answers tell nothing
    assert float(gain[0, 1]) == pytest.approx(float(gain[2, 3]), rel=0.1)  # a symmetric prior
    assert float(gain[2, 3]) > 5 * float(gain[4, 5])  # a clear contrast tells more
    i, j = most_informative_pair(posterior, answers)
    assert i < j and float(gain[i, j]) == float(gain.max())
    assert most_informative_pair(posterior, torch.zeros(3, 6)) == (0, 1)
    # Once the user has chosen P1A over P1B a few times, asking that again tells little.
    posterior.update([Choice(answers[0], answers[1])] * 6)
    settled = posterior.information_gain(answers)
    assert float(settled[0, 1]) < float(gain[0, 1]) / 4
    assert most_informative_pair(posterior, answers) != (0, 1)


def test_candidates_are_the_estimate_and_distinct_posterior_draws():
    soups = SoupSpace(SPACE)
    posterior = Posterior(soups, PersonalSpec())
    generator = torch.Generator().manual_seed(0)
    first = candidate_soups(posterior, 4, generator)
    assert first.shape == (4, 6) and _valid(soups, first)
    truth = soups.vector({"P2B": 1.0})
    posterior.update(_simulated_choices(soups, truth, 80, 1.0, seed=2))
    candidates = candidate_soups(posterior, 4, generator)
    assert torch.equal(candidates[0], posterior.estimate())
    distances = (candidates[:, None] - candidates[None]).abs().sum(dim=-1)
    assert float(distances[~torch.eye(4, dtype=torch.bool)].min()) >= 0.25


def test_the_service_learns_a_user_from_stored_choices(tmp_path):
    from psoups_ray.personal.service import PersonalSoups, database_url
    from psoups_ray.personal.spec import PersonalSpec as Spec
    from psoups_ray.personal.store import ProfileStore

    spec = Spec(beta=4.0)
    url = database_url(spec, str(tmp_path / "run"))
    assert url.endswith("run/personal/profiles.sqlite")
    with pytest.raises(PsoupsError, match="set personal.database"):
        database_url(spec, "s3://bucket/run")
    tuned = {"P1A+P2A+P3A": {"P1A": 1.0, "P2A": 0.5, "P3A": 0.5}}
    service = PersonalSoups(SPACE, SPACE.pole_ids[:4], spec, tuned, ProfileStore(url))
    assert service.poles == ["P1A", "P1B", "P2A", "P2B"] and service.soups.total == 2.0
    truth = service.soups.vector({"P1B": 0.6, "P2A": 0.4})
    for choice in _simulated_choices(service.soups, truth, 40, spec.beta, seed=3):
        profile = service.record("u1", "q", "x", "y", [choice.chosen, choice.rejected])
    assert profile.choices == 40 and set(profile.uncertainty) == set(service.poles)
    assert set(profile.weights) == {"P1B", "P2A"} and sum(profile.weights.values()) == (
        pytest.approx(2.0)
    )
    assert profile.weights["P1B"] > profile.weights["P2A"]
    assert service.profile("u1") == profile
    posterior, soups = service.candidates("u1", seed=0)
    assert posterior.choices == 40 and len(soups) == spec.candidates
    assert soups[0] == service.soups.as_weights(posterior.estimate())
    # Never a question between two equal answers, or with an empty one.
    features = [[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0.0]]
    assert service.pick(posterior, features, ["a", "a", " ", "b"]) in {(0, 3), (1, 3)}
    assert service.pick(posterior, features, ["a"] * 4) == (0, 2)  # none usable: the gain's
    # Profiles scored by another run's reward models are refused, not misread.
    other = PersonalSoups(SPACE, SPACE.pole_ids, spec, tuned, service.store)
    with pytest.raises(PsoupsError, match="scored for the poles"):
        other.candidates("u1", seed=0)
    assert service.delete("u1") and service.profile("u1") is None
