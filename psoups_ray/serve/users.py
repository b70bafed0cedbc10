"""Personal soups over HTTP, mixed into the ``Ingress`` (its auth, body parsing, tokenizer
and model handles):

- ``POST /v1/users/{user}/query`` ``{}`` or ``{"prompt", "max_tokens"}``: two answers to
  choose between, from the two soups whose answers tell most about the user;
- ``POST /v1/users/{user}/choices`` ``{"prompt", "chosen", "rejected"}``: one choice;
  returns the user's number of choices and learned weights;
- ``GET /v1/users/{user}``: the profile (choices, weights, uncertainty); 404 if unknown;
- ``DELETE /v1/users/{user}``: every record of the user; 204 (404 if unknown);
- chat and completion requests with ``model: "psoups"``, the OpenAI ``user`` field and no
  soup named get that user's soup (:meth:`UserEndpoints._user_soup`);
- ``GET /playground``: a web page to chat with any soup, compare two answers and teach the
  server one's own soup through these endpoints (``/playground/space``: the poles it
  offers; both without auth: the page asks for the token and sends it with its calls).

Profiles live in the database (:mod:`psoups_ray.personal.store`), features come from the
``PreferenceScorer`` deployment; nothing about a user is kept in this replica.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.
import asyncio
import logging
import random
import re
from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from psoups_ray.errors import PsoupsError
from psoups_ray.serve.engine import GenerationJob, SamplingParams, Soup
from psoups_ray.serve.responses import RequestError

logger = logging.getLogger("ray.serve")
USER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
PERSONAL_MODEL = "psoups"  # with `user`: that user's soup

router = APIRouter()


class ChoiceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    chosen: str
    rejected: str


class QueryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)


def check_user(user: str, param: str = "user") -> str:
    if not USER_ID.fullmatch(user):
        shown = user if len(user) <= 40 else user[:40] + "..."
        raise RequestError(
            400, f"{param} must be 1-128 characters of A-Z, a-z, 0-9, '.', '_' or '-'; got "
            f"{shown!r}", param,
        )  # fmt: skip
    return user


class UserEndpoints:
    """The ``/v1/users`` endpoints; the ingress provides ``settings``, ``catalog``,
    ``tokenizer``, ``personal`` (a :class:`~psoups_ray.personal.service.PersonalSoups`,
    None when disabled), ``scorer`` (the PreferenceScorer handle), ``_authorize``,
    ``_parse`` and ``_collect``."""

    @router.post("/v1/users/{user}/choices")
    async def add_choice(self, user: str, request: Request):
        async def answer():
            personal = self._personal(request, user)
            body = await self._parse(request, ChoiceBody)
            prompt = self._text(body.prompt, "prompt", self.settings.max_prompt_tokens)
            limit = self.settings.personal.max_text_tokens
            chosen = self._text(body.chosen, "chosen", limit)
            rejected = self._text(body.rejected, "rejected", limit)
            if chosen == rejected:
                raise RequestError(400, "chosen and rejected must be different texts", "rejected")
            features = await self.scorer.features.remote(personal.poles, prompt, [chosen, rejected])
            profile = await asyncio.to_thread(
                personal.record, user, prompt, chosen, rejected, features
            )
            return {"user": user, "choices": profile.choices, "weights": profile.weights}

        return await self._guarded(answer)

    @router.get("/v1/users/{user}")
    async def get_user(self, user: str, request: Request):
        async def answer():
            personal = self._personal(request, user)
            profile = await asyncio.to_thread(personal.profile, user)
            if profile is None:
                raise RequestError(404, f"no user {user!r} (a user exists once it made a choice)")
            return {
                "user": user,
                "choices": profile.choices,
                "weights": profile.weights,
                "uncertainty": profile.uncertainty,
            }

        return await self._guarded(answer)

    @router.delete("/v1/users/{user}")
    async def delete_user(self, user: str, request: Request):
        async def answer():
            personal = self._personal(request, user)
            if not await asyncio.to_thread(personal.delete, user):
                raise RequestError(404, f"no user {user!r}")
            return Response(status_code=204)

        return await self._guarded(answer)

    @router.post("/v1/users/{user}/query")
    async def query(self, user: str, request: Request):
        async def answer():
            personal = self._personal(request, user)
            body = await self._parse(request, QueryBody)
            settings = self.settings
            if body.prompt is None:
                prompts = self._held_out_prompts()
                if not prompts:
                    raise RequestError(400, "this run has no held-out prompts: send a prompt")
                prompt = random.choice(prompts)
            else:
                prompt = self._text(body.prompt, "prompt", settings.max_prompt_tokens)
            max_tokens = body.max_tokens or settings.default_max_tokens
            if max_tokens > settings.max_tokens:
                raise RequestError(
                    400, f"max_tokens must be <= {settings.max_tokens}, got {max_tokens}",
                    "max_tokens",
                )  # fmt: skip
            seed = random.getrandbits(31)
            posterior, soups = await asyncio.to_thread(personal.candidates, user, seed)
            if len(soups) < 2:
                raise RequestError(400, "questions need two soups: this server serves one pole")
            texts = await self._answers(prompt, soups, max_tokens, seed)
            features = await self.scorer.features.remote(personal.poles, prompt, texts)
            first, second = await asyncio.to_thread(personal.pick, posterior, features, texts)
            return {
                "prompt": prompt,
                "candidates": [
                    {"id": label, "text": texts[index], "weights": soups[index]}
                    for label, index in (("a", first), ("b", second))
                ],
            }

        return await self._guarded(answer)

    @router.get("/playground")
    async def playground(self):
        page = resources.files("psoups_ray.serve").joinpath("playground.html").read_text()
        return HTMLResponse(page)

    @router.get("/playground/space")
    async def playground_space(self):
        """The dimensions and the poles served (those with a policy), for the page."""
        served = set(self.catalog.poles)
        return {
            "dimensions": [
                {
                    "id": dimension.id,
                    "name": dimension.name,
                    "poles": [
                        {"id": pole.id, "name": pole.name}
                        for pole in dimension.poles
                        if pole.id in served
                    ],
                }
                for dimension in self.catalog.space.dimensions
                if any(pole.id in served for pole in dimension.poles)
            ],
            "personal": self.personal is not None,
        }

    # -- helpers -------------------------------------------------------------------------
    async def _guarded(self, answer):
        """``answer()``'s result; a refused request's error, or a bug's, in OpenAI's shape."""
        try:
            return await answer()
        except RequestError as exc:
            return exc.response()
        except PsoupsError as exc:  # the server's own state, named (e.g. a foreign profile)
            return RequestError(500, str(exc), kind="server_error").response()
        except Exception as exc:  # a bug, a database or replica failure: keep serving
            # The detail (a database error holds its SQL and host) goes to the replica's log.
            logger.exception("personal soups request failed")
            message = f"internal error ({type(exc).__name__}); see the server's log"
            return RequestError(500, message, kind="server_error").response()

    def _personal(self, request: Request, user: str):
        self._authorize(request)
        if self.personal is None:
            raise RequestError(
                404, "personal soups are not enabled on this server (serve args: personal)"
            )
        check_user(user)
        return self.personal

    def _text(self, value: str, param: str, limit: int) -> str:
        if not value.strip():
            raise RequestError(400, f"{param} must not be empty", param)
        tokens = len(self.tokenizer(value, add_special_tokens=False)["input_ids"])
        if tokens > limit:
            raise RequestError(400, f"{param} has {tokens} tokens; the limit is {limit}", param)
        return value

    def _held_out_prompts(self) -> list[str]:
        if self._held_out is None:
            try:
                self._held_out = self.catalog.run.prompts("held_out")
            except PsoupsError:
                self._held_out = []
        return self._held_out

    async def _answers(
        self, prompt: str, soups: list[dict[str, float]], max_tokens: int, seed: int
    ) -> list[str]:
        """Each soup's answer to ``prompt``, sampled as the run's soups were evaluated."""
        from psoups_ray.prompting import format_prompt

        formatted = format_prompt(self.tokenizer, prompt)
        spec = self.catalog.sampling.model_copy(update={"max_new_tokens": max_tokens})
        jobs = [
            GenerationJob(
                formatted,
                self.catalog.vector(weights),
                SamplingParams.from_spec(spec, seed + index),
            )  # fmt: skip
            for index, weights in enumerate(soups)
        ]
        results = await asyncio.gather(*(self._collect(job) for job in jobs))
        return [text for text, _, _ in results]

    async def _user_soup(self, body) -> Soup | None:
        """The soup of ``body.user`` when the request names no soup (``model: "psoups"``,
        no ``preferences`` or ``weights``); None for any other request. A user without
        choices gets ``personal.default``."""
        wanted = (body.model or "").strip().lower() == PERSONAL_MODEL
        if not wanted or body.preferences is not None or body.weights is not None:
            return None
        if self.personal is None:
            raise RequestError(
                400, "model 'psoups' names a user's soup, and personal soups are not enabled "
                "here; name a soup, e.g. psoups:P1A+P2B+P3A", "model",
            )  # fmt: skip
        if body.user is None:
            raise RequestError(
                400, "model 'psoups' serves the soup of the request's user: send the OpenAI "
                "'user' field, or name a soup (e.g. psoups:P1A+P2B+P3A)", "user",
            )  # fmt: skip
        user = check_user(body.user)
        profile = await asyncio.to_thread(self.personal.profile, user)
        if profile is None or not profile.weights:
            default = self.catalog.resolve(self.settings.personal.default)
            return Soup(default.label, default.weights, "default")
        return Soup(f"user:{user}", self.catalog.vector(profile.weights), "user")
