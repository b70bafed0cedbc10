"""One PPO run: a pole's policy, or a baseline, trained and measured.

:func:`run_policy_training` is callable without Ray; :func:`policy_train_loop` is the Ray
Train per-worker entry point around it (metrics reported every iteration, checkpoints
every ``checkpoint_every``, resume from the last checkpoint after a worker failure).

What a run optimises is a set of *episode kinds*: (poles rewarded, preference prompt in
the query). A pole's policy has one, ``((pole,), None)``; P-MORL has one per combination,
with the combination's preference prompts in the query; the single-reward baseline has
``(all poles, None)``. Each query draws one kind.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from psoups_ray import progress
from psoups_ray.artifacts import BaseArtifact
from psoups_ray.config import PolicyConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.judges import PairToJudge, PairwiseJudge, Verdict
from psoups_ray.judges.attributes import AttributeJudge
from psoups_ray.policies.models import SharedBasePPOModels
from psoups_ray.policies.trainer import PPOTrainer, Query, RewardFn
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir, local_reference
from psoups_ray.runtime.loading import DTYPES, load_base_model, load_base_tokenizer
from psoups_ray.runtime.rewards import read_reward_adapter
from psoups_ray.scratch import scratch_directory
from psoups_ray.seeding import derive_seed
from psoups_ray.training import lora_kwargs, threads_for_worker, worker_node_id

STATE_FILE = "ppo_state.pt"
EpisodeKind = tuple[tuple[str, ...], str | None]  # (poles rewarded, preference prompt)


@dataclass(frozen=True)
class PolicyJob:
    """Everything one PPO run needs, picklable for Ray."""

    run_location: str
    name: str  # pole id, "pmorl" or "rlhf"
    kind: Literal["pole", "pmorl", "rlhf"]
    episodes: tuple[EpisodeKind, ...]
    reward_paths: dict[str, str]  # pole -> reward adapter location
    preference_prompts: dict[str, str]  # pole -> preference prompt (conditioned rewards)
    base: BaseArtifact
    policy: PolicyConfig
    reward_max_length: int
    train_prompts: tuple[str, ...]
    eval_prompts: tuple[str, ...]
    attributes: AttributeJudge | None  # measure attribute rates with the world's judge
    seed: int
    output_relpath: str  # the policy adapter directory
    metrics_relpath: str  # summary + per-iteration history (rank 0)
    text_judge: bool = False  # also compare policy and base with the programmatic text judges

    @property
    def reward_poles(self) -> list[str]:
        return sorted({pole for poles, _ in self.episodes for pole in poles})


def sample_queries(job: PolicyJob, step: int, rank: int, count: int) -> list[Query]:
    """The queries of iteration ``step`` on worker ``rank`` (the same after a resume)."""
    rng = random.Random(derive_seed(job.seed, job.name, "queries", step, rank))
    prompts = job.train_prompts
    chosen = rng.sample(prompts, count) if count <= len(prompts) else rng.choices(prompts, k=count)
    queries = []
    for prompt in chosen:
        poles, preference_prompt = rng.choice(job.episodes)
        queries.append(Query(prompt, preference_prompt, poles))
    return queries


def make_reward_fn(models: SharedBasePPOModels) -> RewardFn:
    """Scores responses: each query's reward is the mean of its poles' normalised rewards
    (the runtime's reward bank on the run's shared base)."""

    def reward(queries: Sequence[Query], texts: Sequence[str]) -> torch.Tensor:
        return models.rewards.mean_scores(
            [query.poles for query in queries], [query.prompt for query in queries], texts
        )

    return reward


def _device(job: PolicyJob, under_ray: bool) -> torch.device:
    if job.policy.resources.use_gpu:
        if under_ray:
            import ray.train.torch

            return ray.train.torch.get_device()
        if torch.cuda.is_available():
            return torch.device("cuda")
    return torch.device("cpu")


def build_trainer(job: PolicyJob, device: torch.device) -> PPOTrainer:
    """Load the base once and attach policy, critic and the run's reward adapters."""
    from peft import LoraConfig, TaskType

    spec = job.policy
    tokenizer = load_base_tokenizer(job.base)
    base_model = load_base_model(job.base)
    adapters = {
        pole: read_reward_adapter(pole, local_reference(job.reward_paths[pole]))
        for pole in job.reward_poles
    }
    critic_from = (
        job.reward_poles[0] if spec.critic_init == "reward" and len(job.reward_poles) == 1 else None
    )
    models = SharedBasePPOModels(
        base_model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            **lora_kwargs(spec.lora, base_model.config.num_hidden_layers),
        ),
        adapters,
        critic_from,
        tokenizer,
        job.preference_prompts,
        job.reward_max_length,
        spec.minibatch_size,
    ).to(device)
    reward_fn = make_reward_fn(models)
    autocast = None
    if device.type == "cuda" and job.base.dtype in ("bfloat16", "float16"):
        autocast = DTYPES[job.base.dtype]
    return PPOTrainer(
        models, tokenizer, spec, reward_fn, device=device, seed=job.seed, autocast_dtype=autocast
    )


@torch.no_grad()
def evaluate_policy(trainer: PPOTrainer, job: PolicyJob) -> dict[str, Any]:
    """Held-out prompts, sampled from the policy and from the base (adapters disabled).

    Query i draws episode kind i mod K, so every kind is measured. Returns mean
    normalised reward of both, the policy's mean per-sequence KL to the reference on its
    own samples, with the tiny world the attribute rates (per pole, among the samples
    whose query asked for it, and over all samples) and with ``job.text_judge`` the
    policy's ``text_judge_win_rate`` against the base (:func:`pole_verdicts`), and with
    either judge the reward models' agreement with it (:func:`reward_judge_agreement`).
    """
    spec = job.policy.eval_generation
    kinds = [job.episodes[i % len(job.episodes)] for i in range(len(job.eval_prompts))]
    queries = [
        Query(prompt, preference_prompt, poles)
        for prompt, (poles, preference_prompt) in zip(job.eval_prompts, kinds, strict=True)
    ]
    result: dict[str, Any] = {"num_prompts": len(queries)}
    seed = derive_seed(job.seed, "eval")
    answers: dict[str, list[str]] = {}
    for which in ("policy", "base"):
        texts: list[str] = []
        kls: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        for start in range(0, len(queries), spec.batch_size):
            batch = queries[start : start + spec.batch_size]
            sampled = trainer.sample(
                batch,
                spec.max_new_tokens,
                spec.temperature,
                spec.top_p,
                derive_seed(seed, start),
                reference=which == "base",
                top_k=spec.top_k,
                dtype=spec.dtype,
            )
            texts.extend(sampled.texts)
            lengths.append(sampled.mask.sum(dim=1).cpu())
            if which == "policy":
                ids, attention, query_length = trainer.join(
                    sampled.encoded, sampled.responses, sampled.mask
                )
                with trainer._autocast():
                    logprobs, _ = trainer.models.policy_logprobs(ids, attention, query_length, 1.0)
                    ref = trainer.models.reference_logprobs(ids, attention, query_length, 1.0)
                kls.append(((logprobs - ref) * sampled.mask).sum(dim=1).cpu())
        rewards = trainer.reward_fn(queries, texts)
        entry: dict[str, Any] = {
            "reward": float(rewards.mean()),
            "response_tokens": float(torch.cat(lengths).float().mean()),
        }
        if kls:
            entry["kl_to_reference"] = float(torch.cat(kls).mean())
        if job.attributes is not None:
            entry.update(_attribute_rates(job.attributes, queries, texts, job.kind != "rlhf"))
        result[which] = entry
        answers[which] = texts
        result.setdefault("samples", [])
        result["samples"].extend(
            {
                "model": which,
                "prompt": q.prompt,
                "preference_prompt": q.preference_prompt,
                "poles": list(q.poles),
                "response": t,
            }
            for q, t in list(zip(queries, texts, strict=True))[:8]
        )
    verdicts = None
    if job.text_judge:
        from psoups_ray.judges.text import TextJudge

        verdicts = pole_verdicts(TextJudge(), queries, answers["policy"], answers["base"])
        result["policy"]["text_judge_win_rate"] = win_rates(verdicts)
    if job.attributes is not None:  # the world's own checkers, where it has them
        verdicts = pole_verdicts(job.attributes, queries, answers["policy"], answers["base"])
    if verdicts is not None:
        prompts = [query.prompt for query in queries]
        scores = {
            which: {
                pole: trainer.models.rewards.score(pole, prompts, answers[which]).tolist()
                for pole in job.reward_poles
            }
            for which in ("policy", "base")
        }
        result["policy"]["reward_judge_agreement"] = reward_judge_agreement(
            verdicts, scores["policy"], scores["base"]
        )
    return result


def pole_verdicts(
    judge: PairwiseJudge,
    queries: Sequence[Query],
    policy_texts: Sequence[str],
    base_texts: Sequence[str],
) -> dict[str, list[tuple[int, Verdict]]]:
    """Per pole, ``(row, verdict)`` for every query asking for it: ``judge``'s comparison of
    the policy's response (``"a"``) with the base's (``"b"``). Both answered the same query
    with the same seed, so the comparison is paired."""
    verdicts = {}
    for pole in sorted({pole for query in queries for pole in query.poles}):
        rows = [row for row, query in enumerate(queries) if pole in query.poles]
        pairs = [PairToJudge(queries[r].prompt, policy_texts[r], base_texts[r]) for r in rows]
        verdicts[pole] = list(zip(rows, judge.compare_batch(pole, pairs), strict=True))
    return verdicts


def reward_judge_agreement(
    verdicts: dict[str, list[tuple[int, Verdict]]],
    policy_scores: dict[str, Sequence[float]],
    base_scores: dict[str, Sequence[float]],
) -> dict[str, dict[str, Any]]:
    """How far the reward models can be trusted on the policy's own samples: per pole,
    among the pairs where the judge (:func:`pole_verdicts`: the world's attribute checkers
    or the text judges) prefers one of the policy's and the base's responses, the share
    where the pole's reward model ranks the two the same way.

    ``{pole: {"agreement": share or None (no decided pair), "pairs": decided pairs}}``. A
    reward that rose in training while this stays near 0.5 is being hacked: the policy
    found what its reward model likes, not what the judge checks."""
    result = {}
    for pole, judged in verdicts.items():
        decided = [(row, verdict) for row, verdict in judged if verdict != "tie"]
        agreed = sum(
            (policy_scores[pole][row] > base_scores[pole][row]) == (verdict == "a")
            for row, verdict in decided
        )
        share = agreed / len(decided) if decided else None
        result[pole] = {"agreement": share, "pairs": len(decided)}
    return result


def win_rates(verdicts: dict[str, list[tuple[int, Verdict]]]) -> dict[str, float]:
    """``{pole: share of the pairs where the judge prefers the policy's response}``, ties
    half (the ``text_judge_win_rate`` against the base)."""
    points = {"a": 1.0, "tie": 0.5, "b": 0.0}
    return {
        pole: sum(points[verdict] for _, verdict in judged) / len(judged)
        for pole, judged in verdicts.items()
    }


def _attribute_rates(
    judge: AttributeJudge, queries: Sequence[Query], texts: Sequence[str], with_success: bool
) -> dict[str, Any]:
    found = [judge.shown(text) for text in texts]
    poles = sorted({pole for query in queries for pole in query.poles})
    all_poles = sorted({pole for shown in found for pole in shown} | set(poles))
    target = {}
    for pole in poles:
        asked = [shown for query, shown in zip(queries, found, strict=True) if pole in query.poles]
        target[pole] = sum(pole in shown for shown in asked) / len(asked)
    rates: dict[str, Any] = {
        "target_rates": target,
        "attribute_rates": {p: sum(p in s for s in found) / len(found) for p in all_poles},
    }
    if with_success:  # every pole the query asked for (undefined for opposite poles)
        rates["success_rate"] = sum(
            set(query.poles) <= shown for query, shown in zip(queries, found, strict=True)
        ) / len(found)
    return rates


def _save_state(trainer: PPOTrainer, history: list[dict[str, float]], directory: Path) -> None:
    torch.save({"trainer": trainer.state_dict(), "history": history}, directory / STATE_FILE)


def _restore(trainer: PPOTrainer) -> list[dict[str, float]] | None:
    """Load the checkpoint Ray Train restored (after a failure or restart), if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = torch.load(
            Path(directory, STATE_FILE), map_location=trainer.device, weights_only=True
        )
    trainer.load_state_dict(state["trainer"])
    return list(state["history"])


def _report_progress(job: PolicyJob, metrics: dict[str, float]) -> None:
    detail = (
        f"reward {metrics['reward']:+.3f} kl {metrics['kl']:.2f} (beta {metrics['kl_coef']:.3f}) "
        f"entropy {metrics['entropy']:.2f} value_loss {metrics['value_loss']:.3f} "
        f"clip {metrics['clip_fraction']:.2f} length {metrics['response_length']:.0f}"
    )
    task = progress.task_name("policies", job.name)
    progress.update(task, int(metrics["step"]), job.policy.steps, "iteration", detail)


def run_policy_training(job: PolicyJob, *, under_ray: bool = False) -> dict[str, Any]:
    """Train one policy; rank 0 saves the adapter and metrics to the run directory."""
    rank, world_size = 0, 1
    if torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not job.train_prompts:
        raise PsoupsError(f"[policies {job.name}] no training prompts in the feedback data")
    torch.manual_seed(derive_seed(job.seed, job.name, "init"))
    trainer = build_trainer(job, _device(job, under_ray))
    history: list[dict[str, float]] = []
    resumed_from = 0
    if under_ray:
        restored = _restore(trainer)
        if restored is not None:
            history, resumed_from = restored, trainer.steps_done
            if rank == 0:
                log(
                    f"[policies {job.name}] resuming from the checkpoint of iteration "
                    f"{resumed_from}"
                )
    spec = job.policy
    started = time.monotonic()
    started_at = time.time()
    if rank == 0:
        progress.start(progress.task_name("policies", job.name), "training")
    while trainer.steps_done < spec.steps:
        step = trainer.steps_done
        metrics = trainer.step(sample_queries(job, step, rank, spec.rollout_batch_size), rank)
        history.append(metrics)
        done = trainer.steps_done
        if rank == 0 and (done % spec.logging_steps == 0 or done == spec.steps):
            _report_progress(job, metrics)
        if under_ray:
            _report(
                trainer,
                history,
                metrics,
                rank,
                done % spec.checkpoint_every == 0 or done == spec.steps,
            )

    summary: dict[str, Any] = {
        "steps": trainer.steps_done,
        "episodes": trainer.steps_done * spec.rollout_batch_size * world_size,  # the budget
        "resumed_from_step": resumed_from,
        "num_workers": world_size,
        "node_id": worker_node_id(),  # rank 0's Ray node
        "started_at": started_at,
        "finished_at": time.time(),
        "train_seconds": time.monotonic() - started,
        "final_kl_coef": trainer.kl_controller.value,
    }
    if rank == 0:
        summary["eval"] = evaluate_policy(trainer, job)
        rundir = RunDir(job.run_location)
        with scratch_directory(f"policy-{job.name}") as workdir:
            adapter_dir = workdir / "adapter"
            trainer.models.save_policy(adapter_dir)
            trainer.tokenizer.save_pretrained(str(adapter_dir))
            rundir.upload_dir(adapter_dir, job.output_relpath)
        rundir.write_json(job.metrics_relpath, {**summary, "history": history})
        _log_eval(job, summary["eval"])
    return summary


def _report(trainer, history, metrics, rank: int, with_checkpoint: bool) -> None:
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    _check_replicas_agree(trainer)
    with scratch_directory("ppo-checkpoint") as scratch:
        directory = scratch / "checkpoint"  # without the scratch directory's lock file
        directory.mkdir()
        if rank == 0:
            _save_state(trainer, history, directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)


def _check_replicas_agree(trainer: PPOTrainer) -> None:
    """Data-parallel workers must hold identical weights; fail loudly if they drifted."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    parameters = trainer.models.policy_parameters() + trainer.models.critic_parameters()
    checksum = torch.stack([p.detach().double().sum() for p in parameters]).sum().reshape(1)
    low, high = checksum.clone(), checksum.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if float(high - low) > 1e-6 * max(1.0, float(checksum.abs())):
        raise PsoupsError(
            f"data-parallel workers' weights diverged (checksums {float(low)} vs {float(high)})"
        )


def _log_eval(job: PolicyJob, result: dict[str, Any]) -> None:
    policy, base = result["policy"], result["base"]
    line = (
        f"[policies {job.name}] held-out: reward {policy['reward']:+.3f} (base "
        f"{base['reward']:+.3f}), KL to reference {policy['kl_to_reference']:.2f}"
    )
    if "target_rates" in policy:
        rates = ", ".join(
            f"{pole} {policy['target_rates'][pole]:.2f} (base {base['target_rates'][pole]:.2f})"
            for pole in policy["target_rates"]
        )
        line += f"; attribute rates {rates}"
    if "text_judge_win_rate" in policy:
        rates = ", ".join(
            f"{pole} {rate:.0%}" for pole, rate in policy["text_judge_win_rate"].items()
        )
        line += f"; text judge win rate vs base {rates}"
    if "reward_judge_agreement" in policy:
        agreement = ", ".join(
            f"{pole} {entry['agreement']:.0%} of {entry['pairs']}"
            if entry["agreement"] is not None
            else f"{pole} – (no decided pair)"
            for pole, entry in policy["reward_judge_agreement"].items()
        )
        line += f"; reward model agrees with the judge on {agreement}"
    log(line)


def policy_train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker entry point: ``loop_config = {"job": PolicyJob}``."""
    job = loop_config["job"]
    threads_for_worker(job.policy.resources.cpus_per_worker)
    run_policy_training(job, under_ray=True)
