"""Ray job: the base stage.

    ray job submit --working-dir . -- python jobs/base.py --config tiny --out s3://bucket/runs/x

Takes the arguments of ``psoups base`` (see ``psoups base --help``). Connects to the
cluster the job runs on (``RAY_ADDRESS``), or starts a local one when run directly.
"""

import sys

import _bootstrap  # noqa: F401  (puts the repository on sys.path)

from psoups_ray.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["base", *sys.argv[1:]]))
