"""Ray clusters started by tests in their own processes and temp dirs, on 127.0.0.1.

Never ``ray stop``: it would stop every Ray on the machine, the session's cluster too.
A cluster here is stopped by ending the processes that name its own temp dir.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY_CLI = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_processes_naming(marker: str, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL, every process whose command line holds ``marker``."""
    mine = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or ()):
                mine.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in mine:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


class RayStartCluster:
    """``ray start --head`` on 127.0.0.1 with its own temp dir and ports; a context manager
    whose ``dashboard_url`` takes ``ray job submit``."""

    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="psr-", dir="/tmp")  # short: socket paths
        self.dashboard_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> RayStartCluster:
        ports = {
            "--port": free_port(),
            "--dashboard-port": self.dashboard_port,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--ray-client-server-port": free_port(),
        }
        command = [
            RAY_CLI, "start", "--head", "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
            "--num-cpus", str(self.num_cpus), "--temp-dir", self.temp_dir,
            "--disable-usage-stats",
            *[str(part) for option, port in ports.items() for part in (option, port)],
        ]  # fmt: skip
        started = subprocess.run(command, capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")
        self._wait_for_job_server()
        return self

    def _wait_for_job_server(self, timeout_s: float = 120.0) -> None:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                JobSubmissionClient(self.dashboard_url).list_jobs()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def stop(self) -> None:
        stop_processes_naming(self.temp_dir)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
