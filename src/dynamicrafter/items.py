"""A batch's work list: the photos of a folder, their prompts and per-item settings, output names, seeds, shards.

Every photo becomes an :class:`Item`, including those that cannot be animated: a manifest row with a bad value, two
manifest rows for one photo, photos whose output names would collide.  Such an item carries its ``problem`` and
fails alone (the summary names it); the others run.  Output names are the photo's stem, or stem + suffix
(``a_png``) for photos sharing a stem; names are compared case-insensitively (as macOS and Windows file systems
do), and photos whose names still collide are refused by name instead of overwriting one another.  Files this tool
wrote (an image whose JSON sidecar records it as a dynamicrafter output) are never taken for photos, so the output
folder may be the photo folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SettingsError
from .files import sidecar_path
from .images import IMAGE_SUFFIXES

# Per-item settings a manifest may carry, with their types.
ITEM_SETTINGS: dict[str, type] = {
    "seed": int, "steps": int, "cfg": float, "cfg_img": float, "eta": float, "fs": int, "frames": int,
    "negative_prompt": str, "end_image": str, "image_scale": float,
}


KINDS = {int: "a whole number", float: "a number", str: "text"}


class ManifestError(ValueError):
    """A prompts file that cannot be read at all (a bad row only fails its item)."""


@dataclass(frozen=True)
class Item:
    """One photo to animate and everything that is particular to it."""

    image: Path
    prompt: str | None
    name: str  # output stem, unique within the batch (case-insensitively)
    overrides: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why this item cannot run (found while listing); None: fine so far


def item_seed(run_seed: int, name: str) -> int:
    """A stable 31-bit seed from the run's seed and the item's photo file name (``p1.png``)."""
    digest = hashlib.sha256(f"{run_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_of(item: Item, run_seed: int) -> int:
    """The item's own manifest seed, else :func:`item_seed` of the run's seed and its photo's file name (not the
    output name, which another photo with the same stem can change)."""
    return int(item.overrides["seed"]) if "seed" in item.overrides else item_seed(run_seed, item.image.name)


def is_tool_output(path: Path) -> bool:
    """Whether ``path`` is a video or frame this tool wrote: its sidecar says so."""
    try:
        record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        return record.get("tool") == "dynamicrafter" and Path(str(record.get("output"))).name == path.name
    except (OSError, ValueError, AttributeError):
        return False


def find_images(folder: Path) -> list[Path]:
    """Photos directly in ``folder`` (png/jpg/jpeg/webp/bmp, any case), sorted by name; the tool's own outputs
    (a ``.webp`` video with its sidecar) are left out."""
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_tool_output(p)
    )


def _manifest_rows(path: Path) -> list[Any]:
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
        return rows
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    raise ManifestError(f"prompts file must be .csv or .jsonl (got {path.name})")


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """CSV (header row) or JSONL prompts file -> {image name: {"prompt": ..., settings...}}.

    A row whose value has the wrong type, or a second row for the same photo, gives that photo an entry with a
    ``problem`` (the photo then fails alone); a row without ``image`` or an unreadable file raises ManifestError.
    """
    out: dict[str, dict[str, Any]] = {}
    first_row: dict[str, int] = {}
    for n, row in enumerate(_manifest_rows(path), 1):
        if not isinstance(row, dict) or not row.get("image"):
            raise ManifestError(f"{path}: row {n} has no 'image'")
        name = Path(str(row["image"])).name
        if name in first_row:
            out[name] = {"problem": f"{path.name}: rows {first_row[name]} and {n} both give settings for {name}; "
                                    f"keep one"}
            continue
        first_row[name] = n
        entry: dict[str, Any] = {"prompt": row.get("prompt")}
        for key, kind in ITEM_SETTINGS.items():
            value = row.get(key)
            if value not in (None, ""):
                try:
                    entry[key] = kind(value)
                except (TypeError, ValueError):
                    entry = {"problem": f"{path.name}: row {n}: {key}={value!r} is not {KINDS[kind]}"}
                    break
        out[name] = entry
    return out


def _output_names(images: Sequence[Path]) -> tuple[list[str], dict[int, str]]:
    """Output stems for ``images`` and, by position, a problem for those whose names collide case-insensitively."""
    stems = defaultdict(int)
    for image in images:
        stems[image.stem.casefold()] += 1
    names = [
        f"{p.stem}_{p.suffix.lstrip('.').lower()}" if stems[p.stem.casefold()] > 1 else p.stem for p in images
    ]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        groups[name.casefold()].append(i)
    problems = {}
    for members in groups.values():
        if len(members) > 1:
            photos = ", ".join(images[i].name for i in members)
            for i in members:
                problems[i] = (f"photos {photos} would write the same output ({names[i]}, letter case aside); "
                               f"rename one of them")
    return names, problems


def collect_items(folder: Path, prompt: str | None = None, manifest: Path | None = None) -> list[Item]:
    """Every image of ``folder`` with its prompt: manifest row, else ``<stem>.txt`` beside it, else ``prompt``.

    A manifest row whose photo is not in the folder is an item too (it fails, and the summary says why).
    """
    rows = read_manifest(manifest) if manifest else {}
    images = find_images(folder)
    present = {image.name for image in images}
    missing = [folder / name for name in rows if name not in present]  # reported as failed items, never skipped
    everything = images + missing
    names, collisions = _output_names(everything)
    items = []
    for i, image in enumerate(everything):
        row = dict(rows.get(image.name, {}))
        problem = row.pop("problem", None) or collisions.get(i)
        text = row.pop("prompt", None)
        sidecar = image.with_suffix(".txt")
        if not text and sidecar.is_file():
            text = sidecar.read_text(encoding="utf-8").strip()
        if "end_image" in row:
            row["end_image"] = str(folder / row["end_image"])
        items.append(Item(image=image, prompt=text or prompt, name=names[i], overrides=row, problem=problem))
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
