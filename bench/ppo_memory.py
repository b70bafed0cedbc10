"""Peak memory and PPO step time: one shared frozen base vs four separate model copies.

    python bench/ppo_memory.py              # CPU here; a GPU is used when present
    python bench/ppo_memory.py --smoke-test # tiny sizes, one step (CI runs this)

Each layout runs in a fresh subprocess (so peaks do not mix): it builds a Llama-style model
(random weights; size from --hidden/--layers/--vocab), a reward adapter (LoRA + score head,
saved like the rewards stage saves one), and runs ``--steps`` PPO iterations of our
:class:`PPOTrainer` after one warm-up.

- ``shared``: :class:`SharedBasePPOModels`, one base with policy, critic and reward
  adapters; the reference is the base with adapters disabled.
- ``separate``: a policy model (base copy + LoRA), a frozen reference copy, a critic (base
  copy + LoRA + value head) and a reward model (base copy as sequence classifier + its
  adapter): the layout of PPO implementations that load each role as its own model.

Memory is the peak resident set (CPU; ``ru_maxrss``) or ``torch.cuda.max_memory_allocated``
(GPU) above what the process held before building the models. Prints both layouts and the
ratios shared / separate measured in this one run (target: memory <= 0.5, time <= ~1).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class SeparateCopiesPPOModels:
    """The four-model layout, with the same methods as ``SharedBasePPOModels``."""

    def __init__(self, base_model, policy_lora, reward_dir: str, pad_token_id: int):
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForSequenceClassification

        from psoups_ray.runtime.batching import position_ids_for

        self._positions = position_ids_for
        self.pad_token_id = pad_token_id
        self.reference = copy.deepcopy(base_model).requires_grad_(False).eval()
        self.policy = get_peft_model(copy.deepcopy(base_model), policy_lora).eval()
        critic_base = copy.deepcopy(base_model.base_model)  # backbone only, no LM head
        # (PEFT rewrites a config's "all-linear" into module paths when it applies it.)
        critic_lora = LoraConfig(
            r=policy_lora.r, lora_alpha=policy_lora.lora_alpha, target_modules="all-linear"
        )
        self.critic = get_peft_model(critic_base, critic_lora).eval()
        self.value_head = torch.nn.Linear(base_model.config.hidden_size, 1)
        with tempfile.TemporaryDirectory() as directory:
            base_model.save_pretrained(directory)
            reward_base = AutoModelForSequenceClassification.from_pretrained(
                directory, num_labels=1
            )
        reward_base.config.pad_token_id = pad_token_id
        self.reward = PeftModel.from_pretrained(reward_base, reward_dir).requires_grad_(False)
        self.reward.eval()
        del base_model

    def to(self, device):
        for module in (self.reference, self.policy, self.critic, self.value_head, self.reward):
            module.to(device)
        return self

    def policy_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad]

    def critic_parameters(self):
        return [p for p in self.critic.parameters() if p.requires_grad] + list(
            self.value_head.parameters()
        )

    @property
    def peft(self):
        return self.policy

    @contextlib.contextmanager
    def sampling(self, reference=False, merged=False):
        yield self.reference if reference else self.policy.get_base_model()

    def _logprobs(self, model, input_ids, attention_mask, query_length, temperature):
        from psoups_ray.policies.ppo_math import entropy_from_logits, gather_logprobs

        logits = (
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=self._positions(attention_mask),
                use_cache=False,
            ).logits[:, query_length - 1 : -1]
            / temperature
        )
        return gather_logprobs(logits, input_ids[:, query_length:]), entropy_from_logits(logits)

    def policy_logprobs(
        self, input_ids, attention_mask, query_length, temperature, with_entropy=False
    ):
        logprobs, entropy = self._logprobs(
            self.policy, input_ids, attention_mask, query_length, temperature
        )
        return logprobs, entropy if with_entropy else None

    def reference_logprobs(self, input_ids, attention_mask, query_length, temperature):
        import torch

        with torch.no_grad():
            return self._logprobs(
                self.reference, input_ids, attention_mask, query_length, temperature
            )[0]

    def values(self, input_ids, attention_mask, query_length):
        hidden = self.critic(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=self._positions(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return self.value_head(hidden[:, query_length - 1 : -1]).squeeze(-1).float()

    def reward_scores(self, pole, input_ids, attention_mask):
        import torch

        with torch.no_grad():
            return self.reward(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    def trainable_state(self):
        return {}

    def load_trainable_state(self, state):
        pass


def run_layout(layout: str, args) -> dict:
    """Build one layout, run PPO iterations, return its measurements (in this process)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from psoups_ray.base.tokenizer import train_bpe_tokenizer
    from psoups_ray.config import PolicyConfig
    from psoups_ray.policies.models import SharedBasePPOModels
    from psoups_ray.policies.trainer import PPOTrainer, Query
    from psoups_ray.runtime.rewards import RewardAdapter, reward_input, score_right_padded
    from psoups_ray.world import TinyWorld

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = TinyWorld()
    tokenizer = train_bpe_tokenizer(world.corpus(seed=0, n=800), vocab_size=args.vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    workdir = Path(tempfile.mkdtemp(prefix="psoups-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # leave nothing in /tmp
    base_dir, reward_dir = workdir / "base", workdir / "reward"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    lora = dict(r=8, lora_alpha=16, target_modules="all-linear")
    reward = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1),
        LoraConfig(task_type=TaskType.SEQ_CLS, **lora),
    )
    with torch.no_grad():  # a reward adapter that is not the identity
        for name, parameter in reward.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    reward.save_pretrained(reward_dir)
    (reward_dir / "reward_stats.json").write_text(
        json.dumps({"conditioned": False, "P": {"score_mean": 0.0, "score_std": 1.0}})
    )
    del reward
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    before = _rss_mib() if device.type == "cpu" else before

    base_model = LlamaForCausalLM.from_pretrained(base_dir)
    policy_lora = LoraConfig(task_type=TaskType.CAUSAL_LM, **lora)
    adapter = RewardAdapter("P", str(reward_dir), False, 0.0, 1.0)
    if layout == "shared":
        models = SharedBasePPOModels(base_model, policy_lora, {"P": adapter}, None).to(device)
    else:
        models = SeparateCopiesPPOModels(
            base_model, policy_lora, str(reward_dir), tokenizer.pad_token_id
        ).to(device)
    del base_model
    spec = PolicyConfig(
        rollout_batch_size=args.batch,
        minibatch_size=args.batch // 2,
        ppo_epochs=2,
        # unmerged sampling in both layouts: merging holds a copy of the adapted weights,
        # which this benchmark of the layouts' memory should not count
        generation={"max_new_tokens": args.new_tokens, "merged": False},
    )

    def reward_fn(queries, texts):  # both layouts score through their reward_scores
        pairs = zip(queries, texts, strict=True)
        inputs = ["".join(reward_input(tokenizer, q.prompt, t)) for q, t in pairs]
        return score_right_padded(
            tokenizer, inputs, args.batch // 2,
            lambda ids, mask: models.reward_scores("P", ids.to(device), mask.to(device)), 512,
        )  # fmt: skip

    trainer = PPOTrainer(models, tokenizer, spec, reward_fn, device=device)
    prompts = world.train_prompts
    timings = []
    for step in range(args.steps + 1):  # the first is warm-up
        queries = [
            Query(prompts[(step * args.batch + i) % len(prompts)], None, ("P",))
            for i in range(args.batch)
        ]
        started = time.perf_counter()
        trainer.step(queries)
        if step > 0 or args.steps == 0:
            timings.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    parameters = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return {
        "layout": layout,
        "device": str(device),
        "base_parameters": parameters,
        "peak_mib": round(peak - before, 1),
        "step_seconds": round(sum(timings) / len(timings), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, one step")
    parser.add_argument("--layout", choices=["shared", "separate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke_test:
        args.hidden, args.layers, args.vocab, args.batch = 64, 2, 400, 4
        args.new_tokens, args.steps = 8, 1
    if args.layout:  # the child process: measure one layout, print JSON
        print("RESULT " + json.dumps(run_layout(args.layout, args)))
        return 0
    results = {}
    for layout in ("shared", "separate"):
        command = [sys.executable, __file__, "--layout", layout, *sys.argv[1:]]
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            sys.stderr.write(output.stderr[-3000:])
            return 1
        results[layout] = json.loads(lines[-1].removeprefix("RESULT "))
        r = results[layout]
        print(
            f"{layout:>9}: peak memory {r['peak_mib']:8.1f} MiB   "
            f"PPO step {r['step_seconds']:.3f} s"
            f"   ({r['device']}, base {r['base_parameters'] / 1e6:.1f}M parameters)"
        )
    shared, separate = results["shared"], results["separate"]
    memory_ratio = shared["peak_mib"] / separate["peak_mib"]
    time_ratio = shared["step_seconds"] / separate["step_seconds"]
    print(f"memory ratio shared/separate: {memory_ratio:.2f} (target <= 0.5)")
    print(f"step time ratio shared/separate: {time_ratio:.2f} (target: not slower, ~1.0)")
    print("RATIOS " + json.dumps({"memory": round(memory_ratio, 3), "time": round(time_ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
