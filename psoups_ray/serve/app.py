"""The Ray Serve application: an OpenAI-compatible ingress and an autoscaling soup model.

    serve run serve_configs/tiny.yaml            # args.run names the run directory
    psoups serve --run runs/tiny [--config serve_configs/tiny.yaml] [--port 8000]

Two deployments:

- ``Ingress`` (FastAPI): auth, request validation, prompt formatting, OpenAI response
  shapes and server-sent events. It loads only the tokenizer and the run's catalog
  (preference space, poles, tuned weights), so bad requests never reach a model replica.
- ``SoupModel``: the base with every pole policy mixed in activation space
  (:class:`SoupEngine`), loaded once per replica. Requests are batched dynamically by
  ``@serve.batch``; one batch holds rows for different combinations and weights. This is
  the deployment the YAML's ``autoscaling_config`` scales.

A request picks its soup by ``model`` (``psoups:base``, ``psoups:P1A``,
``psoups:P1A+P2B+P3A``: tuned weights when the run has them, else uniform) or by the
extension fields ``preferences`` (a list of poles) or ``weights`` ({pole: weight}).
Adapters are only ever loaded from the run directory, never from a path in a request.
"""

import asyncio
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.requests import ClientDisconnect

from psoups_ray.errors import PsoupsError
from psoups_ray.serve.engine import (
    MODEL_PREFIX,
    GenerationJob,
    SamplingParams,
    SoupCatalog,
    SoupEngine,
    StepOutput,
    parse_soup_key,
    soup_key,
)
from psoups_ray.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_error,
    error_body,
)


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


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.param, self.kind), self.status)


def _given(value, default):
    return default if value is None else value


def _next_or_none(iterator):
    return next(iterator, None)


def _event(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


class _SoupModel:
    """Base + every pole policy; dynamic batching of decode requests.

    ``mixing``: one decoding loop per batch, each row with its own weights. ``merged``:
    the batch's rows are grouped by soup and each group decodes with that soup's merged
    copy of the base, taken from a multiplexed LRU cache (rows of later groups wait)."""

    def __init__(self, args: dict[str, Any]):
        settings = ServeArgs.model_validate(args)
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:
            import torch

            torch.set_num_threads(max(1, int(threads)))
        self.strategy = settings.strategy
        self.engine = SoupEngine(settings.run, settings.device, settings.dtype, self.strategy)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="psoups-decode")
        self._decode.set_max_batch_size(settings.max_batch_size)
        self._decode.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.merges = 0
        if self.strategy == "merged":
            engine, executor = self.engine, self._executor

            async def merged(model_id: str):
                self.merges += 1
                weights = parse_soup_key(model_id)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(executor, engine.merged_model, weights)

            cache = settings.merged_cache_size
            self._merged = serve.multiplexed(max_num_models_per_replica=cache)(merged)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _decode(self, jobs: list[GenerationJob]):
        """Yields each job's step output per decoding step (the event loop stays free:
        every step runs on the decode thread)."""
        loop = asyncio.get_running_loop()
        if self.strategy == "mixing":
            groups: dict[tuple[float, ...], list[int]] = {(): list(range(len(jobs)))}
        else:
            groups = {}
            for index, job in enumerate(jobs):
                groups.setdefault(job.weights, []).append(index)
        finished = [False] * len(jobs)
        for weights, indices in groups.items():
            model = None
            if self.strategy == "merged":
                model = await self._merged(soup_key(weights)) if any(weights) else None
                model = model if model is not None else self.engine.model
            iterator = self.engine.stream([jobs[i] for i in indices], model)
            while True:
                outputs = await loop.run_in_executor(self._executor, _next_or_none, iterator)
                if outputs is None:
                    break
                batch: list[Any] = [
                    StopIteration if finished[i] else StepOutput("") for i in range(len(jobs))
                ]
                for slot, index in enumerate(indices):
                    if not finished[index]:
                        batch[index] = outputs[slot]
                        finished[index] = outputs[slot].finished
                yield batch

    async def generate(self, job: GenerationJob) -> AsyncIterator[Any]:
        async for out in self._decode(job):
            yield out
            if out.finished:
                return

    async def complete(self, job: GenerationJob) -> tuple[str, Any]:
        """The whole response in one reply (non-streaming requests: no per-token hops)."""
        async for out in self._decode(job):
            if out.finished:
                return out.final_text, out
        raise RuntimeError("the decoding batch ended before the request finished")

    def info(self) -> dict[str, Any]:
        return {"poles": self.engine.poles, "max_context": self.engine.max_context,
                "pid": os.getpid(), "strategy": self.strategy, "merges": self.merges}  # fmt: skip

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("engine not loaded")


SoupModel = serve.deployment(name="SoupModel", max_ongoing_requests=64, health_check_period_s=10)(
    _SoupModel
)


api = FastAPI(title="psoups_ray", description="P-Soups: any preference combination per request")


@serve.deployment(name="Ingress", max_ongoing_requests=512)
@serve.ingress(api)
class Ingress:
    def __init__(self, model, args: dict[str, Any], token: str | None):
        from psoups_ray.runtime.loading import load_base_tokenizer

        self.settings = ServeArgs.model_validate(args)
        self.catalog = SoupCatalog(self.settings.run)
        self.tokenizer = load_base_tokenizer(self.catalog.base)
        self.model = model.options(stream=True)  # token by token, for stream=true
        self._info_handle = model  # one reply per call
        self.token = token
        self.max_context: int | None = None

    # -- endpoints -----------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        info = await self._info_handle.info.remote()
        return {"status": "ok", "poles": info["poles"]}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except RequestError as exc:
            return exc.response()
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "psoups"}
                for name in self.catalog.model_ids()
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
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                self._sse(jobs, meta, chat, include_usage), media_type="text/event-stream"
            )
        try:
            results = await asyncio.gather(*(self._collect(job) for job in jobs))
        except Exception as exc:  # the model replica failed this request; keep serving
            return RequestError(500, f"generation failed: {exc}", kind="server_error").response()
        choices = []
        for index, (text, last) in enumerate(results):
            choice: dict[str, Any] = {"index": index, "finish_reason": last.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice.update(text=text, logprobs=None)
            choices.append(choice)
        prompt_tokens = results[0][1].prompt_tokens
        completion_tokens = sum(last.completion_tokens for _, last in results)
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "psoups": {"weights": self._weights(soup), "weights_from": soup.source},
        }

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
        try:
            soup = self.catalog.resolve(body.model, body.preferences, body.weights)
        except PsoupsError as exc:
            param = "weights" if body.weights is not None else (
                "preferences" if body.preferences is not None else "model")  # fmt: skip
            raise RequestError(400, str(exc), param) from None
        if body.n > settings.max_n:
            raise RequestError(400, f"n must be <= {settings.max_n}, got {body.n}", "n")
        max_tokens = body.requested_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens:
            raise RequestError(
                400, f"max_tokens must be <= {settings.max_tokens}, got {max_tokens}", "max_tokens"
            )
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
        defaults = self.catalog.sampling
        jobs = [
            GenerationJob(
                prompt,
                soup.weights,
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=_given(body.temperature, defaults.temperature),
                    top_k=max(_given(body.top_k, defaults.top_k), 0),
                    top_p=_given(body.top_p, defaults.top_p),
                    seed=None if body.seed is None else body.seed + index,
                    stop=body.stops,
                ),
            )
            for index in range(body.n)
        ]
        return soup, jobs

    def _chat_prompt(self, messages) -> str:
        from psoups_ray.prompting import format_prompt

        if not any(message.role == "user" and message.content.strip() for message in messages):
            raise RequestError(400, "messages must hold a non-empty user message", "messages")
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        # No chat template (the tiny world): the plain instruction format the policies
        # were trained on, with system and user turns as the instruction.
        instruction = "\n\n".join(m.content for m in messages if m.role != "assistant")
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

    async def _sse(self, jobs, meta, chat: bool, include_usage: bool):
        """Server-sent events: choices interleaved as their tokens arrive, then [DONE]."""
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
        if chat:
            for index in range(len(jobs)):
                yield _event({**meta, "object": kind, "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""},
                     "finish_reason": None}]})  # fmt: skip
        open_streams = len(jobs)
        try:
            while open_streams:
                index, out, error = await queue.get()
                if error is StopAsyncIteration:
                    open_streams -= 1
                    continue
                if error is not None:
                    yield _event(error_body(f"generation failed: {error}", None, "server_error"))
                    continue
                if not out.text and not out.finished:
                    continue
                if chat:
                    choice = {"index": index, "delta": {"content": out.text} if out.text else {},
                              "finish_reason": out.finish_reason}  # fmt: skip
                else:
                    choice = {"index": index, "text": out.text, "logprobs": None,
                              "finish_reason": out.finish_reason}  # fmt: skip
                yield _event({**meta, "object": kind, "choices": [choice]})
                if out.finished:
                    usage["prompt_tokens"] = out.prompt_tokens
                    usage["completion_tokens"] += out.completion_tokens
            if include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield _event({**meta, "object": kind, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()


def build_app(args: dict[str, Any]):
    """The application builder that ``serve run`` and ``serve deploy`` call with a Serve
    YAML's ``args`` (Ray Serve requires exactly one parameter); the YAML's
    ``deployments`` section is applied by Serve itself."""
    return bind_app(args)


def bind_app(args: dict[str, Any], deployment_options: dict[str, dict] | None = None):
    """The bound application for ``args``: validated, and the run checked, before anything
    starts. ``deployment_options`` ({deployment name: options}) is how ``psoups serve``
    applies a YAML's ``deployments`` section, which ``serve run`` applies itself."""
    try:
        settings = ServeArgs.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise PsoupsError(f"invalid serve args: {problems}") from None
    run = settings.run
    if "://" not in run and Path(run).exists():
        run = str(Path(run).resolve())  # replicas may start in another directory
    settings = settings.model_copy(update={"run": run})
    catalog = SoupCatalog(run)  # fail here, with the reason, rather than in every replica
    catalog.run.check_loadable(catalog.run.model_set(catalog.baselines, rewards=False))
    token = None
    if settings.auth_token_env:
        token = os.environ.get(settings.auth_token_env)
        if not token:
            raise PsoupsError(
                f"auth_token_env is {settings.auth_token_env!r} but that environment variable "
                "is empty or unset; export the token, or drop auth_token_env to serve without auth"
            )
    dumped = settings.model_dump()
    options = deployment_options or {}
    unknown = sorted(set(options) - {"SoupModel", "Ingress"})
    if unknown:
        raise PsoupsError(f"unknown deployment(s) {unknown}; the app has SoupModel and Ingress")
    model = SoupModel.options(**options.get("SoupModel", {}))
    ingress = Ingress.options(**options.get("Ingress", {}))
    return ingress.bind(model.bind(dumped), dumped, token)
