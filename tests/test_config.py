from pathlib import Path

import pytest
import yaml

from psoups_ray.config import builtin_config_names, explain, load_config
from psoups_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _shipped_yaml_configs() -> list[Path]:
    return sorted((REPO / "psoups_ray" / "configs").glob("*.yaml"))


def test_every_shipped_config_parses():
    files = _shipped_yaml_configs()
    assert len(files) >= 1, "no shipped configs found: the glob is wrong"
    assert sorted(f.stem for f in files) == builtin_config_names()
    for path in files:
        by_path = load_config(path)
        by_name = load_config(path.stem)
        assert by_path == by_name


def test_default_is_tiny_with_the_papers_space():
    config = load_config()
    assert config.name == "tiny" and config.base.is_tiny
    assert [str(c) for c in config.space.full_combinations()][:2] == [
        "P1A+P2A+P3A",
        "P1A+P2A+P3B",
    ]


def test_overrides_are_typed_and_nested():
    config = load_config(
        None,
        [
            "base.sft.steps=7",
            "base.sft.learning_rate=1e-4",
            "base.sft.resources.use_gpu=true",
            "base.sft.data_files=[a.jsonl, b.jsonl]",
            "ray.address=auto",
        ],
    )
    assert config.base.sft.steps == 7
    assert config.base.sft.learning_rate == pytest.approx(1e-4)
    assert config.base.sft.resources.use_gpu is True
    assert config.base.sft.data_files == ["a.jsonl", "b.jsonl"]
    assert config.ray.address == "auto"


def test_every_problem_is_reported_at_once_with_key_value_and_allowed():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "base.sft.stepz=3",
                "base.sft.steps=abc",
                "base.dtype=int8",
                "base.sft.learning_rate=-1",
                "world.seed.x=1",
                "nonsense",
            ],
        )
    problems = info.value.problems
    assert len(problems) == 6, problems
    text = str(info.value)
    assert "base.sft.stepz: unknown key (did you mean 'steps'?)" in text
    assert "allowed here: enabled, data_files" in text
    assert "base.sft.steps: Input should be a valid integer" in text and "'abc'" in text
    assert "base.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'" in text
    assert "base.sft.learning_rate: Input should be greater than 0 (given -1)" in text
    assert "world.seed is a value (0), not a section" in text
    assert "must look like section.key=value" in text


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="must be divisible by num_heads"):
        load_config(None, ["base.tiny.num_heads=3"])
    with pytest.raises(ConfigError, match="exceeds world.num_eval_prompts"):
        load_config(None, ["base.num_sample_prompts=200"])
    with pytest.raises(ConfigError, match="both belong to dimension 'P1'"):
        load_config(None, ["preferences.combinations=[P1A+P1B]"])
    with pytest.raises(ConfigError, match="could share a GPU, which NCCL does not allow"):
        load_config(
            None,
            [
                "policies.resources.use_gpu=true",
                "policies.resources.num_workers=2",
                "policies.resources.gpus_per_worker=0.5",
            ],
        )
    # One worker may take a fraction (runs of several poles share a GPU), and so may
    # several workers on the CPU.
    one = ["rewards.resources.use_gpu=true", "rewards.resources.gpus_per_worker=0.125"]
    assert load_config(None, one).rewards.resources.gpus_per_worker == 0.125
    load_config(None, ["rewards.resources.num_workers=2", "rewards.resources.gpus_per_worker=0.5"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a built-in config; built-in"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(scalar)
    # PyYAML alone keeps the last of two equal keys: the first section's settings vanish.
    twice = tmp_path / "twice.yaml"
    twice.write_text("tune:\n  num_samples: 4\n  generation:\n    batch_size: 8\n"
                     "  num_samples: 6\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"key 'num_samples' a second time \(first on line 2\)"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("tune:\n  generation: {batch_size: 8, batch_size: 16}\n")
    with pytest.raises(ConfigError, match="key 'batch_size' a second time"):
        load_config(nested)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["tune.generation={batch_size: 8, batch_size: 16}"])
    apart = tmp_path / "apart.yaml"  # equal keys in different mappings are fine
    apart.write_text("tune:\n  generation: {batch_size: 8}\nevaluate:\n  generation: "
                     "{batch_size: 16}\n")  # fmt: skip
    config = load_config(apart)
    assert (config.tune.generation.batch_size, config.evaluate.generation.batch_size) == (8, 16)


def test_user_space_in_yaml_and_real_model_reference(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "mine",
                "base": {"model": "allenai/tulu-2-7b", "dtype": "bfloat16"},
                "preferences": {
                    "dimensions": [
                        {
                            "id": "T",
                            "name": "tone",
                            "poles": [
                                {"id": "T1", "name": "formal", "prompt": "Be formal."},
                                {"id": "T2", "name": "sassy", "prompt": "Be sassy."},
                            ],
                        }
                    ]
                },
            }
        )
    )
    config = load_config(path)
    assert config.space.pole_ids == ["T1", "T2"]
    assert not config.base.is_tiny


def test_tiny_world_rejects_poles_it_cannot_generate(tmp_path):
    path = tmp_path / "sassy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "preferences": {
                    "dimensions": [
                        {
                            "id": "P3",
                            "name": "style",
                            "poles": [
                                {"id": "P3A", "name": "friendly", "prompt": "x"},
                                {"id": "P3C", "name": "sassy", "prompt": "y"},
                            ],
                        }
                    ]
                }
            }
        )
    )
    with pytest.raises(ConfigError, match=r"only knows the poles .* declares \['P3C'\]"):
        load_config(path)


def test_explain_documents_every_leaf_key():
    lines = list(explain())
    keys = [line.split(" ", 1)[0].rstrip(":") for line in lines]
    assert "base.sft.steps" in keys and "ray.dashboard_host" in keys
    undocumented = [line for line in lines if line.rstrip().endswith("):")]
    assert not undocumented, undocumented


def test_policy_config_errors_are_clear():
    with pytest.raises(ConfigError) as caught:
        load_config(
            None,
            [
                "policies.minibatch_size=5",
                "policies.generation.length_range=[50, 20]",
                "policies.baselines=[pmorl, dpo]",
            ],
        )
    text = str(caught.value)
    assert "length_range [50, 20] must be [min, max]" in text
    assert "policies.baselines.1" in text and "'pmorl' or 'rlhf'" in text
    with pytest.raises(ConfigError, match=r"minibatch_size \(5\) must divide rollout_batch_size"):
        load_config(None, ["policies.minibatch_size=5"])
    with pytest.raises(ConfigError, match="exceeds base.tiny.max_position_embeddings"):
        load_config(None, ["policies.generation.max_new_tokens=300"])


def test_validate_checks_a_config_and_prints_its_plan_without_running(capsys, monkeypatch):
    from psoups_ray.__main__ import main

    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "config 'tiny' is valid" in out and "preflight checks passed" in out
    assert "policies: 6 PPO runs + baselines pmorl, rlhf" in out

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["validate", "--config", "paper"]) == 0  # problems listed, not fatal
    out = capsys.readouterr().out
    assert "base: allenai/tulu-2-7b (bfloat16)" in out
    assert "rewards: 6 Ray Train run(s) (per_pole), 1000 steps each on 2 worker(s) x 1 GPU, " \
        "DeepSpeed ZeRO-2" in out  # fmt: skip
    assert "feedback.prompts_file: data/gpt4_alpaca_prompts.jsonl does not exist" in out
    assert "evaluate.llm_judge.api_key_env: the environment variable OPENAI_API_KEY" in out
    assert main(["validate", "--config", "paper", "--strict"]) == 1
    capsys.readouterr()
    assert main(["validate", "--set", "policies.steps=0"]) == 2
    assert "policies.steps: Input should be greater than or equal to 1" in capsys.readouterr().err
