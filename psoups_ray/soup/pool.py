"""What the soup evaluator actors are given and how they are lent, without torch.

:class:`SoupModels` (where a run's models are) and :class:`SoupQuery` (one soup to
measure) travel to the actors; :class:`EvaluatorPool` lends the actors to tune trials and
spreads requests over them. Every Tune trial runs in its own Ray worker process and needs
only these, so this module imports neither torch nor transformers: a trial process starts
in about a second instead of paying several CPU-seconds of imports
(:mod:`psoups_ray.soup.evaluator` holds the models themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psoups_ray.config import BaseConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import log


@dataclass(frozen=True)
class SoupModels:
    """Where a run's models are, picklable for Ray."""

    base_model_path: str
    tokenizer_path: str
    base: BaseConfig
    policy_paths: dict[str, str]  # pole -> policy adapter directory (every pole of the space)
    reward_paths: dict[str, str]  # pole -> reward adapter directory
    preference_prompts: dict[str, str]  # pole -> preference prompt
    reward_max_length: int
    tiny_world: bool  # also measure attribute success with the tiny world's checkers
    use_gpu: bool = False
    baseline_paths: dict[str, str] = field(default_factory=dict)  # baseline -> adapter dir
    # (mixed in like the poles: weight 1 on a baseline alone is that baseline's policy)

    @classmethod
    def from_manifest(
        cls,
        data: dict[str, Any],
        base: BaseConfig,
        reward_max_length: int,
        use_gpu: bool,
        baselines: Sequence[str] = (),
    ) -> SoupModels:
        from psoups_ray.preferences import PreferenceSpace, PreferenceSpaceSpec

        space = PreferenceSpace.from_spec(PreferenceSpaceSpec.model_validate(data["preferences"]))
        policies, rewards = data.get("policies") or {}, data.get("rewards") or {}
        for section, records in (("policies", policies), ("rewards", rewards)):
            missing = [pole for pole in space.pole_ids if pole not in records]
            if missing:
                raise PsoupsError(
                    f"the run has no {section} artifacts for {', '.join(missing)}; run the "
                    f"{section} stage first"
                )
        recorded = data.get("baselines") or {}
        missing = [name for name in baselines if name not in recorded]
        if missing:
            raise PsoupsError(
                f"the run has no baseline policy {', '.join(missing)} (it has: "
                f"{', '.join(recorded) or 'none'}); add it to policies.baselines and run "
                "`psoups policies`"
            )
        clashes = [name for name in baselines if name in space.pole_ids]
        if clashes:
            raise PsoupsError(f"baseline name(s) {clashes} clash with pole ids")
        return cls(
            base_model_path=data["base"]["model_path"],
            tokenizer_path=data["base"]["tokenizer_path"],
            base=base,
            policy_paths={pole: policies[pole]["path"] for pole in space.pole_ids},
            reward_paths={pole: rewards[pole]["path"] for pole in space.pole_ids},
            preference_prompts={pole: space.pole(pole).prompt for pole in space.pole_ids},
            reward_max_length=reward_max_length,
            tiny_world=base.is_tiny,
            use_gpu=use_gpu,
            baseline_paths={name: recorded[name]["path"] for name in baselines},
        )

    @property
    def poles(self) -> list[str]:
        return list(self.policy_paths)


@dataclass(frozen=True)
class SoupQuery:
    """One soup to measure: its weights, the poles whose rewards count, its query prompt."""

    weights: dict[str, float]  # pole -> weight; poles left out weigh 0
    scored: tuple[str, ...]  # the poles whose rewards are measured (the combination)
    preference_prompt: str | None = None  # appended to every prompt (prompted policies)


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
        import ray

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
    from psoups_ray.soup.evaluator import evaluator_actor_class

    actor_class = evaluator_actor_class(cpus, gpus)
    actors = [actor_class.remote(models) for _ in range(count)]
    log(
        f"{stage}: {len(actors)} evaluator actor(s) load the base, "
        f"{len(models.policy_paths) + len(models.baseline_paths)} policies and "
        f"{len(models.reward_paths)} reward models once ({cpus:g} CPU, {gpus:g} GPU each)"
    )
    pool = EvaluatorPool(actors)
    try:
        ray.get([actor.stats.remote() for actor in actors])  # surface loading errors here
    except BaseException:
        pool.stop()
        raise
    return pool
