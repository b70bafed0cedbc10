"""SFT steps on the tiny world: whole padded batches vs length-sorted micro-batches.

    python bench/micro_batches.py               # the tiny default's SFT, 40 steps, 1 thread
    python bench/micro_batches.py --smoke-test  # small sizes, one repeat (CI runs this)

Builds the tiny default's tokenizer, SFT data and freshly initialised base (as the base
stage does), then trains ``--steps`` steps of TRL's SFTTrainer with the tiny config's
settings twice per round: ``whole`` (each batch in one pass, padded to its longest row)
and ``micro`` (``base.sft.micro_batch_size`` rows per pass, sorted by length, gradients
accumulated: :class:`psoups_ray.training.MicroBatchMixin`). Variants alternate over
``--repeats`` rounds; medians are printed, then ``RATIOS {"micro": t_micro / t_whole}``
measured in this one run, the batches' padding (padded tokens / real tokens) both ways,
and whether both variants ended with the same training loss (they take the same steps up
to float rounding).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--smoke-test", action="store_true", help="small sizes, one repeat")
    args = parser.parse_args()
    overrides = []
    if args.smoke_test:
        args.steps, args.repeats = 3, 1
        overrides = ["base.sft.num_examples=64", "base.sft.batch_size=16"]

    import torch
    import transformers
    from datasets import Dataset

    from psoups_ray.base import sft
    from psoups_ray.base.model import build_tiny_model
    from psoups_ray.base.stage import prepare_tiny_sft
    from psoups_ray.config import load_config
    from psoups_ray.rundir import RunDir
    from psoups_ray.runtime.loading import load_tokenizer
    from psoups_ray.training import length_sorted_groups

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    config = load_config("tiny", overrides + [f"base.sft.steps={args.steps}"])
    workdir = Path(tempfile.mkdtemp(prefix="psoups-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # leave nothing in /tmp
    rundir = RunDir(str(workdir / "run"))
    job = prepare_tiny_sft(config, rundir)
    tokenizer = load_tokenizer(str(rundir.local_dir(job.tokenizer_relpath)))
    rows = [json.loads(line) for line in rundir.read_text(job.data_relpath).splitlines()]
    dataset = Dataset.from_list(rows)

    padding: dict[str, list[float]] = {"whole": [], "micro": []}

    def train(micro_batch_size: int | None) -> tuple[float, float]:
        args_ = sft._training_args(job, str(workdir / "out"))
        args_.save_strategy = "no"
        trainer = sft.LengthSortedSFTTrainer(
            model=build_tiny_model(config.base.tiny, tokenizer, seed=0),
            args=args_,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.micro_batch_size = micro_batch_size
        trainer.remove_callback(transformers.PrinterCallback)
        started = time.perf_counter()
        output = trainer.train()
        return time.perf_counter() - started, output.training_loss

    # Padding of the batches the trainer draws, both ways (from the first 20 batches).
    probe = sft._training_args(job, str(workdir / "probe"))
    trainer = sft.LengthSortedSFTTrainer(
        model=build_tiny_model(config.base.tiny, tokenizer, seed=0),
        args=probe,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    for index, batch in enumerate(trainer.get_train_dataloader()):
        if index == 20:
            break
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        real = sum(lengths)
        padding["whole"].append(max(lengths) * len(lengths) / real)
        groups = length_sorted_groups(lengths, args.micro_batch_size)
        padding["micro"].append(sum(max(lengths[i] for i in g) * len(g) for g in groups) / real)

    seconds: dict[str, list[float]] = {"whole": [], "micro": []}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, size in (("whole", None), ("micro", args.micro_batch_size)):
            took, losses[name] = train(size)
            seconds[name].append(took)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    batch = config.base.sft.batch_size
    print(
        f"{args.steps} SFT steps of {batch} tiny-world examples, {args.threads} thread(s); "
        f"micro-batches of {args.micro_batch_size} rows"
    )
    for name in ("whole", "micro"):
        print(
            f"{name:>6}: {median[name]:.2f} s, padded/real tokens "
            f"{statistics.mean(padding[name]):.2f}, final training loss {losses[name]:.7f}"
        )
    same = abs(losses["micro"] - losses["whole"]) <= 1e-4 * abs(losses["whole"])
    print(f"same training loss (rel. 1e-4): {same}")
    print(
        "RATIOS "
        + json.dumps({"micro": round(median["micro"] / median["whole"], 3), "same_loss": same})
    )


if __name__ == "__main__":
    main()
