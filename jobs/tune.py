"""Ray job: the tune stage (Ray Tune search of soup weights per combination, Pareto fronts).

    ray job submit --working-dir . -- python jobs/tune.py --out s3://bucket/runs/x

Takes the arguments of ``psoups tune`` (see ``psoups tune --help``). The stages it needs
must be complete in the run directory (``jobs/pipeline.py --stages tune`` runs them).
"""

import sys

import _bootstrap  # noqa: F401  (puts the repository on sys.path)

from psoups_ray.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
