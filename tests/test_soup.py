"""Soups: the merge methods and the exact activation-space mixing, on a tiny random Llama."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from psoups_ray.artifacts import BaseArtifact
from psoups_ray.config import BaseConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.adapters import read_lora_adapter
from psoups_ray.runtime.export import export_model
from psoups_ray.runtime.loading import load_causal_lm, load_options
from psoups_ray.runtime.merge import check_weights, merge_adapters, merge_into_model
from psoups_ray.runtime.mixing import attach_mixing

NAMES = ["P1A", "P2B", "P3A"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny base and three LoRA adapters with random (non-zero) factors."""
    root = tmp_path_factory.mktemp("soup")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(root / "base")
    directories = []
    for index, name in enumerate(NAMES):
        base = AutoModelForCausalLM.from_pretrained(root / "base")
        rank = 4 if index < 2 else 2  # one adapter of another rank
        lora = LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=8, target_modules="all-linear"
        )
        model = get_peft_model(base, lora)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.normal_(0, 0.2)
        model.save_pretrained(root / name)
        directories.append(root / name)
    return root, directories


def _base(root):
    return AutoModelForCausalLM.from_pretrained(root / "base").eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 21, 40, 11]])


def test_mixing_forward_equals_the_delta_merged_model(world):
    root, directories = world
    adapters = [read_lora_adapter(d, n) for d, n in zip(directories, NAMES, strict=True)]
    weights = [0.5, 0.3, 0.2]
    merged = _base(root)
    merge_into_model(merged, adapters, weights)
    mixed = _base(root)
    mixer = attach_mixing(mixed, adapters)
    with mixer.weights(weights):
        mixed_logits = _logits(mixed, IDS[:1])
    assert torch.allclose(mixed_logits, _logits(merged, IDS[:1]), atol=1e-5)
    # Without weights the mixing model is the base.
    assert torch.allclose(_logits(mixed, IDS), _logits(_base(root), IDS), atol=1e-6)


def test_a_mixed_batch_equals_its_rows_run_separately(world):
    root, directories = world
    adapters = [read_lora_adapter(d, n) for d, n in zip(directories, NAMES, strict=True)]
    model = _base(root)
    mixer = attach_mixing(model, adapters)
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    with mixer.weights(rows):
        together = _logits(model, IDS)
    for index in range(2):
        with mixer.weights(rows[index]):
            alone = _logits(model, IDS[index : index + 1])
        assert torch.allclose(together[index], alone[0], atol=1e-5)


def test_a_soup_sampled_in_a_mixed_batch_equals_the_same_soup_alone(world):
    """The runtime's sampler over a mixing model: 12 rows, each its own soup and seed,
    decoded together (finished rows leaving the batch) give each row the tokens it gets
    decoded alone."""
    from psoups_ray.base.tokenizer import train_bpe_tokenizer
    from psoups_ray.runtime.sampling import Sampler, SampleRequest, SamplingParams

    root, directories = world
    adapters = [read_lora_adapter(d, n) for d, n in zip(directories, NAMES, strict=True)]
    model = _base(root)
    model.generation_config.eos_token_id = [5, 6, 7]  # rows end at different steps
    tokenizer = train_bpe_tokenizer(["a calm sea and a dog on a long road"] * 20, 300)
    mixer = attach_mixing(model, adapters)
    sampler = Sampler(model, tokenizer, mixer)
    torch.manual_seed(3)
    weights = torch.rand(12, 3)  # every row its own soup
    ids = torch.randint(8, 64, (12, 4))
    requests = [
        SampleRequest(
            tuple(ids[i].tolist()), SamplingParams(40, seed=i), tuple(weights[i].tolist())
        )
        for i in range(12)
    ]
    batch_sizes: list[int] = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    together = sampler.complete(requests, batch_size=12)
    hook.remove()
    assert batch_sizes[0] == 12 and min(batch_sizes) < 9, "no rows left: no compaction tested"
    for request, completion in zip(requests, together, strict=True):
        assert sampler.complete([request], batch_size=1)[0].token_ids == completion.token_ids
    # Outside the decoding the mixer holds no weights: nothing left narrowed.
    assert torch.allclose(_logits(model, IDS), _logits(_base(root), IDS), atol=1e-6)


def test_adapters_no_row_weighs_are_skipped_exactly_and_nesting_restores(world):
    root, directories = world
    adapters = [read_lora_adapter(d, n) for d, n in zip(directories, NAMES, strict=True)]
    merged = _base(root)
    merge_into_model(merged, [adapters[0], adapters[2]], [0.6, 0.4])
    model = _base(root)
    mixer = attach_mixing(model, adapters)
    layer = next(m for m in model.modules() if hasattr(m, "lora_a"))
    with mixer.weights([[0.6, 0.0, 0.4], [0.6, 0.0, 0.4]]):
        outer = _logits(model, IDS)
        assert layer._active[0].shape[0] == 4 + 2  # the ranks of adapters 0 and 2 only
        with mixer.weights([0.0, 1.0, 0.0]):
            _logits(model, IDS)
            assert layer._active[0].shape[0] == 4
        assert torch.allclose(_logits(model, IDS), outer, atol=1e-6)  # restored
    assert torch.allclose(outer, _logits(merged, IDS), atol=1e-5)
    with mixer.weights([0.0, 0.0, 0.0]):
        assert torch.allclose(_logits(model, IDS), _logits(_base(root), IDS), atol=1e-6)


def test_weight_one_on_a_pole_reproduces_that_policy(world):
    root, directories = world
    adapters = [read_lora_adapter(d, n) for d, n in zip(directories, NAMES, strict=True)]
    policy = PeftModel.from_pretrained(_base(root), directories[1]).eval()
    model = _base(root)
    mixer = attach_mixing(model, adapters)
    with mixer.weights([0.0, 1.0, 0.0]):
        assert torch.allclose(_logits(model, IDS), _logits(policy, IDS), atol=1e-5)


def test_mixing_inside_a_peft_model_keeps_its_adapters_working(world):
    """Tuning and serving mix the policies into a model that also carries reward adapters
    through PEFT: adapters disabled + weights = the soup; an adapter enabled and no weights
    = that adapter alone, as if nothing were mixed."""
    root, directories = world
    adapters = [read_lora_adapter(d, n) for d, n in zip(directories, NAMES, strict=True)]
    other = PeftModel.from_pretrained(_base(root), directories[2]).eval()  # another adapter
    expected_other = _logits(other, IDS)
    mixer = attach_mixing(other.get_base_model(), adapters[:2])
    weights = [0.7, 0.3]
    merged = _base(root)
    merge_into_model(merged, adapters[:2], weights)
    with other.disable_adapter(), mixer.weights(weights):
        assert torch.allclose(_logits(other, IDS), _logits(merged, IDS), atol=1e-5)
    assert torch.allclose(_logits(other, IDS), expected_other, atol=1e-6)


def test_delta_soup_adapter_loads_with_plain_peft_and_equals_the_merge(world, tmp_path):
    root, directories = world
    weights = [0.6, 0.1, 0.3]
    out = merge_adapters(directories, NAMES, weights, "delta", tmp_path / "soup")
    soup = PeftModel.from_pretrained(_base(root), out).eval()
    merged = _base(root)
    adapters = [read_lora_adapter(d, n) for d, n in zip(directories, NAMES, strict=True)]
    merge_into_model(merged, adapters, weights)
    assert torch.allclose(_logits(soup, IDS), _logits(merged, IDS), atol=1e-5)
    # The same as PEFT's exact "cat" combination.
    peft_model = PeftModel.from_pretrained(_base(root), directories[0], adapter_name=NAMES[0])
    for directory, name in zip(directories[1:], NAMES[1:], strict=True):
        peft_model.load_adapter(directory, adapter_name=name)
    peft_model.add_weighted_adapter(NAMES, weights, "cat", combination_type="cat")
    peft_model.set_adapter("cat")
    assert torch.allclose(_logits(peft_model.eval(), IDS), _logits(soup, IDS), atol=1e-5)


def test_factor_soup_averages_factors_and_refuses_other_ranks(world, tmp_path):
    root, directories = world
    out = merge_adapters(directories[:2], NAMES[:2], [0.5, 0.5], "factor", tmp_path / "f")
    soup = read_lora_adapter(out)
    first, second = (read_lora_adapter(d) for d in directories[:2])
    module = first.modules[0]
    assert torch.allclose(soup.a[module], (first.a[module] + second.a[module]) / 2)
    assert torch.allclose(soup.b[module], (first.b[module] + second.b[module]) / 2)
    # It is not the average of the updates (that is what delta computes).
    averaged = (first.delta(module) + second.delta(module)) / 2
    assert not torch.allclose(soup.delta(module), averaged, atol=1e-4)
    PeftModel.from_pretrained(_base(root), out)  # loads with plain PEFT
    with pytest.raises(PsoupsError, match="equal ranks"):
        merge_adapters(directories, NAMES, [0.4, 0.3, 0.3], "factor", tmp_path / "g")


@pytest.mark.parametrize("method", ["ties", "dare_linear", "svd"])
def test_peft_merge_methods_write_loadable_adapters(world, tmp_path, method):
    root, directories = world
    torch.manual_seed(0)
    out = merge_adapters(
        directories[:2],
        NAMES[:2],
        [0.5, 0.5],
        method,
        tmp_path / method,
        BaseArtifact(str(root / "base"), str(root / "base")),
        density=0.5,
    )
    soup = PeftModel.from_pretrained(_base(root), out).eval()
    assert not torch.allclose(_logits(soup, IDS), _logits(_base(root), IDS))


REMOTE_CONFIG = """from transformers import LlamaConfig


class RemoteLlamaConfig(LlamaConfig):
    model_type = "remote_llama"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_remote import RemoteLlamaConfig


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig
"""


def _remote_code_base(root) -> str:
    """The world's base saved as a model with its own modelling code (``auto_map``)."""
    directory = root / "remote-base"
    if not directory.exists():
        _base(root).save_pretrained(directory)
        (directory / "configuration_remote.py").write_text(REMOTE_CONFIG)
        (directory / "modeling_remote.py").write_text(REMOTE_MODEL)
        config = json.loads((directory / "config.json").read_text())
        config["model_type"] = "remote_llama"
        config["auto_map"] = {
            "AutoConfig": "configuration_remote.RemoteLlamaConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteLlamaForCausalLM",
        }
        (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def test_a_base_with_its_own_code_is_merged_and_exported_only_when_the_run_trusts_it(
    world, tmp_path
):
    root, directories = world
    remote = _remote_code_base(root)
    trusted = load_options({"dtype": "float32", "trust_remote_code": True})
    untrusted = load_options({"dtype": "float32"})  # a manifest's base section without it
    assert untrusted == {"revision": None, "trust_remote_code": False}
    assert load_options(BaseConfig(revision="v1", trust_remote_code=True)) == {
        "revision": "v1",
        "trust_remote_code": True,
    }
    with pytest.raises(PsoupsError, match="trust_remote_code"):
        load_causal_lm(remote, **untrusted)
    model = load_causal_lm(remote, **trusted)
    assert type(model).__name__ == "RemoteLlamaForCausalLM"

    distrusted = BaseArtifact(remote, remote)  # a run whose base config does not trust it
    with pytest.raises(PsoupsError, match="trust_remote_code"):
        merge_adapters(directories[:2], NAMES[:2], [0.5, 0.5], "ties", tmp_path / "no", distrusted)
    trusting = BaseArtifact(remote, remote, trust_remote_code=True)
    adapter = merge_adapters(
        directories[:2], NAMES[:2], [0.5, 0.5], "ties", tmp_path / "ties", trusting
    )
    export_model(trusting, adapter, tmp_path / "merged")
    exported = load_causal_lm(str(tmp_path / "merged"), **trusted)
    soup = PeftModel.from_pretrained(_base(root), adapter).eval()
    assert torch.allclose(_logits(exported.eval(), IDS), _logits(soup, IDS), atol=1e-5)


def test_weights_are_validated():
    assert check_weights(["a", "b"], [1, 0]) == [1.0, 0.0]
    with pytest.raises(PsoupsError, match="negative merge weights a=-0.5.*--allow-negative"):
        check_weights(["a", "b"], [-0.5, 1.5])
    assert check_weights(["a", "b"], [-0.5, 1.5], allow_negative=True) == [-0.5, 1.5]
    with pytest.raises(PsoupsError, match="all zero"):
        check_weights(["a", "b"], [0, 0])
    with pytest.raises(PsoupsError, match="finite"):
        check_weights(["a", "b"], [float("nan"), 1])
    with pytest.raises(PsoupsError, match="2 weights for 3 adapters"):
        check_weights(["a", "b", "c"], [0.5, 0.5])


def test_mixing_rejects_wrong_weight_shapes(world):
    root, directories = world
    adapters = [read_lora_adapter(d, n) for d, n in zip(directories, NAMES, strict=True)]
    model = _base(root)
    mixer = attach_mixing(model, adapters)
    with pytest.raises(PsoupsError, match="3 columns"):
        with mixer.weights([0.5, 0.5]):
            pass
    with pytest.raises(PsoupsError, match="for 1 rows but the batch has 2"):
        with mixer.weights([[0.2, 0.3, 0.5]]), torch.no_grad():
            copy.deepcopy(model)(input_ids=IDS)


def test_soup_weights_given_tuned_or_uniform():
    from psoups_ray.runtime.export import parse_weights, soup_weights

    assert parse_weights("p1a=0.5, P3A=0.5") == {"P1A": 0.5, "P3A": 0.5}
    assert parse_weights(None) is None
    with pytest.raises(PsoupsError, match="POLE=NUMBER"):
        parse_weights("P1A0.5")
    with pytest.raises(PsoupsError, match="not a number"):
        parse_weights("P1A=half")
    combo = ["P1A", "P3A"]
    assert soup_weights(combo, {"P1A": 0.2, "P3A": 0.8}, None) == ([0.2, 0.8], "given")
    assert soup_weights(combo, None, {"P1A": 0.6, "P3A": 0.4}) == ([0.6, 0.4], "tuned")
    assert soup_weights(combo, None, None) == ([0.5, 0.5], "uniform")
    with pytest.raises(PsoupsError, match="no weight given for P3A"):
        soup_weights(combo, {"P1A": 1.0}, None)
