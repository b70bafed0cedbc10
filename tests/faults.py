"""Helpers of the fault tests: killing Ray Train workers, reading what Ray Train has
checkpointed, and watching the manifest while runs die."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from psoups_ray.training import checkpoint_step


def ray_processes_of(process_id: int, title: str) -> list[int]:
    """PIDs of the Ray processes titled ``title`` (e.g. ``ray::TrainController``) among a
    process's descendants: a local cluster started by ``ray.init`` descends from it."""
    import psutil

    found = []
    for child in psutil.Process(process_id).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(title):
                found.append(child.pid)
        except psutil.Error:  # exited meanwhile
            continue
    return found


def train_workers_of(process_id: int) -> list[int]:
    """PIDs of the Ray Train workers among a process's descendants (its own Ray cluster)."""
    return ray_processes_of(process_id, "ray::RayTrainWorker")


def checkpoint_steps(run: Path, stage: str) -> dict[str, int]:
    """Per Ray Train run of ``stage``, the step of the newest checkpoint Ray Train has
    registered (the one a restart resumes from)."""
    steps = {}
    for snapshot in run.glob(f"ray/{stage}/*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except ValueError:  # being rewritten: the next poll reads it
            continue
        if not latest:
            continue
        if "step" in latest["metrics"]:  # PPO reports its iteration
            steps[snapshot.parent.name] = int(latest["metrics"]["step"])
        else:  # a Hugging Face trainer's checkpoint knows its global step
            checkpoint = snapshot.parent / latest["checkpoint_dir_name"] / "checkpoint"
            steps[snapshot.parent.name] = checkpoint_step(str(checkpoint))
    return steps


class ManifestWatcher(threading.Thread):
    """Parses the manifest as fast as it can while runs are killed: it must always be
    whole, valid JSON (written to a temporary file and renamed)."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.reads, self.errors = path, 0, []
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                json.loads(self.path.read_text())
                self.reads += 1
            except FileNotFoundError:
                pass
            except ValueError as exc:
                self.errors.append(str(exc))
            time.sleep(0.005)
