"""GPU check of the base stage's training path: TRL SFT in bf16 over NCCL DDP.

Run with torchrun on a CUDA machine (Ray not needed; this exercises the same
``run_sft`` the Ray Train workers run, with the process group torchrun sets up):

    torchrun --nproc_per_node=1 scripts/gpu_check_base.py /tmp/gpu-run [--steps 200]

Prints one JSON line with the device, the loss curve end points, the time per
step and the per-pole attribute rates of the result.
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

    from psoups_ray.base.sft import run_sft
    from psoups_ray.base.stage import prepare_tiny_sft, summarize_tiny_sft
    from psoups_ray.config import load_config
    from psoups_ray.rundir import RunDir

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()  # without one: a CPU dry run of this script (gloo)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    config = load_config(
        None,
        [
            f"base.sft.steps={args.steps}",
            f"base.sft.resources.use_gpu={str(on_gpu).lower()}",
            f"base.dtype={'bfloat16' if on_gpu else 'float32'}",
        ],
    )
    rundir = RunDir(args.out)
    job = prepare_tiny_sft(config, rundir) if dist.get_rank() == 0 else None
    jobs = [job]
    dist.broadcast_object_list(jobs, src=0)
    started = time.monotonic()
    metrics = run_sft(jobs[0])
    seconds = time.monotonic() - started
    if dist.get_rank() == 0:
        section = summarize_tiny_sft(config, rundir, rundir.read_json("base/metrics.json"))
        report = {
            "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "backend": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "torch": torch.__version__,
            "steps": metrics["steps"],
            "train_loss": metrics["train_loss"],
            "seconds_total": round(seconds, 1),
            "train_seconds": metrics["train_seconds"],
            "seconds_per_step": round(metrics["train_seconds"] / metrics["steps"], 4),
            "attribute_rates": section["metrics"]["attribute_rates"],
            "on_topic_rate": section["metrics"]["on_topic_rate"],
        }
        print("GPU_CHECK " + json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
