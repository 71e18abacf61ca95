"""``batch --engine ray`` on a local Ray instance (CPU, tiny model): the same videos as the local batch, a killed
worker's items redone, a bad item reported alone, nothing scheduled on a rerun, and a clear message without Ray."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dynamicrafter import ray_engine
from dynamicrafter.items import item_seed
from dynamicrafter.cli import app
from dynamicrafter.files import atomic_path
from dynamicrafter.video import read_video

try:
    import ray
except ImportError:  # only the tests that run Ray skip; the "Ray not installed" message is tested either way
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'dynamicrafter[ray]')")
runner = CliRunner()
FAST = ["--model", "tiny", "--steps", "2", "--format", "png", "--prompt", "moving"]


@pytest.fixture(autouse=True)
def own_instance(monkeypatch):
    """Never join a cluster someone started on this machine with `ray start`: each command starts its own."""
    monkeypatch.setenv("RAY_ADDRESS", "local")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def summary(result) -> dict[str, dict]:
    """The --json summary by image name."""
    return {os.path.basename(r["image"]): r for r in json.loads(result.stdout.strip().splitlines()[-1])}


def photos(folder, n):
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray((rng.random((96 + 8 * i, 128, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def no_partials(folder):
    assert not [p for p in folder.rglob("*") if ".partial" in p.name]


@pytest.fixture(scope="module")
def ray_batch(tmp_path_factory):
    """Six photos animated by two Ray workers of a local 2-CPU instance (so each worker has one CPU, one thread)."""
    root = tmp_path_factory.mktemp("ray")
    folder, out = photos(root / "photos", 6), root / "out"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # the command uses it as it is
    try:
        result = run("batch", folder, *FAST, "--seed", 11, "--out-dir", out, "--engine", "ray", "--workers", 2,
                     "--json")
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    return folder, out, result


@needs_ray
def test_ray_matches_local_batch(ray_batch, tmp_path):
    folder, out, result = ray_batch
    rows = summary(result)
    assert [rows[f"p{i}.png"]["status"] for i in range(6)] == ["done"] * 6
    assert all(rows[f"p{i}.png"]["seed"] == item_seed(11, f"p{i}.png") for i in range(6))
    # The local batch with the thread count of a 1-CPU Ray worker (on CPU, torch's float reduction order depends on
    # it: otherwise ~0.1% of the values differ by 1 of 255).
    torch.set_num_threads(1)
    try:
        local = run("batch", folder, *FAST, "--seed", 11, "--out-dir", tmp_path / "local", "--quiet")
    finally:
        torch.set_num_threads(2)
    assert local.exit_code == 0, local.output
    for i in range(6):
        frames = read_video(out / f"p{i}")
        assert frames.shape == (16, 128, 128, 3)
        assert np.array_equal(frames, read_video(tmp_path / "local" / f"p{i}"))
        record = json.loads((out / f"p{i}.json").read_text())
        assert record["seed"] == item_seed(11, f"p{i}.png") and record["settings"]["steps"] == 2
    no_partials(out)


@needs_ray
def test_rerun_schedules_no_work(ray_batch, monkeypatch):
    folder, out, _ = ray_batch

    def boom(*a, **k):
        raise AssertionError("work was scheduled although every item is finished")

    monkeypatch.setattr(ray_engine, "run_on_ray", boom)
    monkeypatch.setattr(ray, "init", boom)
    result = run("batch", folder, *FAST, "--seed", 11, "--out-dir", out, "--engine", "ray", "--workers", 2, "--json")
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in summary(result).values()} == {"skipped"} and len(summary(result)) == 6


@needs_ray
def test_killed_worker_is_redone(tmp_path, monkeypatch):
    """The first attempt at p1 kills its worker process in the middle of writing; Ray restarts it and redoes p1."""
    folder, out, marker = photos(tmp_path / "photos", 3), tmp_path / "out", tmp_path / "killed"

    class DiesOnce(ray_engine.BatchWorker):  # shipped to the workers by value
        def __call__(self, batch):
            if "p1" in list(batch["name"]) and not marker.exists():
                marker.write_text(str(os.getpid()))
                with atomic_path(out / "p1", is_dir=True) as partial:
                    (partial / "frame_0000.png").write_bytes(b"half a frame")
                    os._exit(1)
            return super().__call__(batch)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(ray_engine, "BatchWorker", DiesOnce)
    result = run("batch", folder, *FAST, "--out-dir", out, "--engine", "ray", "--workers", 2, "--json")
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized()  # the local instance the command started is gone
    assert marker.exists()  # a worker really died
    assert {r["status"] for r in summary(result).values()} == {"done"}
    for i in range(3):
        assert read_video(out / f"p{i}").shape == (16, 128, 128, 3) and (out / f"p{i}.json").is_file()
    no_partials(tmp_path)


@needs_ray
def test_broken_image_fails_alone_with_shards(tmp_path):
    folder = photos(tmp_path / "photos", 4)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    # sorted: broken, p0, p1, p2, p3 -> shard 1/2 is broken, p1, p3
    result = run("batch", folder, *FAST, "--out-dir", out, "--engine", "ray", "--workers", 2, "--shard", "1/2")
    assert result.exit_code == 1, result.output
    assert "broken.png" in result.output and "not a readable image" in result.output
    assert "2 done, 0 skipped, 1 failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["p1", "p1.json", "p3", "p3.json", "report.html"]


def test_without_ray_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    result = run("batch", photos(tmp_path / "photos", 1), *FAST, "--engine", "ray")
    assert result.exit_code == 2 and "pip install 'dynamicrafter[ray]'" in result.output
    assert not (tmp_path / "photos" / "animated").exists()


def test_engine_options_are_checked():
    result = run("batch", ".", *FAST, "--workers", 2)
    assert result.exit_code == 2 and "only apply to --engine ray" in result.output
    result = run("batch", ".", *FAST, "--engine", "ray", "--workers", 0)
    assert result.exit_code == 2 and "--workers must be at least 1" in result.output


def test_worker_plan():
    plan = ray_engine.plan_workers
    cpu2, gpu4 = [{"CPU": 2.0}], [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert plan(cpu2, 6, None, 2, None) == ray_engine.WorkerPlan(2, 1.0, 0.0)
    assert plan(cpu2, 6, None, None, None) == ray_engine.WorkerPlan(1, 2.0, 0.0)
    assert plan(cpu2, 1, None, 2, None).workers == 1  # never more workers than batches
    assert plan([{"CPU": 8.0}, {"CPU": 8.0}], 9, None, 3, None).cpus == 4.0  # all three fit on two nodes
    assert plan(gpu4, 9, None, None, None) == ray_engine.WorkerPlan(4, 1.0, 1.0)
    assert plan(gpu4, 9, None, None, 0.5).workers == 8
    assert plan(gpu4, 9, "cpu", 2, None).gpus == 0.0
    with pytest.raises(ValueError, match="do not fit"):
        plan(gpu4, 9, None, 5, None)
    with pytest.raises(ValueError, match="no GPUs"):
        plan(cpu2, 9, "cuda", None, None)
