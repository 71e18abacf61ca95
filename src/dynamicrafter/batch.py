"""Batches of photos: discovering items, reading prompt manifests, per-item seeds, and the resumable runner.

An item's output is complete when its video *and* its JSON sidecar exist (the sidecar is written last, both
atomically), so a rerun skips finished items and redoes anything interrupted.  Each item's seed is derived from the
run's seed and the item's own name, so an item gives the same video whichever worker, shard or batch runs it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .images import IMAGE_SUFFIXES

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


def item_seed(run_seed: int, name: str) -> int:
    """A stable 31-bit seed from the run's seed and the item's name."""
    digest = hashlib.sha256(f"{run_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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
    """Every image of ``folder`` with its prompt: manifest row, else ``<stem>.txt`` beside it, else ``prompt``."""
    rows = read_manifest(manifest) if manifest else {}
    items = []
    for image in find_images(folder):
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
        raise ValueError(f"--shard must look like I/N, e.g. 1/4 (got {text!r})") from None
    if not (n >= 1 and 1 <= i <= n):
        raise ValueError(f"--shard {text}: need 1 <= I <= N")
    return i, n


def shard(items: Sequence[Item], spec: tuple[int, int] | None) -> list[Item]:
    """The I-th of N disjoint slices (round-robin over the sorted items), or everything."""
    if spec is None:
        return list(items)
    i, n = spec
    return [item for k, item in enumerate(items) if k % n == i - 1]


def is_complete(output: Path, sidecar: Path) -> bool:
    return output.exists() and sidecar.is_file()


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
