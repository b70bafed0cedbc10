"""Personal soups' settings (the serve app's ``personal`` args), without torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from psoups_ray.config import MAX_SOUP_WEIGHT


class PersonalSpec(BaseModel):
    """How each user's soup is learned from the user's choices and where profiles live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Serve ``/v1/users/...`` and users' soups (loads the run's reward models in a
    ``PreferenceScorer`` replica)."""
    database: str | None = None
    """SQLAlchemy URL of the profile store: ``sqlite:////abs/path.sqlite``, or
    ``postgresql+psycopg://user:password@host/db`` when replicas run on several nodes
    (``pip install 'psoups_ray[postgres]'``). Empty: ``personal/profiles.sqlite`` in the
    run directory (a local run only)."""
    beta: float = Field(default=1.0, gt=0, le=100)
    """Choice sharpness: P(a over b) = sigmoid(beta * w . (phi(a) - phi(b))), phi the
    normalised pole rewards."""
    particles: int = Field(default=4096, ge=64, le=1_000_000)
    """Soups drawn from the prior that carry each user's posterior."""
    none_probability: float = Field(default=1 / 3, ge=0, lt=1)
    """Prior chance that a user leans to neither pole of a dimension."""
    total: float | None = Field(default=None, gt=0, le=MAX_SOUP_WEIGHT)
    """Total weight of users' soups; empty: the mean total of the run's tuned soups (1
    without tuned weights). Choices cannot tell it (it scales like beta)."""
    max_choices: int = Field(default=1000, ge=1)
    """Choices kept per user: the newest ones (older ones are dropped as new ones come)."""
    max_text_tokens: int = Field(default=1024, ge=1)
    """Longest answer a choice may carry (tokens); its prompt: the app's max_prompt_tokens."""
    candidates: int = Field(default=4, ge=2, le=16)
    """Soups that answer an active question; the two most informative answers are shown."""
    default: str = "psoups:base"
    """The soup of a user with no choices (a model id, e.g. psoups:P1A+P2A+P3A)."""
    seed: int = 0
    """Seed of the particles (every replica draws the same ones)."""
