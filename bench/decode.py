"""Decoding speed: the runtime's sampler against ``generate`` and this machine's bound.

    python bench/decode.py                 # SmolLM2-135M's shape, batch 32, 64 new tokens
    python bench/decode.py --all           # tiny and SmolLM2 shapes x batch 1/8/32/64
    python bench/decode.py --dtypes float32,bfloat16 --batches 8,32
    python bench/decode.py --smoke-test    # small sizes (CI runs this)

A Llama-style model with random weights at each shape (``tiny``: the tiny default's base;
``smollm2``: SmolLM2-135M's width, depth, heads and vocabulary) and three LoRA policies
(r=8 on every linear layer, random non-zero factors), then for each batch size and dtype
every row samples ``--new-tokens`` tokens from the full distribution (temperature 1, no
EOS: every variant does the same work) after a left-padded prompt:

- ``generate``: transformers' ``generate(do_sample=True, top_k=0)`` on the policy merged
  into a copy of the base, in the dtype;
- ``merged``: the runtime's :class:`~psoups_ray.runtime.sampling.Sampler` on that same
  model (as PPO rollouts and merged serving decode a single policy);
- ``mixing``: the sampler on the base with the three policies mixed per row, every row
  a different soup (as tune, evaluate and ``psoups serve`` decode);
- ``bound``: the matmuls alone, timed on this machine in this run: every layer's
  projections for the prompts' real tokens in one pass, then for every step at the step's
  row count, and the output head at each: what decoding cannot go below with these
  kernels. ``bound tokens/s`` = new tokens / that time.

Every variant is timed end to end (prompt and new tokens) ``--repeats`` times after a
warm-up, alternating; medians are printed, per step (one new token for each row). The
last line is ``RATIOS {...}``: for the default (first) configuration, ours (mixing) and
generate in tokens/s, the bound, and ``ours_vs_generate`` / ``ours_vs_bound``, all
measured in this run; ``rows`` holds every configuration's figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (128, 4, 4, 4, 344, 1000),
    "smollm2": (576, 30, 9, 3, 1536, 49152),
    "smoke": (64, 2, 4, 2, 128, 300),
}
POLICIES = 3
PROMPT_LENGTH = 48


def build(shape: str, seed: int = 0):
    """(base with the policies mixed, mixer, the first policy merged into a copy)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from psoups_ray.runtime.adapters import LoraAdapter
    from psoups_ray.runtime.mixing import attach_mixing

    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0,
        eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).eval().requires_grad_(False)
    base.generation_config.eos_token_id = None
    linears = {
        name: module
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    policies = []
    for index in range(POLICIES):
        a = {
            name: torch.randn(8, m.in_features) / m.in_features**0.5 for name, m in linears.items()
        }
        b = {name: torch.randn(m.out_features, 8) * 0.02 for name, m in linears.items()}
        policies.append(LoraAdapter(f"policy{index}", {"lora_alpha": 16, "r": 8}, a, b))
    merged = copy.deepcopy(base)
    with torch.no_grad():
        modules = dict(merged.named_modules())
        for name in linears:
            modules[name].weight += policies[0].delta(name)
    mixer = attach_mixing(base, policies)
    return base, mixer, merged


def step_matmuls(model, rows: int, dtype):
    """One forward's matmuls for ``rows`` token rows: (input (rows, in), weight (out, in))
    for every projection of every layer (q/k/v and gate/up packed, as the fast decoder runs
    them) and the output head (run on each sequence's last position only)."""
    import torch

    config = model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    shapes = [(hidden, qkv), (hidden, hidden), (hidden, 2 * inter), (inter, hidden)]
    pairs = []
    for _ in range(config.num_hidden_layers):  # distinct weights: streamed as in a step
        for fan_in, fan_out in shapes:
            weight = torch.randn(fan_out, fan_in, dtype=dtype)
            pairs.append((torch.randn(rows, fan_in, dtype=dtype), weight))
    return pairs


def head_matmul(model, rows: int, dtype):
    import torch

    config = model.config
    weight = torch.randn(config.vocab_size, config.hidden_size, dtype=dtype)
    return [(torch.randn(rows, config.hidden_size, dtype=dtype), weight)]


def measure(base, mixer, merged, dtype_name: str, batch: int, args) -> dict:
    """Every variant's median time for one configuration: a row of the table."""
    import torch
    import torch.nn.functional as F

    from psoups_ray.runtime.decoder import resolve_dtype
    from psoups_ray.runtime.sampling import Sampler, SampleRequest, SamplingParams

    dtype = resolve_dtype(dtype_name, torch.device("cpu"), torch.float32)
    if dtype != torch.float32:
        merged = copy.deepcopy(merged).to(dtype)
    steps, vocab = args.new_tokens, base.config.vocab_size
    generator = torch.Generator().manual_seed(batch)
    lengths = torch.randint(PROMPT_LENGTH // 2, PROMPT_LENGTH + 1, (batch,), generator=generator)
    prompts = [tuple(torch.randint(2, vocab, (int(n),), generator=generator).tolist())
               for n in lengths]  # fmt: skip
    soups = torch.rand((batch, POLICIES), generator=generator).tolist()
    mixing_requests = [
        SampleRequest(prompt, SamplingParams(steps, 1.0, seed=row), tuple(weights))
        for row, (prompt, weights) in enumerate(zip(prompts, soups, strict=True))
    ]
    merged_requests = [
        SampleRequest(prompt, SamplingParams(steps, 1.0, seed=row))
        for row, prompt in enumerate(prompts)
    ]
    mixing_sampler, merged_sampler = Sampler(base, None, mixer), Sampler(merged, None)
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros((batch, width), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    # The bound: the matmuls of the prompts' real tokens (one pass) and of every step.
    prompt_tokens = sum(len(p) for p in prompts)
    prefill = step_matmuls(base, prompt_tokens, dtype) + head_matmul(base, batch, dtype)
    step = step_matmuls(base, batch, dtype) + head_matmul(base, batch, dtype)

    def bound():
        for x, w in prefill:
            F.linear(x, w)
        for _ in range(steps):
            for x, w in step:
                F.linear(x, w)

    def generate():
        merged.generate(
            input_ids=input_ids, attention_mask=attention, do_sample=True, top_k=0, top_p=1.0,
            temperature=1.0, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0,
        )  # fmt: skip

    variants = {
        "bound": bound,
        "generate": generate,
        "merged": lambda: merged_sampler.complete(merged_requests, batch, dtype=dtype_name),
        "mixing": lambda: mixing_sampler.complete(mixing_requests, batch, dtype=dtype_name),
    }
    seconds = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, run in variants.items():
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    per_step = {name: statistics.median(times[1:]) / steps for name, times in seconds.items()}
    speed = {name: batch / per_step[name] for name in per_step}
    return {
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        **{f"{name}_ms_per_step": round(1000 * per_step[name], 2) for name in per_step},
        **{f"{name}_tokens_per_s": round(speed[name], 1) for name in per_step},
        "mixing_vs_generate": round(speed["mixing"] / speed["generate"], 2),
        "merged_vs_generate": round(speed["merged"] / speed["generate"], 2),
        "mixing_vs_bound": round(speed["mixing"] / speed["bound"], 3),
        "merged_vs_bound": round(speed["merged"] / speed["bound"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--batches", default="32", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", default="auto", help="comma-separated: auto, float32, bfloat16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--all", action="store_true", help="tiny and smollm2 x batch 1/8/32/64")
    parser.add_argument("--smoke-test", action="store_true", help="small sizes, one repeat")
    args = parser.parse_args()
    if args.all:
        args.shapes, args.batches = "smollm2,tiny", "32,1,8,64"
    if args.smoke_test:
        args.shapes, args.batches, args.new_tokens, args.repeats = "smoke", "4", 8, 1

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    rows = []
    for shape in args.shapes.split(","):
        base, mixer, merged = build(shape)
        for dtype_name in args.dtypes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                row = {"shape": shape, **measure(base, mixer, merged, dtype_name, batch, args)}
                rows.append(row)
                print(
                    f"{shape:>8} batch {batch:>3} {row['dtype']:>8}: "
                    + "  ".join(f"{name} {row[f'{name}_tokens_per_s']:8.1f} tok/s"
                                for name in ("bound", "generate", "merged", "mixing"))
                    + f"  | mixing {row['mixing_vs_generate']:.2f}x generate, "
                    f"{100 * row['mixing_vs_bound']:.0f}% of bound; merged "
                    f"{row['merged_vs_generate']:.2f}x, {100 * row['merged_vs_bound']:.0f}%",
                    flush=True,
                )  # fmt: skip
    first = rows[0]
    print("RATIOS " + json.dumps({
        "ours_tokens_per_s": first["mixing_tokens_per_s"],
        "ours_merged_tokens_per_s": first["merged_tokens_per_s"],
        "generate_tokens_per_s": first["generate_tokens_per_s"],
        "bound_tokens_per_s": first["bound_tokens_per_s"],
        "ours_vs_generate": first["mixing_vs_generate"],
        "ours_vs_bound": first["mixing_vs_bound"],
        "dtype": first["dtype"], "shape": first["shape"], "batch": first["batch"],
        "rows": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
