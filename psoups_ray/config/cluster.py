"""``ray``: how to reach (or start) the Ray cluster."""

from __future__ import annotations

from pydantic import Field

from psoups_ray.config.common import StrictModel


class RayConfig(StrictModel):
    """How to reach (or start) the Ray cluster."""

    address: str | None = None
    """Address of a running Ray cluster (``ray://host:10001`` or ``auto``). Empty: use
    ``RAY_ADDRESS`` when set (as under ``ray job submit``), otherwise start a local cluster."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of a newly started local cluster (default: all of this machine's)."""
    num_gpus: int | None = Field(default=None, ge=0)
    """GPUs of a newly started local cluster (default: all visible)."""
    include_dashboard: bool = True
    """Start the Ray dashboard with a local cluster (bound to ``dashboard_host``). Ray
    Train's controller queries the state API it hosts to clean up after failed runs."""
    max_concurrent_runs: int | None = Field(default=None, ge=1)
    """Ray Train runs of a stage launched at a time, in the stage's order (the longest
    first). Empty: as many as the cluster's CPUs and GPUs hold, re-read as runs finish.
    Set it on an autoscaling cluster, where the runs that do not fit yet must be
    requested for the autoscaler to add nodes."""
    dashboard_host: str = "127.0.0.1"
    """Interface the dashboard of a local cluster binds to; keep 127.0.0.1 unless you
    put authentication in front of it."""
