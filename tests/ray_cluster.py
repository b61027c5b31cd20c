"""A Ray cluster of several nodes on this machine, started as on a real one: `ray start --head`,
then `ray start --address` for each worker node, with token authentication on.

Each node is a `ray start --block` process in a session of its own (with its own temp folder),
so stopping or removing a node kills exactly the processes that node started (its raylet, its
object store, its workers), by their process group, and nothing else on the machine. Used by
tests/test_ray_cluster.py and scripts/bench_ray.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODES_TIMEOUT_S = 60
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}
"""Head-node settings that mark a killed node dead in about 2 s (Ray's defaults take about 15 s)."""

WAIT_FOR_NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
want, deadline = set(sys.argv[2].split(",")), time.time() + float(sys.argv[3])
while time.time() < deadline:
    alive = {name: n["NodeID"] for n in ray.nodes() if n["Alive"] for name in n["Resources"] if name in want}
    if set(alive) == want:
        print(json.dumps(alive))
        sys.exit(0)
    time.sleep(0.2)
sys.exit(f"nodes alive after {sys.argv[3]} s: {sorted(alive)}, wanted {sorted(want)}")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_command() -> str:
    """The `ray` command of this Python environment."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


class LocalCluster:
    """Nodes named by the caller; each carries a custom resource of its name, to find its node id."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths are limited
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.env.pop("RAY_ADDRESS", None)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.ids: dict[str, str] = {}

    def add_node(self, name: str, cpus: float = 1, env: dict | None = None) -> None:
        """Start node `name` (the first one is the head) with `cpus` CPUs and `env` added to its environment."""
        args = [ray_command(), "start", "--block", f"--num-cpus={cpus:g}", f"--temp-dir={self.root / name}",
                "--object-store-memory=100000000", f"--resources={json.dumps({name: 1})}", "--disable-usage-stats"]
        if not self.nodes:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false",
                     f"--ray-client-server-port={_free_port()}"]
        else:
            args += [f"--address={self.address}", "--dashboard-agent-listen-port=0"]
        with open(self.root / f"{name}.log", "w") as out:
            self.nodes[name] = subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> dict[str, str]:
        """Wait until exactly the running nodes are alive; their node ids by name."""
        running = [name for name, node in self.nodes.items() if node.poll() is None]
        result = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, self.address, ",".join(running),
                                 str(NODES_TIMEOUT_S)], env=self.env, capture_output=True, text=True,
                                timeout=NODES_TIMEOUT_S + 30)
        if result.returncode != 0:
            raise RuntimeError(f"the cluster's nodes did not come up: {result.stderr[-2000:]}\n{self.logs()}")
        self.ids.update(json.loads(result.stdout.strip().splitlines()[-1]))
        return self.ids

    def kill(self, name: str) -> None:
        """Remove node `name` at once, as a machine that dies: SIGKILL to every process it started."""
        node = self.nodes[name]
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=30)

    def stop(self) -> list[str]:
        """Kill every node; the command lines of processes of this cluster still alive after (none expected)."""
        for name in self.nodes:
            self.kill(name)
        deadline = time.time() + 15
        while (left := self.processes()) and time.time() < deadline:
            time.sleep(0.2)
        for pid in self.processes():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        return list(left.values())

    def processes(self) -> dict[int, str]:
        """Processes whose command line names this cluster's folder: its nodes' and their workers'."""
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.root) in line and int(proc.name) != os.getpid():
                found[int(proc.name)] = line
        return found

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))
