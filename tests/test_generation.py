"""The decoding loop every stage samples with: the same tokens as transformers' ``generate``
for the same seed and settings, EOS handling, and PPO's merged-policy sampling (same
policy, base weights restored bit for bit)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType
from transformers import LlamaConfig, LlamaForCausalLM

from psoups_ray.generation import (
    GrowingLayer,
    default_top_k,
    preallocated_cache,
    sample_tokens,
    sampling_probabilities,
)
from psoups_ray.rl.models import POLICY, SharedBasePPOModels

PAD, EOS = 0, 1


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
        pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Four left-padded prompts of lengths 7, 4, 7, 2: (4, 7) ids and mask."""
    torch.manual_seed(5)
    ids = torch.randint(2, 48, (4, 7))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (3, 5)):
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0},  # PPO rollouts: the full distribution
        {"temperature": 1.0, "top_k": 50, "top_p": 1.0},  # every other stage: generate's top-k
        {"temperature": 0.6, "top_k": 10, "top_p": 0.8},
        {"temperature": 1.5, "top_k": 0, "top_p": 0.5},
    ],
)
@pytest.mark.parametrize("eos", [EOS, None, [EOS, 7]])
def test_sampling_draws_the_same_tokens_as_transformers_generate(settings, eos):
    model = tiny_model()
    ids, mask = prompts()
    torch.manual_seed(11)
    expected = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=40,
        pad_token_id=PAD, eos_token_id=eos, **settings,
    )[:, ids.shape[1] :]  # fmt: skip
    torch.manual_seed(11)
    got = sample_tokens(
        model, ids, mask, max_new_tokens=40, pad_token_id=PAD, eos_token_id=eos, **settings
    )
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_the_cache_grows_in_place_and_holds_what_transformers_cache_holds(monkeypatch):
    from transformers.cache_utils import DynamicLayer

    model = tiny_model()
    cache = preallocated_cache(model, 5)
    assert [type(layer) for layer in cache.layers] == [GrowingLayer, GrowingLayer]
    growing, dynamic = GrowingLayer(5), DynamicLayer()
    torch.manual_seed(0)
    buffers = set()
    for length in (3, 1, 1, 1, 3, 1):  # the prompt, then tokens: 6 > 5 doubles it to 10
        keys, values = torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
        got = growing.update(keys, values)
        expected = dynamic.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert growing.get_seq_length() == dynamic.get_seq_length()
        buffers.add(growing._keys.data_ptr())
    assert len(buffers) == 2  # written in place, reallocated once (doubled) on overflow
    # Sampling uses it; the tokens are those of transformers' cache (and of generate, above).
    ids, mask = prompts()
    settings = dict(max_new_tokens=30, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(4)
    with_growing = sample_tokens(model, ids, mask, **settings)
    monkeypatch.setattr(  # the model's own cache
        "psoups_ray.generation.preallocated_cache", lambda model, capacity: None
    )
    torch.manual_seed(4)
    with_dynamic = sample_tokens(model, ids, mask, **settings)
    assert torch.equal(with_growing, with_dynamic)


def eos_prone_model(eos_bias: float) -> LlamaForCausalLM:
    """The tiny model with a bias towards EOS: rows finish at different steps."""
    model = tiny_model()
    head = torch.nn.Linear(32, 48)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    model.lm_head = head
    return model


def test_rows_stop_at_eos_and_decoding_ends_when_every_row_has():
    model = eos_prone_model(2.0)
    ids, mask = prompts()
    torch.manual_seed(3)
    tokens = sample_tokens(
        model, ids, mask, max_new_tokens=80, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD
    )
    ends = []
    for row in tokens.tolist():
        assert EOS in row
        end = row.index(EOS)
        assert all(token == PAD for token in row[end + 1 :])  # padding after a row's EOS
        ends.append(end)
    assert tokens.shape[1] == max(ends) + 1  # no step after the last row finished
    assert len(set(ends)) > 1


@pytest.mark.parametrize("settings", [{"top_k": 0, "top_p": 1.0}, {"top_k": 10, "top_p": 0.8}])
def test_finished_rows_leave_the_batch_and_every_row_draws_the_same_tokens(settings):
    model = eos_prone_model(1.5)
    torch.manual_seed(8)
    ids = torch.randint(2, 48, (16, 5))
    mask = torch.ones_like(ids)
    ids[::3, :2], mask[::3, :2] = PAD, 0  # some left padding
    batch_sizes: list[int] = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    kept: list[torch.Tensor] = []
    run = dict(max_new_tokens=60, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD, **settings)
    torch.manual_seed(21)
    compacted = sample_tokens(model, ids, mask, on_compact=kept.append, **run)
    compacted_sizes, batch_sizes[:] = list(batch_sizes), []
    torch.manual_seed(21)
    every_row = sample_tokens(model, ids, mask, compact=False, **run)
    assert torch.equal(compacted, every_row)
    assert set(batch_sizes) == {16}
    # The model computed fewer rows as they finished: at least a quarter leave at a time.
    assert compacted_sizes[0] == 16 and compacted_sizes[-1] < 8
    assert compacted_sizes == sorted(compacted_sizes, reverse=True)
    assert len(kept) >= 2
    sizes = sorted(set(compacted_sizes), reverse=True)
    for before, after, index in zip(sizes, sizes[1:], kept, strict=False):
        assert len(index) == after and bool((index < before).all())


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = sampling_probabilities(logits, 1.0, top_k=2)
    assert torch.count_nonzero(probs) == 2 and probs[0, :2].sum() == pytest.approx(1.0)
    full = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    probs = sampling_probabilities(logits, 1.0, top_p=0.8)  # 0.636 < 0.8 <= 0.636 + 0.234
    assert torch.count_nonzero(probs) == 2
    assert probs[0, 0] == pytest.approx(full[0] / (full[0] + full[1]))
    assert torch.count_nonzero(sampling_probabilities(logits, 1.0, top_p=0.01)) == 1
    assert torch.allclose(sampling_probabilities(logits, 2.0), (logits / 2).softmax(-1))


def test_the_model_generation_config_sets_top_k_as_generate_would():
    model = tiny_model()
    assert default_top_k(model) == 50  # transformers' default
    model.generation_config.top_k = 7
    assert default_top_k(model) == 7


def ppo_models() -> SharedBasePPOModels:
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules="all-linear",
        init_lora_weights=False,  # random B: the adapter changes the outputs
    )  # fmt: skip
    torch.manual_seed(1)
    return SharedBasePPOModels(tiny_model(), lora, {}, None, PAD)


def test_merged_sampling_is_the_same_policy_and_restores_the_base_exactly():
    models = ppo_models()
    ids, mask = prompts()
    base_weights = {n: p.clone() for n, p in models.peft.named_parameters() if "base_layer" in n}
    adapter_weights = [p.clone() for p in models.policy_parameters()]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    backbone = models.peft.get_base_model()
    with torch.no_grad():
        unmerged = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with models.policy_merged():
            merged = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            changed = any(
                not torch.equal(p, base_weights[n])
                for n, p in models.peft.named_parameters()
                if "base_layer" in n
            )
        with models.peft.disable_adapter():
            reference = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert changed, "the policy's update was merged into the base weights"
    assert not torch.allclose(unmerged, reference, atol=1e-3), "the adapter matters"
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    for name, parameter in models.peft.named_parameters():
        if "base_layer" in name:
            assert torch.equal(parameter, base_weights[name]), name
    assert all(
        torch.equal(a, b) for a, b in zip(models.policy_parameters(), adapter_weights, strict=True)
    )
    assert all(p.requires_grad for p in models.policy_parameters())
    from peft.tuners.lora import LoraLayer

    assert not any(m.merged for m in models.peft.modules() if isinstance(m, LoraLayer))
    assert models.peft.active_adapter == POLICY


def test_merged_weights_are_restored_when_sampling_fails():
    models = ppo_models()
    base_weights = {n: p.clone() for n, p in models.peft.named_parameters() if "base_layer" in n}
    with pytest.raises(RuntimeError, match="boom"), models.policy_merged():
        raise RuntimeError("boom")
    for name, parameter in models.peft.named_parameters():
        if "base_layer" in name:
            assert torch.equal(parameter, base_weights[name]), name


def test_ppo_models_sample_policy_and_reference():
    models = ppo_models()
    ids, mask = prompts()
    settings = dict(
        max_new_tokens=12, temperature=1.0, top_k=0, eos_token_id=None, pad_token_id=PAD
    )
    samples = {}
    for label, kwargs in {
        "policy": {},
        "merged": {"merged": True},
        "reference": {"reference": True},
    }.items():
        torch.manual_seed(4)
        samples[label] = models.generate(ids, mask, **kwargs, **settings)
        assert samples[label].shape == (4, 12)
    torch.manual_seed(4)
    plain_base = sample_tokens(
        models.peft.get_base_model(), ids, mask, **settings
    )  # adapters on: the policy
    assert torch.equal(plain_base, samples["policy"])
    assert not torch.equal(samples["policy"], samples["reference"])


def test_generation_settings_the_loop_does_not_apply_are_named_once(capsys):
    from psoups_ray.base.tokenizer import train_bpe_tokenizer
    from psoups_ray.config import GenerationSpec
    from psoups_ray.generation import generate, ignored_generation_settings

    tokenizer = train_bpe_tokenizer(["a calm sea", "a dog on a long road"] * 20, 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    ).eval()
    assert ignored_generation_settings(model) == {}
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.no_repeat_ngram_size = 0  # neutral: not reported
    assert ignored_generation_settings(model) == {"repetition_penalty": 1.3}

    spec = GenerationSpec(max_new_tokens=3, batch_size=2)
    for _ in range(2):
        assert len(generate(model, tokenizer, ["a sea", "a dog", "a road"], spec)) == 3
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "repetition_penalty=1.3" in line]
    assert len(warnings) == 1 and "not applied" in warnings[0]
