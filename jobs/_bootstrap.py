"""Make ``psoups_ray`` importable when a job runs from the repository (``ray job submit
--working-dir .``) without the package installed on the cluster."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
