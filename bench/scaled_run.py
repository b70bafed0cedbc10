"""A run directory with a bigger base, for benchmarks whose costs scale with the model.

The tiny default's 0.9M-parameter base makes every weight operation nearly free (a merge
copies 4 MB), so it cannot show what serving strategies cost on a real model. This
builds a run directory with the source run's tokenizer, preference space and tuned
weights, but a randomly initialised Llama base of the given width and depth and, per
pole, a random LoRA adapter of the source's rank on every linear layer. Outputs are
meaningless text; shapes, FLOPs and bytes are those of the bigger model, which is all
a throughput benchmark measures.

    python bench/scaled_run.py --run runs/tiny --out /tmp/scaled --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_scaled_run(source: str, out: str, hidden: int, layers: int, seed: int = 0) -> str:
    """Write the scaled run directory ``out``; returns it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from psoups_ray.artifacts import RunArtifacts
    from psoups_ray.runtime.adapters import read_lora_adapter
    from psoups_ray.runtime.loading import load_base_tokenizer

    run = RunArtifacts.load(source)
    data = run.data
    target = Path(out)
    if target.exists():
        raise SystemExit(f"{target} exists; choose a new --out")
    tokenizer = load_base_tokenizer(run.base)
    original = AutoConfig.from_pretrained(run.base.local_model())
    heads = max(1, hidden // 64)
    config = original.__class__(
        **{
            **original.to_dict(),
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "intermediate_size": int(hidden * 8 / 3) // 64 * 64,
        }
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    base_dir = target / "base" / "model"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    parameters = sum(p.numel() for p in model.parameters())

    policies = {}
    for index, (pole, artifact) in enumerate(run.trained_policies().items()):
        template = read_lora_adapter(artifact.local_dir(), pole).config
        lora = LoraConfig(
            r=template["r"], lora_alpha=template["lora_alpha"], target_modules="all-linear",
            task_type="CAUSAL_LM",
        )  # fmt: skip
        torch.manual_seed(seed + 1 + index)
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
        with torch.no_grad():  # B starts at zero in PEFT: make the update non-trivial
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.02)
        adapter_dir = target / "policies" / pole / "adapter"
        peft_model.save_pretrained(adapter_dir)
        policies[pole] = {"kind": "pole", "path": f"./policies/{pole}/adapter", "metrics": {}}

    manifest = {
        **{key: data[key] for key in ("schema_version", "psoups_version", "preferences")},
        "created_at": data["created_at"],
        "updated_at": data["updated_at"],
        "config": data["config"],
        "stages": {},
        "base": {
            "model": f"random llama {hidden}x{layers}",
            "model_path": "./base/model",
            "tokenizer_path": "./base/model",
            "metrics": {"num_parameters": parameters},
        },
        "policies": policies,
        "tuned_weights": data.get("tuned_weights") or {},
    }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"scaled run: {target} ({parameters / 1e6:.1f}M-parameter base, "
          f"{len(policies)} pole adapters)")  # fmt: skip
    return str(target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="source run directory (tokenizer, poles)")
    parser.add_argument("--out", required=True, help="new run directory")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    if args.hidden < 64 or args.hidden % 64 or args.layers < 1:
        raise SystemExit("--hidden must be a multiple of 64 (>= 64), --layers >= 1")
    make_scaled_run(args.run, args.out, args.hidden, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
