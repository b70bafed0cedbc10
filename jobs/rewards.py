"""Ray job: the rewards stage.

    ray job submit --working-dir . -- python jobs/rewards.py --out s3://bucket/runs/x

Takes the arguments of ``psoups rewards`` (see ``psoups rewards --help``). The stages it needs
must be complete in the run directory (``jobs/pipeline.py --stages rewards`` runs them).
"""

import sys

import _bootstrap  # noqa: F401  (puts the repository on sys.path)

from psoups_ray.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["rewards", *sys.argv[1:]]))
