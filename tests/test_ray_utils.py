"""Which of Ray Train's per-run helper actors our runs start, and that they go away."""

from __future__ import annotations

import os
import signal
import time

import pytest
from faults import ray_processes_of
from ray.train import ScalingConfig

from psoups_ray import ray_utils


@pytest.mark.parametrize("local", ["0", "1"])
def test_runs_skip_the_dataset_actor_and_on_our_own_cluster_the_cleaner(monkeypatch, local):
    monkeypatch.setenv(ray_utils.LOCAL_CLUSTER_ENV, local)
    trainer = ray_utils._trainer_class()(
        lambda config: None, scaling_config=ScalingConfig(num_workers=1)
    )
    names = [type(callback).__name__ for callback in trainer._create_default_callbacks()]
    assert "BackendSetupCallback" in names  # the process group is still set up
    assert "DatasetsCallback" not in names
    assert ("PlacementGroupCleanerCallback" in names) == (local == "0")


def test_runs_with_ray_datasets_keep_their_manager(ray_cluster):  # Ray Data starts Ray
    import ray.data

    trainer = ray_utils._trainer_class()(
        lambda config: None,
        scaling_config=ScalingConfig(num_workers=1),
        datasets={"train": ray.data.range(4)},
    )
    names = [type(callback).__name__ for callback in trainer._create_default_callbacks()]
    assert "DatasetsCallback" in names


@pytest.mark.integration
def test_a_finished_run_leaves_no_controller_and_the_sigint_handler_is_restored(
    ray_cluster, tmp_path
):
    from psoups_ray.config import ScalingSpec
    from psoups_ray.rundir import RunDir

    def controllers() -> list[int]:  # of the cluster this process started
        return ray_processes_of(os.getpid(), "ray::TrainController")

    handler = signal.getsignal(signal.SIGINT)
    # The loop: len(config), a no-op that workers can unpickle (a function of this test
    # module is pickled by reference, and the module is not importable in Ray workers).
    ray_utils.fit_torch_run(len, {}, ScalingSpec(), RunDir(tmp_path), "test", "one")
    # Ray Train's fit() registers a handler holding the controller's actor handle; left
    # in place, it kept each process's last controller alive (and polling) for good.
    assert signal.getsignal(signal.SIGINT) is handler
    deadline = time.monotonic() + 60
    while controllers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert controllers() == []
