"""Ray clusters started by tests in their own processes and temp dirs, on 127.0.0.1.

Never ``ray stop``: it would stop every Ray on the machine, the session's cluster too.
A cluster here is stopped by ending the processes that name its own temp dir.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

RAY_CLI = str(Path(sys.executable).with_name("ray"))
SERVE_CLI = str(Path(sys.executable).with_name("serve"))
REPO = Path(__file__).resolve().parents[1]


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
    """``ray start --head`` on 127.0.0.1 with its own temp dir and ports, and ``workers``
    more nodes joined to it with ``ray start --address`` (one machine, several raylets: a
    multi-node cluster as Ray sees it); a context manager whose ``dashboard_url`` takes
    ``ray job submit`` and ``serve deploy``.

    ``resources``: the head's custom resources; ``workers``: one ``(num_cpus, resources)``
    per worker node."""

    def __init__(
        self,
        num_cpus: float = 2,
        resources: dict[str, float] | None = None,
        workers: Sequence[tuple[float, dict[str, float]]] = (),
    ):
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.workers = list(workers)
        # One temp dir per node (short: socket paths): nodes sharing one would share its
        # runtime-env files, and one node's agent deletes a job's working dir under the
        # others.
        self.temp_dirs = [
            tempfile.mkdtemp(prefix="psr-", dir="/tmp") for _ in range(1 + len(self.workers))
        ]
        self.dashboard_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{free_port()}"

    def __enter__(self) -> RayStartCluster:
        head = [
            "--head", "--port", self.gcs_address.rsplit(":", 1)[1],
            "--dashboard-port", str(self.dashboard_port),
            "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
            "--ray-client-server-port", str(free_port()),
        ]  # fmt: skip
        try:
            self._start(head, self.num_cpus, self.resources, self.temp_dirs[0])
            for (num_cpus, resources), temp_dir in zip(
                self.workers, self.temp_dirs[1:], strict=True
            ):
                self._start(["--address", self.gcs_address], num_cpus, resources, temp_dir)
            self._wait_for_job_server()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(
        self, role: list[str], num_cpus: float, resources: dict[str, float], temp_dir: str
    ) -> None:
        ports = {  # every node its own: they share one machine
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        command = [
            RAY_CLI, "start", *role, "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
            "--temp-dir", temp_dir, "--disable-usage-stats",
            *[str(part) for option, port in ports.items() for part in (option, port)],
        ]  # fmt: skip
        # A node joining a head with token auth (Ray's default for `ray start --head`)
        # authenticates with the token `ray start --head` left in ~/.ray.
        env = {**os.environ, "RAY_AUTH_MODE": "token"} if "--address" in role else None
        started = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")

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
        for temp_dir in reversed(self.temp_dirs):  # the workers' nodes, then the head
            stop_processes_naming(temp_dir)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def shipped_serve_config(directory: Path, run: Path, port: int) -> Path:
    """serve_configs/tiny.yaml with ``args.run`` pointed at ``run`` and HTTP on ``port``,
    written in ``directory``."""
    import yaml

    config = yaml.safe_load((REPO / "serve_configs" / "tiny.yaml").read_text())
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["args"]["run"] = str(run)
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def first_chat_answer(
    base_url: str, alive, question: str = "What is salt?", timeout_s: float = 300
) -> dict:
    """Poll until the app answers a chat completion for P2A+P3B (``alive()`` false: give
    up)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline and alive():
        try:
            last = httpx.post(
                f"{base_url}/v1/chat/completions",
                json={"model": "psoups:P2A+P3B", "max_tokens": 8, "temperature": 0,
                      "messages": [{"role": "user", "content": question}]},
                timeout=60,
            )  # fmt: skip
            if last.status_code == 200:
                return last.json()
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"no chat completion from {base_url}: {last and last.text[:500]}")
