"""The Ray edge of the soup evaluators: long-lived actors, each a
:class:`~psoups_ray.runtime.evaluator.SoupEvaluator` that loaded the run's models once, and
the pool that lends them to tune trials and spreads requests over them.

Torch-free at import, as :mod:`psoups_ray.runtime.queries` (a trial process imports this):
only the actors import the evaluator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from psoups_ray import console
from psoups_ray.console import RunLog
from psoups_ray.progress import log
from psoups_ray.runtime.queries import SoupModels, SoupQuery

CLOSE_TIMEOUT_S = 60.0  # for the actors to flush (and upload) their logs when stopped


class EvaluatorPool:
    """Evaluator actors, lent one request at a time (a Ray queue of actor handles) or
    spread over a list of requests (:meth:`map`)."""

    def __init__(self, actors: Sequence[Any]):
        from ray.util.queue import Queue

        self.actors = list(actors)
        self._queue = Queue(actor_options={"num_cpus": 0})
        for actor in self.actors:
            self._queue.put(actor)

    def evaluate(self, queries: Sequence[SoupQuery], prompts, spec, seed, keep_samples=0):
        """Run one request on whichever actor is free (blocks until one is)."""
        import ray

        actor = self._queue.get()
        try:
            return ray.get(actor.evaluate.remote(list(queries), list(prompts), spec, seed,
                                                 keep_samples))  # fmt: skip
        finally:
            self._queue.put(actor)

    def stats(self) -> list[dict[str, Any]]:
        """Each actor's process id and number of requests served."""
        import ray

        return ray.get([actor.stats.remote() for actor in self.actors])

    def map(
        self,
        requests: Sequence[tuple[Any, ...]],
        method: str = "evaluate",
        on_result: Callable[[int, int], None] | None = None,
    ) -> list[Any]:
        """Spread requests (argument tuples of the actor's ``method``) over every actor at
        once; results in request order. ``on_result(done, total)`` after each."""
        import ray

        pending: dict[Any, tuple[int, Any]] = {}
        results: list[Any] = [None] * len(requests)
        free = list(self.actors)
        queue = list(enumerate(requests))
        while queue or pending:
            while free and queue:
                index, arguments = queue.pop(0)
                actor = free.pop()
                pending[getattr(actor, method).remote(*arguments)] = (index, actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            index, actor = pending.pop(done[0])
            results[index] = ray.get(done[0])
            free.append(actor)
            if on_result is not None:
                on_result(len(requests) - len(queue) - len(pending), len(requests))
        return results

    def stop(self) -> None:
        """Close the actors' logs (an object store's are uploaded then), then end them."""
        import ray

        closing = [actor.close.remote() for actor in self.actors]
        ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        for actor in self.actors:
            ray.kill(actor)


def evaluators_that_fit(cpus: float, gpus: float, total: dict[str, float]) -> int:
    """How many actors of ``cpus`` CPU / ``gpus`` GPU the cluster's ``total`` resources hold."""
    fits = [total.get("CPU", 0.0) / cpus]
    if gpus > 0:
        fits.append(total.get("GPU", 0.0) / gpus)
    return int(min(fits) + 1e-9)


def start_evaluators(
    models: SoupModels, count: int, cpus: float, gpus: float, stage: str
) -> EvaluatorPool:
    """``count`` evaluator actors with these resources, each having loaded ``models``."""
    import ray

    total = ray.cluster_resources()
    fit = evaluators_that_fit(cpus, gpus, total)
    if fit == 0:
        log(
            f"{stage}: warning: an evaluator needs {cpus:g} CPU / {gpus:g} GPU but the "
            f"cluster has {total.get('CPU', 0):g} / {total.get('GPU', 0):g}; it waits for an "
            f"autoscaler (or lower {stage}.resources)"
        )
    elif fit < count:
        # The others would wait for resources that never come, and with them this call.
        log(
            f"{stage}: {count} evaluators of {cpus:g} CPU / {gpus:g} GPU asked for, but the "
            f"cluster holds {fit} ({total.get('CPU', 0):g} CPU / {total.get('GPU', 0):g} GPU); "
            f"starting {fit}"
        )
        count = fit
    actor_class = evaluator_actor_class(cpus, gpus)
    actors = [
        actor_class.remote(models, console.run_log(stage, f"evaluator-{index}"))
        for index in range(count)
    ]
    log(
        f"{stage}: {len(actors)} evaluator actor(s) load the base, "
        f"{len(models.models.policies)} policies and "
        f"{len(models.models.rewards)} reward models once ({cpus:g} CPU, {gpus:g} GPU each)"
    )
    pool = EvaluatorPool(actors)
    try:
        ray.get([actor.stats.remote() for actor in actors])  # surface loading errors here
    except BaseException:
        pool.stop()
        raise
    return pool


def evaluator_actor_class(num_cpus: float, num_gpus: float):
    """:class:`SoupEvaluator` as a Ray actor class with these resources."""
    import ray

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=1)
    class SoupEvaluatorActor:
        def __init__(self, models: SoupModels, log: RunLog | None = None):
            # The actor's output, for its lifetime, goes to its log (under a console).
            self._output = contextlib.ExitStack()
            self._output.enter_context(console.worker_output(log))
            import torch

            from psoups_ray.runtime.evaluator import SoupEvaluator
            from psoups_ray.training import threads_for_worker

            threads_for_worker(num_cpus)
            device = "cpu"
            if models.use_gpu and torch.cuda.is_available():
                device = "cuda"
            self.evaluator = SoupEvaluator(models, device)
            self.calls = 0
            self.busy_seconds = 0.0  # time spent serving calls (utilisation = busy / wall)

        def _serve(self, method, *arguments):
            import time

            started = time.monotonic()
            self.calls += 1
            try:
                return method(*arguments)
            finally:
                self.busy_seconds += time.monotonic() - started

        def evaluate(self, queries, prompts, spec, seed, keep_samples=0):
            return self._serve(self.evaluator.evaluate, queries, prompts, spec, seed,
                               keep_samples)  # fmt: skip

        def sample(self, queries, prompts, spec, seed, scored):
            return self._serve(self.evaluator.sample, queries, prompts, spec, seed, scored)

        def close(self) -> None:
            self._output.close()

        def stats(self) -> dict[str, Any]:
            import os

            return {
                "pid": os.getpid(),
                "calls": self.calls,
                "busy_seconds": round(self.busy_seconds, 1),
            }

    return SoupEvaluatorActor
