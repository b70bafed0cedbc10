"""Shared fixtures: one local Ray cluster per test session, tiny configs."""

from __future__ import annotations

import os

import pytest

# Before Ray starts: see psoups_ray.ray_utils.ensure_ray.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with fixed resources, shared by the session's tests."""
    import ray

    context = ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
    )
    yield context  # .dashboard_url: the job server for `ray job submit`
    ray.shutdown()
