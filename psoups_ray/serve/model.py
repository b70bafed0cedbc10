"""The ``SoupModel`` deployment: the base with every pole policy mixed in activation space
(:class:`~psoups_ray.serve.engine.SoupEngine`), loaded once per replica; requests batched
dynamically by ``@serve.batch``, one batch holding rows for different soups. This is the
deployment the YAML's ``autoscaling_config`` scales.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from psoups_ray.serve.args import ServeArgs
from psoups_ray.serve.engine import (
    GenerationJob,
    SoupEngine,
    StepOutput,
    TokenStep,
    parse_soup_key,
    soup_key,
)


def limit_torch_threads() -> None:
    """A replica's torch threads: its OMP_NUM_THREADS (the YAML's runtime_env), if set."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def _next_or_none(iterator):
    return next(iterator, None)


class _SoupModel:
    """Base + every pole policy; dynamic batching of decode requests.

    ``mixing``: one decoding loop per batch, each row with its own weights. ``merged``:
    the batch's rows are grouped by soup and each group decodes with that soup's merged
    copy of the base, taken from a multiplexed LRU cache (rows of later groups wait)."""

    def __init__(self, args: dict[str, Any]):
        settings = ServeArgs.model_validate(args)
        limit_torch_threads()
        self.strategy = settings.strategy
        self.engine = SoupEngine(settings.run, settings.device, settings.dtype, self.strategy)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="psoups-decode")
        self._decode.set_max_batch_size(settings.max_batch_size)
        self._decode.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        from ray.serve import metrics

        self._batch_rows = metrics.Histogram(
            "psoups_decode_batch_rows", "Requests decoded together in one batch",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )  # fmt: skip
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
        self._batch_rows.observe(len(jobs))
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

    async def complete(self, job: GenerationJob) -> tuple[str, Any, list[TokenStep]]:
        """The whole response in one reply (non-streaming requests: no per-token hops):
        (text, the last step's output, each token's logprobs when the job asked).

        The batch's stream is read to its end for this request (the step after it finished
        ends it), so no future of the batch is left holding an unread exception."""
        last, steps = None, []
        async for out in self._decode(job):
            if last is None:
                if out.token_id is not None and out.logprob is not None:
                    steps.append(TokenStep(out.token_id, out.logprob, out.top_logprobs or []))
                if out.finished:
                    last = out
        if last is None:
            raise RuntimeError("the decoding batch ended before the request finished")
        return last.final_text, last, steps

    async def prompt_logprobs(self, job: GenerationJob, top: int) -> list[TokenStep]:
        """The soup's log-probability of each prompt token (``echo``), one forward pass on
        the decode thread."""
        model = None
        if self.strategy == "merged" and any(job.weights):
            model = await self._merged(soup_key(job.weights))
        elif self.strategy == "merged":
            model = self.engine.model
        request = self.engine.request_of(job)
        loop = asyncio.get_running_loop()
        scored = (await loop.run_in_executor(
            self._executor, self.engine.sampler.prompt_logprobs, [request], top, model
        ))[0]  # fmt: skip
        return [
            TokenStep(token, logprob, alternatives)
            for token, (logprob, alternatives) in zip(request.prompt_ids, scored, strict=True)
        ]

    def info(self) -> dict[str, Any]:
        return {"poles": self.engine.poles, "max_context": self.engine.max_context,
                "pid": os.getpid(), "strategy": self.strategy, "merges": self.merges}  # fmt: skip

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("engine not loaded")


SoupModel = serve.deployment(name="SoupModel", max_ongoing_requests=64, health_check_period_s=10)(
    _SoupModel
)
