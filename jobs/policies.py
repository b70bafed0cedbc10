"""Ray job: the policies stage (per-pole PPO policies and the baselines).

    ray job submit --working-dir . -- python jobs/policies.py --out s3://bucket/runs/x

Takes the arguments of ``psoups policies`` (see ``psoups policies --help``). The stages it needs
must be complete in the run directory (``jobs/pipeline.py --stages policies`` runs them).
"""

import sys

import _bootstrap  # noqa: F401  (puts the repository on sys.path)

from psoups_ray.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["policies", *sys.argv[1:]]))
