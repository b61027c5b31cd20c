"""`--engine ray` on a cluster of several nodes (issue 29), simulated on this machine as Ray's own
tests do: `ray start --head`, then `ray start --address` per worker node, each node a process
group of its own with token authentication on (tests/ray_cluster.py). The CLI joins with
--ray-address, as a user's driver would.

- `extract` and `predict` with actors on two nodes give the local engine's stores and CSV; a
  node killed after the first chunk is written (its actors hold their batches: the
  TRANSFER_ENSEMBLE_TEST_STALL_NODE hook) stops the run with exit code 2 and a message naming
  the node, and the same command on the cluster with a new node computes only what is missing.
- A node whose weights file differs from the driver's stops the run with an error naming it.

Every node is killed by its process group at the end, and the module checks that no process of
its clusters is left.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FAST_EXTRACT, FAST_TRAIN, draw, make_kaggle, run_cli, run_in_process, save_rgb
from ray_cluster import FAST_NODE_DEATH, LocalCluster
from transfer_ensemble.engines import ray as ray_engine
from transfer_ensemble.errors import UserError

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'transfer_ensemble[ray]')")
EXTRACT = [*FAST_EXTRACT, "--backbones", "xception", "--batch-size", "2"]
RUN_TIMEOUT_S = 240
IMAGES = 12
FIRST_CHUNK_TIMEOUT_S = 180
PLACEMENT = re.compile(r"(\w+): computed on \d+ nodes?: (.*)")


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def _nodes_by_split(stderr: str) -> dict[str, set[str]]:
    """The node ids the run's log says computed each split (``engines.ray._placement``)."""
    found: dict[str, set[str]] = {}
    for split, nodes in PLACEMENT.findall(stderr):
        found.setdefault(split, set()).update(re.findall(r"on node ([0-9a-f]+)", nodes))
    return found


def _assert_same_stores(a: Path, b: Path, split: str) -> None:
    """Every store of `split` (final and middle layer) in both runs: same keys and settings, all
    rows done, features within the tolerance of tests/test_ray_engine.py."""
    names = sorted(p.name for p in (a / "features" / split).iterdir())
    assert names == sorted(p.name for p in (b / "features" / split).iterdir()) and names
    for name in names:
        one, two = a / "features" / split / name, b / "features" / split / name
        assert (one / "keys.json").read_text() == (two / "keys.json").read_text()
        assert (one / "meta.json").read_text() == (two / "meta.json").read_text()
        assert np.load(one / "done.npy").all() and np.load(two / "done.npy").all()
        for view in ("original", "flipped"):
            x, y = np.load(one / f"{view}.npy"), np.load(two / f"{view}.npy")
            assert x.shape == y.shape and np.abs(x).max() > 0
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6 * np.abs(x).max())


def _run_until_first_chunk(args: list[str], env: dict, done_glob: tuple[Path, str]) -> subprocess.Popen:
    """Start the CLI and return once a done mask matching `done_glob` (folder, pattern) has a row done."""
    folder, pattern = done_glob
    proc = subprocess.Popen([sys.executable, "-m", "transfer_ensemble", *args], env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + FIRST_CHUNK_TIMEOUT_S
    while time.time() < deadline and proc.poll() is None:
        if any(_rows_done(mask) for mask in folder.glob(pattern)):
            return proc
        time.sleep(0.1)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"no chunk was written within {FIRST_CHUNK_TIMEOUT_S} s (exit {proc.returncode})\n{out}\n{err[-4000:]}")


def _rows_done(mask: Path) -> int:
    try:
        return int(np.load(mask).sum())
    except (OSError, ValueError):  # being replaced right now
        return 0


def _stopped(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run went on for {RUN_TIMEOUT_S} s after its node was lost\n{err[-4000:]}")
    return proc.returncode, out, err


def _assert_stopped_for_the_lost_node(code: int, err: str, node: str, what: str) -> None:
    assert code == 2, f"exit {code}\n{err[-4000:]}"
    assert f"error: The Ray cluster lost node {node} during {what}" in err, err[-4000:]
    assert "run the same command again" in err and "Traceback" not in err


def _live_worker(cluster: LocalCluster) -> str:
    """The name of a live worker node, once the nodes are up (each fault test kills one)."""
    cluster.wait()
    return next(name for name, node in cluster.nodes.items() if name != "head" and node.poll() is None)


def _new_worker(cluster: LocalCluster) -> str:
    """Add a worker node, wait for it; its name."""
    name = f"n{len(cluster.nodes) + 1}"
    cluster.add_node(name)
    cluster.wait()
    return name


@pytest.fixture(scope="module")
def cluster():
    """Head and one worker node, 1 CPU each; the head marks a killed node dead in about 2 s. They
    start while the local run is made: the first test waits for them."""
    nodes = LocalCluster()
    try:
        nodes.add_node("head", env=FAST_NODE_DEATH)
        nodes.add_node("n2")
        yield nodes
    finally:
        left = nodes.stop()
    assert not left, f"processes of the cluster outlived it: {left}"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The local engine's run (extracted and trained) on 12 + 8 tiny images."""
    root = tmp_path_factory.mktemp("cluster_local")
    data = make_kaggle(root / "data", per_class=4, n_test=8)
    run = root / "run"
    _ok(run_in_process("extract", "--data", str(data), "--run", str(run), *EXTRACT))
    _ok(run_in_process("train", "--run", str(run), *FAST_TRAIN))
    return data, run


@needs_ray
@pytest.mark.slow
def test_extract_on_two_nodes_loses_one_then_resumes_to_the_local_features(cluster, local_run, tmp_path):
    data, local = local_run
    run = tmp_path / "run"
    args = ["extract", "--data", str(data), "--run", str(run), *EXTRACT, "--engine", "ray",
            "--ray-address", cluster.address, "--actors", "2"]
    worker = _live_worker(cluster)
    lost = cluster.ids[worker]
    proc = _run_until_first_chunk(args, {**cluster.env, ray_engine.STALL_NODE: lost},
                                  (run / "features" / "train", "xception/done.npy"))
    cluster.kill(worker)
    code, _, err = _stopped(proc)
    _assert_stopped_for_the_lost_node(code, err, lost, "the extraction of train")
    assert _nodes_by_split(err) == {"train": {cluster.ids["head"]}}, "the stalled node computed nothing"
    done = np.load(run / "features" / "train" / "xception" / "done.npy")
    assert 0 < done.sum() < len(done), "the lost node held rows not done"
    assert not (run / "config.json").exists()

    added = _new_worker(cluster)
    result = run_cli(*args, env=cluster.env, timeout=RUN_TIMEOUT_S)
    out = _ok(result)
    train_row = next(line.split() for line in out.splitlines() if line.startswith("train "))
    assert train_row[:4] == ["train", str(len(done)), str(len(done) - done.sum()), str(done.sum())], out
    assert "Deprecat" not in result.stderr, "the engine is on Ray Data's current API"
    placed, alive = _nodes_by_split(result.stderr), {cluster.ids["head"], cluster.ids[added]}
    assert placed["test"] == alive and placed["train"] <= alive, result.stderr[-3000:]
    for split in ("train", "test"):
        _assert_same_stores(local, run, split)


@needs_ray
@pytest.mark.slow
def test_predict_on_two_nodes_loses_one_then_resumes_to_the_local_predictions(cluster, local_run, tmp_path):
    """12 images in batches of 2: the stalled node holds 2 batches when it is killed (Ray Data gives
    an actor 2 at a time), so the rerun, in batches of 1, has more than the head's actor takes."""
    _, local = local_run
    rng = np.random.default_rng(3)
    for i in range(IMAGES):
        save_rgb(tmp_path / "new" / f"img{i:02d}.png", draw(i % 3, rng))
    local_csv = tmp_path / "local.csv"
    _ok(run_in_process("predict", "--run", str(local), "--images", str(tmp_path / "new"), "--out", str(local_csv),
                       "--cache-dir", str(tmp_path / "c_local")))
    args = ["predict", "--run", str(local), "--images", str(tmp_path / "new"), "--out", str(tmp_path / "ray.csv"),
            "--cache-dir", str(tmp_path / "c_ray"), "--engine", "ray", "--ray-address", cluster.address,
            "--actors", "2"]
    worker = _live_worker(cluster)
    lost = cluster.ids[worker]
    proc = _run_until_first_chunk(args, {**cluster.env, ray_engine.STALL_NODE: lost},
                                  (tmp_path / "c_ray", "**/xception/done.npy"))
    cluster.kill(worker)
    code, _, err = _stopped(proc)
    _assert_stopped_for_the_lost_node(code, err, lost, "the extraction of predict")
    assert not (tmp_path / "ray.csv").exists(), "no CSV from a run that stopped"
    done = sum(_rows_done(mask) for mask in (tmp_path / "c_ray").glob("**/xception/done.npy"))
    assert 0 < done < IMAGES

    added = _new_worker(cluster)
    result = run_cli(*args, "--batch-size", "1", env=cluster.env, timeout=RUN_TIMEOUT_S)  # a batch per row left:
    assert f"{IMAGES - done} computed" in _ok(result), result.stdout                  # more than 2, for 2 actors
    placed = _nodes_by_split(result.stderr)["predict"]
    assert placed == {cluster.ids["head"], cluster.ids[added]}, result.stderr[-3000:]
    expected, got = pd.read_csv(local_csv), pd.read_csv(tmp_path / "ray.csv")
    assert list(got.columns) == list(expected.columns) and list(got["image"]) == list(expected["image"])
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-6)


@needs_ray
@pytest.mark.slow
def test_a_node_with_other_weights_stops_the_run_naming_it(tmp_path):
    """The driver and the head find one xception weights file in their Keras cache, the worker node
    (the only node with a CPU, so the actor runs there) another: the run stops naming that node."""
    homes = {}
    for name, content in (("driver", b"weights as the driver has them"), ("other", b"other weights")):
        homes[name] = tmp_path / f"keras_{name}"
        (homes[name] / "models").mkdir(parents=True)
        (homes[name] / "models" / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(content)
    data = make_kaggle(tmp_path / "data", per_class=1, n_test=1)
    nodes = LocalCluster()
    try:
        nodes.add_node("head", cpus=0, env={"KERAS_HOME": str(homes["driver"])})
        nodes.add_node("other", env={"KERAS_HOME": str(homes["other"])})
        nodes.wait()
        result = run_cli("extract", "--data", str(data), "--run", str(tmp_path / "run"), *EXTRACT,
                         "--weights", "imagenet", "--engine", "ray", "--ray-address", nodes.address,
                         env={**nodes.env, "KERAS_HOME": str(homes["driver"])}, timeout=RUN_TIMEOUT_S)
    finally:
        left = nodes.stop()
    assert not left, f"processes of the cluster outlived it: {left}"
    assert result.returncode == 2, result.stderr[-4000:]
    theirs = hashlib.sha256(b"other weights").hexdigest()
    ours = hashlib.sha256(b"weights as the driver has them").hexdigest()
    assert (f"node {nodes.ids['other']}, finds other xception weights (identity sha256:{theirs}) than the "
            f"driver (sha256:{ours})") in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr


def test_a_pool_must_fit_node_by_node():
    one_cpu = {"Alive": True, "Resources": {"CPU": 1.0}}
    dead = {"Alive": False, "Resources": {"CPU": 8.0}}
    ray_engine.check_nodes([one_cpu, one_cpu, dead], ray_engine.Pool(2, 0.0, 1.0))
    ray_engine.check_nodes([one_cpu], ray_engine.Pool(2, 0.0, 0.5))
    with pytest.raises(UserError, match=r"2 actors \(2 CPU each\) do not fit .*these nodes hold 0"):
        ray_engine.check_nodes([one_cpu, one_cpu, dead], ray_engine.Pool(2, 0.0, 2.0))
    gpu = {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}}
    with pytest.raises(UserError, match=r"hold 2\. .*\(--actors 2\)"):
        ray_engine.check_nodes([gpu, gpu], ray_engine.Pool(3, 1.0, 1.0))


def test_a_refused_connection_says_what_token_authentication_needs(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert "set RAY_AUTH_MODE=token here too" in ray_engine._token_hint("head:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "this process's token is not the cluster's" in ray_engine._token_hint("head:6379")
    assert ray_engine._token_hint(None) == ""


class _Nodes:
    """A stand-in for the ray module: `nodes()` as a cluster whose node n2 dies after the first look."""

    def __init__(self, left_cpus: float) -> None:
        self.looks = 0
        self.left_cpus = left_cpus

    def nodes(self) -> list[dict]:
        self.looks += 1
        head = {"NodeID": "head", "Alive": True, "Resources": {"CPU": self.left_cpus}}
        return [head, {"NodeID": "n2", "Alive": self.looks == 1, "Resources": {"CPU": 1.0}}]


def test_a_lost_node_is_logged_when_the_nodes_left_hold_the_pool_and_stops_the_run_when_not(monkeypatch, caplog):
    monkeypatch.setattr(ray_engine, "NODE_CHECK_S", 0.0)
    roomy = ray_engine._NodeWatch(_Nodes(left_cpus=2.0), ray_engine.Pool(2, 0.0, 1.0), "the extraction of train")
    with caplog.at_level("WARNING"):
        roomy.check()
        roomy.check()
    assert caplog.text.count("lost node n2 during the extraction of train: Ray restarts its actors") == 1
    full = ray_engine._NodeWatch(_Nodes(left_cpus=1.0), ray_engine.Pool(2, 0.0, 1.0), "scoring")
    with pytest.raises(UserError, match=r"lost node n2 during scoring, and the nodes left have no room for "
                                        r"2 actors \(1 CPU each\)\. .*computes only what is missing"):
        full.check()


class GetTimeoutError(Exception):
    """Named as Ray's: what Ray Data raises when a pool's actors have not started in time."""


def test_a_pool_that_does_not_start_in_time_stops_the_run_with_what_to_do():
    with pytest.raises(UserError, match=rf"did not start the actors for the extraction of train within "
                                        rf"{ray_engine.ACTORS_START_TIMEOUT_S} s: .*fewer --actors"):
        with ray_engine._worker_errors("the extraction of train"):
            try:
                raise GetTimeoutError("Timed out while starting actors. This may mean that ...")
            except GetTimeoutError as exc:
                raise RuntimeError("wrapped") from exc
    with pytest.raises(GetTimeoutError):
        with ray_engine._worker_errors("scoring"):
            raise GetTimeoutError("Get timed out: some object(s) not ready.")
