"""Batched sampling from a causal LM, shared by every stage that generates text."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from psoups_ray.config import GenerationSpec
from psoups_ray.prompting import adds_special_tokens


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    spec: GenerationSpec,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Sample one response per (already formatted) prompt; returns the decoded responses.

    ``on_batch(done, total)`` is called after each batch, for progress display.
    """
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    responses: list[str] = []
    try:
        for start in range(0, len(prompts), spec.batch_size):
            batch = list(prompts[start : start + spec.batch_size])
            encoded = tokenizer(
                batch,
                return_tensors="pt",
                padding=True,
                add_special_tokens=adds_special_tokens(tokenizer),
            ).to(device)
            output = model.generate(
                **encoded,
                do_sample=True,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_new_tokens=spec.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # (batch, prompt_len + new_tokens)
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            responses.extend(
                text.strip()
                for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            )
            if on_batch is not None:
                on_batch(len(responses), len(prompts))
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return responses
