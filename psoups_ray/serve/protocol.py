"""The OpenAI-compatible request bodies we accept, and OpenAI-style error bodies.

Unknown fields are refused with their name (a typo must not silently change
nothing); OpenAI parameters we do not implement are refused unless left at their
neutral value.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Sampling left out: the run's evaluate.generation settings (what was tuned and evaluated).
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)  # vLLM's; 0 or -1: no cut
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # torch takes int64 seeds
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=0, le=0)
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)
    # P-Soups extensions: pick the soup by poles or by explicit weights.
    preferences: list[str] | None = None
    weights: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if value is None:
            return value
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("prompt must be one string (or a list holding one)")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    # A message quoting the request may hold lone surrogates, which UTF-8 cannot encode.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for a FastAPI/pydantic validation error list."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(first.get("msg", "")), None
    if first.get("type") == "extra_forbidden":
        return f"{param}: unknown or unsupported field", param
    if first.get("type") == "missing":
        return f"{param}: required", param
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    given = first.get("input")
    text = f"{param}: {message}" if param else message
    if given is not None and not isinstance(given, dict | list):
        shown = repr(given)
        text += f" (given {shown if len(shown) <= 80 else shown[:77] + '...'})"
    return text, param
