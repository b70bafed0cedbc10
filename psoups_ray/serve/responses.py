"""OpenAI response shapes for what the soup model produced: choices, log-probabilities
(chat's ``logprobs.content`` and completions' ``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset``) and server-sent events."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from psoups_ray.serve.engine import TokenStep
from psoups_ray.serve.protocol import error_body


class RequestError(Exception):
    """A request refused: its HTTP status and the OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.param, self.kind), self.status)


def event(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


class TokenText:
    """Token ids as the text clients see: each token decoded on its own, the special ones
    (EOS, a chat template's markers) left out of a response's log-probabilities."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def visible(self, steps: Sequence[TokenStep]) -> list[TokenStep]:
        return [step for step in steps if step.token_id not in self.special]

    def chat_logprobs(self, steps: Sequence[TokenStep]) -> dict[str, Any]:
        """``choices[i].logprobs`` of a chat completion."""

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {
                    **entry(step.token_id, step.logprob),
                    "top_logprobs": [entry(token, lp) for token, lp in step.top],
                }
                for step in self.visible(steps)
            ]  # fmt: skip
        }

    def completion_logprobs(
        self, steps: Sequence[TokenStep], offset: int = 0, keep_special: bool = False
    ) -> dict[str, Any]:
        """``choices[i].logprobs`` of a completion (the legacy shape evaluation harnesses
        read); ``offset``: the characters before the first token (``text_offset``)."""
        shown = list(steps) if keep_special else self.visible(steps)
        tokens, offsets = [], []
        for step in shown:
            offsets.append(offset)
            text = self.text(step.token_id)
            tokens.append(text)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [step.logprob for step in shown],
            "top_logprobs": [
                None if step.logprob is None else {self.text(t): lp for t, lp in step.top}
                for step in shown
            ],
            "text_offset": offsets,
        }
