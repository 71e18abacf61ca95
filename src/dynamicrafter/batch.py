"""Batches of photos: discovering items, reading prompt manifests, per-item seeds, sharding, and running them.

An item's output is complete when its video *and* its JSON sidecar exist (the sidecar is written last, both
atomically), so a rerun skips finished items and redoes anything interrupted.  Each item's seed is derived from the
run's seed and the item's own name, so an item gives the same video whichever worker, shard or batch runs it.

Running is shared by the engines: the local batch and every Ray worker turn items into :class:`Job` s (an item, its
validated :class:`~dynamicrafter.api.Request` and its output path) with :func:`prepare_jobs`, and animate them on
a loaded :class:`~dynamicrafter.api.Animator` with :func:`run_jobs`, which saves each video and sidecar atomically
and yields one :class:`Outcome` per item.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .api import Animator
from .errors import SettingsError
from .files import sidecar_path
from .images import IMAGE_SUFFIXES
from .request import Request, make_request

# Per-item settings a manifest may carry, with their types.
ITEM_SETTINGS: dict[str, type] = {
    "seed": int, "steps": int, "cfg": float, "cfg_img": float, "eta": float, "fs": int, "frames": int,
    "negative_prompt": str, "end_image": str, "image_scale": float,
}


class ManifestError(ValueError):
    """A prompts file that cannot be read."""


@dataclass(frozen=True)
class Item:
    """One photo to animate and everything that is particular to it."""

    image: Path
    prompt: str | None
    name: str  # output stem, unique within the batch
    overrides: dict[str, Any] = field(default_factory=dict)


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

    def output(self, item: Item) -> Path:
        """Where ``item``'s video goes (a PNG frame folder has no suffix)."""
        return self.out_dir / (item.name if self.fmt == "png" else f"{item.name}.{self.fmt}")


@dataclass(frozen=True)
class Job:
    """A validated item: the request it makes and where its video goes."""

    item: Item
    request: Request
    output: Path


def item_seed(run_seed: int, name: str) -> int:
    """A stable 31-bit seed from the run's seed and the item's photo file name (``p1.png``)."""
    digest = hashlib.sha256(f"{run_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_of(item: Item, run_seed: int) -> int:
    """The item's own manifest seed, else :func:`item_seed` of the run's seed and its photo's file name (not the
    output name, which another photo with the same stem can change)."""
    return int(item.overrides["seed"]) if "seed" in item.overrides else item_seed(run_seed, item.image.name)


def find_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (png/jpg/jpeg/webp/bmp, any case), sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """CSV (header row) or JSONL prompts file -> {image name: {"prompt": ..., settings...}}."""
    if not path.is_file():
        raise ManifestError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read prompts file {path}: {exc}") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ManifestError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    elif path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        raise ManifestError(f"prompts file must be .csv or .jsonl (got {path.name})")
    out: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("image"):
            raise ManifestError(f"{path}: row {n} has no 'image'")
        entry: dict[str, Any] = {"prompt": row.get("prompt")}
        for key, kind in ITEM_SETTINGS.items():
            value = row.get(key)
            if value not in (None, ""):
                try:
                    entry[key] = kind(value)
                except (TypeError, ValueError):
                    raise ManifestError(f"{path}: row {n}: {key}={value!r} is not a {kind.__name__}") from None
        out[Path(str(row["image"])).name] = entry
    return out


def collect_items(folder: Path, prompt: str | None = None, manifest: Path | None = None) -> list[Item]:
    """Every image of ``folder`` with its prompt: manifest row, else ``<stem>.txt`` beside it, else ``prompt``.

    A manifest row whose photo is not in the folder is an item too (it fails, and the summary says why).  Outputs
    are named after the photo's stem; photos sharing a stem (``a.png``, ``a.jpg``) keep their suffix (``a_png``).
    """
    rows = read_manifest(manifest) if manifest else {}
    images = find_images(folder)
    present = {image.name for image in images}
    missing = [folder / name for name in rows if name not in present]  # reported as failed items, never skipped
    items = []
    for image in images + missing:
        row = dict(rows.get(image.name, {}))
        text = row.pop("prompt", None)
        sidecar = image.with_suffix(".txt")
        if not text and sidecar.is_file():
            text = sidecar.read_text(encoding="utf-8").strip()
        if "end_image" in row:
            row["end_image"] = str(folder / row["end_image"])
        items.append(Item(image=image, prompt=text or prompt, name=image.stem, overrides=row))
    names = [i.name for i in items]
    for item in items:  # photo.png and photo.jpg would share an output name: keep the suffix for those
        if names.count(item.name) > 1:
            items[items.index(item)] = replace(item, name=f"{item.image.stem}_{item.image.suffix.lstrip('.').lower()}")
    return items


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (1-based) -> (I, N); None passes through."""
    if text is None:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise SettingsError("shard", f"{{setting}} must look like I/N, e.g. 1/4 (got {text!r})") from None
    if not (n >= 1 and 1 <= i <= n):
        raise SettingsError("shard", f"{{setting}} {text}: need 1 <= I <= N")
    return i, n


def shard(items: Sequence[Item], spec: tuple[int, int] | None) -> list[Item]:
    """The I-th of N disjoint slices (round-robin over the sorted items), or everything."""
    if spec is None:
        return list(items)
    i, n = spec
    return [item for k, item in enumerate(items) if k % n == i - 1]


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
    """(items still to animate, a "skipped" outcome for each item whose complete output exists).

    With ``spec.overwrite`` nothing is skipped.
    """
    todo, skipped = [], []
    for item in items:
        output = spec.output(item)
        if not spec.overwrite and is_complete(output, sidecar_path(output)):
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
    """Validate one item (prompt, images, per-item settings) into a :class:`Job`; raises what animate would."""
    if not item.prompt or not item.prompt.strip():
        raise SettingsError("prompt", f"no prompt: add {item.image.stem}.txt, a prompts-file row, or a prompt for all")
    opts = {**spec.options, **item.overrides}
    request = make_request(
        spec.model, item.image, item.prompt, end_image=opts.get("end_image"), seed=seed_of(item, spec.seed),
        negative_prompt=opts.get("negative_prompt", ""), image_scale=opts.get("image_scale"),
        steps=opts.get("steps"), cfg_scale=opts.get("cfg"), cfg_img=opts.get("cfg_img"), eta=opts.get("eta"),
        fs=opts.get("fs"), frames=opts.get("frames"),
    )
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
