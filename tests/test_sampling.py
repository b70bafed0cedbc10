"""The one decode loop (psoups_ray.runtime.sampling): transformers' distributions and greedy
tokens, a row's tokens independent of its batch-mates, EOS and finished-row compaction,
stop strings and streamed text, and PPO's merged-policy sampling (the same policy, base
weights restored bit for bit)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from peft import LoraConfig, TaskType
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from psoups_ray.base.tokenizer import train_bpe_tokenizer
from psoups_ray.policies.models import POLICY, SharedBasePPOModels
from psoups_ray.runtime.cache import GrowingLayer, preallocated_cache
from psoups_ray.runtime.logits import (
    RowSettings,
    TokenHistory,
    apply_penalties,
    sampling_probabilities,
)
from psoups_ray.runtime.sampling import (
    Sampler,
    SampleRequest,
    SamplingParams,
    ignored_generation_settings,
)
from psoups_ray.runtime.text import RowText, final_text

CORPUS = [
    "a calm sea and a dog on a long road.",
    "the sun is hot today, so drink water!",
    "Salt is a mineral: sodium chloride, NaCl. Hope this helps :)",
] * 30


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, 300)


def tiny_model(tokenizer, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def eos_prone(model: LlamaForCausalLM, eos: int, bias: float) -> LlamaForCausalLM:
    """``model`` with a bias towards EOS: rows finish at different steps."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = bias
    model.lm_head = head
    return model


PROMPTS = ["a calm", "the dog on a long road", "Salt", "the sun is hot today, so"]


def requests(sampler, params: list[SamplingParams]) -> list[SampleRequest]:
    ids = sampler.encode([PROMPTS[i % len(PROMPTS)] for i in range(len(params))])
    return [SampleRequest(row, p) for row, p in zip(ids, params, strict=True)]


SETTINGS = [
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},  # PPO: the whole distribution
    {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0},
    {"temperature": 0.6, "top_k": 10, "top_p": 0.8, "min_p": 0.0},
    {"temperature": 1.5, "top_k": 0, "top_p": 0.5, "min_p": 0.0},
    {"temperature": 0.7, "top_k": 1, "top_p": 0.3, "min_p": 0.0},
    {"temperature": 1.2, "top_k": 0, "top_p": 1.0, "min_p": 0.05},
    {"temperature": 0.9, "top_k": 30, "top_p": 0.9, "min_p": 0.1},
]


def test_per_row_probabilities_are_transformers_warpers_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(len(SETTINGS), 97) * 3
    got = sampling_probabilities(
        logits, *(torch.tensor([s[k] for s in SETTINGS]) for k in SETTINGS[0])
    )
    for row, settings in enumerate(SETTINGS):
        scores = logits[row : row + 1]
        scores = TemperatureLogitsWarper(settings["temperature"])(None, scores)
        if settings["top_k"]:
            scores = TopKLogitsWarper(settings["top_k"])(None, scores)
        if settings["top_p"] < 1:
            scores = TopPLogitsWarper(settings["top_p"])(None, scores)
        if settings["min_p"]:
            scores = MinPLogitsWarper(settings["min_p"])(None, scores)
        torch.testing.assert_close(got[row], scores.softmax(-1)[0])


def test_penalties_are_transformers_repetition_and_openais_frequency_and_presence():
    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 2
    prompts = [[3, 4, 5], [7], []]
    params = [SamplingParams(4, repetition_penalty=1.3), SamplingParams(4, frequency_penalty=0.5,
              presence_penalty=0.25), SamplingParams(4)]  # fmt: skip
    settings = RowSettings.of(params, torch.device("cpu"))
    history = TokenHistory(prompts, 40, torch.device("cpu"))
    history.add(torch.tensor([9, 7, 2]))
    history.add(torch.tensor([9, 8, 2]))
    got = apply_penalties(logits, settings, history)
    seen = torch.tensor([[3, 4, 5, 9, 9]])
    torch.testing.assert_close(got[0:1], RepetitionPenaltyLogitsProcessor(1.3)(seen, logits[0:1]))
    expected = logits[1].clone()
    expected[7] -= 0.5 + 0.25  # sampled once (being in the prompt does not count)
    expected[8] -= 0.5 + 0.25
    torch.testing.assert_close(got[1], expected)
    torch.testing.assert_close(got[2], logits[2])


def test_greedy_rows_are_transformers_greedy_tokens(tokenizer):
    model = tiny_model(tokenizer)
    sampler = Sampler(model, tokenizer)
    batch = requests(sampler, [SamplingParams(24, temperature=0.0) for _ in PROMPTS])
    got = sampler.complete(batch, batch_size=4)
    for request, completion in zip(batch, got, strict=True):
        ids = torch.tensor([request.prompt_ids])
        expected = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=24, pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()  # fmt: skip
        assert completion.token_ids == expected[: len(completion.token_ids)]


def test_a_rows_tokens_depend_on_its_seed_not_on_its_batch_mates(tokenizer):
    sampler = Sampler(tiny_model(tokenizer), tokenizer)
    params = [SamplingParams(30, seed=seed, **SETTINGS[seed % len(SETTINGS)]) for seed in range(8)]
    batch = requests(sampler, params)
    together = sampler.complete(batch, batch_size=8)
    pairs = sampler.complete(batch, batch_size=2)
    for request, completion, paired in zip(batch, together, pairs, strict=True):
        alone = sampler.complete([request], batch_size=1)[0]
        assert completion.token_ids == alone.token_ids == paired.token_ids
        assert completion.text == alone.text
    reseeded = [SampleRequest(r.prompt_ids, SamplingParams(30, seed=100 + i)) for i, r in
                enumerate(batch)]  # fmt: skip
    assert [c.token_ids for c in sampler.complete(reseeded, 8)] != [c.token_ids for c in together]


def test_sampled_tokens_follow_the_distribution(tokenizer):
    """The first token of 4000 rows of one prompt, each with its own seed: the empirical
    frequencies match the tempered, top-k-cut distribution (a chi-square test)."""
    model = tiny_model(tokenizer)
    sampler = Sampler(model, tokenizer)
    prompt = sampler.encode(["a calm"])[0]
    params = {"temperature": 0.8, "top_k": 12}
    rows = [SampleRequest(prompt, SamplingParams(1, seed=seed, **params)) for seed in range(4000)]
    counts = torch.zeros(len(tokenizer))
    for completion in sampler.complete(rows, batch_size=500):
        counts[completion.token_ids[0]] += 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    probs = sampling_probabilities(
        logits[None], torch.tensor([0.8]), torch.tensor([12]), torch.tensor([1.0])
    )[0]
    assert counts[probs == 0].sum() == 0  # nothing outside the top 12
    support = probs > 0
    expected = probs[support] * len(rows)
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 40.0, chi2  # 11 degrees of freedom: P(chi2 > 40) < 1e-4


def test_rows_stop_at_eos_leave_the_batch_and_decode_as_they_would_alone(tokenizer):
    model = eos_prone(tiny_model(tokenizer), tokenizer.eos_token_id, 2.5)
    sampler = Sampler(model, tokenizer)
    batch_sizes: list[int] = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    params = [SamplingParams(60, seed=seed, top_k=20) for seed in range(16)]
    batch = requests(sampler, params)
    together = sampler.complete(batch, batch_size=16)
    computed = list(batch_sizes)
    ends = [len(c.token_ids) for c in together]
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == tokenizer.eos_token_id
               for c in together if len(c.token_ids) < 60)  # fmt: skip
    assert len(set(ends)) > 3
    assert len(computed) == max(ends)  # no step after the last row finished
    # The model computed fewer rows as they finished, at least a quarter leaving at a time.
    assert computed[0] == 16 and computed[-1] < 8 and computed == sorted(computed, reverse=True)
    for request, completion in zip(batch, together, strict=True):
        assert sampler.complete([request], 1)[0].token_ids == completion.token_ids


def test_stop_strings_cut_the_text_and_streamed_pieces_join_to_it(tokenizer):
    sampler = Sampler(tiny_model(tokenizer, seed=3), tokenizer)
    free = sampler.complete(requests(sampler, [SamplingParams(40, seed=s) for s in range(6)]), 6)
    # A stop string taken from inside each free text: the text ends right before it.
    stops = []
    for completion in free:
        text = completion.text
        assert len(text) > 8, text
        stops.append(text[len(text) // 2 : len(text) // 2 + 2])
    stopped_params = [SamplingParams(40, seed=s, stop=(stops[s],)) for s in range(6)]
    batch = requests(sampler, stopped_params)
    stopped = sampler.complete(batch, 6)
    for completion, original, stop in zip(stopped, free, stops, strict=True):
        assert completion.finish_reason == "stop"
        assert stop not in completion.text
        assert original.text.startswith(completion.text)
        assert len(completion.token_ids) <= len(original.token_ids)
    streamed = ["" for _ in batch]
    finals = [None] * len(batch)
    for outputs in sampler.stream(batch):
        for index, out in enumerate(outputs):
            streamed[index] += out.text
            if out.finished and finals[index] is None:
                finals[index] = out.final_text
    assert streamed == finals == [c.text for c in stopped]


def test_the_incremental_text_is_the_decode_of_every_token(tokenizer):
    """Random token sequences (special tokens and broken UTF-8 sequences among them): the
    pieces RowText returns join to the final text, which is the stripped decode."""
    rng = random.Random(0)
    for trial in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        row = RowText(tokenizer)
        pieces = []
        for token in ids:
            row.add(token)
            pieces.append(row.delta())
        final, _ = final_text(tokenizer, ids)
        pieces.append(row.finish(final))
        assert final == tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert "".join(pieces) == final, (trial, ids)


def test_the_cache_grows_in_place_and_holds_what_transformers_cache_holds(tokenizer, monkeypatch):
    from transformers.cache_utils import DynamicLayer

    model = tiny_model(tokenizer)
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
    sampler = Sampler(model, tokenizer, fast=False)  # transformers' forward, with the cache
    batch = requests(sampler, [SamplingParams(30, seed=s) for s in range(4)])
    with_growing = [c.token_ids for c in sampler.complete(batch, 4)]
    monkeypatch.setattr(  # the model's own cache
        "psoups_ray.runtime.cache.preallocated_cache", lambda model, capacity: None
    )
    assert [c.token_ids for c in sampler.complete(batch, 4)] == with_growing


def test_bad_sampling_settings_are_refused_naming_them():
    with pytest.raises(Exception, match="top_p must be in"):
        SamplingParams(4, top_p=0.0)
    with pytest.raises(Exception, match="max_tokens must be >= 1"):
        SamplingParams(0)
    with pytest.raises(Exception, match="temperature must be >= 0"):
        SamplingParams(4, temperature=-1.0)
    with pytest.raises(Exception, match="temperature must be >= 0"):
        SamplingParams(4, temperature=math.nan)


def ppo_models(tokenizer) -> SharedBasePPOModels:
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules="all-linear",
        init_lora_weights=False,  # random B: the adapter changes the outputs
    )  # fmt: skip
    model = tiny_model(tokenizer)
    torch.manual_seed(1)
    return SharedBasePPOModels(model, lora, {}, None, tokenizer)


def test_merged_sampling_is_the_same_policy_and_restores_the_base_exactly(tokenizer):
    models = ppo_models(tokenizer)
    ids = torch.tensor([Sampler(models.peft, tokenizer).encode(["a calm sea"])[0]])
    base_weights = {n: p.clone() for n, p in models.peft.named_parameters() if "base_layer" in n}
    adapter_weights = [p.clone() for p in models.policy_parameters()]
    with torch.no_grad():
        with models.sampling() as model:
            unmerged = model(input_ids=ids).logits
        with models.sampling(merged=True) as model:
            merged = model(input_ids=ids).logits
            changed = any(
                not torch.equal(p, base_weights[n])
                for n, p in models.peft.named_parameters()
                if "base_layer" in n
            )
        with models.sampling(reference=True) as model:
            reference = model(input_ids=ids).logits
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


def test_merged_weights_are_restored_when_sampling_fails(tokenizer):
    models = ppo_models(tokenizer)
    base_weights = {n: p.clone() for n, p in models.peft.named_parameters() if "base_layer" in n}
    with pytest.raises(RuntimeError, match="boom"), models.sampling(merged=True):
        raise RuntimeError("boom")
    for name, parameter in models.peft.named_parameters():
        if "base_layer" in name:
            assert torch.equal(parameter, base_weights[name]), name


def test_ppo_samples_policy_merged_policy_and_reference(tokenizer):
    from psoups_ray.config import PolicyConfig
    from psoups_ray.policies.trainer import PPOTrainer, Query

    models = ppo_models(tokenizer)
    queries = [Query(prompt, None, ("P1A",)) for prompt in PROMPTS]
    samples = {}
    for merged in (True, False):
        spec = PolicyConfig(generation={"merged": merged})
        trainer = PPOTrainer(models, tokenizer, spec, reward_fn=None)
        samples[merged] = trainer.sample(queries, 12, 1.0, 1.0, seed=4)
        samples["reference"] = trainer.sample(queries, 12, 1.0, 1.0, seed=4, reference=True)
    assert torch.equal(samples[True].responses, samples[False].responses)
    assert not torch.equal(samples[True].responses, samples["reference"].responses)
    sample = samples[True]
    assert sample.mask.shape == sample.responses.shape and len(sample.texts) == len(queries)
    for row, ended in enumerate(sample.ended.tolist()):
        length = int(sample.mask[row].sum())
        assert ended == (sample.responses[row, length - 1] == tokenizer.eos_token_id)
        assert bool((sample.responses[row, length:] == tokenizer.pad_token_id).all())


def test_generation_settings_the_loop_does_not_apply_are_named_once(tokenizer, capsys):
    model = tiny_model(tokenizer, layers=1)
    assert ignored_generation_settings(model) == {}
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.no_repeat_ngram_size = 0  # neutral: not reported
    assert ignored_generation_settings(model) == {"repetition_penalty": 1.3}
    for _ in range(2):
        sampler = Sampler(model, tokenizer)
        batch = requests(sampler, [SamplingParams(3, seed=s) for s in range(3)])
        assert len(sampler.complete(batch, 2)) == 3
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "repetition_penalty=1.3" in line]
    assert len(warnings) == 1 and "not applied" in warnings[0]


def test_logprobs_are_the_models_own_for_sampled_and_prompt_tokens(tokenizer):
    """A step's reported log-probabilities are the log-softmax of the model's raw logits for
    the sampled token and the most likely ones; a prompt's (echo) come from one forward pass
    and agree with them."""
    model = tiny_model(tokenizer)
    sampler = Sampler(model, tokenizer)
    (request,) = requests(sampler, [SamplingParams(6, temperature=0.8, seed=5, logprobs=3,
                                                   repetition_penalty=1.5)])  # fmt: skip
    steps = [outputs[0] for outputs in sampler.stream([request]) if outputs[0].token_id is not None]
    ids = list(request.prompt_ids)
    for out in steps:
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        assert out.logprob == pytest.approx(float(expected[out.token_id]), abs=1e-5)
        top = expected.topk(3)
        assert [t for t, _ in out.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in out.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
        ids.append(out.token_id)
    whole = SampleRequest(tuple(ids), SamplingParams(1))
    short = SampleRequest(request.prompt_ids, SamplingParams(1))
    echoed, first = sampler.prompt_logprobs([whole, short], top=2)  # padded rows, one pass
    assert len(echoed) == len(ids) and echoed[0] == (None, [])
    for out, (logprob, alternatives) in zip(steps, echoed[len(request.prompt_ids) :],
                                            strict=True):  # fmt: skip
        assert logprob == pytest.approx(out.logprob, abs=1e-4)
        assert [t for t, _ in alternatives] == [t for t, _ in out.top_logprobs[:2]]
    # the short prompt, left-padded in the same pass, reads its tokens as the long one does
    assert first[0] == (None, []) and len(first) == len(request.prompt_ids)
    for (short_lp, _), (long_lp, _) in zip(first[1:], echoed[1 : len(first)], strict=True):
        assert short_lp == pytest.approx(long_lp, abs=1e-4)


def test_min_tokens_holds_eos_back_and_ignore_eos_decodes_to_max_tokens(tokenizer):
    model = eos_prone(tiny_model(tokenizer), tokenizer.eos_token_id, 4.0)
    sampler = Sampler(model, tokenizer)
    free = sampler.complete(requests(sampler, [SamplingParams(30, seed=s) for s in range(8)]), 8)
    assert min(len(c.token_ids) for c in free) < 5  # this model ends early
    held = sampler.complete(
        requests(sampler, [SamplingParams(30, seed=s, min_tokens=12) for s in range(8)]), 8
    )
    assert all(len(c.token_ids) >= 12 for c in held)
    assert all(tokenizer.eos_token_id not in c.token_ids[:11] for c in held)
    ignored = sampler.complete(
        requests(sampler, [SamplingParams(20, seed=s, ignore_eos=True) for s in range(4)]), 4
    )
    assert all(len(c.token_ids) == 20 and c.finish_reason == "length" for c in ignored)
    assert any(tokenizer.eos_token_id in c.token_ids for c in ignored)
