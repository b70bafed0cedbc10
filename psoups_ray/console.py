"""What ``psoups run`` shows: the project's own lines and one live line per stage and per
Ray run. Everything else its processes print goes to log files in the run directory.

- The driver renders (:class:`RunConsole`): on a terminal a live display (``rich``),
  otherwise (CI, ``ray job logs``) plain lines, each task's at most every
  :data:`PLAIN_INTERVAL_S` seconds. What the driver's libraries print (Ray, Tune, Optuna,
  warnings) goes to ``RUN/logs/driver.log``.
- The workers that do a stage's work (Ray Train workers, evaluator actors, the feedback
  sampling task) run inside :func:`worker_output`, given a :class:`RunLog` by the driver:
  their stdout and stderr, C level included (model load reports, dataset progress bars,
  deprecation warnings, Ray Train's checkpoint messages), go to
  ``RUN/logs/<stage>/<name>.log``; their progress goes to the driver through a
  :class:`ProgressHub` actor it polls.
- Ray does not forward worker output to a driver with a console (``log_to_driver``).
- ``psoups run --verbose`` runs without a console: raw output, as Ray forwards it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from psoups_ray import progress
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import TaskState
from psoups_ray.rundir import RunDir

LOGS_DIR = "logs"
DRIVER_LOG = f"{LOGS_DIR}/driver.log"
POLL_S = 0.5  # how often the driver drains the hub
PLAIN_INTERVAL_S = 30.0  # without a terminal: a task's progress line at most this often
TAIL_LINES = 20  # of a failed run's log, shown with its error


@dataclass(frozen=True)
class RunLog:
    """Where one worker's output and progress go; the driver builds it (:func:`run_log`)
    and hands it to the worker."""

    location: str  # the run directory
    relpath: str  # e.g. "logs/policies/P1A.log"
    hub: tuple[str, str] | None  # (name, namespace) of the driver's ProgressHub actor

    def for_rank(self, rank: int) -> RunLog:
        """Rank 0 writes ``<name>.log``, other workers of the run ``<name>.rank<k>.log``."""
        if rank == 0:
            return self
        return replace(self, relpath=f"{self.relpath.removesuffix('.log')}.rank{rank}.log")

    @property
    def uri(self) -> str:
        return RunDir(self.location).uri(self.relpath)


def active() -> RunConsole | None:
    """This process's console (the driver of ``psoups run``), if any."""
    listener = progress.listener()
    return listener if isinstance(listener, RunConsole) else None


def run_log(stage: str, name: str) -> RunLog | None:
    """The log of a worker the driver is about to start (None without a console: the worker
    then prints as usual)."""
    console = active()
    return console.run_log(stage, name) if console is not None else None


def log_tail(log: RunLog | None, lines: int = TAIL_LINES) -> str:
    """``"\\n  last lines of <log>:\\n    ..."`` for an error message ('' when there is none)."""
    if log is None:
        return ""
    rundir = RunDir(log.location)
    try:
        text = rundir.read_text(log.relpath) if rundir.exists(log.relpath) else ""
    except OSError:
        return f"\n  log: {log.uri}"
    tail = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    if not tail:
        return f"\n  log: {log.uri} (empty)"
    shown = "\n".join(f"    {line}" for line in tail[-lines:])
    return f"\n  last lines of {log.uri}:\n{shown}"


# --- workers -------------------------------------------------------------------------------


@contextlib.contextmanager
def worker_output(log: RunLog | None) -> Iterator[None]:
    """Run the block with this process's output in ``log`` and its progress sent to the
    driver's console; a no-op for ``None``. An exception's traceback is written to the log
    before it propagates."""
    if log is None:
        yield
        return
    with _redirected(RunDir(log.location), log.relpath):
        previous = progress.set_listener(_hub_link(log.hub))
        try:
            yield
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            progress.set_listener(previous)


class _HubLink:
    """A worker's listener: forwards to the driver's hub, never waiting for it."""

    def __init__(self, hub: Any):
        self.hub = hub

    def event(self, line: str) -> None:
        self.hub.event.remote(progress.stamp(line))

    def task(self, state: TaskState) -> None:
        self.hub.task.remote(state)


def _hub_link(address: tuple[str, str] | None) -> _HubLink | None:
    if address is None:
        return None
    import ray

    name, namespace = address
    try:
        return _HubLink(ray.get_actor(name, namespace=namespace))
    except ValueError:  # the driver is gone: the log still gets everything
        return None


@contextlib.contextmanager
def _redirected(rundir: RunDir, relpath: str) -> Iterator[None]:
    """File descriptors 1 and 2 (Python, C extensions, subprocesses) appended to
    ``relpath`` of the run directory for the block: written in place on a local or mounted
    file system, uploaded at the end for an object store."""
    if rundir.is_local:
        path = Path(rundir.path(relpath))
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        handle, name = tempfile.mkstemp(prefix="psoups-", suffix=".log")
        os.close(handle)
        path = Path(name)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    streams = sys.stdout, sys.stderr
    # Streams not on fds 1 and 2 (pytest's capsys, a notebook's) are swapped for the block.
    replacements = [
        stream if _on_fd(stream, fd) else open(target, "w", buffering=1, closefd=False)  # noqa: SIM115
        for stream, fd in zip(streams, (1, 2), strict=True)
    ]
    for fd in (1, 2):
        os.dup2(target, fd)
    sys.stdout, sys.stderr = replacements
    try:
        yield
    finally:
        for stream in replacements:
            stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for stream, original in zip(replacements, streams, strict=True):
            if stream is not original:
                stream.close()
        sys.stdout, sys.stderr = streams
        os.close(target)
        if not rundir.is_local:
            earlier = rundir.read_bytes(relpath) if rundir.exists(relpath) else b""
            rundir.write_bytes(relpath, earlier + path.read_bytes())
            path.unlink()


def _on_fd(stream: Any, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


# --- the driver ----------------------------------------------------------------------------


class ProgressHub:
    """Ray actor: holds the workers' lines and latest task states until the driver drains
    them."""

    def __init__(self) -> None:
        self._events: list[str] = []
        self._tasks: dict[str, TaskState] = {}

    def event(self, line: str) -> None:
        self._events.append(line)

    def task(self, state: TaskState) -> None:
        known = self._tasks.get(state.name)
        if known is None or known.at <= state.at:
            self._tasks[state.name] = state

    def drain(self) -> tuple[list[str], list[TaskState]]:
        drained = self._events, list(self._tasks.values())
        self._events, self._tasks = [], {}
        return drained


@dataclass
class _Shown:
    """What the console knows of one task."""

    began: float  # monotonic, when first seen
    origin: tuple[float, int] | None = None  # (time, done) of its first state with a total
    printed_at: float = -1e18  # plain output: when its last line was printed
    pending: TaskState | None = None  # plain output: a state not printed yet
    rich_id: Any = None


class RunConsole:
    """The driver's console for one ``psoups run`` (a context manager): renders progress on
    ``terminal`` (default: this process's stderr) and sends the driver's own output to
    ``RUN/logs/driver.log``. ``live``: a live display (default: when ``terminal`` is one)."""

    def __init__(
        self,
        rundir: RunDir,
        terminal: TextIO | None = None,
        live: bool | None = None,
        plain_interval: float = PLAIN_INTERVAL_S,
    ):
        self.rundir = rundir
        self._given_terminal = terminal
        self._live_wanted = live
        self.plain_interval = plain_interval
        self._lock = threading.RLock()
        self._tasks: dict[str, _Shown] = {}
        self._finished: dict[str, float] = {}  # task -> when it finished (its states' clock)
        self._hub: Any = None
        self._hub_address: tuple[str, str] | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._progress: Any = None  # rich.progress.Progress when live

    # -- lifetime ---------------------------------------------------------------------
    def __enter__(self) -> RunConsole:
        self.terminal, self._owns_terminal = self._given_terminal, False
        if self.terminal is None:
            self.terminal, self._owns_terminal = _terminal_stream()
        live = self._live_wanted
        self.live = _isatty(self.terminal) if live is None else live
        self._exits = contextlib.ExitStack()
        self._exits.enter_context(_redirected(self.rundir, DRIVER_LOG))
        sys.stderr.write(
            f"\n===== psoups {' '.join(sys.argv[1:])} (pid {os.getpid()}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}) =====\n"
        )
        if self.live:
            self._start_rich()
        self._previous = progress.set_listener(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._poller is not None:
                self._stop.set()
                self._poller.join(timeout=10)
                self._drain()
            if exc_type is not None:
                sys.stderr.write("".join(traceback.format_exception(exc_type, exc, tb)))
        finally:
            progress.set_listener(self._previous)
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
            self._exits.close()
            self._kill_hub()
            if exc_type is not None and not issubclass(exc_type, (KeyboardInterrupt, PsoupsError)):
                # A psoups error says what is wrong (a failed run's, with its log's tail).
                self._print(f"logs of this run: {self.rundir.uri(LOGS_DIR)}")
            if self._owns_terminal:
                self.terminal.close()

    def attach_ray(self) -> None:
        """Ray is up: start the hub workers report to, and poll it."""
        if self._hub is not None:
            return
        import ray

        namespace = ray.get_runtime_context().namespace
        name = f"psoups-progress-{uuid.uuid4().hex[:12]}"
        hub_class = ray.remote(num_cpus=0, max_restarts=0)(ProgressHub)
        self._hub = hub_class.options(name=name, namespace=namespace).remote()
        self._hub_address = (name, namespace)
        self._poller = threading.Thread(target=self._poll, name="psoups-console", daemon=True)
        self._poller.start()

    def run_log(self, stage: str, name: str) -> RunLog:
        return RunLog(self.rundir.location, f"{LOGS_DIR}/{stage}/{name}.log", self._hub_address)

    def _kill_hub(self) -> None:
        if self._hub is None:
            return
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self._hub)
        self._hub = self._hub_address = None

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:
            events, states = ray.get(self._hub.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a missed poll only delays the display
            return
        for line in events:
            self._print(line)
        for state in sorted(states, key=lambda state: state.at):
            self.task(state)

    # -- Listener -----------------------------------------------------------------------
    def event(self, line: str) -> None:
        self._print(progress.stamp(line))

    def task(self, state: TaskState) -> None:
        with self._lock:
            if state.finished:
                self._finished[state.name] = state.at
                self._end(state.name)
                return
            if self._finished.get(state.name, -1e18) >= state.at:
                return  # a worker's late report of a task already over
            self._finished.pop(state.name, None)
            now = time.monotonic()
            shown = self._tasks.setdefault(state.name, _Shown(began=now))
            if shown.origin is None and state.total is not None:
                shown.origin = (now, state.done)
            if self.live:
                self._render_rich(state, shown)
            else:
                self._render_plain(state, shown, now)

    # -- rendering ----------------------------------------------------------------------
    def _print(self, line: str) -> None:
        with self._lock:
            if self._progress is not None:
                from rich.text import Text

                self._progress.console.print(Text(line))
            else:
                self.terminal.write(line + "\n")
                self.terminal.flush()

    def _render_plain(
        self, state: TaskState, shown: _Shown, now: float, force: bool = False
    ) -> None:
        """A line for the task's state when it is done, or when :attr:`plain_interval`
        has passed since its last line (or its start): a short task gets one line."""
        if state.total is None:
            return  # a task starting: the driver's own lines say so
        last = shown.began if shown.printed_at < -1e17 else shown.printed_at
        due = force or state.done >= state.total or now - last >= self.plain_interval
        if not due:
            shown.pending = state
            return
        shown.pending, shown.printed_at = None, now
        left = progress.eta(shown.origin, now, state.done, state.total) if shown.origin else None
        self._print(
            progress.stamp(
                progress.format_update(
                    state.name,
                    state.done,
                    state.total,
                    state.unit,
                    state.detail,
                    now - shown.began,
                    left,
                )  # fmt: skip
            )
        )

    def _end(self, name: str) -> None:
        shown = self._tasks.pop(name, None)
        if shown is None:
            return
        if self.live:
            if shown.rich_id is not None:
                self._progress.remove_task(shown.rich_id)
        elif shown.pending is not None:  # its last state, however recent the one before
            self._render_plain(shown.pending, shown, time.monotonic(), force=True)

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        console = Console(file=self.terminal, force_terminal=True, highlight=False, markup=False)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[count]}", table_column=Column(no_wrap=True)),
            TextColumn(
                "{task.fields[detail]}",
                table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"),
            ),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            redirect_stdout=False,  # the driver's output goes to its log, not through rich
            redirect_stderr=False,
            expand=True,
            refresh_per_second=4,
        )
        self._progress.start()

    def _render_rich(self, state: TaskState, shown: _Shown) -> None:
        count = "" if state.total is None else f"{state.done}/{state.total} {state.unit}"
        fields = {"count": count, "detail": state.detail}
        if shown.rich_id is None:
            shown.rich_id = self._progress.add_task(
                state.name, total=state.total, completed=state.done, **fields
            )
        else:
            self._progress.update(shown.rich_id, total=state.total, completed=state.done, **fields)


def _terminal_stream() -> tuple[TextIO, bool]:
    """Where the console writes: a copy of stderr's file descriptor (so the driver's own
    fd 2 can go to its log), or stderr itself when it has none (pytest's capsys)."""
    stream = sys.stderr
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream, False
    terminal = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    return terminal, True


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
