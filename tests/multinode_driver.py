"""Driver for the simulated multi-node test (its own process: one Ray per process).

Starts a ``ray.cluster_utils.Cluster`` of three 1-CPU nodes, each with its own custom
resource, redoes the rewards stage of a copied smoke run on it (every pole's run needs a
whole node's CPU, so the runs cannot share a node), and prints a JSON summary: the nodes
and the node each run trained on.

    python tests/multinode_driver.py RUN_DIR
"""

from __future__ import annotations

import json
import sys

from clusters import free_port


def main(run_dir: str) -> None:
    import ray
    from conftest import policy_test_config
    from ray.cluster_utils import Cluster

    from psoups_ray.pipeline import run_pipeline

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"node_head": 1},
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
        },
    )
    try:
        for index in range(2):
            cluster.add_node(num_cpus=1, resources={f"node_{index}": 1})
        cluster.wait_for_nodes()
        config = policy_test_config(
            f"ray.address={cluster.address}",
            "rewards.resources.cpus_per_worker=1",
            "rewards.steps=4",  # placement is the point here, not the models
            "rewards.checkpoint_every=2",
        )
        manifest = run_pipeline(config, run_dir, ["rewards"], force=True)
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        summary = {
            "nodes": nodes,
            "node_resources": [sorted(node["Resources"]) for node in ray.nodes()],
            "rewards": manifest.data["rewards"],
        }
        print("SUMMARY " + json.dumps(summary))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
