"""Ray job: rebuild ``report.md`` and its plots from a run directory (reads no config).

ray job submit --working-dir . -- python jobs/report.py --run s3://bucket/runs/x
"""

import sys

import _bootstrap  # noqa: F401  (puts the repository on sys.path)

from psoups_ray.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
