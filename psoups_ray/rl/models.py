"""Policy, critic, reference and reward models of a PPO run on one frozen base.

One copy of the base weights serves every role (DESIGN.md, "Training on Ray"):

- policy: LoRA adapter ``default`` (so that it saves as a plain PEFT adapter directory);
- critic: LoRA adapter ``critic`` + a linear value head on the last hidden state;
- reference: the base with adapters disabled;
- rewards: each pole's reward adapter (trained by the rewards stage as a sequence
  classifier) attached as adapter ``reward_<NAME>``, its score head kept as a linear
  layer. The reward adapter's LoRA weights live on the same backbone modules in a causal
  LM as in a sequence classifier, so they load onto this model unchanged.

Switching roles switches the active adapter; nothing is copied. The layout with four
separate models that this replaces is in ``bench/ppo_memory.py``.

A frozen trunk is computed once (:class:`TrunkCache`): when every adapter adapts only the
top layers (``lora.top_layers``), the layers below them compute the same hidden states for
every role, so a batch goes through them once and each role runs only the top layers —
policy, reference and critic share one trunk pass per batch (and the PPO epochs' minibatches
one per minibatch), the reward models of a baseline one per batch of reward inputs.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from psoups_ray.errors import PsoupsError
from psoups_ray.rl.ppo_math import entropy_from_logits, gather_logprobs

POLICY = "default"
CRITIC = "critic"
SCORE_KEY_SUFFIX = ".score.weight"


@dataclass(frozen=True)
class RewardAdapter:
    """A reward model of the run: adapter directory and how to read its scores."""

    pole: str  # the pole it scores
    directory: str  # local directory of the PEFT SEQ_CLS adapter + score head
    conditioned: bool  # the pole's preference prompt is part of its input
    score_mean: float  # held-out statistics: scores are normalised with these
    score_std: float


def read_reward_adapter(pole: str, directory: str) -> RewardAdapter:
    """A reward adapter with ``pole``'s score statistics from its ``reward_stats.json``."""
    from psoups_ray.rewards.train import read_reward_stats

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


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens (left padding starts at 0): (B, L)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """The position a sequence classifier reads its score from: the last non-pad token.

    The same rule as transformers' ``*ForSequenceClassification``, so scores equal those
    of the reward model as trained. (B, L) -> (B,)
    """
    if pad_token_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id).int()).argmax(-1)


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
    ``adapter_name``; return its score head as a linear layer (hidden -> 1).

    The reward adapter's LoRA weights live on the same backbone modules in a causal LM as
    in a sequence classifier, so they load unchanged.
    """
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


class _TrunkDone(Exception):
    """Stops a forward pass once the trunk's output has been captured."""


class TrunkCache:
    """Hidden states of a backbone's frozen bottom layers, computed once per distinct batch.

    ``first_adapted``: the lowest layer any adapter changes (0: nothing to share, every call
    is a plain forward pass). :meth:`hidden` returns the backbone's last hidden state (after
    the final norm) like ``backbone(...).last_hidden_state``: the trunk (layers below
    ``first_adapted``, without gradients: nothing below them trains) comes from the cache when
    the same ids, mask and positions were seen among the last ``capacity`` batches; the top
    layers run with whatever adapter is active, with gradients when enabled. The inputs of
    layer ``first_adapted`` are captured as the model passes them (causal mask, rotary
    embeddings), so the top layers see exactly what a full pass would give them.
    """

    def __init__(self, backbone: nn.Module, first_adapted: int, capacity: int = 8):
        layers = getattr(backbone, "layers", None)
        usable = layers is not None and hasattr(backbone, "norm") and 0 < first_adapted
        self.backbone = backbone
        self.first_adapted = first_adapted if usable and first_adapted < len(layers) else 0
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[tuple[torch.Tensor, ...], Any]] = OrderedDict()
        self._next_key = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.first_adapted > 0

    def clear(self) -> None:
        self._entries.clear()

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The last hidden state: (B, L, H)."""
        if not self.enabled:
            return self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state
        hidden, layer_kwargs = self._trunk(input_ids, attention_mask, position_ids)
        for layer in self.backbone.layers[self.first_adapted :]:
            output = layer(hidden, **layer_kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        return self.backbone.norm(hidden)

    def _trunk(self, input_ids, attention_mask, position_ids):
        inputs = (input_ids, attention_mask, position_ids)
        for key, (seen, result) in self._entries.items():
            if all(_same(a, b) for a, b in zip(inputs, seen, strict=True)):
                self._entries.move_to_end(key)
                self.hits += 1
                return result
        self.misses += 1
        captured: dict[str, Any] = {}

        def capture(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = kwargs
            raise _TrunkDone

        handle = self.backbone.layers[self.first_adapted].register_forward_pre_hook(
            capture, with_kwargs=True
        )
        try:
            with torch.no_grad():
                self.backbone(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                )
        except _TrunkDone:
            pass
        finally:
            handle.remove()
        result = (captured["hidden"], captured["kwargs"])
        self._entries[self._next_key] = (tuple(_detached(x) for x in inputs), result)
        self._next_key += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return result


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().clone()


def first_adapted_layer(peft: PeftModel) -> int:
    """The lowest decoder layer any of ``peft``'s adapters changes (0 when some adapter has
    no ``layers_to_transform``, i.e. adapts every layer, or changes anything else)."""
    lowest = None
    for config in peft.peft_config.values():
        layers = getattr(config, "layers_to_transform", None)
        if not layers or getattr(config, "modules_to_save", None):
            return 0
        layers = [layers] if isinstance(layers, int) else list(layers)
        lowest = min(layers) if lowest is None else min(lowest, *layers)
    return lowest or 0


class SharedBasePPOModels(nn.Module):
    """Every model a PPO run needs, as adapters on one frozen causal LM.

    Args:
        base_model: the causal LM (its weights are frozen here).
        policy_lora: the policy adapter's shape (also the critic's unless it copies a reward).
        rewards: reward adapters by pole (poles sharing a directory, as with a multitask
            reward model, share one attached adapter).
        critic_from: pole whose reward adapter initialises the critic (adapter weights,
            and the value head from its score head rescaled by the score statistics so the
            critic starts predicting normalised scores); None: a fresh adapter, small
            random head.
        pad_token_id: the tokenizer's pad token (for reading reward scores).
    """

    def __init__(
        self,
        base_model: nn.Module,
        policy_lora: LoraConfig,
        rewards: Mapping[str, RewardAdapter],
        critic_from: str | None,
        pad_token_id: int | None,
    ):
        super().__init__()
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.peft: PeftModel = get_peft_model(base_model, policy_lora, adapter_name=POLICY)
        hidden_size = base_model.config.hidden_size
        self.score_heads = nn.ModuleDict()  # adapter name -> score head
        self.rewards = dict(rewards)
        self._reward_adapter_of: dict[str, str] = {}  # pole -> adapter name
        by_directory: dict[str, str] = {}
        for pole, adapter in self.rewards.items():
            if adapter.directory not in by_directory:
                name = f"reward_{len(by_directory)}"
                self.score_heads[name] = self._attach_reward(name, adapter.directory)
                by_directory[adapter.directory] = name
            self._reward_adapter_of[pole] = by_directory[adapter.directory]
        self.value_head = nn.Linear(hidden_size, 1)
        if critic_from is not None:
            source = self.rewards[critic_from]
            self._attach_reward(CRITIC, source.directory)
            with torch.no_grad():
                head = self.score_heads[self._reward_adapter_of[critic_from]]
                self.value_head.weight.copy_(head.weight / source.score_std)
                self.value_head.bias.fill_(-source.score_mean / source.score_std)
        else:  # a random head: with a zero one the fresh adapter (B = 0) gets no gradient
            self.peft.add_adapter(CRITIC, policy_lora)
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1))
            nn.init.zeros_(self.value_head.bias)
        self.score_heads.requires_grad_(False)
        self._policy_params = self._adapter_parameters(POLICY)
        self._critic_params = [*self._adapter_parameters(CRITIC), *self.value_head.parameters()]
        self.peft.eval()  # no dropout in RL: the sampled and the trained policy must agree
        self._active: str | None = None
        self._activate(POLICY)
        self.trunk = TrunkCache(self.backbone, first_adapted_layer(self.peft))

    # -- building ------------------------------------------------------------------
    def _attach_reward(self, adapter_name: str, directory: str) -> nn.Linear:
        self.peft.add_adapter(adapter_name, reward_lora_config(directory))
        return load_reward_weights(self.peft, adapter_name, directory)

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        marker = f".{adapter_name}."
        return [p for n, p in self.peft.named_parameters() if marker in n]

    def _activate(self, adapter_name: str) -> None:
        # PEFT's set_adapter makes only the active adapter trainable; policy and critic
        # are both trained, so their flags are restored after every switch.
        if self._active == adapter_name:
            return
        self._active = adapter_name
        self.peft.set_adapter(adapter_name)
        for parameter in self.peft.parameters():
            parameter.requires_grad_(False)
        for parameter in self._policy_params + self._critic_params:
            parameter.requires_grad_(True)

    @property
    def backbone(self) -> nn.Module:
        """The transformer without its LM head (e.g. ``LlamaModel``)."""
        return self.peft.get_base_model().base_model

    def policy_parameters(self) -> list[nn.Parameter]:
        return self._policy_params

    def critic_parameters(self) -> list[nn.Parameter]:
        return self._critic_params

    # -- roles -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        reference: bool = False,
        merged: bool = False,
        **sampling,
    ) -> torch.Tensor:
        """Sample from the policy (or the reference); returns the new tokens only: (B, T).

        ``sampling``: :func:`psoups_ray.generation.sample_tokens`'s settings. ``merged``:
        decode with the policy adapter merged into the base weights (the same function,
        without the adapter's per-layer overhead; see :meth:`policy_merged`).
        """
        from psoups_ray.generation import sample_tokens

        self._activate(POLICY)
        if reference:
            context = self.peft.disable_adapter()
        elif merged:
            context = self.policy_merged()
        else:
            context = contextlib.nullcontext()
        with context:
            return sample_tokens(self.peft.get_base_model(), input_ids, attention_mask, **sampling)

    @contextlib.contextmanager
    def policy_merged(self) -> Iterator[None]:
        """The policy adapter merged into the base weights for the duration.

        Afterwards the base weights are restored bit for bit from a copy (PEFT's unmerge
        subtracts the update again, which rounds): the reference and the reward models
        must stay exactly the base. The copy costs the adapted layers' base weights.
        """
        from peft.tuners.lora import LoraLayer

        layers = [
            module
            for module in self.peft.modules()
            if isinstance(module, LoraLayer) and POLICY in module.lora_A
        ]
        saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        try:
            for layer in layers:
                layer.merge(adapter_names=[POLICY])
            yield
        finally:
            with torch.no_grad():
                for layer, weight in zip(layers, saved, strict=True):
                    if layer.merged:
                        layer.unmerge()
                    layer.get_base_layer().weight.copy_(weight)

    def _response_logits(self, input_ids, attention_mask, query_length, temperature):
        hidden = self.trunk.hidden(input_ids, attention_mask, position_ids_for(attention_mask))
        # Position i predicts token i + 1: the response's logits start one before it (the
        # LM head runs on those positions only).
        head = self.peft.get_base_model().get_output_embeddings()
        return head(hidden[:, query_length - 1 : -1]) / temperature  # (B, T, V)

    def policy_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_length: int,
        temperature: float,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(response token) and optionally the policy's entropy: (B, T) each.

        ``input_ids`` is (B, L) = left-padded queries of length ``query_length`` followed by
        right-padded responses. Differentiable when gradients are enabled.
        """
        self._activate(POLICY)
        logits = self._response_logits(input_ids, attention_mask, query_length, temperature)
        logprobs = gather_logprobs(logits, input_ids[:, query_length:])
        entropy = entropy_from_logits(logits) if with_entropy else None
        return logprobs, entropy

    @torch.no_grad()
    def reference_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_length: int,
        temperature: float,
    ) -> torch.Tensor:
        """log pi_ref(response token) under the base with adapters disabled: (B, T)."""
        with self.peft.disable_adapter():
            logits = self._response_logits(input_ids, attention_mask, query_length, temperature)
        return gather_logprobs(logits, input_ids[:, query_length:])

    def values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_length: int
    ) -> torch.Tensor:
        """V(state before each response token): (B, T). Differentiable when enabled."""
        self._activate(CRITIC)
        hidden = self.trunk.hidden(
            input_ids, attention_mask, position_ids_for(attention_mask)
        )  # (B, L, H)
        hidden = hidden[:, query_length - 1 : -1].to(self.value_head.weight.dtype)  # (B, T, H)
        return self.value_head(hidden).squeeze(-1).float()  # (B, T)

    @torch.no_grad()
    def reward_scores(
        self, pole: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw scores of ``pole``'s reward model for right-padded texts: (B, L) -> (B,)."""
        adapter_name = self._reward_adapter_of[pole]
        self._activate(adapter_name)
        return read_scores(
            self.backbone, self.score_heads[adapter_name], input_ids, attention_mask,
            self.pad_token_id, self.trunk,
        )  # fmt: skip

    # -- state -----------------------------------------------------------------------
    def trainable_state(self) -> dict[str, Any]:
        """Policy and critic weights (adapters + value head), for checkpoints."""
        return {
            "policy": [p.detach().clone() for p in self._policy_params],
            "critic": [p.detach().clone() for p in self._critic_params],
        }

    def load_trainable_state(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for key, params in (("policy", self._policy_params), ("critic", self._critic_params)):
                if len(state[key]) != len(params):
                    raise PsoupsError(f"checkpoint's {key} does not match this model's shape")
                for parameter, saved in zip(params, state[key], strict=True):
                    parameter.copy_(saved)

    def save_policy(self, directory: str | Path) -> None:
        """The policy adapter as a plain PEFT directory (``PeftModel.from_pretrained``)."""
        self.peft.save_pretrained(str(directory), selected_adapters=[POLICY])
