"""The runtime every stage runs on: loading, sampling, rewards. It imports no stage.

- :mod:`~psoups_ray.runtime.loading`: the one way to load a run's base (revision,
  ``trust_remote_code``, dtype, device), its tokenizer and any set of adapters: policies
  mixed in activation space (:mod:`~psoups_ray.runtime.mixing`), reward adapters with their
  score heads (:mod:`~psoups_ray.runtime.rewards`).
- :mod:`~psoups_ray.runtime.sampling`: the one KV-cache decode loop (per-row soup weights,
  per-row generators, temperature / top-k / top-p, stop strings, EOS, finished-row
  compaction, step-wise streaming) that PPO rollouts, feedback sampling, tune, evaluate
  and serving all call.
- :mod:`~psoups_ray.runtime.rewards`: the reward bank: adapters attached once,
  ``score(pole, prompts, responses)`` raw and normalised, one truncation rule.
- :mod:`~psoups_ray.runtime.adapters` and :mod:`~psoups_ray.runtime.merge`: LoRA adapters
  as tensors, and their soups merged into weights or adapter files.
"""
