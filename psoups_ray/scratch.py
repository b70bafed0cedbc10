"""Node-local scratch directories that a killed process does not leave behind.

Training jobs write Hugging Face checkpoints and adapters into a temporary directory before
uploading them to the run directory. ``try/finally`` removes it on errors, but not when the
process is killed (a lost worker, an interrupted run, ``ray stop``), and a 7B reward model's
checkpoint with its optimizer state is gigabytes of ``/tmp``.

Each directory made by :func:`scratch_directory` holds an exclusive ``flock`` on a lock file
inside it for as long as its owner lives; the kernel releases the lock when the owner dies,
however it dies. Every new scratch directory first sweeps the temporary directory for
``psoups-*`` directories whose lock nobody holds (:func:`remove_abandoned`). Directories
without the lock file (made by something else) are never touched.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = "psoups-"
LOCK_FILE = ".psoups-owner.lock"


@contextmanager
def scratch_directory(label: str) -> Iterator[Path]:
    """A new ``<tmp>/psoups-<label>-XXXX`` directory, removed on exit or by the next sweep
    after its owner died."""
    remove_abandoned()
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{label}-"))
    owner = _hold(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        owner.close()


def _hold(path: Path):
    """Lock a file, then move it into place: a sweep never sees the lock file unlocked."""
    descriptor, pending = tempfile.mkstemp(dir=path, prefix=".lock-")
    handle = os.fdopen(descriptor, "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    os.replace(pending, path / LOCK_FILE)
    return handle


def remove_abandoned(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch directories under ``root`` (default: the temporary directory)
    whose owner is gone; returns them."""
    removed = []
    for path in sorted(Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*")):
        try:
            handle = open(path / LOCK_FILE)  # noqa: SIM115 - held across the removal
        except OSError:  # not a directory, not ours, or being removed by its owner
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its owner is alive
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
