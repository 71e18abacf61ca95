"""Running a batch of items (see :mod:`dynamicrafter.items` for how a folder becomes one): resume, jobs, groups.

An item's output is complete when its video *and* its JSON sidecar exist (the sidecar is written last, both
atomically), so a rerun skips finished items and redoes anything interrupted.  Each item's seed is derived from the
run's seed and the item's own name, so an item gives the same video whichever worker, shard or batch runs it.

Running is shared by the engines: the local batch and every Ray worker turn items into :class:`Job` s (an item, its
validated :class:`~dynamicrafter.api.Request` and its output path) with :func:`prepare_jobs`, and animate them on
a loaded :class:`~dynamicrafter.api.Animator` with :func:`run_jobs`, which saves each video and sidecar atomically
and yields one :class:`Outcome` per item.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import Animator
from .errors import SettingsError
from .files import check_name, sidecar_path
from .items import Item, seed_of
from .request import Request, make_request


@dataclass
class Outcome:
    """What happened to one item."""

    item: Item
    status: str  # "done", "skipped" (complete output existed) or "failed"
    output: Path | None = None
    error: str | None = None
    seed: int | None = None
    measures: dict[str, Any] | None = None  # see dynamicrafter.measures


@dataclass(frozen=True)
class BatchSpec:
    """What every item of one run shares: plain values only, so it can travel to Ray workers."""

    model: str
    out_dir: Path
    fmt: str = "mp4"
    seed: int = 123  # the run's seed; each item's own is derived from it (see seed_of)
    options: dict[str, Any] = field(default_factory=dict)  # run-wide ITEM_SETTINGS; an item's own ones win
    checkpoint: Path | None = None
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: fp16 on cuda, fp32 on cpu
    fps: int | None = None  # None: the preset's
    batch_size: int = 1  # photos per UNet call
    overwrite: bool = False
    measures: bool = True  # measure every video (sidecar, summary, report)
    weights: str | None = None  # see dynamicrafter.offload (None: chosen by memory)
    offload: str | None = None
    memory: str = "auto"
    max_memory: str | None = None  # e.g. "6GiB"

    def output(self, item: Item) -> Path:
        """Where ``item``'s video goes (a PNG frame folder has no suffix)."""
        return self.out_dir / (item.name if self.fmt == "png" else f"{item.name}.{self.fmt}")


@dataclass(frozen=True)
class Job:
    """A validated item: the request it makes and where its video goes."""

    item: Item
    request: Request
    output: Path


def is_complete(output: Path, sidecar: Path) -> bool:
    return output.exists() and sidecar.is_file()


def recorded(sidecar: Path) -> tuple[int | None, dict[str, Any] | None]:
    """The seed and measures a finished item's sidecar records (None for what cannot be read)."""
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        return int(record["seed"]), record.get("measures")
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def split_finished(items: Iterable[Item], spec: BatchSpec) -> tuple[list[Item], list[Outcome]]:
    """(items still to animate, an outcome for each of the others: "failed" for an item with a known problem,
    "skipped" for one whose complete output exists (with ``spec.overwrite`` nothing is skipped)).
    """
    todo, skipped = [], []
    for item in items:
        output = spec.output(item)
        if item.problem is not None:
            skipped.append(Outcome(item, "failed", error=item.problem))
        elif not spec.overwrite and is_complete(output, sidecar_path(output)):
            seed, measures = recorded(sidecar_path(output))
            skipped.append(Outcome(item, "skipped", output, seed=seed, measures=measures))
        else:
            todo.append(item)
    return todo, skipped


def clear_partials(items: Iterable[Item], spec: BatchSpec) -> None:
    """Remove what killed writes (SIGKILL, a dead worker) left of these items: ``.<name>.<random>.partial``."""
    names = {p.name for item in items for p in (spec.output(item), sidecar_path(spec.output(item)))}
    if not names or not spec.out_dir.is_dir():
        return
    for path in spec.out_dir.iterdir():
        stem = path.name[1 : -len(".partial")]
        if path.name.startswith(".") and path.name.endswith(".partial") and stem.rsplit(".", 1)[0] in names:
            shutil.rmtree(path, ignore_errors=True)


def group_for_batching(items: Iterable[Item], batch_size: int, key: Callable[[Item], Any]) -> list[list[Item]]:
    """Consecutive groups of at most ``batch_size`` items sharing ``key`` (the settings one UNet call needs)."""
    groups: dict[Any, list[list[Item]]] = {}
    order: list[list[Item]] = []
    for item in items:
        k = key(item)
        bucket = groups.setdefault(k, [])
        if not bucket or len(bucket[-1]) >= batch_size:
            bucket.append([])
            order.append(bucket[-1])
        bucket[-1].append(item)
    return order


def describe(exc: BaseException) -> str:
    """One line for a failed item: the message of an expected error, with the type for anything else."""
    return str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"


def prepare_job(item: Item, spec: BatchSpec) -> Job:
    """Validate one item (prompt, images, per-item settings, output name) into a :class:`Job`; raises what animate
    would."""
    if item.problem is not None:
        raise SettingsError("prompts", item.problem)
    if not item.prompt or not item.prompt.strip():
        raise SettingsError("prompt", f"no prompt: add {item.image.stem}.txt, a prompts-file row, or a prompt for all")
    opts = {**spec.options, **item.overrides}
    request = make_request(
        spec.model, item.image, item.prompt, end_image=opts.get("end_image"), seed=seed_of(item, spec.seed),
        negative_prompt=opts.get("negative_prompt", ""), image_scale=opts.get("image_scale"),
        steps=opts.get("steps"), cfg_scale=opts.get("cfg"), cfg_img=opts.get("cfg_img"), eta=opts.get("eta"),
        fs=opts.get("fs"), frames=opts.get("frames"),
    )
    check_name(spec.output(item))  # a name the file system refuses fails now, not after the generation
    check_name(sidecar_path(spec.output(item)))
    return Job(item, request, spec.output(item))


def prepare_jobs(items: Iterable[Item], spec: BatchSpec) -> tuple[list[Job], list[Outcome]]:
    """(jobs, a "failed" outcome for every item that cannot be animated); one bad item never stops the others."""
    jobs, failed = [], []
    for item in items:
        try:
            jobs.append(prepare_job(item, spec))
        except Exception as exc:
            failed.append(Outcome(item, "failed", error=describe(exc)))
    return jobs, failed


def run_jobs(
    animator: Animator,
    jobs: Sequence[Job],
    spec: BatchSpec,
    *,
    callback: Callable[[int, int], None] | None = None,
) -> Iterator[Outcome]:
    """Animate ``jobs`` on ``animator`` in groups of compatible settings (``spec.batch_size`` per UNet call).

    Each video and then its sidecar are saved atomically as its group finishes, and its outcome is yielded; a
    group that fails yields "failed" outcomes and the next one goes on.  ``callback(step, steps)`` reports denoising.
    """
    for group in group_for_batching(jobs, spec.batch_size, key=lambda j: j.request.batch_key):
        finished = 0
        try:
            results = animator.run([j.request for j in group], progress=callback, keep_encoders=True,
                                   measures=spec.measures)
            for job, result in zip(group, results):
                written = result.save(job.output, fmt=spec.fmt, fps=spec.fps, overwrite=True)
                finished += 1
                yield Outcome(job.item, "done", written, seed=result.seed, measures=result.measures)
        except Exception as exc:  # a failing group is reported; the others go on
            for job in group[finished:]:
                yield Outcome(job.item, "failed", error=describe(exc), seed=job.request.seed)
