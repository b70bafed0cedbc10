"""Measure soups: generate with any weights over the pole policies, score with the pole
reward models. One loaded base serves everything.

The base model is loaded once; every pole's reward adapter is attached to it through
PEFT (with its score head), and every pole's policy adapter is mixed into the same
linear layers by :mod:`psoups_ray.soup.mixing`. Generating with a soup = reward adapters
disabled + mixing weights set, per row; scoring = one reward adapter enabled, no mixing
weights. A request is a list of :class:`SoupQuery`; all their rows (query x prompt) are
generated in mixed batches.

:class:`SoupEvaluator` needs no Ray; :func:`evaluator_actor_class` wraps it as the
long-lived Ray actor that tune trials and Pareto sweeps call (the model stays loaded
across trials).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from psoups_ray.config import BaseConfig, GenerationSpec
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import log
from psoups_ray.rundir import local_reference


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


class SoupEvaluator:
    """A run's base, pole policies (mixed) and reward models, loaded once."""

    def __init__(self, models: SoupModels, device: torch.device | str = "cpu"):
        from peft import get_peft_model

        from psoups_ray.base.model import load_causal_lm, load_tokenizer
        from psoups_ray.rl.models import (
            load_reward_weights,
            read_reward_adapter,
            reward_lora_config,
        )
        from psoups_ray.soup.adapters import read_lora_adapter
        from psoups_ray.soup.mixing import attach_mixing

        self.models = models
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(local_reference(models.tokenizer_path))
        base = load_causal_lm(local_reference(models.base_model_path), models.base.dtype)
        base.requires_grad_(False)
        self.rewards = {
            pole: read_reward_adapter(pole, local_reference(path))
            for pole, path in models.reward_paths.items()
        }
        self._adapter_of: dict[str, str] = {}  # pole -> attached reward adapter name
        self._heads: dict[str, torch.nn.Linear] = {}
        by_directory: dict[str, str] = {}
        self.peft = None
        for pole, adapter in self.rewards.items():
            if adapter.directory not in by_directory:
                name = f"reward_{len(by_directory)}"
                config = reward_lora_config(adapter.directory)
                if self.peft is None:
                    self.peft = get_peft_model(base, config, adapter_name=name)
                else:
                    self.peft.add_adapter(name, config)
                self._heads[name] = load_reward_weights(self.peft, name, adapter.directory)
                by_directory[adapter.directory] = name
            self._adapter_of[pole] = by_directory[adapter.directory]
        self.lm = self.peft.get_base_model()  # the causal LM, PEFT layers inside
        policies = [
            read_lora_adapter(local_reference(path), name)
            for name, path in {**models.policy_paths, **models.baseline_paths}.items()
        ]
        self.mixer = attach_mixing(self.lm, policies)
        self.peft.to(self.device)
        for head in self._heads.values():
            head.to(self.device)
        self.peft.eval()

    @property
    def poles(self) -> list[str]:
        """Names of the mixable adapters: every pole, then the loaded baselines."""
        return self.mixer.adapter_names

    def weight_vector(self, weights: dict[str, float]) -> list[float]:
        unknown = sorted(set(weights) - set(self.poles))
        if unknown:
            raise PsoupsError(f"no policy for {', '.join(unknown)} (poles: {self.poles})")
        return [float(weights.get(pole, 0.0)) for pole in self.poles]

    @torch.no_grad()
    def generate(
        self,
        queries: Sequence[SoupQuery],
        prompts: Sequence[str],
        spec: GenerationSpec,
        seed: int,
    ) -> list[list[str]]:
        """Responses of every soup to every prompt: ``[query][prompt]``.

        Rows are (query, prompt) pairs in batches of ``spec.batch_size``; each row mixes
        with its own query's weights. Batch k is sampled with seed ``seed + k``, so the
        same queries, prompts and seed give the same samples (tune trials compare weights
        on common random numbers).
        """
        from psoups_ray.generation import generate
        from psoups_ray.prompting import format_prompt

        rows = [(q, p) for q in range(len(queries)) for p in range(len(prompts))]
        weights = torch.tensor([self.weight_vector(query.weights) for query in queries])
        texts: list[str] = []
        with self.peft.disable_adapter():
            for batch, start in enumerate(range(0, len(rows), spec.batch_size)):
                chunk = rows[start : start + spec.batch_size]
                formatted = [
                    format_prompt(self.tokenizer, prompts[p], queries[q].preference_prompt)
                    for q, p in chunk
                ]
                with self.mixer.weights(weights[[q for q, _ in chunk]].to(self.device)):
                    texts.extend(
                        generate(self.lm, self.tokenizer, formatted, spec, seed=seed + batch)
                    )
        return [texts[q * len(prompts) : (q + 1) * len(prompts)] for q in range(len(queries))]

    @torch.no_grad()
    def normalized_rewards(
        self, pole: str, prompts: Sequence[str], texts: Sequence[str], batch_size: int
    ) -> torch.Tensor:
        """``pole``'s reward of each (prompt, response), standardised with the reward
        model's held-out statistics: (len(texts),)."""
        from psoups_ray.rewards.train import reward_input, score_right_padded
        from psoups_ray.rl.models import read_scores

        adapter = self.rewards[pole]
        name = self._adapter_of[pole]
        preference = self.models.preference_prompts[pole] if adapter.conditioned else None
        inputs = [
            "".join(reward_input(self.tokenizer, prompt, text, preference))
            for prompt, text in zip(prompts, texts, strict=True)
        ]
        self.peft.set_adapter(name)
        scores = score_right_padded(
            self.tokenizer,
            inputs,
            batch_size,
            lambda ids, mask: read_scores(
                self.peft.get_base_model().base_model,
                self._heads[name],
                ids.to(self.device),
                mask.to(self.device),
                self.tokenizer.pad_token_id,
            ),
            self.models.reward_max_length,
        )
        return (scores - adapter.score_mean) / adapter.score_std

    def sample(
        self,
        queries: Sequence[SoupQuery],
        prompts: Sequence[str],
        spec: GenerationSpec,
        seed: int,
        scored: Sequence[str],
    ) -> list[dict[str, Any]]:
        """Per query: its responses (one per prompt) and, for each pole in ``scored``, the
        normalised reward of every response (``rewards[pole]``, a list like the responses)."""
        if not prompts:
            raise PsoupsError("no prompts to sample")
        texts = self.generate(queries, prompts, spec, seed)
        return [
            {
                "responses": responses,
                "rewards": {
                    pole: self.normalized_rewards(
                        pole, prompts, responses, spec.batch_size
                    ).tolist()
                    for pole in scored
                },
            }
            for responses in texts
        ]

    def evaluate(
        self,
        queries: Sequence[SoupQuery],
        prompts: Sequence[str],
        spec: GenerationSpec,
        seed: int,
        keep_samples: int = 0,
    ) -> list[dict[str, Any]]:
        """Per query: mean normalised reward of each scored pole, their mean (``mean_reward``),
        response length, and in the tiny world the share of responses exhibiting every
        scored pole (``success_rate``)."""
        if not prompts:
            raise PsoupsError("no prompts to evaluate soups on")
        texts = self.generate(queries, prompts, spec, seed)
        results = []
        for query, responses in zip(queries, texts, strict=True):
            rewards = {
                pole: float(
                    self.normalized_rewards(pole, prompts, responses, spec.batch_size).mean()
                )
                for pole in query.scored
            }
            result: dict[str, Any] = {
                "weights": {pole: float(w) for pole, w in query.weights.items()},
                "rewards": rewards,
                "mean_reward": sum(rewards.values()) / len(rewards),
                "response_words": sum(len(t.split()) for t in responses) / len(responses),
            }
            if self.models.tiny_world:
                from psoups_ray.world import exhibited_poles

                wanted = set(query.scored)
                shown = [exhibited_poles(text) for text in responses]
                result["success_rate"] = sum(wanted <= s for s in shown) / len(shown)
                result["target_rates"] = {
                    pole: sum(pole in s for s in shown) / len(shown) for pole in query.scored
                }
            if keep_samples:
                result["samples"] = [
                    {"prompt": p, "response": r}
                    for p, r in list(zip(prompts, responses, strict=True))[:keep_samples]
                ]
            results.append(result)
        return results


def evaluator_actor_class(num_cpus: float, num_gpus: float):
    """:class:`SoupEvaluator` as a Ray actor class with these resources."""
    import ray

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=1)
    class SoupEvaluatorActor:
        def __init__(self, models: SoupModels):
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

        def stats(self) -> dict[str, Any]:
            import os

            return {
                "pid": os.getpid(),
                "calls": self.calls,
                "busy_seconds": round(self.busy_seconds, 1),
            }

    return SoupEvaluatorActor


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
