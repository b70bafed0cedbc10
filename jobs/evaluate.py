"""Ray job: the evaluate stage (every system answers the held-out prompts; win rates of
P-Soups against the baselines by the reward, attribute and optional LLM judges).

    ray job submit --working-dir . -- python jobs/evaluate.py --out s3://bucket/runs/x

Takes the arguments of ``psoups evaluate`` (see ``psoups evaluate --help``). The stages it
needs must be complete in the run directory (``jobs/pipeline.py --stages evaluate`` runs
them). An LLM judge's key comes from the job's environment, e.g.
``--runtime-env-json '{"env_vars": {"OPENAI_API_KEY": "..."}}'``.
"""

import sys

import _bootstrap  # noqa: F401  (puts the repository on sys.path)

from psoups_ray.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
