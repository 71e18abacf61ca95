"""Running a batch on Ray Data: ``dynamicrafter batch FOLDER --engine ray``.

The items still to do become a Ray Dataset of plain rows (image path, name, prompt, seed, per-item settings as
JSON); ``map_batches`` hands them to a fixed pool of :class:`BatchWorker` actors, each of which loads the model once
and animates its rows with the same library code as the local batch (:func:`~dynamicrafter.batch.prepare_jobs`,
:func:`~dynamicrafter.batch.run_jobs`), writing videos and sidecars atomically into the shared output folder.
Each worker returns one row per item (name, status, output, error, seed), which the driver turns back into
:class:`~dynamicrafter.batch.Outcome` s.

Faults: a bad item is a "failed" row (it never raises, so it is never retried); a worker process that dies has its
batches redone by a restarted worker, at most ``MAX_RETRIES`` times, after which their items are reported failed and
the others go on.  Ray is imported only when a run starts, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .batch import BatchSpec, Outcome, describe, prepare_jobs, run_jobs
from .errors import SettingsError
from .items import Item, seed_of

INSTALL_HINT = "pip install 'dynamicrafter[ray]'"
MAX_RETRIES = 3  # restarts of a dead worker, and re-runs of each batch it held


class RayUnavailableError(ImportError):
    """Ray Data is not installed."""


class ClusterTooSmallError(SettingsError):
    """The requested workers (or device) do not fit the Ray cluster."""


class RayClusterError(ValueError):
    """A Ray cluster that cannot be reached."""


def require_ray() -> None:
    """Import Ray Data, or say exactly what to install."""
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayUnavailableError(f"the Ray engine needs Ray Data, which is not installed ({exc.name or exc}); "
                                  f"install it with: {INSTALL_HINT}") from None


def to_row(item: Item, run_seed: int) -> dict[str, Any]:
    """An item as a plain, serialisable Dataset row: absolute paths (workers run elsewhere), its seed resolved once."""
    settings = dict(item.overrides)
    if "end_image" in settings:
        settings["end_image"] = str(Path(settings["end_image"]).absolute())
    return {"image": str(item.image.absolute()), "name": item.name, "prompt": item.prompt or "",
            "seed": seed_of(item, run_seed), "settings": json.dumps(settings)}


def from_row(row: dict[str, Any]) -> Item:
    overrides = {**json.loads(str(row["settings"])), "seed": int(row["seed"])}
    return Item(image=Path(str(row["image"])), prompt=str(row["prompt"]) or None, name=str(row["name"]),
                overrides=overrides)


class BatchWorker:
    """A Ray Data actor: loads the model once, then animates each batch of rows with the library's runner."""

    def __init__(self, spec: BatchSpec) -> None:
        import ray
        import torch

        from .api import Animator

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        self.spec, self.error = spec, None
        try:  # a worker that cannot load the model reports it on each of its items, like a bad item
            from .offload import parse_size

            self.animator = Animator.load(spec.model, checkpoint=spec.checkpoint, device=spec.device, dtype=spec.dtype,
                                          weights=spec.weights, offload=spec.offload, memory=spec.memory,
                                          max_memory=parse_size(spec.max_memory))
        except Exception as exc:
            self.error = describe(exc)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        keys = list(batch)
        items = [from_row({k: batch[k][i] for k in keys}) for i in range(len(batch["name"]))]
        if self.error is not None:
            outcomes = [Outcome(item, "failed", error=self.error, seed=seed_of(item, self.spec.seed)) for item in items]
        else:
            jobs, outcomes = prepare_jobs(items, self.spec)
            outcomes += run_jobs(self.animator, jobs, self.spec)
        return {
            "image": [str(o.item.image) for o in outcomes],
            "name": [o.item.name for o in outcomes],
            "status": [o.status for o in outcomes],
            "output": [str(o.output) if o.output else "" for o in outcomes],
            "error": [o.error or "" for o in outcomes],
            "seed": [-1 if o.seed is None else o.seed for o in outcomes],
            "measures": [json.dumps(o.measures) for o in outcomes],
        }


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cpus: float  # per worker
    gpus: float  # per worker


def fits(node_capacity: Sequence[float], per_worker: float) -> int:
    """How many workers needing ``per_worker`` of a resource the nodes can hold."""
    return sum(int(c / per_worker + 1e-9) for c in node_capacity) if per_worker > 0 else 1 << 30


def plan_workers(
    nodes: Sequence[dict[str, float]], batches: int, device: str | None, workers: int | None, gpus: float | None
) -> WorkerPlan:
    """Workers and their CPUs/GPUs from the nodes' resources: one per GPU by default (1 on a CPU-only cluster),
    never more than the batches to run, and always all schedulable at once (so the pool cannot wait forever)."""
    node_gpus = [n.get("GPU", 0.0) for n in nodes]
    node_cpus = [n.get("CPU", 0.0) for n in nodes]
    if device is not None and device.startswith("cuda") and not any(node_gpus):
        raise ClusterTooSmallError("device", "{setting} cuda was asked for, but the Ray cluster has no GPUs")
    if gpus is None:
        gpus = 1.0 if any(node_gpus) and device != "cpu" else 0.0
    if workers is None:
        workers = fits(node_gpus, gpus) if gpus > 0 else 1
    workers = max(1, min(workers, batches))
    if gpus > 0 and fits(node_gpus, gpus) < workers:
        raise ClusterTooSmallError("workers", f"{workers} workers with {gpus:g} GPU each do not fit the Ray cluster "
                                   f"({sum(node_gpus):g} GPUs on {len(nodes)} node(s)); use fewer {{setting}}")
    if gpus > 0:
        cpus = 1.0
    else:  # CPU workers share the CPUs: the largest even share that still places every worker on some node
        shares = sorted({c / k for c in node_cpus for k in range(1, workers + 1) if c > 0}, reverse=True)
        cpus = next((s for s in shares if fits(node_cpus, s) >= workers), 0.0)
        if cpus <= 0:
            raise ClusterTooSmallError("workers", "the Ray cluster has no CPUs")
    return WorkerPlan(workers, cpus, gpus)


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody answers at (Ray itself keeps retrying for minutes)."""
    if address is None or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise RayClusterError(f"cannot reach the Ray cluster at {address}: {exc}") from None


@contextlib.contextmanager
def connected(address: str | None, quiet: bool) -> Iterator[None]:
    """A Ray session for the block: joined or started here (and shut down after), or the one already open."""
    import logging

    import ray

    level = logging.ERROR if quiet else logging.INFO
    logging.getLogger("ray.data").setLevel(level)
    if ray.is_initialized():
        yield
        return
    check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=level)
    except ConnectionError as exc:
        raise RayClusterError(f"cannot reach the Ray cluster at {address or 'RAY_ADDRESS'}: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()


def run_on_ray(
    items: Sequence[Item],
    spec: BatchSpec,
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    quiet: bool = False,
) -> Iterator[Outcome]:
    """Animate ``items`` on a Ray cluster, yielding each item's outcome as its batch finishes.

    ``address`` None: the cluster of ``RAY_ADDRESS`` or of ``ray start`` on this machine, else a new local Ray
    instance with this machine's CPUs and GPUs (shut down at the end); a Ray session already open in this process is
    used as it is.  Items without a result (their worker died more than ``MAX_RETRIES`` times, or the run itself
    stopped) are yielded as failed; a rerun tries them again.
    """
    if not items:
        return
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    checkpoint = spec.checkpoint.absolute() if spec.checkpoint else None
    remote = replace(spec, out_dir=spec.out_dir.absolute(), checkpoint=checkpoint)  # as every node sees it
    # Ray prints worker deaths on stdout: keep stdout for the results (the --json summary)
    with contextlib.redirect_stdout(sys.stderr), connected(address, quiet):
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        batches = -(-len(items) // spec.batch_size)
        plan = plan_workers(nodes, batches, spec.device, workers, gpus_per_worker)
        with warnings.catch_warnings():  # Ray 2.5x flags its own settings and the actor options as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            context = DataContext.get_current()  # (a dataset copies it when created)
            context.max_errored_blocks = -1  # a batch that outlives its retries is reported, the run goes on
            context.max_consecutive_actor_init_deaths = MAX_RETRIES  # workers that die while loading the model
            context.enable_progress_bars = not quiet
            dataset = ray.data.from_items([to_row(item, spec.seed) for item in items], override_num_blocks=batches)
            results = dataset.map_batches(
                BatchWorker, fn_constructor_kwargs={"spec": remote}, batch_size=spec.batch_size,
                compute=ActorPoolStrategy(size=plan.workers, max_tasks_in_flight_per_actor=2),
                num_cpus=plan.cpus, num_gpus=plan.gpus or None,
                max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
            )
        pending = {str(item.image.absolute()): item for item in items}  # rows carry absolute paths (to_row)
        lost = f"its Ray worker died and {MAX_RETRIES} retries ran out; rerun to try again"
        try:
            for row in results.iter_rows():
                item = pending.pop(str(row["image"]))
                yield Outcome(item, str(row["status"]), spec.output(item) if row["output"] else None,
                              str(row["error"]) or None, None if row["seed"] < 0 else int(row["seed"]),
                              json.loads(str(row["measures"])))
        except Exception as exc:  # the run itself broke (e.g. workers that die while loading the model)
            lost = f"the Ray run stopped ({type(exc).__name__}: {next(iter(str(exc).splitlines()), '')})"
        for item in pending.values():
            yield Outcome(item, "failed", error=lost, seed=seed_of(item, spec.seed))
