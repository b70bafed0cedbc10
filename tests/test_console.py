"""``psoups run``'s console: the project's lines and live progress on the terminal, every
process's other output in ``RUN/logs/``; workers report through a real Ray cluster."""

from __future__ import annotations

import io
import os
import sys
import warnings

import pytest
from ray import cloudpickle

from psoups_ray import console, progress
from psoups_ray.console import DRIVER_LOG, RunConsole
from psoups_ray.errors import PsoupsError
from psoups_ray.rundir import RunDir

# Ray workers cannot import this module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_plain_progress_is_throttled_per_task_and_the_last_state_is_shown(tmp_path):
    terminal = io.StringIO()
    with RunConsole(RunDir(tmp_path), terminal=terminal, live=False, plain_interval=3600):
        progress.log("a line for the user")
        sys.stderr.write("a library's chatter\n")
        os.write(2, b"a C extension's chatter\n")
        progress.start("rewards P1A", "starting")
        for step in range(1, 9):
            progress.update("rewards P1A", step, 10, "step", f"loss {1 / step:.3f}")
        progress.update("rewards P1B", 1, 10)
        progress.finish("rewards P1A")  # its last state (8/10) is shown as it ends
        progress.update("rewards P1B", 10, 10)  # done: shown at once
        progress.note("for the logs only")
    shown = terminal.getvalue()
    lines = shown.splitlines()
    assert any(line.endswith("a line for the user") for line in lines)
    (ended,) = [line for line in lines if "[rewards P1A]" in line]
    assert "step 8/10 loss 0.125" in ended and "left)" in ended
    (done,) = [line for line in lines if "[rewards P1B]" in line]
    assert "step 10/10" in done
    for noise in ("chatter", "for the logs only"):
        assert noise not in shown
    log = (tmp_path / DRIVER_LOG).read_text()
    for kept in (
        "a library's chatter",
        "a C extension's chatter",
        "for the logs only",
        "[rewards P1A] step 5/10",  # every update is in the process's log
    ):
        assert kept in log
    assert progress.listener() is None  # the console is gone with its block

    terminal = io.StringIO()  # a line whenever the interval has passed
    with RunConsole(RunDir(tmp_path), terminal=terminal, live=False, plain_interval=0):
        for step in range(1, 4):
            progress.update("tune P1A+P2B", step, 9, "trial")
    assert terminal.getvalue().count("[tune P1A+P2B] trial") == 3


def test_a_terminal_gets_one_live_line_per_task(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    terminal = io.StringIO()
    with RunConsole(RunDir(tmp_path), terminal=terminal, live=True):
        progress.update("policies P2A", 3, 10, "iteration", "reward +0.125")
        progress.log("policies: launched run P2B")
    shown = terminal.getvalue()
    assert "policies: launched run P2B" in shown
    assert "policies P2A" in shown and "3/10 iteration" in shown and "reward +0.125" in shown


def test_an_unexpected_error_is_logged_with_the_logs_path_a_psoups_error_not(tmp_path):
    terminal = io.StringIO()
    with pytest.raises(ZeroDivisionError), RunConsole(RunDir(tmp_path), terminal, live=False):
        _ = 1 / 0
    assert f"logs of this run: {tmp_path / 'logs'}" in terminal.getvalue()
    assert "ZeroDivisionError" in (tmp_path / DRIVER_LOG).read_text()
    terminal = io.StringIO()
    with pytest.raises(PsoupsError), RunConsole(RunDir(tmp_path), terminal, live=False):
        raise PsoupsError("the config says so")
    assert "logs of this run" not in terminal.getvalue()


def _noisy_worker(output):
    with console.worker_output(output):
        print("print from the worker")
        os.write(1, b"fd 1 from the worker\n")
        warnings.warn("worker deprecation", FutureWarning, stacklevel=1)
        progress.log("hello from the worker")
        progress.update("test worker", 1, 2, "item", "half")
        progress.update("test worker", 2, 2, "item", "all")
    return os.getpid()


def _failing_loop(config):
    print("the cause is in this log line")
    raise RuntimeError("the loop broke")


@pytest.mark.integration
def test_workers_write_their_logs_and_report_to_the_console(ray_cluster, tmp_path):
    import ray

    terminal = io.StringIO()
    with RunConsole(RunDir(tmp_path), terminal=terminal, live=False) as run_console:
        run_console.attach_ray()
        output = console.run_log("test", "worker")
        pid = ray.get(ray.remote(num_cpus=0)(_noisy_worker).remote(output))
        assert pid != os.getpid()
        from psoups_ray.config import ScalingSpec
        from psoups_ray.ray_utils import fit_torch_run

        with pytest.raises(PsoupsError) as failed:
            fit_torch_run(_failing_loop, {}, ScalingSpec(), RunDir(tmp_path), "test", "broken")
    shown = terminal.getvalue()
    assert "hello from the worker" in shown  # through the hub
    assert "[test worker] item 2/2 all" in shown and "item 1/2" not in shown  # throttled
    assert "print from the worker" not in shown and "worker deprecation" not in shown
    log = (tmp_path / "logs/test/worker.log").read_text()
    for kept in ("print from the worker", "fd 1 from the worker", "worker deprecation",
                 "hello from the worker", "[test worker] item 1/2"):  # fmt: skip
        assert kept in log
    # A failed run's error holds its log's tail, the traceback included, and its path.
    message = str(failed.value)
    broken = tmp_path / "logs/test/broken.log"
    assert f"last lines of {broken}" in message
    assert "the cause is in this log line" in message and "the loop broke" in message
    assert "RuntimeError: the loop broke" in broken.read_text()
