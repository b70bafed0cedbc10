"""Decoding speed of a LoRA policy: transformers' ``generate`` vs our loop, unmerged and merged.

    python bench/generation.py               # the tiny default's shape, CPU (a GPU if present)
    python bench/generation.py --smoke-test  # small sizes, one repeat (CI runs this)

Builds a Llama-style model with random weights (size from --hidden/--layers/--vocab; the
default is the tiny world's base) and a policy LoRA on every linear layer with random,
non-zero factors, as :class:`SharedBasePPOModels` holds it, then samples ``--new-tokens``
tokens for ``--batch`` left-padded prompts (no EOS: every row decodes to the end, so every
variant does the same work) with the full distribution, as PPO rollouts do:

- ``hf``: ``PeftModel.generate(do_sample=True, top_k=0)``;
- ``loop``: the runtime's :class:`~psoups_ray.runtime.sampling.Sampler` on the same adapted
  model (each row from its own generator);
- ``merged``: the same loop inside ``SharedBasePPOModels.sampling(merged=True)`` (the policy
  LoRA merged into the base weights, restored exactly afterwards: PPO's default).

Variants alternate over ``--repeats`` rounds; medians are printed, then
``RATIOS {"loop": t_loop / t_hf, "merged": t_merged / t_hf}`` measured in this one run,
whether ``loop`` decodes greedily the exact tokens of ``hf``'s greedy ``generate``, and
whether ``merged`` restored the base weights bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(args):
    import torch
    from peft import LoraConfig, TaskType
    from transformers import LlamaConfig, LlamaForCausalLM

    from psoups_ray.policies.models import SharedBasePPOModels

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32),
        max_position_embeddings=args.prompt_length + args.new_tokens + 8,
        pad_token_id=0,
        eos_token_id=1,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear")
    models = SharedBasePPOModels(base, lora, {}, None)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would make merging a no-op
        for name, parameter in models.peft.named_parameters():
            if ".default." in name and "lora_B" in name:
                parameter.normal_(std=0.02)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--smoke-test", action="store_true", help="small sizes, one repeat")
    args = parser.parse_args()
    if args.smoke_test:
        args.hidden, args.layers, args.vocab = 64, 2, 200
        args.batch, args.prompt_length, args.new_tokens, args.repeats = 4, 8, 12, 1

    import torch

    from psoups_ray.runtime.sampling import Sampler, SampleRequest, SamplingParams

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = build(args).to(device)
    lengths = torch.randint(args.prompt_length // 2, args.prompt_length + 1, (args.batch,))
    input_ids = torch.randint(2, args.vocab, (args.batch, args.prompt_length), device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths.tolist()):  # left padding
        attention_mask[row, args.prompt_length - length :] = 1
        input_ids[row, : args.prompt_length - length] = 0
    models.peft.generation_config.eos_token_id = None  # every row decodes to the end
    sampling = dict(
        temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    base_weights = {
        name: p.detach().clone()
        for name, p in models.peft.named_parameters()
        if "base_layer" in name
    }
    sampler = Sampler(models.peft.get_base_model(), None)
    prompts = [
        tuple(row[mask.bool()].tolist())
        for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
    ]

    def requests(temperature: float = 1.0) -> list[SampleRequest]:
        return [
            SampleRequest(ids, SamplingParams(args.new_tokens, temperature, seed=index))
            for index, ids in enumerate(prompts)
        ]

    def loop(temperature: float = 1.0) -> torch.Tensor:
        completions = sampler.complete(requests(temperature), len(prompts))
        return torch.tensor([c.token_ids for c in completions])

    def merged() -> torch.Tensor:
        with models.sampling(merged=True):
            return loop()

    def hf(do_sample: bool = True):
        output = models.peft.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=do_sample, **sampling
        )
        return output[:, input_ids.shape[1] :]

    variants = {"hf": hf, "loop": loop, "merged": merged}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    tokens = {}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, run in variants.items():
                torch.manual_seed(1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                tokens[name] = run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - started)
    restored = all(
        torch.equal(p, base_weights[name])
        for name, p in models.peft.named_parameters()
        if "base_layer" in name
    )
    steps = tokens["hf"].shape[1]
    print(
        f"{args.batch} prompts x {steps} new tokens, {args.layers} layers of {args.hidden}, "
        f"vocab {args.vocab}, LoRA r=8 on every linear layer, {device.type}"
    )
    median = {}
    for name, times in seconds.items():
        median[name] = statistics.median(times[1:])
        print(f"{name:>7}: {median[name]:.3f} s ({1000 * median[name] / steps:.2f} ms per step)")
    with torch.no_grad():
        same = bool(torch.equal(hf(do_sample=False).cpu(), loop(temperature=0.0)))
    print(
        f"loop decodes greedily the tokens of hf's greedy generate: {same}; "
        f"base weights restored after merging: {restored}"
    )
    ratios = {name: round(median[name] / median["hf"], 3) for name in ("loop", "merged")}
    print("RATIOS " + json.dumps({**ratios, "greedy_equals_hf": same, "restored": restored}))


if __name__ == "__main__":
    main()
