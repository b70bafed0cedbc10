"""Ray job: the whole pipeline (or ``--stages``), resuming a previous run.

    ray job submit --working-dir . -- python jobs/pipeline.py --out s3://bucket/runs/x

Takes the arguments of ``psoups run`` (see ``psoups run --help``).
"""

import sys

import _bootstrap  # noqa: F401  (puts the repository on sys.path)

from psoups_ray.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
