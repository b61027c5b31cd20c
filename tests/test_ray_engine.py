"""`--engine ray`: the same feature stores, submission and predictions as the local engine; a killed
Ray extraction resumes to the same features; bad engine options are refused clearly.

The slow tests share one local Ray cluster (2 CPUs), started here; the CLI runs in subprocesses
that join it with --ray-address, as on a real cluster.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FAST_EXTRACT, FAST_TRAIN, draw, make_kaggle, run_cli, run_in_process, save_rgb
from transfer_ensemble.engines import ray as ray_engine
from transfer_ensemble.engines import EngineConfig
from transfer_ensemble.errors import UserError

BACKBONES = ("xception", "inception_v3")
VIEWS = ("original", "flipped")


def _ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _assert_same_stores(a: Path, b: Path, split: str) -> None:
    """The two runs' stores of `split` hold the same rows, keys and ids, done, with equal features."""
    for name in BACKBONES:
        one, two = a / "features" / split / name, b / "features" / split / name
        assert (one / "keys.json").read_text() == (two / "keys.json").read_text()
        assert (one / "meta.json").read_text() == (two / "meta.json").read_text()
        assert np.load(one / "done.npy").all() and np.load(two / "done.npy").all()
        for view in VIEWS:
            x, y = np.load(one / f"{view}.npy"), np.load(two / f"{view}.npy")
            assert x.shape == y.shape and np.abs(x).max() > 0
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6 * np.abs(x).max())


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray cluster for the module: 2 CPUs, no dashboard."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             runtime_env=ray_engine.runtime_env())
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A run extracted and trained with the local engine, and its submission."""
    root = tmp_path_factory.mktemp("ray_local")
    data = make_kaggle(root / "data", per_class=5, n_test=6)
    run = root / "run"
    _ok(run_in_process("extract", "--data", str(data), "--run", str(run), *FAST_EXTRACT))
    _ok(run_in_process("train", "--run", str(run), *FAST_TRAIN))
    _ok(run_in_process("submit", "--run", str(run), "--out", str(root / "local.csv")))
    return data, run, root / "local.csv"


@pytest.mark.slow
def test_predict_on_ray_equals_local_predict(local_run, ray_address, tmp_path):
    _, run, _ = local_run
    rng = np.random.default_rng(7)
    for i in range(9):
        save_rgb(tmp_path / "new" / f"img{i}.png", draw(i % 3, rng))
    paths = [tmp_path / "new" / f"img{i}.png" for i in range(9)]
    out = _ok(run_cli("predict", "--run", str(run), "--images", str(tmp_path / "new"), "--out",
                      str(tmp_path / "ray.csv"), "--cache-dir", str(tmp_path / "c_ray"),
                      "--engine", "ray", "--ray-address", ray_address))
    assert "9 computed" in out

    from transfer_ensemble.predict import Run

    trained = Run.load(run)
    expected = trained.predict(paths, cache_dir=tmp_path / "c_local")
    got = pd.read_csv(tmp_path / "ray.csv")
    assert list(got["image"]) == [f"img{i}.png" for i in range(9)]
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected, atol=1e-6)
    api = trained.predict(paths, engine="ray", cache_dir=tmp_path / "c_ray")
    np.testing.assert_allclose(api, expected, atol=1e-6)


@pytest.mark.slow
def test_a_ray_extraction_killed_part_way_resumes_to_the_local_features_and_submission(local_run, ray_address,
                                                                                       tmp_path):
    """One Ray extraction, killed after 2 chunks and run again, covers both asks of the issue: the
    stores equal the local engine's, and train and submit on them give the local submission."""
    data, local, local_csv = local_run
    run = tmp_path / "run"
    args = ["extract", "--data", str(data), "--run", str(run), *FAST_EXTRACT, "--batch-size", "4",
            "--engine", "ray", "--ray-address", ray_address]
    killed = run_cli(*args, env={ray_engine.KILL_AFTER_CHUNKS: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = np.load(run / "features" / "train" / "xception" / "done.npy")
    assert 0 < done.sum() < len(done), "the kill should leave some rows done and some to compute"
    assert not (run / "config.json").exists(), "the run's records are written only when extraction succeeds"

    out = _ok(run_cli(*args))
    train_row = out.splitlines()[2].split()
    assert train_row[:4] == ["train", str(len(done)), str(len(done) - done.sum()), str(done.sum())], out
    for split in ("train", "test"):
        _assert_same_stores(local, run, split)
    assert not list(run.rglob("*.new")) and not list(run.rglob(".*.tmp*"))

    _ok(run_in_process("train", "--run", str(run), *FAST_TRAIN))
    _ok(run_in_process("submit", "--run", str(run), "--out", str(tmp_path / "ray.csv")))
    expected, got = pd.read_csv(local_csv), pd.read_csv(tmp_path / "ray.csv")
    assert list(got.columns) == list(expected.columns) and list(got["id"]) == list(expected["id"])
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-6)


def test_engine_options_are_checked_with_their_flag():
    with pytest.raises(UserError, match=r"--actors 0 .*at least 1"):
        EngineConfig.of("ray", actors=0)
    with pytest.raises(UserError, match=r"--gpus-per-actor -1 .*0 \(CPU actors\) or more"):
        EngineConfig.of("ray", gpus_per_actor=-1)
    with pytest.raises(UserError, match=r"--engine 'spark' .*'local', 'ray'"):
        EngineConfig(engine="spark")
    with pytest.raises(UserError, match=r"--actors 2 \(given on the command line\) is an option of --engine ray: add --engine ray"):
        EngineConfig.from_flags({"actors": 2})


def test_an_unreachable_ray_address_is_refused_quickly():
    with pytest.raises(UserError, match=r"The Ray cluster at '127\.0\.0\.1:1' cannot be reached.*ray start --head"):
        ray_engine.check_address("127.0.0.1:1")
    with pytest.raises(UserError, match=r"--ray-address 'nowhere' is not a Ray address of the form host:port"):
        ray_engine.check_address("nowhere")


def test_an_address_from_RAY_ADDRESS_is_blamed_on_the_variable_not_the_flag(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "garbage")
    with pytest.raises(UserError) as refused:
        ray_engine.check_address(*ray_engine.address_of(EngineConfig(engine="ray")))
    assert "RAY_ADDRESS 'garbage' is not a Ray address" in str(refused.value)
    assert "--ray-address 'garbage'" not in str(refused.value)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(UserError, match=r"The Ray cluster at '127\.0\.0\.1:1' \(from RAY_ADDRESS\) cannot be reached"):
        ray_engine.check_address(*ray_engine.address_of(EngineConfig(engine="ray")))
    flag = EngineConfig.of("ray", ray_address="nowhere")
    assert ray_engine.address_of(flag) == ("nowhere", "--ray-address")


@pytest.mark.slow
def test_the_cli_names_RAY_ADDRESS_when_the_bad_address_came_from_it(kaggle_data, tmp_path):
    result = run_cli("extract", "--data", str(kaggle_data), "--run", str(tmp_path / "run"), *FAST_EXTRACT,
                     "--engine", "ray", env={"RAY_ADDRESS": "garbage"})
    assert result.returncode == 2, result.stderr
    assert "error: RAY_ADDRESS 'garbage' is not a Ray address" in result.stderr
    assert "--ray-address 'garbage'" not in result.stderr and not (tmp_path / "run").exists()


def test_the_registry_is_the_list_of_engines_and_imports_ray_only_when_used():
    from transfer_ensemble import engines

    assert engines.names() == ("local", "ray")
    code = ("import sys; from transfer_ensemble import engines, predict, workflow; "
            "from transfer_ensemble.engines import EngineConfig; "
            "e = engines.get(EngineConfig()); print(type(e).__name__, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["LocalEngine", "False"]


@pytest.mark.slow
def test_the_cli_refuses_an_unreachable_ray_address_before_any_work(kaggle_data, tmp_path):
    result = run_cli("extract", "--data", str(kaggle_data), "--run", str(tmp_path / "run"), *FAST_EXTRACT,
                     "--engine", "ray", "--ray-address", "127.0.0.1:1")
    assert result.returncode == 2, result.stderr
    assert "error: The Ray cluster at '127.0.0.1:1' cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_without_ray_installed_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install 'transfer_ensemble\[ray\]'"):
        ray_engine.connect(EngineConfig(engine="ray"))


class _Cluster:
    def __init__(self, cpus: float, gpus: float) -> None:
        self.resources = {"CPU": cpus, "GPU": gpus}

    def cluster_resources(self) -> dict:
        return self.resources


def test_the_actor_pool_defaults_to_one_actor_per_gpu_and_must_fit_the_cluster():
    assert ray_engine.pool_for(_Cluster(16, 4), EngineConfig(engine="ray")) == ray_engine.Pool(4, 1.0, 1.0)
    assert ray_engine.pool_for(_Cluster(2, 0), EngineConfig(engine="ray")) == ray_engine.Pool(1, 0.0, 1.0)
    half = EngineConfig.of("ray", gpus_per_actor=0.5)
    assert ray_engine.pool_for(_Cluster(16, 2), half) == ray_engine.Pool(4, 0.5, 1.0)
    with pytest.raises(UserError, match=r"--actors 3 with --gpus-per-actor 1 need 3 GPUs, but the Ray cluster has 2"):
        ray_engine.pool_for(_Cluster(16, 2), EngineConfig.of("ray", actors=3))
    with pytest.raises(UserError, match=r"leave less than one to decode images"):
        ray_engine.pool_for(_Cluster(2, 2), EngineConfig.of("ray", actors=2))
    with pytest.raises(UserError, match=r"--actors 3 with --cpus-per-actor 1 reserve 3 CPUs, but the Ray cluster has 2"):
        ray_engine.pool_for(_Cluster(2, 0), EngineConfig.of("ray", actors=3))
    assert ray_engine.pool_for(_Cluster(2, 0), EngineConfig.of("ray", actors=2)) == ray_engine.Pool(2, 0.0, 1.0)


def test_the_driver_writes_a_batch_or_one_percent_of_the_rows_at_a_time():
    assert ray_engine.write_chunk(4, 15) == 4
    assert ray_engine.write_chunk(32, 640) == 32
    assert ray_engine.write_chunk(32, 100_000) == 1000
    assert ray_engine.write_chunk(32, 1_000_000) == ray_engine.WRITE_CHUNK_MAX


def test_rays_notice_about_actor_arguments_is_dropped_from_stderr_and_its_other_errors_kept():
    from transfer_ensemble import noise

    notice = (b"[2026-11-27 05:40:33,571 E 3353 3353] core_worker.cc:2465: Actor with class name: "
              b"'MapWorker(MapBatches(_Backbones))' and ID: '5e0a' has constructor arguments in the object "
              b"store and max_restarts > 0. If the arguments in the object store go out of scope ...")
    assert noise.clean(b"extract train: 44%" + notice) == b"extract train: 44%"
    error = b"[2026-11-27 05:40:33,571 E 3353 3353] core_worker.cc:10: the object store is full"
    assert noise.clean(error) == error + b"\n"
