"""The frozen-trunk cache of the PPO models: with LoRA on the top layers only, running the
bottom layers once per batch gives the same log-probabilities, values, reward scores and
gradients as full forward passes."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from psoups_ray.policies.models import SharedBasePPOModels
from psoups_ray.runtime.rewards import read_reward_adapter
from psoups_ray.runtime.trunk import TrunkCache, first_adapted_layer

LAYERS = 5
TOP = [3, 4]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip


def lora(task_type: TaskType, layers: list[int] | None) -> LoraConfig:
    return LoraConfig(
        task_type=task_type, r=4, lora_alpha=8, target_modules=MODULES,
        layers_to_transform=layers, init_lora_weights=False,  # random B: adapters change outputs
    )  # fmt: skip


def reward_adapter(directory, pole: str, layers: list[int] | None):
    torch.manual_seed(hash(pole) % 1000)
    classifier = LlamaForSequenceClassification(tiny_config().__class__(
        **{**tiny_config().to_dict(), "num_labels": 1}))  # fmt: skip
    peft = get_peft_model(classifier, lora(TaskType.SEQ_CLS, layers))
    peft.save_pretrained(directory)
    stats = {"conditioned": False, pole: {"score_mean": 0.1, "score_std": 2.0}}
    (directory / "reward_stats.json").write_text(json.dumps(stats))
    return read_reward_adapter(pole, str(directory))


def build(tmp_path, layers: list[int] | None) -> SharedBasePPOModels:
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    rewards = {}
    for pole in ("P1A", "P2B"):
        (tmp_path / pole).mkdir(exist_ok=True)
        rewards[pole] = reward_adapter(tmp_path / pole, pole, layers)
    torch.manual_seed(1)
    return SharedBasePPOModels(base, lora(TaskType.CAUSAL_LM, layers), rewards, "P1A")


def batch():
    torch.manual_seed(2)
    ids = torch.randint(2, 64, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of the first query
    ids[0, :3] = 0
    mask[2, -2:] = 0  # right padding of the last response
    ids[2, -2:] = 0
    return ids, mask


def everything(models: SharedBasePPOModels, ids, mask, query_length=5):
    models.zero_grad()
    logprobs, entropy = models.policy_logprobs(ids, mask, query_length, 0.7, with_entropy=True)
    values = models.values(ids, mask, query_length)
    (logprobs.sum() + values.sum()).backward()
    grads = [p.grad.clone() for p in models.policy_parameters() + models.critic_parameters()]
    return {
        "logprobs": logprobs.detach(),
        "entropy": entropy.detach(),
        "reference": models.reference_logprobs(ids, mask, query_length, 0.7),
        "values": values.detach(),
        "P1A": models.reward_scores("P1A", ids, mask),
        "P2B": models.reward_scores("P2B", ids, mask),
        "grads": grads,
    }


def test_the_trunk_cache_changes_no_number(tmp_path):
    models = build(tmp_path, TOP)
    assert first_adapted_layer(models.peft) == 3 and models.trunk.enabled
    ids, mask = batch()
    cached = everything(models, ids, mask)
    # One trunk pass for policy, critic and reference, one for both reward models (their
    # inputs count positions from the first token, not the first attended one).
    assert (models.trunk.misses, models.trunk.hits) == (2, 3)
    models.trunk = TrunkCache(models.backbone, 0)  # plain full forward passes
    full = everything(models, ids, mask)
    for key in ("logprobs", "entropy", "reference", "values", "P1A", "P2B"):
        torch.testing.assert_close(cached[key], full[key], rtol=1e-5, atol=1e-5)
    for got, want in zip(cached["grads"], full["grads"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in full["grads"])
    assert not torch.allclose(cached["logprobs"], cached["reference"])  # adapters do act


def test_adapters_on_every_layer_turn_the_cache_off(tmp_path):
    models = build(tmp_path, None)
    assert first_adapted_layer(models.peft) == 0 and not models.trunk.enabled


def test_new_batches_miss_and_old_ones_are_evicted(tmp_path):
    models = build(tmp_path, TOP)
    models.trunk.capacity = 2
    ids, mask = batch()
    for shift in range(3):
        models.reward_scores("P1A", (ids + shift) % 64, mask)
    assert models.trunk.misses == 3 and len(models.trunk._entries) == 2
    models.reward_scores("P2B", (ids + 2) % 64, mask)
    assert models.trunk.hits == 1
    shifted = torch.where(mask.bool(), ids % 62 + 2, ids)  # other tokens, same mask
    assert not torch.allclose(  # different content is never served from the cache
        models.reward_scores("P1A", ids, mask), models.reward_scores("P1A", shifted, mask)
    )


def test_trimming_shared_padding_changes_no_number(tmp_path):
    """PPO's forward passes drop the columns that are padding in every row of a minibatch
    (the left padding all queries share, the positions after the longest response)."""
    from psoups_ray.policies.trainer import trim_padding

    models = build(tmp_path, None)
    torch.manual_seed(3)
    query_length, width = 6, 7
    ids = torch.randint(2, 64, (3, query_length + width))
    attention = torch.ones_like(ids)
    attention[:, :2] = 0  # every query is left-padded by at least 2
    attention[1, :4] = 0
    response = torch.zeros(3, width, dtype=torch.long)
    for row, length in enumerate((3, 5, 1)):  # the longest response is 5 tokens
        response[row, :length] = 1
    attention[:, query_length:] = response
    ids = ids.masked_fill(attention == 0, 0)

    trimmed_ids, trimmed_attention, trimmed_query, kept = trim_padding(
        ids, attention, response, query_length
    )
    assert (trimmed_query, kept) == (4, 5)
    assert trimmed_ids.shape == (3, 4 + 5)
    full = everything(models, ids, attention, query_length)
    cut = everything(models, trimmed_ids, trimmed_attention, trimmed_query)
    live = response[:, :kept].bool()
    for key in ("logprobs", "entropy", "reference", "values"):
        torch.testing.assert_close(cut[key][live], full[key][:, :kept][live], rtol=1e-5, atol=1e-5)


def test_rollout_passes_in_length_sorted_chunks_give_every_row_its_own_numbers(tmp_path):
    """The rollout's no-gradient passes run chunks of rows of similar response length and
    put each row's outputs back in its place."""
    from psoups_ray.config import PolicyConfig
    from psoups_ray.policies.trainer import PPOTrainer

    models = build(tmp_path, TOP)
    trainer = PPOTrainer(models, None, PolicyConfig(minibatch_size=2), reward_fn=None)
    torch.manual_seed(4)
    query_length, width = 6, 9
    ids = torch.randint(2, 64, (5, query_length + width))
    attention = torch.ones_like(ids)
    attention[0, :3] = attention[3, :1] = 0  # left-padded queries
    response = torch.zeros(5, width, dtype=torch.long)
    for row, length in enumerate((2, 9, 4, 7, 1)):
        response[row, :length] = 1
    attention[:, query_length:] = response
    ids = ids.masked_fill(attention == 0, 0)

    with torch.no_grad():
        logprobs, entropy = trainer._per_token_in_chunks(
            lambda i, a, q: models.policy_logprobs(i, a, q, 0.7, with_entropy=True),
            ids, attention, response, query_length,
        )  # fmt: skip
        values = trainer._per_token_in_chunks(models.values, ids, attention, response, query_length)
        whole_logprobs, whole_entropy = models.policy_logprobs(
            ids, attention, query_length, 0.7, with_entropy=True
        )
        whole_values = models.values(ids, attention, query_length)
    live = response.bool()
    pairs = ((logprobs, whole_logprobs), (entropy, whole_entropy), (values, whole_values))
    for chunked, whole in pairs:
        assert chunked.shape == (5, width)
        torch.testing.assert_close(chunked[live], whole[live], rtol=1e-5, atol=1e-5)
