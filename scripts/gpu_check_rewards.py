"""GPU check of reward-model training: TRL RewardTrainer + LoRA in bf16 over NCCL, plain
and with DeepSpeed ZeRO-2.

    torchrun --nproc_per_node=1 scripts/gpu_check_rewards.py BASE_MODEL_DIR /tmp/gpu-rewards

BASE_MODEL_DIR is a base model directory (e.g. RUN/base/model of a tiny run). Ray is not
needed: this runs the same ``run_reward_training`` the Ray Train workers run, in the
process group torchrun sets up. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    import torch.distributed as dist

    from psoups_ray.config import load_config
    from psoups_ray.feedback.rows import EVAL_PATH, TRAIN_PATH, write_rows
    from psoups_ray.feedback.stage import world_feedback
    from psoups_ray.rewards.train import RewardJob, run_reward_training
    from psoups_ray.rundir import RunDir

    parser = argparse.ArgumentParser()
    parser.add_argument("base_model")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()  # without one: a CPU dry run (gloo)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rundir = RunDir(args.out)
    for pole, deepspeed in (("P3A", False), ("P1B", True)):
        config = load_config(
            None,
            [
                f"rewards.steps={args.steps}",
                f"rewards.resources.use_gpu={str(on_gpu).lower()}",
                f"base.dtype={'bfloat16' if on_gpu else 'float32'}",
                f"rewards.deepspeed.enabled={str(deepspeed).lower()}",
            ],
        )
        if dist.get_rank() == 0:
            train, eval_rows = world_feedback(config)
            write_rows(rundir, TRAIN_PATH, train)
            write_rows(rundir, EVAL_PATH, eval_rows)
        dist.barrier()
        space = config.space
        job = RewardJob(
            run_location=rundir.location,
            name=pole,
            poles=(pole,),
            conditioned=False,
            preference_prompts={p: space.pole(p).prompt for p in space.pole_ids},
            base_model_path=args.base_model,
            tokenizer_path=args.base_model,
            base=config.base,
            rewards=config.rewards,
            seed=0,
            output_relpath=f"rewards/{pole}/adapter",
            metrics_relpath=f"rewards/{pole}/metrics.json",
        )
        started = time.monotonic()
        metrics = run_reward_training(job)
        if dist.get_rank() == 0:
            report = {
                "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                "backend": dist.get_backend(),
                "pole": pole,
                "deepspeed_stage": metrics["deepspeed_stage"],
                "dtype": config.base.dtype,
                "steps": metrics["steps"],
                "train_loss": round(metrics["train_loss"], 4),
                "seconds": round(time.monotonic() - started, 1),
                "train_seconds": round(metrics["finished_at"] - metrics["started_at"], 1),
                "held_out_accuracy": metrics["eval"][pole]["accuracy"],
            }
            print("GPU_CHECK " + json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
