"""The base stage: the model and tokenizer every adapter is trained on.

``tiny``: train a BPE tokenizer on the tiny world's text, SFT a small Llama-style
model on mixed-style responses inside a Ray Train run, then sample it on
held-out prompts and record how often each pole shows (RL needs room to move
them). A real model: validate and record the reference (a GGUF file is dequantised
once and saved as ``base/pretrained/``, which every later stage loads); SFT it only
when ``base.sft.data_files`` are given.

Artifacts (in the run directory): ``base/tokenizer/``, ``base/sft_data.jsonl``,
``base/model/`` (model + tokenizer, loadable by plain ``transformers``),
``base/pretrained/`` (a GGUF base's plain copy), ``base/metrics.json``,
``base/samples.jsonl``.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

from psoups_ray.base.model import describe_reference, load_gguf_base, reference_facts
from psoups_ray.base.sft import SFTJob, sft_train_loop
from psoups_ray.base.tokenizer import train_bpe_tokenizer
from psoups_ray.config import PsoupsConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.preferences import PreferenceSpace
from psoups_ray.progress import log
from psoups_ray.prompting import format_prompt
from psoups_ray.ray_utils import fit_torch_run
from psoups_ray.rundir import RunDir, local_reference
from psoups_ray.runtime.loading import load_tokenizer

TOKENIZER_DIR = "base/tokenizer"
SFT_DATA = "base/sft_data.jsonl"
MODEL_DIR = "base/model"
PRETRAINED_DIR = "base/pretrained"
METRICS = "base/metrics.json"
SAMPLES = "base/samples.jsonl"
RAY_RUN_NAME = "base"


def run_base_stage(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    """Produce the base model; returns the manifest's ``base`` section."""
    if config.base.is_tiny:
        return _tiny_base(config, rundir)
    return _real_base(config, rundir)


def check_base_config(config: PsoupsConfig) -> None:
    """A ``package:`` base that is not installed, or a GGUF base that cannot be read, fails
    before any stage runs (with the command that installs what is missing)."""

    from psoups_ray.base.model import gguf_problems
    from psoups_ray.errors import ConfigError
    from psoups_ray.runtime.loading import resolve_reference

    base = config.base
    if base.is_tiny:
        return
    try:
        directory = resolve_reference(base.model)
    except PsoupsError as exc:
        raise ConfigError([str(exc)]) from None
    problems = gguf_problems(directory, base.gguf_file) if base.gguf_file else []
    if problems:
        raise ConfigError(problems)


def _tiny_base(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    job = prepare_tiny_sft(config, rundir)
    return summarize_tiny_sft(config, rundir, _fit_sft(config, rundir, job))


def _world(config: PsoupsConfig):
    from psoups_ray.world import TinyWorld

    return TinyWorld(seed=config.world.seed, num_eval_prompts=config.world.num_eval_prompts)


def prepare_tiny_sft(config: PsoupsConfig, rundir: RunDir) -> SFTJob:
    """Train the tokenizer, write the SFT data; returns the SFT job (run it with Ray or not)."""
    world = _world(config)
    space = config.space
    spec = config.base.tiny
    log(f"base: training a {spec.vocab_size}-token BPE tokenizer on the tiny world")
    tokenizer = train_bpe_tokenizer(
        world.corpus(seed=config.world.seed, n=config.world.tokenizer_corpus_size), spec.vocab_size
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        rundir.upload_dir(tmp, TOKENIZER_DIR)

    examples = world.sft_examples(config.base.sft.num_examples, seed=config.seed)
    rng = random.Random(config.seed)
    declared = set(space.pole_ids)  # a space may declare only some of the world's poles
    rows = []
    for example in examples:
        preference_prompt = None
        if rng.random() < config.base.sft.prompted_fraction:
            chosen = [
                pole for pole in example.poles.values() if pole in declared and rng.random() < 0.5
            ]
            if chosen:
                preference_prompt = space.preference_prompt(space.combination(chosen))
        rows.append(
            {
                "prompt": format_prompt(tokenizer, example.prompt, preference_prompt),
                "completion": example.response,
            }
        )
    _write_jsonl(rundir, SFT_DATA, rows)

    eval_prompts = world.eval_prompts[: config.base.num_sample_prompts]
    return SFTJob(
        run_location=rundir.location,
        base=config.base,
        seed=config.seed,
        tokenizer_relpath=TOKENIZER_DIR,
        data_relpath=SFT_DATA,
        output_relpath=MODEL_DIR,
        metrics_relpath=METRICS,
        sample_prompts=tuple(format_prompt(tokenizer, p) for p in eval_prompts),
    )


def summarize_tiny_sft(
    config: PsoupsConfig, rundir: RunDir, sft_metrics: dict[str, Any]
) -> dict[str, Any]:
    """Score the held-out samples with the attribute checkers; returns the ``base`` section."""
    world = _world(config)
    eval_prompts = world.eval_prompts[: config.base.num_sample_prompts]
    sft_metrics = dict(sft_metrics)
    samples = sft_metrics.pop("samples")
    _write_jsonl(
        rundir,
        SAMPLES,
        [{"prompt": p, "response": r} for p, r in zip(eval_prompts, samples, strict=True)],
    )
    metrics = {
        "sft": sft_metrics,
        **attribute_metrics(world, config.space, eval_prompts, samples),
    }
    rates = ", ".join(f"{pole} {rate:.2f}" for pole, rate in metrics["attribute_rates"].items())
    log(f"base: per-pole attribute rates on {len(samples)} held-out prompts: {rates}")
    return {
        "model": config.base.model,
        "model_path": rundir.locate(MODEL_DIR),
        "tokenizer_path": rundir.locate(MODEL_DIR),
        "sft_data_path": rundir.locate(SFT_DATA),
        "samples_path": rundir.locate(SAMPLES),
        "metrics": metrics,
    }


def attribute_metrics(
    world, space: PreferenceSpace, prompts: list[str], responses: list[str]
) -> dict[str, Any]:
    """Per-pole share of responses exhibiting the pole, share on topic, mean length."""
    from psoups_ray.world import exhibited_poles

    exhibited = [exhibited_poles(text) for text in responses]
    count = max(len(responses), 1)
    rates = {pole: sum(pole in found for found in exhibited) / count for pole in space.pole_ids}
    on_topic = sum(
        world.topic_of(prompt).subject.lower() in response.lower()
        for prompt, response in zip(prompts, responses, strict=True)
    )
    return {
        "attribute_rates": rates,
        "on_topic_rate": on_topic / count,
        "mean_response_words": sum(len(r.split()) for r in responses) / count,
        "num_samples": len(responses),
    }


def _real_base(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    base = config.base
    section: dict[str, Any] = {
        "model": base.model,
        "model_path": base.model,
        "tokenizer_path": base.tokenizer or base.model,
        "revision": base.revision,
    }
    if base.gguf_file:  # validated by loading it: the file is read once
        section.update(_save_gguf_base(config, rundir))
    else:
        log(f"base: validating model reference {base.model!r}")
        section["metrics"] = {"reference": describe_reference(base)}
    if not (base.sft.enabled and base.sft.data_files):
        log("base: no base.sft.data_files given; using the model as it is")
        return section

    tokenizer = load_tokenizer(
        local_reference(rundir.resolve(section["tokenizer_path"])),
        base.revision,
        base.trust_remote_code,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        rundir.upload_dir(tmp, TOKENIZER_DIR)
    rows = [
        {"prompt": format_prompt(tokenizer, row["prompt"]), "completion": row["completion"]}
        for row in read_sft_files(base.sft.data_files)
    ]
    _write_jsonl(rundir, SFT_DATA, rows)
    job = SFTJob(
        run_location=rundir.location,
        base=base,
        seed=config.seed,
        tokenizer_relpath=TOKENIZER_DIR,
        data_relpath=SFT_DATA,
        output_relpath=MODEL_DIR,
        metrics_relpath=METRICS,
        init_from=rundir.resolve(section["model_path"]),
    )
    section["metrics"]["sft"] = _fit_sft(config, rundir, job)
    section.update(
        model_path=rundir.locate(MODEL_DIR),
        tokenizer_path=rundir.locate(MODEL_DIR),
        sft_data_path=rundir.locate(SFT_DATA),
    )
    return section


def _save_gguf_base(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    """Dequantise the GGUF base once into the run directory; the later stages (and their
    Ray workers, on any node) load that plain copy instead of converting the file again."""
    base = config.base
    log(f"base: loading {base.gguf_file} from {base.model} (dequantising the GGUF weights)")
    model, tokenizer = load_gguf_base(base.model, base.gguf_file, base.trust_remote_code)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # names the architecture in the config (GGUF's does not)
        tokenizer.save_pretrained(tmp)
        facts = reference_facts(base, model.config, tokenizer)
        del model
        rundir.upload_dir(tmp, PRETRAINED_DIR)
    log(f"base: saved the {parameters / 1e6:.1f}M-parameter model at {rundir.uri(PRETRAINED_DIR)}")
    return {
        "model_path": rundir.locate(PRETRAINED_DIR),
        "tokenizer_path": rundir.locate(PRETRAINED_DIR),
        "gguf_file": base.gguf_file,
        "parameters": parameters,
        "metrics": {"reference": facts},
    }


def read_sft_files(paths: list[str]) -> list[dict[str, str]]:
    """Rows of JSONL files with non-empty string ``prompt`` and ``completion`` fields."""
    rows: list[dict[str, str]] = []
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise PsoupsError(f"base.sft.data_files: {path} does not exist")
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PsoupsError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise PsoupsError(f"{path}:{number}: expected a JSON object, got {row!r:.60}")
            for field in ("prompt", "completion"):
                value = row.get(field)
                if not isinstance(value, str) or not value.strip():
                    raise PsoupsError(
                        f"{path}:{number}: field {field!r} must be a non-empty string, "
                        f"got {value!r:.60}"
                    )
            rows.append({"prompt": row["prompt"], "completion": row["completion"]})
    if not rows:
        raise PsoupsError(f"base.sft.data_files {paths} hold no rows")
    return rows


def _fit_sft(config: PsoupsConfig, rundir: RunDir, job: SFTJob) -> dict[str, Any]:
    resources = config.base.sft.resources
    log(
        f"base: SFT for {config.base.sft.steps} steps on {resources.num_workers} Ray Train "
        f"worker(s) ({'GPU' if resources.use_gpu else 'CPU'})"
    )
    fit_torch_run(sft_train_loop, {"job": job}, resources, rundir, stage="base", name=RAY_RUN_NAME)
    return rundir.read_json(METRICS)


def _write_jsonl(rundir: RunDir, relpath: str, rows: list[dict[str, Any]]) -> None:
    rundir.write_text(relpath, "".join(json.dumps(row) + "\n" for row in rows))
