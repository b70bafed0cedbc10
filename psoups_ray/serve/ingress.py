"""The ``Ingress`` deployment (FastAPI): auth, request validation, prompt formatting, OpenAI
response shapes and server-sent events, metrics. It loads only the tokenizer and the run's
catalog (preference space, poles, tuned weights), so bad requests never reach a model
replica.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# at runtime (a string `Request` makes the request a query parameter, and every call a 422).
import asyncio
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.requests import ClientDisconnect

from psoups_ray.errors import PsoupsError
from psoups_ray.serve.args import ServeArgs
from psoups_ray.serve.engine import (
    MODEL_PREFIX,
    GenerationJob,
    SamplingParams,
    SoupCatalog,
    TokenStep,
    soup_key,
)
from psoups_ray.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_error,
    error_body,
)
from psoups_ray.serve.responses import RequestError, TokenText, event
from psoups_ray.serve.users import PERSONAL_MODEL, UserEndpoints
from psoups_ray.serve.users import router as users_router


class IngressMetrics:
    """What the ingress exports through Ray Serve's metrics (Prometheus, on each node's
    metrics port, prefixed ``ray_``): requests by endpoint and status, latency, tokens."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "psoups_requests", "Requests answered", tag_keys=("endpoint", "status")
        )
        self.latency = metrics.Histogram(
            "psoups_request_latency_s", "Time from request to the whole answer (streams: to "
            "the first byte)", boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
            tag_keys=("endpoint",),
        )  # fmt: skip
        self.tokens = metrics.Counter(
            "psoups_completion_tokens", "Tokens sampled", tag_keys=("endpoint",)
        )


def endpoint_of(chat: bool) -> str:
    return "chat" if chat else "completions"


def _given(value, default):
    return default if value is None else value


api = FastAPI(title="psoups_ray", description="P-Soups: any preference combination per request")
api.include_router(users_router)


@serve.deployment(name="Ingress", max_ongoing_requests=512)
@serve.ingress(api)
class Ingress(UserEndpoints):
    def __init__(self, model, args: dict[str, Any], token: str | None, scorer=None):
        from psoups_ray.runtime.loading import load_base_tokenizer

        self.settings = ServeArgs.model_validate(args)
        self.catalog = SoupCatalog(self.settings.run)
        self.tokenizer = load_base_tokenizer(self.catalog.base)
        self.token_text = TokenText(self.tokenizer)
        self.metrics = IngressMetrics()
        self.model = model.options(stream=True)  # token by token, for stream=true
        self._info_handle = model  # one reply per call
        self.token = token
        self.max_context: int | None = None
        self.scorer = scorer  # the PreferenceScorer handle (personal soups)
        self.personal = None
        self._held_out: list[str] | None = None
        if self.settings.personal.enabled:
            from psoups_ray.personal.service import open_personal_soups

            self.personal = open_personal_soups(self.settings.personal, self.catalog)

    # -- endpoints -----------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        info = await self._info_handle.info.remote()
        return {"status": "ok", "poles": info["poles"]}

    @api.get("/health")
    async def health(self):
        """What vLLM and TGI answer and benchmark tools probe: 200 once a model replica
        answers."""
        return await self.healthz()

    @api.get("/version")
    async def version(self):
        from psoups_ray import __version__

        return {"version": __version__, "server": "psoups_ray"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except RequestError as exc:
            return exc.response()
        created = int(time.time())
        names = self.catalog.model_ids()
        if self.personal is not None:
            names.append(PERSONAL_MODEL)  # with the request's `user`: that user's soup
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "psoups"}
                for name in names
            ],
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    # -- request handling ----------------------------------------------------------------
    async def _serve(self, request: Request, chat: bool):
        started = time.monotonic()
        endpoint = endpoint_of(chat)
        try:
            response = await self._answer(request, chat)
        except Exception as exc:  # a bug must not become a bare 500: OpenAI's error shape
            message = f"internal error: {type(exc).__name__}: {exc}"
            response = RequestError(500, message, kind="server_error").response()
        status = getattr(response, "status_code", 200)
        self.metrics.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.metrics.latency.observe(time.monotonic() - started, tags={"endpoint": endpoint})
        return response

    async def _answer(self, request: Request, chat: bool):
        try:
            self._authorize(request)
            body = await self._parse(request, ChatCompletionRequest if chat else CompletionRequest)
            soup, jobs = await self._jobs(body, chat)
        except RequestError as exc:
            return exc.response()
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": MODEL_PREFIX + soup.label,
        }
        echo = not chat and body.echo
        try:
            echoed = await self._echoed(jobs[0], body) if echo else None
        except Exception as exc:  # the model replica failed this request; keep serving
            return RequestError(500, f"scoring failed: {exc}", kind="server_error").response()
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                self._sse(jobs, meta, chat, include_usage, body, echoed),
                media_type="text/event-stream",
            )
        try:
            if body.requested_tokens == 0:  # echo only: the prompt scored, nothing sampled
                results = [(job.prompt, None, []) for job in jobs]
            else:
                results = await asyncio.gather(*(self._collect(job) for job in jobs))
        except Exception as exc:  # the model replica failed this request; keep serving
            return RequestError(500, f"generation failed: {exc}", kind="server_error").response()
        choices = []
        last = results[0][1]
        prompt_tokens = last.prompt_tokens if last is not None else self._prompt_tokens(jobs[0])
        completion_tokens = 0
        for index, (text, last, steps) in enumerate(results):
            reason = last.finish_reason if last is not None else "length"
            completion_tokens += last.completion_tokens if last is not None else 0
            choice: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if body.logprobs:
                    choice["logprobs"] = self.token_text.chat_logprobs(steps)
            else:
                if echo and last is not None:
                    text = jobs[0].prompt + text
                choice["text"] = text
                if body.logprobs is not None:
                    shown = [*(echoed or []), *self.token_text.visible(steps)]
                    choice["logprobs"] = self.token_text.completion_logprobs(shown, 0, True)
            choices.append(choice)
        if completion_tokens:  # Ray's counters take increments > 0 only
            self.metrics.tokens.inc(completion_tokens, tags={"endpoint": endpoint_of(chat)})
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "psoups": {"weights": self._weights(soup), "source": soup.source},
        }

    def _prompt_tokens(self, job: GenerationJob) -> int:
        from psoups_ray.prompting import adds_special_tokens

        if job.prompt_ids is not None:
            return len(job.prompt_ids)
        encoded = self.tokenizer(job.prompt, add_special_tokens=adds_special_tokens(self.tokenizer))
        return len(encoded["input_ids"])

    async def _echoed(self, job: GenerationJob, body) -> list[TokenStep] | None:
        """With ``echo`` and ``logprobs``: the prompt's tokens with their log-probabilities
        under the soup (one forward pass on the model replica)."""
        if body.logprobs is None:
            return None
        return await self._route(self._info_handle, job).prompt_logprobs.remote(job, body.logprobs)

    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # bytes: compare_digest refuses str with non-ASCII characters
        given_token, token = given.strip().encode(), self.token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_token, token):
            raise RequestError(
                401, "missing or wrong bearer token (Authorization: Bearer <key>)", None,
                "authentication_error",
            )  # fmt: skip

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it exceeds ``max_request_bytes`` (by its
        Content-Length, or while reading a chunked one): the ingress never holds more."""
        limit = self.settings.max_request_bytes
        too_large = RequestError(
            413, f"the request body exceeds max_request_bytes ({limit} bytes)", None
        )
        try:
            declared = int(request.headers.get("content-length", "0"))
        except ValueError:
            declared = 0  # the proxy's HTTP parser refuses a malformed one before us
        if declared > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise RequestError(400, "the client disconnected while sending the body") from None
        return b"".join(chunks)

    async def _parse(self, request: Request, model: type[BaseModel]):
        raw = await self._read_body(request)
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8, huge ints
            raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise RequestError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            message, param = describe_validation_error(exc.errors(include_url=False))
            raise RequestError(400, message, param) from None

    async def _jobs(self, body, chat: bool):
        settings = self.settings
        soup = await self._user_soup(body)
        try:
            soup = soup or self.catalog.resolve(body.model, body.preferences, body.weights)
        except PsoupsError as exc:
            param = "weights" if body.weights is not None else (
                "preferences" if body.preferences is not None else "model")  # fmt: skip
            raise RequestError(400, str(exc), param) from None
        if body.n > settings.max_n:
            raise RequestError(400, f"n must be <= {settings.max_n}, got {body.n}", "n")
        if chat and body.top_logprobs is not None and not body.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        requested = body.requested_tokens
        if requested == 0 and not (not chat and body.echo):
            raise RequestError(
                400, "max_tokens 0 samples nothing: it needs echo: true on /v1/completions "
                "(to score the prompt), or max_tokens >= 1", "max_tokens",
            )  # fmt: skip
        if requested == 0 and body.stream:
            raise RequestError(400, "max_tokens 0 (echo only) cannot stream", "stream")
        max_tokens = settings.default_max_tokens if requested is None else requested
        if max_tokens > settings.max_tokens:
            raise RequestError(
                400, f"max_tokens must be <= {settings.max_tokens}, got {max_tokens}", "max_tokens"
            )
        prompt_ids = None if chat else body.prompt_ids
        if prompt_ids is not None:
            vocab = len(self.tokenizer)
            if max(prompt_ids) >= vocab:
                raise RequestError(
                    400, f"prompt token ids must be < the vocabulary's {vocab}", "prompt"
                )
            prompt, prompt_tokens = self.tokenizer.decode(list(prompt_ids)), len(prompt_ids)
        else:
            prompt = self._chat_prompt(body.messages) if chat else self._completion_prompt(body)
            prompt_tokens = len(self.tokenizer(prompt)["input_ids"])
        where = "messages" if chat else "prompt"
        if prompt_tokens > settings.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt has {prompt_tokens} tokens; the limit is {settings.max_prompt_tokens}",
                where,
            )
        if self.max_context is None:
            self.max_context = (await self._info_handle.info.remote())["max_context"]
        if prompt_tokens + max_tokens > self.max_context:
            raise RequestError(
                400,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {self.max_context} tokens",
                "max_tokens",
            )
        if body.min_tokens > max_tokens:
            raise RequestError(
                400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens})",
                "min_tokens",
            )  # fmt: skip
        defaults = self.catalog.sampling
        jobs = [
            GenerationJob(
                prompt,
                soup.weights,
                SamplingParams(
                    max_tokens=max(max_tokens, 1),  # 0 (echo only) samples nothing
                    temperature=_given(body.temperature, defaults.temperature),
                    top_k=max(_given(body.top_k, defaults.top_k), 0),
                    top_p=_given(body.top_p, defaults.top_p),
                    seed=None if body.seed is None else body.seed + index,
                    stop=body.stops,
                    min_p=body.min_p,
                    repetition_penalty=body.repetition_penalty,
                    frequency_penalty=body.frequency_penalty,
                    presence_penalty=body.presence_penalty,
                    min_tokens=body.min_tokens,
                    ignore_eos=body.ignore_eos,
                    logprobs=body.logprob_count,
                ),
                prompt_ids,
            )
            for index in range(body.n)
        ]
        return soup, jobs

    def _chat_prompt(self, messages) -> str:
        from psoups_ray.prompting import format_prompt

        if not any(message.role == "user" and message.text.strip() for message in messages):
            raise RequestError(400, "messages must hold a non-empty user message", "messages")
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": m.template_role, "content": m.text} for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        # No chat template: the plain instruction format, with the system, developer and
        # user turns as the instruction.
        instruction = "\n\n".join(m.text for m in messages if m.role != "assistant")
        return format_prompt(self.tokenizer, instruction)

    @staticmethod
    def _completion_prompt(body: CompletionRequest) -> str:
        if not body.prompt_text.strip():
            raise RequestError(400, "prompt must not be empty", "prompt")
        return body.prompt_text

    def _weights(self, soup) -> dict[str, float]:
        names = self.catalog.adapter_names
        return {p: w for p, w in zip(names, soup.weights, strict=True) if w}

    def _route(self, handle, job: GenerationJob):
        """``merged``: send a soup's requests to replicas holding its merged copy."""
        if self.settings.strategy == "merged" and any(job.weights):
            return handle.options(multiplexed_model_id=soup_key(job.weights))
        return handle

    async def _collect(self, job: GenerationJob):
        return await self._route(self._info_handle, job).complete.remote(job)

    async def _sse(self, jobs, meta, chat: bool, include_usage: bool, body, echoed):
        """Server-sent events: choices interleaved as their tokens arrive, then [DONE].
        With logprobs, each event carries those of its step's token; with echo, a first
        event per choice carries the prompt (and its log-probabilities)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: GenerationJob):
            try:
                async for out in self._route(self.model, job).generate.remote(job):
                    await queue.put((index, out, None))
            except Exception as exc:  # reported in the stream; the server keeps serving
                await queue.put((index, None, exc))
            finally:
                await queue.put((index, None, StopAsyncIteration))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        kind = "chat.completion.chunk" if chat else "text_completion"
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        with_logprobs = (body.logprobs if chat else body.logprobs is not None) or False
        for index, job in enumerate(jobs):
            if chat:
                yield event({**meta, "object": kind, "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}]})  # fmt: skip
            elif body.echo:
                logprobs = None if echoed is None else (
                    self.token_text.completion_logprobs(echoed, 0, True))  # fmt: skip
                yield event({**meta, "object": kind, "choices": [
                    {"index": index, "text": job.prompt, "logprobs": logprobs,
                     "finish_reason": None}]})  # fmt: skip
        open_streams = len(jobs)
        try:
            while open_streams:
                index, out, error = await queue.get()
                if error is StopAsyncIteration:
                    open_streams -= 1
                    continue
                if error is not None:
                    yield event(error_body(f"generation failed: {error}", None, "server_error"))
                    continue
                steps = []
                if with_logprobs and out.token_id is not None and out.logprob is not None:
                    steps = self.token_text.visible(
                        [TokenStep(out.token_id, out.logprob, out.top_logprobs or [])]
                    )
                if not out.text and not out.finished and not steps:
                    continue
                logprobs = None
                if with_logprobs:
                    logprobs = (self.token_text.chat_logprobs(steps) if chat
                                else self.token_text.completion_logprobs(steps))  # fmt: skip
                if chat:
                    choice = {"index": index, "delta": {"content": out.text} if out.text else {},
                              "logprobs": logprobs, "finish_reason": out.finish_reason}  # fmt: skip
                else:
                    choice = {"index": index, "text": out.text, "logprobs": logprobs,
                              "finish_reason": out.finish_reason}  # fmt: skip
                yield event({**meta, "object": kind, "choices": [choice]})
                if out.finished:
                    usage["prompt_tokens"] = out.prompt_tokens
                    usage["completion_tokens"] += out.completion_tokens
            if include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield event({**meta, "object": kind, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
