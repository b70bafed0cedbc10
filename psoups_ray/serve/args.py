"""The Serve application's ``args``: in a Serve YAML, or built by ``psoups serve``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from psoups_ray.personal.spec import PersonalSpec


class ServeArgs(BaseModel):
    """The application's ``args`` (in the Serve YAML, or built by ``psoups serve``)."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(min_length=1)
    """Run directory (local path or pyarrow.fs URI) with base, policies, tuned weights."""
    strategy: Literal["mixing", "merged"] = "mixing"
    """``mixing``: the exact soup in activation space, any weights per row of a batch.
    ``merged``: each soup's weights merged into a copy of the base, an LRU cache of
    ``merged_cache_size`` copies per replica, and Serve's model multiplexing routing a
    soup's requests to replicas that hold it; a batch decodes one soup at a time."""
    merged_cache_size: int = Field(default=2, ge=1)
    """Merged copies a replica keeps (``merged``): each costs a full model's memory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Weights' dtype on the replica; empty: the run's ``base.dtype``."""
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    max_prompt_tokens: int = Field(default=1024, ge=1)
    max_tokens: int = Field(default=256, ge=1)
    """Upper bound on a request's ``max_tokens``."""
    default_max_tokens: int = Field(default=128, ge=1)
    max_n: int = Field(default=4, ge=1)
    max_request_bytes: int = Field(default=1 << 20, ge=1)
    """Largest request body accepted (bytes); a bigger one gets 413 before it is parsed,
    whether it declares its Content-Length or is sent chunked."""
    auth_token_env: str | None = None
    """Name of an environment variable holding the bearer token; empty: no auth."""
    personal: PersonalSpec = PersonalSpec()
    """Personal soups: each user's soup learned from the user's choices (``/v1/users``)."""
