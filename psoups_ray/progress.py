"""Progress lines for long work: ``[psoups HH:MM:SS] message`` on stderr.

Ray forwards workers' stderr to the driver, so lines printed inside Ray Train
workers show up in ``psoups run`` and in ``ray job logs``.
"""

from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    # sys.stderr.write, not print: Ray Train patches print() in workers to log twice.
    sys.stderr.write(f"[psoups {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()
