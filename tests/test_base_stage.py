"""The base stage for real: BPE tokenizer, SFT with TRL inside Ray Train, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from psoups_ray.config import SMOKE_TEST_OVERRIDES, load_config
from psoups_ray.errors import PsoupsError
from psoups_ray.pipeline import run_pipeline

pytestmark = pytest.mark.integration


def smoke_config(*overrides: str):
    return load_config(None, [*SMOKE_TEST_OVERRIDES, *overrides])


def test_tiny_base_on_two_workers_then_skip_refuse_and_force(ray_cluster, tmp_path):
    out = str(tmp_path / "run")
    config = smoke_config(
        "base.sft.resources.num_workers=2", "base.sft.resources.cpus_per_worker=0.5"
    )
    manifest = run_pipeline(config, out, ["base"])
    base = manifest.data["base"]
    # Recorded relative to the run directory, so the run can move.
    assert base["model_path"] == base["tokenizer_path"] == "./base/model"
    model_path = manifest.rundir.resolve(base["model_path"])
    assert model_path == str(Path(out, "base", "model"))

    # An ordinary HF model + tokenizer directory that plain transformers loads.
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(manifest.rundir.resolve(base["tokenizer_path"]))
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|eos|>"
    assert not Path(model_path, "training_args.bin").exists()  # no pickles
    text = "How do volcanoes work?"
    assert tokenizer.decode(tokenizer(text).input_ids) == text

    metrics = base["metrics"]
    assert metrics["sft"]["num_workers"] == 2
    assert metrics["sft"]["steps"] == 20
    assert set(metrics["attribute_rates"]) == {"P1A", "P1B", "P2A", "P2B", "P3A", "P3B"}
    assert metrics["num_samples"] == 8
    on_disk = json.loads(Path(out, "manifest.json").read_text())
    assert on_disk["stages"]["base"]["status"] == "complete"
    assert on_disk["base"]["model_path"] == base["model_path"]

    # Re-running a complete stage skips it (the model is not rewritten).
    weights = Path(model_path, "model.safetensors")
    stamp = weights.stat().st_mtime_ns
    run_pipeline(config, out, ["base"])
    assert weights.stat().st_mtime_ns == stamp

    # A changed input is refused, naming the change; --force redoes the stage.
    changed = smoke_config("base.sft.steps=10")
    with pytest.raises(PsoupsError, match=r"(?s)base\.sft\.steps: 20 -> 10.*--force"):
        run_pipeline(changed, out, ["base"])
    forced = run_pipeline(changed, out, ["base"], force=True)
    assert forced.data["base"]["metrics"]["sft"]["steps"] == 10
    assert forced.data["base"]["metrics"]["sft"]["num_workers"] == 1
    assert weights.stat().st_mtime_ns != stamp


def test_real_model_reference_is_validated_and_optionally_fine_tuned(ray_cluster, tmp_path):
    from psoups_ray.base.model import build_tiny_model
    from psoups_ray.base.tokenizer import train_bpe_tokenizer
    from psoups_ray.config import TinyModelSpec

    # A "real" model saved locally the way a hub snapshot would be.
    tokenizer = train_bpe_tokenizer(["hello there, how are you today?"] * 50, 300)
    tokenizer.chat_template = None  # exercise the plain prompt template
    model = build_tiny_model(
        TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        tokenizer,
        seed=0,
    )
    model_dir = tmp_path / "my-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    config = load_config(None, [f"base.model={model_dir}"])
    manifest = run_pipeline(config, str(tmp_path / "run-ref"), ["base"])
    assert manifest.data["base"]["model_path"] == str(model_dir)
    assert manifest.data["base"]["metrics"]["reference"]["model_type"] == "llama"

    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": "hello", "completion": "there, how are you"}) + "\n"
            for _ in range(8)
        )
    )
    config = load_config(
        None,
        [
            f"base.model={model_dir}",
            f"base.sft.data_files=[{data}]",
            "base.sft.steps=3",
            "base.sft.batch_size=4",
        ],
    )
    manifest = run_pipeline(config, str(tmp_path / "run-sft"), ["base"])
    tuned = AutoModelForCausalLM.from_pretrained(
        manifest.rundir.resolve(manifest.data["base"]["model_path"])
    )
    changed = [
        name
        for name, p in tuned.named_parameters()
        if not torch.equal(p, dict(model.named_parameters())[name])
    ]
    assert len(changed) == len(list(model.parameters())), "every weight should have trained"
    assert manifest.data["base"]["metrics"]["sft"]["steps"] == 3

    missing = load_config(None, ["base.model=/nonexistent/model-dir"])
    with pytest.raises(PsoupsError, match="base.model '/nonexistent/model-dir' cannot be resolved"):
        run_pipeline(missing, str(tmp_path / "run-missing"), ["base"])


def test_bad_sft_data_file_names_file_line_and_field(ray_cluster, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "completion": "yo"}\n{"prompt": "", "completion": "x"}\n')
    config = load_config(None, [f"base.model={tmp_path}", f"base.sft.data_files=[{data}]"])
    from psoups_ray.base.stage import read_sft_files

    with pytest.raises(PsoupsError, match=r"bad\.jsonl:2: field 'prompt' must be a non-empty"):
        read_sft_files(config.base.sft.data_files)
