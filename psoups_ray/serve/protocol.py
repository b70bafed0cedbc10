"""The OpenAI-compatible request bodies we accept, and OpenAI-style error bodies.

The fields clients send: OpenAI's (content parts, the ``developer`` role, logprobs,
penalties, ``max_completion_tokens``, ``response_format`` of type text, ``user``) and
vLLM's common sampling fields (``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``min_tokens``; ``echo`` on completions). Unknown fields are refused with
their name (a typo must not silently change nothing), and so is what we do not implement
(a non-text content part, a JSON response format), with what is supported.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value):
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported; only 'text'")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value):
        """A part of another type is named, with its index, before pydantic tries the
        union's other branch (its message would say 'a valid string')."""
        if isinstance(value, list):
            for index, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"part {index} is {kind!r}: only text parts are supported "
                        '({"type": "text", "text": "..."})'
                    )
        return value

    @property
    def text(self) -> str:
        """The content, text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    @property
    def template_role(self) -> str:
        """The role in the chat template: ``developer`` is OpenAI's newer ``system``."""
        return "system" if self.role == "developer" else self.role


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value):
        if value != "text":
            raise ValueError(f"response_format type {value!r} is not supported; only 'text'")
        return value


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
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    # vLLM's sampling fields
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
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
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def logprob_count(self) -> int | None:
        """How many top log-probabilities each token reports (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    """One prompt: text or token ids (evaluation harnesses send ids), alone or in a list."""
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt only

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        one = "prompt must be one prompt: a string or a list of token ids (or a list holding one)"
        if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
            if any(isinstance(t, bool) or t < 0 for t in value):
                raise ValueError("prompt token ids must be integers >= 0")
            return value
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(one)
        return value

    @property
    def prompt_ids(self) -> tuple[int, ...] | None:
        """The prompt's token ids when it was sent as ids, else None."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]  # a list holding one list of ids
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return tuple(prompt)
        return None

    @property
    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if isinstance(self.prompt[0], str) else ""


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
