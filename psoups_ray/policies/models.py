"""Policy, critic, reference and reward models of a PPO run on one frozen base.

One copy of the base weights serves every role (DESIGN.md, "Training on Ray"):

- policy: LoRA adapter ``default`` (so that it saves as a plain PEFT adapter directory);
- critic: LoRA adapter ``critic`` + a linear value head on the last hidden state;
- reference: the base with adapters disabled;
- rewards: each pole's reward adapter, attached by the runtime's
  :class:`~psoups_ray.runtime.rewards.RewardBank` (the one scoring rule of every stage).

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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from psoups_ray.errors import PsoupsError
from psoups_ray.policies.ppo_math import entropy_from_logits, gather_logprobs
from psoups_ray.runtime.batching import position_ids_for
from psoups_ray.runtime.decoder import weights_changed
from psoups_ray.runtime.rewards import (
    RewardAdapter,
    RewardBank,
    load_reward_weights,
    reward_lora_config,
)
from psoups_ray.runtime.trunk import TrunkCache, first_adapted_layer

POLICY = "default"
CRITIC = "critic"


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
        tokenizer: the base's tokenizer (None: reward scores of token rows only).
        preference_prompts: pole -> preference prompt (conditioned reward models).
        reward_max_length: ``rewards.max_length``, the reward models' truncation.
        reward_batch_size: texts per reward forward pass.
    """

    def __init__(
        self,
        base_model: nn.Module,
        policy_lora: LoraConfig,
        rewards: Mapping[str, RewardAdapter],
        critic_from: str | None,
        tokenizer=None,
        preference_prompts: Mapping[str, str] | None = None,
        reward_max_length: int | None = None,
        reward_batch_size: int = 16,
    ):
        super().__init__()
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        self.peft: PeftModel = get_peft_model(base_model, policy_lora, adapter_name=POLICY)
        hidden_size = base_model.config.hidden_size
        self.rewards = RewardBank(
            self.peft, rewards, tokenizer, preference_prompts, reward_max_length,
            reward_batch_size, activate=self._activate,
        )  # fmt: skip
        self.score_heads = nn.ModuleDict(self.rewards.heads)  # moved with the model
        self.value_head = nn.Linear(hidden_size, 1)
        if critic_from is not None:
            source = self.rewards.adapters[critic_from]
            self.peft.add_adapter(CRITIC, reward_lora_config(source.directory))
            load_reward_weights(self.peft, CRITIC, source.directory)
            with torch.no_grad():
                head = self.rewards.heads[self.rewards.adapter_name(critic_from)]
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
        self.rewards.trunk = self.trunk  # reward inputs share the trunk pass too

    # -- building ------------------------------------------------------------------
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
    @contextlib.contextmanager
    def sampling(self, reference: bool = False, merged: bool = False) -> Iterator[nn.Module]:
        """The causal LM to sample the policy (or, ``reference``, the base) from, for the
        duration (:class:`psoups_ray.runtime.sampling.Sampler` decodes with it). ``merged``:
        the policy adapter merged into the base weights (the same policy, without the
        adapter's per-layer overhead; see :meth:`policy_merged`)."""
        self._activate(POLICY)
        if reference:
            context = self.peft.disable_adapter()
        elif merged:
            context = self.policy_merged()
        else:
            context = contextlib.nullcontext()
        with context:
            yield self.peft.get_base_model()

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
        base = self.peft.get_base_model()
        try:
            for layer in layers:
                layer.merge(adapter_names=[POLICY])
            weights_changed(base)
            yield
        finally:
            with torch.no_grad():
                for layer, weight in zip(layers, saved, strict=True):
                    if layer.merged:
                        layer.unmerge()
                    layer.get_base_layer().weight.copy_(weight)
            weights_changed(base)

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
        return self.rewards.token_scores(pole, input_ids, attention_mask)

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
