"""Shared fixtures: one local Ray cluster per test session, tiny configs."""

from __future__ import annotations

import os

import pytest

# Before Ray starts: see psoups_ray.ray_utils.ensure_ray.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.umask(0o022)  # the usual one, which tests of the run directories' modes assume


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with fixed resources, shared by the session's tests.

    Its processes run Ray Train as on the local cluster `psoups run` starts (see
    ``ray_utils._init_ray``): without the helper actors a one-machine cluster that goes
    away with its driver has no use for (the preemption watcher, the placement-group
    cleaner), each one more process per run. The variables are set for the cluster's
    processes only: clusters the tests start with ``ray start`` keep Ray's defaults.
    """
    import ray

    from psoups_ray.ray_utils import LOCAL_CLUSTER_ENV

    lean = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", LOCAL_CLUSTER_ENV: "1"}
    before = {name: os.environ.get(name) for name in lean}
    os.environ.update(lean)
    try:
        context = ray.init(
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
        )
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    yield context
    ray.shutdown()


POLICY_DIMENSIONS = ("P2", "P3")  # informativeness and style: two dimensions to soup


def keep_dimensions(config, ids):
    """``config`` with its preference space cut to the dimensions ``ids`` (in place)."""
    from psoups_ray.preferences import PreferenceSpaceSpec

    dimensions = [d for d in config.preferences.dimensions if d.id in ids]
    config.preferences = PreferenceSpaceSpec(dimensions=dimensions)
    return config


# The session run's reward models are the ones test_rewards checks for accuracy: 200 pairs
# per pole leave 20 held out, enough to read an accuracy off, and LoRA on every layer (the
# tiny default adapts only the top 2 of 4, which reads the poles off the frozen layers below;
# the smoke base, 20 SFT steps, has not learnt them there: P3A held-out accuracy 0.65 after
# 30 steps; the default's 300-step base has, 0.95-1.00). More steps cost little next to a
# Ray Train run's start-up.
REWARD_TEST_OVERRIDES = (
    "feedback.pairs_per_pole=200",
    "rewards.steps=30",
    "rewards.lora.top_layers=null",
)


def policy_test_config(*overrides: str):
    """Smoke settings on a two-dimension space (P2 x P3), shared by the reward, policy and
    tune tests."""
    from psoups_ray.config import SMOKE_TEST_OVERRIDES, load_config

    config = load_config(None, [*SMOKE_TEST_OVERRIDES, *REWARD_TEST_OVERRIDES, *overrides])
    return keep_dimensions(config, POLICY_DIMENSIONS)


@pytest.fixture(scope="session")
def policy_run(ray_cluster, tmp_path_factory):
    """One smoke run through base, feedback, rewards and policies (every pole of P2 x P3
    plus the baselines), run by the first module that needs it and read (or copied) by the
    others."""
    from psoups_ray.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("policies") / "run"
    manifest = run_pipeline(policy_test_config(), str(out), ["policies"])
    return out, manifest


def tuned_test_config(*overrides: str):
    """:func:`policy_test_config` with 11-point Pareto fronts: the tune and later stages."""
    return policy_test_config("tune.pareto_points=11", *overrides)


@pytest.fixture(scope="session")
def tuned_run(policy_run, tmp_path_factory):
    """A copy of the policy run with the tune stage done (every P2 x P3 combination)."""
    import shutil

    from psoups_ray.pipeline import run_pipeline

    source, _ = policy_run
    out = tmp_path_factory.mktemp("tune") / "run"
    shutil.copytree(source, out)
    manifest = run_pipeline(tuned_test_config(), str(out), ["tune"], run_prerequisites=False)
    return out, manifest
