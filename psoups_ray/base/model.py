"""Building the tiny model and loading any base model (hub id, local directory, run artifact)."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from psoups_ray.config import BaseConfig, TinyModelSpec
from psoups_ray.errors import PsoupsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_model(
    spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int
) -> LlamaForCausalLM:
    """A randomly initialised Llama-style model sized by ``spec`` (same seed -> same weights)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_tokenizer(
    reference: str, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (falls back to EOS as the pad token)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            reference, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise PsoupsError(
            f"cannot load tokenizer {reference!r}: {exc}. Give a Hugging Face model id (with "
            "network access or a filled cache) or a local directory saved by save_pretrained"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    reference: str,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM by hub id or local directory, with a clear error when it fails."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            reference,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype="auto" if dtype == "auto" else DTYPES[dtype],
        )
    except (OSError, ValueError) as exc:
        raise PsoupsError(
            f"cannot load model {reference!r}: {exc}. Give a Hugging Face causal-LM id (with "
            "network access or a filled cache) or a local directory saved by save_pretrained"
        ) from None


def describe_reference(base: BaseConfig) -> dict:
    """Validate a real model reference without loading its weights; returns its key facts."""
    tokenizer_reference = base.tokenizer or base.model
    try:
        config = AutoConfig.from_pretrained(
            base.model, revision=base.revision, trust_remote_code=base.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise PsoupsError(
            f"base.model {base.model!r} cannot be resolved: {exc}. Give a Hugging Face model id "
            "(with network access or a filled cache) or a local directory saved by save_pretrained"
        ) from None
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise PsoupsError(
            f"base.model {base.model!r} is a {architectures} model; P-Soups needs a causal LM "
            "(an architecture ending in ForCausalLM)"
        )
    tokenizer = load_tokenizer(tokenizer_reference, base.revision, base.trust_remote_code)
    return {
        "model_type": config.model_type,
        "architectures": architectures,
        "vocab_size": getattr(config, "vocab_size", None),
        "tokenizer_vocab_size": len(tokenizer),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
