"""The reward bank: a run's reward models attached once to one frozen base.

A reward model of the rewards stage is a LoRA adapter with a linear score head, trained as
a sequence classifier (TRL's ``RewardTrainer``). Its LoRA weights live on the same
backbone modules of a causal LM as of a sequence classifier, so :class:`RewardBank`
attaches every pole's adapter to the causal LM the other roles use (PPO's policy, the
soups being measured), keeps the score heads apart, and scores a pole by enabling its
adapter. A multitask reward model (one adapter for every pole, conditioned on the pole's
preference prompt) is attached once and serves every pole.

One rule for every consumer (PPO's reward, tune, evaluate, personal soups and the public
:class:`RewardScorer`): the text scored is the formatted prompt, the response and EOS
(:func:`reward_input`), tokenised as one text and truncated to its first ``max_length``
tokens; the score is read at the last non-pad token, as transformers' sequence classifiers
read it; it is normalised with the pole's held-out mean and standard deviation, stored in
``reward_stats.json`` next to the adapter, so poles are comparable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.batching import last_token_index
from psoups_ray.runtime.trunk import TrunkCache

STATS_FILE = "reward_stats.json"
SCORE_KEY_SUFFIX = ".score.weight"


@dataclass(frozen=True)
class RewardAdapter:
    """A reward model of the run: adapter directory and how to read its scores."""

    pole: str  # the pole it scores
    directory: str  # local directory of the PEFT SEQ_CLS adapter + score head
    conditioned: bool  # the pole's preference prompt is part of its input
    score_mean: float  # held-out statistics: scores are normalised with these
    score_std: float


def read_reward_stats(directory: str | Path, location: str | None = None) -> dict[str, Any]:
    """The ``reward_stats.json`` next to a reward adapter (``conditioned`` + per-pole stats)."""
    path = Path(directory, STATS_FILE)
    if not path.is_file():
        raise PsoupsError(
            f"reward adapter {location or directory} has no {STATS_FILE}; re-run the rewards "
            "stage with --force"
        )
    return json.loads(path.read_text())


def read_reward_adapter(pole: str, directory: str) -> RewardAdapter:
    """A reward adapter with ``pole``'s score statistics from its ``reward_stats.json``."""
    stats = read_reward_stats(directory)
    if pole not in stats:
        raise PsoupsError(f"reward adapter {directory} has no statistics for pole {pole!r}")
    return RewardAdapter(
        pole=pole,
        directory=directory,
        conditioned=bool(stats.get("conditioned")),
        score_mean=float(stats[pole]["score_mean"]),
        score_std=max(float(stats[pole]["score_std"]), 1e-6),
    )


def reward_lora_config(directory: str) -> LoraConfig:
    """The LoRA shape of a rewards-stage adapter, for attaching it to a causal LM."""
    config = json.loads(Path(directory, "adapter_config.json").read_text())
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=0.0,
        target_modules=config["target_modules"],
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
    )


def load_reward_weights(peft: PeftModel, adapter_name: str, directory: str) -> nn.Linear:
    """Load a SEQ_CLS reward adapter's LoRA weights into ``peft``'s (already added)
    ``adapter_name``; return its score head as a linear layer (hidden -> 1)."""
    weights = load_file(str(Path(directory, "adapter_model.safetensors")))
    score_keys = [k for k in weights if k.endswith(SCORE_KEY_SUFFIX)]
    if len(score_keys) != 1:
        raise PsoupsError(f"{directory} is not a reward adapter (no single score head)")
    score = weights.pop(score_keys[0])  # (1, hidden)
    result = set_peft_model_state_dict(peft, weights, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise PsoupsError(
            f"reward adapter {directory} does not fit the base model: "
            f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}"
        )
    head = nn.Linear(score.shape[1], 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(score)
    head.requires_grad_(False)
    return head.to(next(peft.parameters()).device)


@torch.no_grad()
def read_scores(
    backbone: nn.Module,
    head: nn.Linear,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_token_id: int | None,
    trunk: TrunkCache | None = None,
) -> torch.Tensor:
    """Raw reward scores of right-padded texts with the active reward adapter: (B, L) -> (B,)."""
    if trunk is not None:  # with the trunk off, a plain forward pass as below
        hidden = trunk.hidden(input_ids, attention_mask, None)
    else:
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, L, H)
    last = last_token_index(input_ids, pad_token_id)
    picked = hidden[torch.arange(len(hidden), device=hidden.device), last]  # (B, H)
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


def reward_input(
    tokenizer, prompt: str, response: str, preference_prompt: str | None = None
) -> tuple[str, str]:
    """(prompt text, response text) exactly as the reward model sees them (EOS appended)."""
    from psoups_ray.prompting import format_prompt

    eos = tokenizer.eos_token or ""
    text = response if response.endswith(eos) else response + eos
    return format_prompt(tokenizer, prompt, preference_prompt), text


def score_right_padded(
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_length: int | None = None,
) -> torch.Tensor:
    """``score(input_ids, attention_mask)`` of every text, in batches: (len(texts),).

    Batches are right-padded (a sequence classifier reads its score at the last non-pad
    token) and hold texts of similar token length (sorted longest first), so little of
    their compute goes to padding; each text's score does not depend on its batch-mates.
    ``score`` maps a (b, L) batch to (b,) scores. ``max_length`` keeps each text's first
    tokens; None keeps every token.
    """
    if tokenizer.pad_token_id is None:
        raise PsoupsError("the tokenizer has no pad token: reward scores need one")
    encoded = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)[
        "input_ids"
    ]
    lengths = [len(ids) for ids in encoded]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    scores = torch.zeros(len(texts))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = lengths[rows[0]]
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, index in enumerate(rows):
            input_ids[row, : lengths[index]] = torch.tensor(encoded[index])
            attention_mask[row, : lengths[index]] = 1
        scores[rows] = score(input_ids, attention_mask).float().cpu()  # (b,)
    return scores


class RewardBank:
    """Reward adapters attached once to one causal LM, each pole's score a switch away.

    Args:
        model: a :class:`~peft.PeftModel` over the causal LM (the adapters are added to
            it, beside its own) or the plain causal LM (wrapped here).
        adapters: reward adapters by pole (poles sharing a directory, as with a multitask
            reward model, share one attached adapter).
        tokenizer: the base's tokenizer (None: only :meth:`token_scores`).
        preference_prompts: pole -> preference prompt, for conditioned reward models.
        max_length: the reward models' ``rewards.max_length`` (longer texts keep their
            first tokens).
        batch_size: texts scored per forward pass.
        activate: switches the active adapter (default ``peft.set_adapter``; PPO passes
            its own, which keeps the policy and critic trainable).
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Mapping[str, RewardAdapter],
        tokenizer=None,
        preference_prompts: Mapping[str, str] | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        activate: Callable[[str], None] | None = None,
    ):
        self.adapters = dict(adapters)
        self.tokenizer = tokenizer
        self.preference_prompts = dict(preference_prompts or {})
        self.max_length = max_length
        self.batch_size = batch_size
        self.trunk: TrunkCache | None = None  # set by owners sharing the base's trunk
        self.heads: dict[str, nn.Linear] = {}  # attached adapter name -> score head
        self._adapter_of: dict[str, str] = {}  # pole -> attached adapter name
        peft = model if isinstance(model, PeftModel) else None
        by_directory: dict[str, str] = {}
        for pole, adapter in self.adapters.items():
            if adapter.directory not in by_directory:
                name = f"reward_{len(by_directory)}"
                config = reward_lora_config(adapter.directory)
                if peft is None:
                    peft = get_peft_model(model, config, adapter_name=name)
                else:
                    peft.add_adapter(name, config)
                self.heads[name] = load_reward_weights(peft, name, adapter.directory)
                by_directory[adapter.directory] = name
            self._adapter_of[pole] = by_directory[adapter.directory]
        self.peft = peft
        self._activate = activate or (lambda name: self.peft.set_adapter(name))
        config = getattr(model, "config", None)
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_token_id = pad if pad is not None else getattr(config, "pad_token_id", None)

    @property
    def poles(self) -> list[str]:
        return list(self._adapter_of)

    def adapter_name(self, pole: str) -> str:
        """The name ``pole``'s reward adapter is attached under."""
        if pole not in self._adapter_of:
            raise PsoupsError(f"no reward model for pole {pole!r}; known: {', '.join(self.poles)}")
        return self._adapter_of[pole]

    def statistics(self, pole: str) -> dict[str, float]:
        """``pole``'s held-out score mean and standard deviation."""
        self.adapter_name(pole)  # an unknown pole fails here, naming the known ones
        adapter = self.adapters[pole]
        return {"score_mean": adapter.score_mean, "score_std": adapter.score_std}

    @property
    def backbone(self) -> nn.Module:
        """The transformer without its LM head (e.g. ``LlamaModel``)."""
        return self.peft.get_base_model().base_model

    @torch.no_grad()
    def token_scores(
        self, pole: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw scores of right-padded token rows for ``pole``: (B, L) -> (B,)."""
        name = self.adapter_name(pole)
        self._activate(name)
        device = self.heads[name].weight.device
        return read_scores(
            self.backbone, self.heads[name], input_ids.to(device), attention_mask.to(device),
            self.pad_token_id, self.trunk,
        )  # fmt: skip

    @torch.no_grad()
    def score(
        self,
        pole: str,
        prompts: Sequence[str],
        responses: Sequence[str],
        normalize: bool = True,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """``pole``'s rewards of ``responses`` to the raw instructions ``prompts``: (B,),
        standardised to the pole's held-out mean 0 / std 1 unless ``normalize`` is false.
        ``batch_size``: texts per forward pass (default: the bank's)."""
        if self.tokenizer is None:
            raise PsoupsError("scoring texts needs a reward bank with a tokenizer")
        if len(prompts) != len(responses):
            raise PsoupsError(f"{len(prompts)} prompts but {len(responses)} responses")
        self.adapter_name(pole)  # an unknown pole fails here, naming the known ones
        adapter = self.adapters[pole]
        preference = self.preference_prompts.get(pole) if adapter.conditioned else None
        texts = [
            "".join(reward_input(self.tokenizer, prompt, response, preference))
            for prompt, response in zip(prompts, responses, strict=True)
        ]
        raw = score_right_padded(
            self.tokenizer,
            texts,
            batch_size or self.batch_size,
            lambda ids, mask: self.token_scores(pole, ids, mask),
            self.max_length,
        )
        if not normalize:
            return raw
        return (raw - adapter.score_mean) / adapter.score_std

    def mean_scores(
        self,
        poles: Sequence[Sequence[str]],
        prompts: Sequence[str],
        responses: Sequence[str],
    ) -> torch.Tensor:
        """Row i's mean normalised reward over its poles ``poles[i]``: (B,). Each pole
        scores only the rows that ask for it."""
        total = torch.zeros(len(responses))
        for pole in sorted({pole for row in poles for pole in row}):
            rows = [index for index, wanted in enumerate(poles) if pole in wanted]
            total[rows] += self.score(
                pole, [prompts[i] for i in rows], [responses[i] for i in rows]
            )
        counts = torch.tensor([len(row) for row in poles], dtype=torch.float)
        return total / counts
