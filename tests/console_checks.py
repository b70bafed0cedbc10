"""What ``psoups run``'s terminal may show: the check the end-to-end tests share."""

from __future__ import annotations

from pathlib import Path

WORKER_NOISE = ("LOAD REPORT", "FutureWarning", "examples/s", "Checkpoint successfully",
                "TrainController", "Reporting training result")  # fmt: skip


def assert_quiet_console(shown: str, run: Path, max_lines: int = 150) -> None:
    """``psoups run``'s terminal holds none of the workers' noise, in a screen or two;
    ``RUN/logs`` holds it."""
    for noise in WORKER_NOISE:
        assert noise not in shown, (noise, shown[-3000:])
    lines = shown.splitlines()
    assert len(lines) <= max_lines, (len(lines), shown[-3000:])
    assert (run / "logs/driver.log").is_file()
    policy_logs = sorted((run / "logs/policies").glob("*.log"))
    assert policy_logs, sorted(run.rglob("*.log"))
    noisy = "".join(path.read_text() for path in policy_logs)
    assert "Checkpoint successfully" in noisy and "[policies" in noisy
