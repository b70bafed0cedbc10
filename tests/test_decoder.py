"""The sampler's fast decoder (psoups_ray.runtime.decoder): the same tokens as transformers'
forward from the same seeds in float32 — plain, with per-row soups, with PEFT adapters,
rows leaving the batch — a bounded distance from them in bfloat16, weights stored once,
and models it cannot reproduce left to the generic path."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.adapters import LoraAdapter
from psoups_ray.runtime.batching import left_padded, position_ids_for
from psoups_ray.runtime.cache import GenericDecoding
from psoups_ray.runtime.decoder import (
    FastDecoder,
    cpu_has_bfloat16,
    decoder_for,
    fast_path_problem,
    resolve_dtype,
)
from psoups_ray.runtime.mixing import attach_mixing
from psoups_ray.runtime.sampling import Sampler, SampleRequest, SamplingParams

VOCAB, EOS = 300, 1
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVERY = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


def llama(seed: int = 0, kv_heads: int = 2, layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=EOS, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def prompts(count: int = 6, seed: int = 0) -> list[tuple[int, ...]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 14, (count,), generator=generator).tolist()
    return [tuple(torch.randint(2, VOCAB, (n,), generator=generator).tolist()) for n in lengths]


def sampled(sampler: Sampler, weights=None, max_tokens: int = 24, **params) -> list[list[int]]:
    rows = prompts()
    weights = weights or [None] * len(rows)
    requests = [
        SampleRequest(p, SamplingParams(max_tokens, seed=10 + i, **params), w)
        for i, (p, w) in enumerate(zip(rows, weights, strict=True))
    ]
    return [c.token_ids for c in sampler.complete(requests, len(requests))]


def both_paths(model, mixer=None) -> tuple[Sampler, Sampler]:
    return Sampler(model, None, mixer), Sampler(model, None, mixer, fast=False)


def random_adapter(model, name: str, layers, modules, rank: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    named = dict(model.named_modules())
    a, b = {}, {}
    for layer in layers:
        for module in modules:
            block = "self_attn" if module in ATTENTION else "mlp"
            full = f"model.layers.{layer}.{block}.{module}"
            linear = named[full]
            a[full] = torch.randn(rank, linear.in_features, generator=generator) * 0.3
            b[full] = torch.randn(linear.out_features, rank, generator=generator) * 0.3
    return LoraAdapter(name, {"lora_alpha": 2 * rank, "r": rank}, a, b)


def test_plain_models_sample_the_same_tokens_as_transformers_forward():
    for kv_heads in (4, 2, 1):  # multi-head, grouped and multi-query attention
        fast, generic = both_paths(llama(kv_heads=kv_heads))
        assert sampled(fast) == sampled(generic)
        assert sampled(fast, temperature=0.7, top_k=20, top_p=0.9) == sampled(
            generic, temperature=0.7, top_k=20, top_p=0.9
        )
    assert isinstance(decoder_for(fast.model), FastDecoder)


def test_per_row_soups_sample_the_same_tokens_as_the_mixing_layers():
    model = llama(seed=1)
    adapters = [
        random_adapter(model, "every", range(3), EVERY, seed=1),
        random_adapter(model, "some", (1, 2), ("q_proj", "v_proj", "down_proj"), seed=2),
        random_adapter(model, "one", (2,), ("up_proj",), seed=3),
    ]
    mixer = attach_mixing(model, adapters)
    fast, generic = both_paths(model, mixer)
    weights = [(1.0, 0.0, 0.0), (0.3, 0.7, 0.0), None, (0.5, 0.5, 2.0), (0.0, 0.0, 1.0), None]
    assert sampled(fast, weights) == sampled(generic, weights)
    unweighted = sampled(fast)
    assert sampled(fast, [(0.0, 0.0, 0.0)] * 6) == unweighted  # zero weights: the base
    assert sampled(fast, weights) != unweighted
    # One soup for every row (a broadcast weight vector) equals that soup per row.
    requests = [SampleRequest(p, SamplingParams(16, seed=10 + i)) for i, p in enumerate(prompts())]
    with mixer.weights(torch.tensor([0.2, 0.5, 0.3])):
        broadcast = [c.token_ids for c in fast.complete(requests, 6)]
    assert broadcast == sampled(fast, [(0.2, 0.5, 0.3)] * 6, max_tokens=16)


def test_logits_match_after_the_prompt_each_step_and_rows_leaving():
    model = llama(seed=2)
    mixer = attach_mixing(model, [random_adapter(model, "x", range(3), EVERY, seed=4)])
    input_ids, attention = left_padded(prompts(), 0)
    positions = position_ids_for(attention)
    weights = torch.tensor([[1.0], [0.5], [0.0], [2.0], [1.0], [0.25]])
    with torch.no_grad(), mixer.weights(weights):
        fast, generic = decoder_for(model), GenericDecoding(model)
        capacity = input_ids.shape[1] + 8
        got = fast.prefill(input_ids, attention, positions, capacity, torch.float32)
        want = generic.prefill(input_ids, attention, positions, capacity)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        tokens = got.argmax(-1)
        for step in range(6):
            positions = positions[:, -1:] + 1
            if step == 2:  # rows 1 and 4 leave
                keep = torch.tensor([0, 2, 3, 5])
                fast.select_rows(keep)
                generic.select_rows(keep)
                mixer.select_rows(keep)
                positions, tokens = positions[keep], tokens[keep]
            got, want = fast.step(tokens, positions), generic.step(tokens, positions)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            tokens = got.argmax(-1)


def test_rows_that_end_early_leave_and_the_rest_decode_as_alone():
    model = llama(seed=3)
    common = torch.tensor(_flat(sampled(Sampler(model, None), max_tokens=40))).mode().values
    model.generation_config.eos_token_id = int(common)  # frequent: rows end at different steps
    fast, generic = both_paths(model)
    together = sampled(fast, max_tokens=40)
    assert min(len(ids) for ids in together) < 20 and max(len(ids) for ids in together) > 20
    assert together == sampled(generic, max_tokens=40)
    alone = [
        fast.complete([SampleRequest(p, SamplingParams(40, seed=10 + i))], 1)[0].token_ids
        for i, p in enumerate(prompts())
    ]
    assert together == alone


def test_peft_adapters_active_disabled_or_merged_are_decoded_as_peft_does():
    model = llama(seed=4)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(EVERY)))
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    peft.eval()
    base = peft.get_base_model()
    fast, generic = both_paths(base)
    with_adapter = sampled(fast)
    assert with_adapter == sampled(generic)
    with peft.disable_adapter():
        without = sampled(fast)
        assert without == sampled(generic)
    assert with_adapter != without
    peft.merge_adapter()  # merged in place into the packed weights: the decoder sees it
    try:
        merged = sampled(fast)
    finally:
        peft.unmerge_adapter()
    assert merged == with_adapter


def test_projections_are_views_of_the_packed_weights_and_follow_the_model():
    model = llama(seed=5)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    fast, generic = both_paths(model)
    first = sampled(fast)
    decoder = decoder_for(model)
    attention = model.model.layers[0].self_attn
    packed = decoder._layers[0].qkv
    assert (
        attention.q_proj.weight.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    )
    assert attention.v_proj.weight.data_ptr() == packed[-attention.v_proj.out_features :].data_ptr()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == before
    with torch.no_grad():  # an in-place change is the decoder's too
        attention.k_proj.weight.mul_(1.5)
    changed = sampled(fast)
    assert changed != first and changed == sampled(generic)
    attention.q_proj.weight = torch.nn.Parameter(  # a replaced parameter is packed again
        attention.q_proj.weight.detach().clone() * 0.5, requires_grad=False
    )
    assert sampled(fast) == sampled(generic)
    assert decoder._layers[0].qkv is not packed


def test_qwen2_attention_biases_are_packed_too():
    torch.manual_seed(6)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=EOS, use_sliding_window=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.normal_(std=0.5)
    assert fast_path_problem(model) is None
    fast, generic = both_paths(model)
    assert sampled(fast) == sampled(generic)


def test_models_it_cannot_reproduce_keep_the_generic_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    assert "gpt2" in fast_path_problem(gpt2)
    trainable = llama(seed=7).requires_grad_(True)
    assert "trains" in fast_path_problem(trainable)
    biased = llama(seed=8)
    biased.config.attention_bias = True
    assert "biases" in fast_path_problem(biased)
    fast, generic = both_paths(trainable)  # the fast sampler falls back, same tokens
    assert isinstance(decoder_for(trainable), str)
    assert sampled(fast) == sampled(generic)
    with pytest.raises(PsoupsError, match="only the fast decoder"):
        fast.complete([SampleRequest((3, 4), SamplingParams(2))], 1, dtype="bfloat16")


def test_auto_dtype_is_bfloat16_only_where_the_hardware_computes_it():
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if cpu_has_bfloat16() else torch.float32
    assert resolve_dtype("auto", cpu, torch.float32) == expected
    assert resolve_dtype("float32", cpu, torch.float32) == torch.float32
    assert resolve_dtype("bfloat16", cpu, torch.float32) == torch.bfloat16
    assert resolve_dtype("auto", cpu, torch.float16) == torch.float16  # the model's own
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", cpu, torch.float32)


def test_bfloat16_decoding_stays_close_to_the_float32_distribution():
    """bfloat16 weights and activations, float32 logits: teacher-forced on the float32
    path's tokens, each step's next-token distribution is within 0.05 total variation of
    float32's on average (0.15 at worst), and sampling from the same seeds keeps most
    tokens."""
    model = llama(seed=9)
    mixer = attach_mixing(model, [random_adapter(model, "x", range(3), EVERY, seed=5)])
    input_ids, attention = left_padded(prompts(), 0)
    decoder = decoder_for(model)

    def decode(dtype, forced=None):
        positions = position_ids_for(attention)
        logits = [decoder.prefill(input_ids, attention, positions, 40, dtype)]
        tokens = []
        for step in range(12):
            tokens.append(logits[-1].argmax(-1) if forced is None else forced[step])
            positions = positions[:, -1:] + 1
            logits.append(decoder.step(tokens[-1], positions))
        return logits, tokens

    with torch.no_grad(), mixer.weights(torch.full((6, 1), 0.8)):
        full, tokens = decode(torch.float32)
        low, _ = decode(torch.bfloat16, forced=tokens)
    assert all(step.dtype == torch.float32 for step in low)
    distances = torch.cat([
        0.5 * (a.softmax(-1) - b.softmax(-1)).abs().sum(-1) for a, b in zip(low, full, strict=True)
    ])  # fmt: skip
    assert float(distances.mean()) < 0.05 and float(distances.max()) < 0.15, distances
    fast = Sampler(model, None, mixer)
    weights = [(0.8,)] * 6
    low_tokens = _flat(sampled_in(fast, weights, "bfloat16"))
    full_tokens = _flat(sampled_in(fast, weights, "float32"))
    same = sum(a == b for a, b in zip(low_tokens, full_tokens, strict=False))
    assert same > 0.5 * len(full_tokens)


def sampled_in(sampler, weights, dtype):
    requests = [
        SampleRequest(p, SamplingParams(12, seed=i), w)
        for i, (p, w) in enumerate(zip(prompts(), weights, strict=True))
    ]
    return [c.token_ids for c in sampler.complete(requests, 6, dtype=dtype)]


def _flat(rows):
    return [token for row in rows for token in row]
