"""Progress of long work, from whichever process does it: the driver, a Ray Train worker,
an evaluator actor, the feedback sampling task.

- :func:`log`: a line for the user.
- :func:`note`: a line for the logs only (the trials of a sweep, a run's checkpoints).
- :func:`start` / :func:`update` / :func:`finish`: the state of one task (a stage, a Ray
  Train run, a combination's sweep): ``done`` of ``total`` units and a short detail.

Every line is written, timestamped, to this process's stderr. Without a console (tests,
notebooks, ``psoups run --verbose``) that is the terminal, or Ray forwards it there. Under
``psoups run``'s console (:mod:`psoups_ray.console`) a process's stderr is its log file in
``RUN/logs/``, and the console, told through :func:`set_listener`, renders the user's lines
and the tasks' live state.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class TaskState:
    """One task's latest state, as a listener receives it (picklable: it crosses to the
    driver through Ray)."""

    name: str  # "rewards P1A": the stage, then the run or combination
    done: int = 0
    total: int | None = None  # None: not known yet (a run still starting)
    unit: str = "step"
    detail: str = ""  # the latest metrics, e.g. "loss 0.412"
    finished: bool = False
    at: float = field(default_factory=time.time)


class Listener(Protocol):
    """Where this process's progress goes besides its stderr (the console, or a worker's
    link to it)."""

    def event(self, line: str) -> None: ...

    def task(self, state: TaskState) -> None: ...


_listener: Listener | None = None
_first_seen: dict[str, tuple[float, int]] = {}  # task -> (monotonic time, done) at its start


def set_listener(listener: Listener | None) -> Listener | None:
    """Send this process's progress to ``listener`` too; returns the previous one."""
    global _listener
    previous, _listener = _listener, listener
    return previous


def listener() -> Listener | None:
    return _listener


def task_name(stage: str, run: str) -> str:
    """The task of one Ray run of a stage: ``"rewards P1A"``; a stage's only run (``base``)
    is the stage's task."""
    return stage if run == stage else f"{stage} {run}"


def stamp(line: str) -> str:
    return f"[psoups {time.strftime('%H:%M:%S')}] {line}"


def _write(line: str) -> None:
    # sys.stderr.write, not print: Ray Train patches print() in workers to log twice.
    sys.stderr.write(stamp(line) + "\n")
    sys.stderr.flush()


def log(message: str) -> None:
    """A line for the user: on the console, and in this process's log."""
    _write(message)
    if _listener is not None:
        _listener.event(message)


def note(message: str) -> None:
    """A line for this process's log only (on the terminal when no console runs)."""
    _write(message)


def start(task: str, detail: str = "") -> None:
    """``task`` begins (its line appears, with no total yet)."""
    _first_seen[task] = (time.monotonic(), 0)
    if _listener is not None:
        _listener.task(TaskState(task, detail=detail))


def update(
    task: str, done: int, total: int | None = None, unit: str = "step", detail: str = ""
) -> None:
    """``task`` has done ``done`` of ``total`` ``unit``\\ s; ``detail`` holds its latest
    metrics. Written to the log as ``[task] unit done/total detail (elapsed, ~left)``."""
    now = time.monotonic()
    first = _first_seen.setdefault(task, (now, done))
    left = eta(first, now, done, total)
    _write(format_update(task, done, total, unit, detail, now - first[0], left))
    if _listener is not None:
        _listener.task(TaskState(task, done, total, unit, detail))


def finish(task: str, detail: str = "") -> None:
    """``task`` is over (its live line goes)."""
    _first_seen.pop(task, None)
    if _listener is not None:
        _listener.task(TaskState(task, detail=detail, finished=True))


def eta(first: tuple[float, int], now: float, done: int, total: int | None) -> float | None:
    """Seconds left at the rate since ``first`` (time, done), or None when unknown."""
    started, done_then = first
    if total is None or done <= done_then or now <= started:
        return None
    rate = (done - done_then) / (now - started)
    return max(0.0, (total - done) / rate)


def format_update(
    task: str,
    done: int,
    total: int | None,
    unit: str,
    detail: str,
    elapsed: float,
    left: float | None,
) -> str:
    count = f"{done}/{total}" if total is not None else f"{done}"
    timing = f"{elapsed:.0f}s" + (f", ~{format_seconds(left)} left" if left is not None else "")
    return f"[{task}] {unit} {count}" + (f" {detail}" if detail else "") + f" ({timing})"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
