"""Benchmark `extract --engine ray` against the local engine on this machine (issue 11).

On N JPEGs of about 500x375 (real dogs3 photos when ../shared is there, as bench_extract.py
writes them), both default backbones at --image-size, each engine in its own `extract` process
on a fresh run folder:

(A) local: the local engine;
(B) ray, local Ray: --engine ray with no address, so the run starts (and stops) its own Ray;
(C) ray, running cluster: --engine ray --ray-address of a Ray cluster this script started
    beforehand (`ray.init(num_cpus=CPUs)`), as on a real cluster where the cluster is up.

For each: the process's wall time, the extraction seconds `extract` reports (for Ray they
include starting the actor pool and building the models in it, once per split; for local the
models are built before that clock) and images/s; for Ray also the seconds until the first
features came back in each split (actor start and model build: "actor start s") and the rate
over the rest ("images/s after", which counts the images of the first chunk too, so it is a
little high). Ray's start-up cost is shown three ways: the
cluster's start (C's ray.init), the driver's connection (from the run's log), and the wall-time
difference to the local engine. The last line is one JSON object for tools.

--multi-node (issue 29) measures clusters of several nodes started on this machine as on a real
one (`ray start --head`, `ray start --address`, tests/ray_cluster.py), each node with
--node-cpus CPUs and each actor reserving them all: 1, 2, ... --nodes nodes (one actor each), one
node with all those CPUs and as many actors (the same actors and cores without a second node),
and the local engine in one process on the same cores. Each row also says how many nodes
computed features (from the run's log). On one machine the nodes share its cores, so the rows
show Ray's overhead and what a second node costs, not a second machine's speed-up.

    python scripts/bench_ray.py --n 640 --image-size 75
    python scripts/bench_ray.py --multi-node --n 640 --image-size 75     # 1 vs 2 nodes of 1 CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from bench_extract import write_dataset  # noqa: E402
from ray_cluster import LocalCluster  # noqa: E402

EXTRACTED = re.compile(r"extracted the features of (\d+) images?(?: at \d+ scales)? in ([\d.]+) s")
CONNECTED = re.compile(r"connected to .* in ([\d.]+) s")
FIRST = re.compile(r"first features back after ([\d.]+) s")
PLACED = re.compile(r"computed on \d+ nodes?: (.*)")


def extract(data: Path, run: Path, args: argparse.Namespace, extra: list[str], env: dict | None = None) -> dict:
    """One `extract` process: wall seconds, the extraction seconds it reports, its connect time and
    how many Ray nodes computed features."""
    command = [sys.executable, "-m", "transfer_ensemble", "extract", "--data", str(data), "--run", str(run),
               "--weights", "random", "--image-size", str(args.image_size), "--batch-size",
               str(args.batch_size), "--scales", "1", *extra]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**(env or os.environ), "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    images, seconds = EXTRACTED.search(result.stdout).groups()
    connected = CONNECTED.search(result.stderr)
    first = [float(s) for s in FIRST.findall(result.stderr)]
    return {"wall_s": round(wall, 2), "extract_s": float(seconds), "images": int(images),
            "images_per_s": round(int(images) / float(seconds), 2),
            "connect_s": float(connected.group(1)) if connected else None,
            "actor_start_s": round(sum(first), 2) if first else None,
            "steady_images_per_s": round(int(images) / (float(seconds) - sum(first)), 2) if first else None,
            "nodes": len({node for line in PLACED.findall(result.stderr) for node in re.findall(r"node (\w+)", line)})}


def on_cluster(data: Path, run: Path, args: argparse.Namespace, node_cpus: list[int], actors: int) -> dict:
    """`extract` with `actors` actors of --node-cpus CPUs on a cluster, started for it, of nodes with
    `node_cpus` CPUs; the cluster is stopped after."""
    cluster = LocalCluster()
    try:
        for i, cpus in enumerate(node_cpus):
            cluster.add_node(f"node{i}", cpus=cpus)
        cluster.wait()
        return extract(data, run, args, ["--engine", "ray", "--ray-address", cluster.address, "--actors",
                                         str(actors), "--cpus-per-actor", str(args.node_cpus)], env=cluster.env)
    finally:
        cluster.stop()


def multi_node(data: Path, root: Path, args: argparse.Namespace) -> dict[str, dict]:
    """The local engine, then 1 to --nodes nodes of --node-cpus CPUs, then one node with all their CPUs."""
    rows = {"local engine": extract(data, root / "run_local", args, [])}
    for n in range(1, args.nodes + 1):
        rows[f"ray, {n} node{'s' if n > 1 else ''} x {args.node_cpus} CPU"] = on_cluster(
            data, root / f"run_nodes{n}", args, [args.node_cpus] * n, n)
    cpus = args.node_cpus * args.nodes
    rows[f"ray, 1 node x {cpus} CPU, {args.nodes} actors"] = on_cluster(
        data, root / "run_one_node", args, [cpus], args.nodes)
    return rows


def print_multi_node(rows: dict[str, dict], args: argparse.Namespace, cpus: int) -> None:
    print(f"{args.n} JPEGs of 500x375, xception + inception_v3 at {args.image_size} px, batch {args.batch_size}, "
          f"{cpus} CPUs shared by every node, both views")
    print(f"{'engine':36s} {'nodes':>5s} {'wall s':>8s} {'extract s':>10s} {'images/s':>9s} {'actor start s':>14s} "
          f"{'images/s after':>15s}")
    for name, r in rows.items():
        actors = f"{r['actor_start_s']:.1f}" if r["actor_start_s"] is not None else "-"
        steady = f"{r['steady_images_per_s']:.1f}" if r["steady_images_per_s"] is not None else "-"
        nodes = str(r["nodes"]) if r["connect_s"] is not None else "-"
        print(f"{name:36s} {nodes:>5s} {r['wall_s']:8.1f} {r['extract_s']:10.1f} {r['images_per_s']:9.1f} "
              f"{actors:>14s} {steady:>15s}")
    print(json.dumps({"n": args.n, "image_size": args.image_size, "batch_size": args.batch_size, "cpus": cpus,
                      "node_cpus": args.node_cpus, "rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=640, help="images (default 640)")
    parser.add_argument("--image-size", type=int, default=75, help="model input size (default 75)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--multi-node", action="store_true", help="compare clusters of 1 to --nodes nodes")
    parser.add_argument("--nodes", type=int, default=2, help="most nodes with --multi-node (default 2)")
    parser.add_argument("--node-cpus", type=int, default=1, help="CPUs of each node with --multi-node (default 1)")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        root = Path(tmp)
        data = root / "data"
        write_dataset(data, args.n)
        if args.multi_node:
            print_multi_node(multi_node(data, root, args), args, cpus)
            return
        local = extract(data, root / "run_local", args, [])
        own_ray = extract(data, root / "run_ray_local", args, ["--engine", "ray"])

        import ray

        from transfer_ensemble.engines import ray as ray_engine

        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 runtime_env=ray_engine.runtime_env())
        cluster_start = time.perf_counter() - start
        address = ray.get_runtime_context().gcs_address
        running = extract(data, root / "run_ray_cluster", args, ["--engine", "ray", "--ray-address", address])
        ray.shutdown()

    rows = [("local engine", local), ("ray, local Ray started by the run", own_ray),
            ("ray, running cluster", running)]
    print(f"{args.n} JPEGs of 500x375, xception + inception_v3 at {args.image_size} px, batch "
          f"{args.batch_size}, {cpus} CPUs, both views")
    print(f"{'engine':36s} {'wall s':>8s} {'extract s':>10s} {'images/s':>9s} {'connect s':>10s} "
          f"{'actor start s':>14s} {'images/s after':>15s}")
    for name, r in rows:
        connect = f"{r['connect_s']:.1f}" if r["connect_s"] is not None else "-"
        actors = f"{r['actor_start_s']:.1f}" if r["actor_start_s"] is not None else "-"
        steady = f"{r['steady_images_per_s']:.1f}" if r["steady_images_per_s"] is not None else "-"
        print(f"{name:36s} {r['wall_s']:8.1f} {r['extract_s']:10.1f} {r['images_per_s']:9.1f} {connect:>10s} "
              f"{actors:>14s} {steady:>15s}")
    print(f"Ray start-up: cluster start {cluster_start:.1f} s; wall time over the local engine "
          f"+{own_ray['wall_s'] - local['wall_s']:.1f} s (own Ray), +{running['wall_s'] - local['wall_s']:.1f} s "
          f"(running cluster)")
    print(json.dumps({"n": args.n, "image_size": args.image_size, "batch_size": args.batch_size, "cpus": cpus,
                      "local": local, "ray_own": own_ray, "ray_cluster": running,
                      "ray_cluster_start_s": round(cluster_start, 2)}))


if __name__ == "__main__":
    main()
