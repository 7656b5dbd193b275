"""Start one Ray worker node on this machine's loopback and block (tests/platform/test_multinode).

`ray start --address=127.0.0.1:P` rewrites 127.0.0.1 to the machine's outward address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that variable at 0 it refuses to start a worker
node at all; this starts the node as `ray.cluster_utils.Cluster.add_node` does instead, with the
variable at 0. SIGTERM or SIGKILL of its process group takes the node down.

    python tests/platform/ray_node.py 127.0.0.1:6379 --num-cpus 1 --resources '{"worker": 1}'
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("--num-cpus", type=int, default=1)
    ap.add_argument("--resources", default="{}")
    args = ap.parse_args()
    import ray._private.node
    from ray._private.parameter import RayParams

    params = RayParams(node_ip_address="127.0.0.1", gcs_address=args.address,
                       num_cpus=args.num_cpus, num_gpus=0,
                       resources=json.loads(args.resources),
                       object_store_memory=150 * 2**20, min_worker_port=0, max_worker_port=0,
                       include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # atexit kills the node's processes
    print(f"node {node.unique_id} up", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
