"""Which of Ray Train's per-run helper actors our runs start."""

from __future__ import annotations

import pytest
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


def test_runs_with_ray_datasets_keep_their_manager():
    import ray.data

    trainer = ray_utils._trainer_class()(
        lambda config: None,
        scaling_config=ScalingConfig(num_workers=1),
        datasets={"train": ray.data.range(4)},
    )
    names = [type(callback).__name__ for callback in trainer._create_default_callbacks()]
    assert "DatasetsCallback" in names
