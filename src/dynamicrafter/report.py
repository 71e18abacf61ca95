"""A self-contained HTML page that shows every output of a folder with its settings and quality measures.

:func:`build_report` reads the JSON sidecars (``"tool": "dynamicrafter"``) of one folder, not its subfolders, and
writes one page with inline CSS and JavaScript and no network access: photos and still frames are embedded as
``data:`` URIs; videos are linked by paths relative to the page's folder (a video outside that folder is embedded
as a ``data:`` URI when it is small enough, else left out), so the page never refers to anything outside its folder.
The table sorts by any column whose header is underlined (click again to reverse); flagged rows are highlighted.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .measures import MEASURES_VERSION, measure_video, warning_for

REPORT_NAME = "report.html"
THUMB_SIDE = 160  # longest side of embedded photos and frames, pixels
MAX_EMBED_BYTES = 16 * 2**20  # a video outside the page's folder is embedded up to this size
VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")
MIME = {".mp4": "video/mp4", ".gif": "image/gif", ".webp": "image/webp", ".png": "image/png"}

# (key in measures, column title, decimals shown)
MEASURE_COLUMNS = (
    ("motion", "motion", 4),
    ("dynamic_degree", "dynamic degree", 4),
    ("flow_px", "flow px", 2),
    ("conformity", "conformity", 3),
    ("conformity_min", "conformity min", 3),
    ("temporal_consistency", "temporal consistency", 4),
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# --------------------------------------------------------------------------------------------------------------
# Finding and reading files


def read_sidecars(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, record)`` of every ``*.json`` in ``folder`` whose record has ``"tool": "dynamicrafter"``, by name.

    Files that are not JSON objects, cannot be read, or come from elsewhere (a sweep's ``metrics.json``) are skipped.
    """
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(record, dict) and record.get("tool") == "dynamicrafter":
            found.append((path, record))
    return found


def _candidates(name: str | None, near: Path) -> list[Path]:
    """Where a path written in a sidecar may be now: beside the sidecar first, then as written (cwd or absolute),
    then relative to the folders above the sidecar (a batch writes ``photos/a.jpg`` run from the folder above
    ``photos/animated/``, and the page may be built from anywhere)."""
    if not name:
        return []
    p = Path(name)
    if p.is_absolute():
        return [near / p.name, p]
    above = list(near.absolute().parents)
    return [near / p.name, near / p, p, *(a / p for a in above), *(a / p.name for a in above[:1])]


def find_output(sidecar: Path, record: Mapping[str, Any]) -> Path | None:
    """The video a sidecar describes (a file or a PNG-frame folder), or None when it cannot be found."""
    names = _candidates(record.get("output"), sidecar.parent)
    names += [sidecar.with_suffix(s) for s in VIDEO_SUFFIXES] + [sidecar.with_suffix("")]
    for p in names:
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            return p
        if p.is_dir() and any(p.glob("frame_*.png")):
            return p
    return None


def find_photo(sidecar: Path, record: Mapping[str, Any]) -> Path | None:
    """The source photo of a sidecar, or None when it is gone."""
    return next((p for p in _candidates(record.get("image"), sidecar.parent) if p.is_file()), None)


def _inside(path: Path, page_dir: Path) -> str | None:
    """``path`` as a URL relative to ``page_dir`` when it lies inside it, else None."""
    try:
        rel = path.resolve().relative_to(page_dir.resolve())
    except ValueError:
        return None
    return quote(rel.as_posix())


def _file_uri(path: Path, page_dir: Path) -> str | None:
    """A relative URL for a file inside the page's folder, a data: URI for a small one elsewhere, or None."""
    rel = _inside(path, page_dir)
    if rel is not None:
        return rel
    if path.stat().st_size > MAX_EMBED_BYTES:
        return None
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _thumb_uri(image, side: int = THUMB_SIDE) -> str:
    """A JPEG data: URI of a PIL image or an (H, W, 3) uint8 array, shrunk to ``side`` pixels at most."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------------------
# One row


def _media_html(output: Path, page_dir: Path, fps: int) -> str:
    if output.is_dir():
        srcs = [u for u in (_file_uri(p, page_dir) for p in sorted(output.glob("frame_*.png"))) if u]
        if not srcs:
            return '<span class="note">frames too large to embed</span>'
        frames = _e(json.dumps(srcs))
        return f'<img class="media flip" src="{_e(srcs[0])}" data-frames="{frames}" data-fps="{fps}" alt="frames">'
    src = _file_uri(output, page_dir)
    if src is None:
        return '<span class="note">video outside the report folder and too large to embed</span>'
    if output.suffix.lower() == ".mp4":
        return f'<video class="media" src="{_e(src)}" autoplay muted loop playsinline controls preload="auto"></video>'
    return f'<img class="media" src="{_e(src)}" alt="video">'


def _number_cell(value: Any, decimals: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return '<td class="num" data-v="">–</td>'
    return f'<td class="num" data-v="{value!r}">{value:.{decimals}f}</td>'


def _settings_html(record: Mapping[str, Any]) -> str:
    pairs = [("model", record.get("model")), ("mode", record.get("mode")), ("fps", record.get("fps"))]
    if record.get("width"):
        pairs.append(("size", f"{record.get('frames')}×{record.get('height')}×{record.get('width')}"))
    settings = record.get("settings")
    pairs += list(settings.items()) if isinstance(settings, Mapping) else []
    if isinstance(record.get("timings"), Mapping):
        pairs += [(f"time {k}", f"{v} s") for k, v in record["timings"].items()]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs if v is not None)
    return f'<details><summary>settings</summary><table class="kv">{rows}</table></details>'


def _item_row(index: int, sidecar: Path, record: Mapping[str, Any], page_dir: Path) -> tuple[str, bool]:
    """One table row (HTML) for a sidecar, and whether the item is flagged."""
    notes: list[str] = []
    photo = find_photo(sidecar, record)
    photo_html = '<span class="note">photo not found</span>'
    if photo is not None:
        try:
            photo_html = f'<img class="thumb" src="{_thumb_uri(_open_image(photo))}" alt="photo">'
        except Exception as exc:  # noqa: BLE001 - an unreadable photo must not stop the report
            notes.append(f"photo unreadable: {exc}")

    measures = record.get("measures") if isinstance(record.get("measures"), Mapping) else None
    output = find_output(sidecar, record)
    media_html, stills_html = '<span class="note">video not found</span>', ""
    if output is not None:
        media_html = _media_html(output, page_dir, int(record.get("fps") or 8))
        try:
            from .video import read_video

            frames = read_video(output)
            picks = sorted({0, len(frames) // 2, len(frames) - 1})
            stills_html = "".join(
                f'<img class="still" src="{_thumb_uri(frames[i])}" alt="frame {i}" title="frame {i}">' for i in picks
            )
            if measures is None:
                measures = measure_video(frames)
                notes.append("measures computed from the file (no CLIP)")
        except Exception as exc:  # noqa: BLE001 - a corrupt or unreadable video is reported, not fatal
            notes.append(f"could not read the video: {exc}")

    measures = measures or {}
    flags = [str(f) for f in measures.get("flags") or []]
    warning = warning_for(measures)
    name = output.name if output is not None else sidecar.stem
    flags_cell = (
        f'<td data-v="{_e(" ".join(flags))}"><div class="flags">{_e(", ".join(flags))}</div>'
        + (f'<div class="warn">{_e(warning)}</div>' if warning else "")
        + "".join(f'<div class="note">{_e(n)}</div>' for n in notes) + "</td>"
    )
    cells = [  # the order of the headers in render()
        f'<td class="num" data-v="{index}">{index}</td>',
        f"<td>{photo_html}</td>",
        f'<td>{media_html}<div class="name">{_e(name)}</div></td>',
        f'<td class="stills">{stills_html}</td>',
        flags_cell,
        f'<td class="prompt"><div>{_e(record.get("prompt"))}</div>'
        + (f'<div class="neg">not: {_e(record["negative_prompt"])}</div>' if record.get("negative_prompt") else "")
        + _settings_html(record) + "</td>",
        _number_cell(record.get("seed"), 0),
        _number_cell(record.get("image_scale"), 2),
        *(_number_cell(measures.get(key), dec) for key, _, dec in MEASURE_COLUMNS),
    ]
    cls = ' class="flagged"' if flags else ""
    return f'<tr id="item-{index}"{cls} data-sidecar="{_e(sidecar.name)}">{"".join(cells)}</tr>', bool(flags)


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.copy()


def _failure_rows(failures: Iterable[Mapping[str, Any]]) -> str:
    return "".join(
        f'<tr class="failed"><td>{_e(f.get("image"))}</td><td>{_e(f.get("prompt"))}</td><td>{_e(f.get("seed"))}</td>'
        f'<td class="error">{_e(f.get("error"))}</td></tr>'
        for f in failures
    )


# --------------------------------------------------------------------------------------------------------------
# The page

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.15em;margin-top:1.5em}
table.items,table.failures{border-collapse:collapse;background:#fff}
table.items>thead th,table.failures th{position:sticky;top:0;background:#eee;text-align:left;padding:.4em;
font-weight:600}
table.items>tbody>tr>td,table.failures td{border-top:1px solid #ddd;padding:.4em;vertical-align:top}
th.sortable{cursor:pointer;text-decoration:underline dotted;white-space:nowrap}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.flagged>td{background:#fff1e6}tr.flagged .flags{color:#b3261e;font-weight:600}
.media{width:224px;max-height:320px;object-fit:contain;display:block}.thumb,.still{max-width:120px;max-height:120px}
.stills{white-space:nowrap}.still{margin-right:2px}.name{font-size:.8em;color:#666;word-break:break-all}
.prompt{max-width:22em}.neg{color:#666;font-size:.9em}.note{color:#888;font-size:.85em}.warn{font-size:.85em;max-width:18em}
table.kv th,table.kv td{font-size:.8em;padding:0 .5em 0 0;text-align:left;font-weight:normal;color:#444}
td.error{color:#b3261e;white-space:pre-wrap}dl.legend{font-size:.85em;color:#444}dl.legend dt{font-weight:600}
"""

_JS = """
document.querySelectorAll("th.sortable").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    table.querySelectorAll("th.sortable").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    function key(row) {
      var v = row.children[col].getAttribute("data-v");
      return v === null || v === "" ? null : (isNaN(Number(v)) ? v : Number(v));
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      return (x < y ? -1 : x > y ? 1 : 0) * dir;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
document.querySelectorAll("img.flip").forEach(function (img) {
  var srcs = JSON.parse(img.getAttribute("data-frames")), i = 0;
  var delay = 1000 / (Number(img.getAttribute("data-fps")) || 8);
  setInterval(function () { i = (i + 1) % srcs.length; img.src = srcs[i]; }, delay);
});
"""

_LEGEND = """<details><summary>What the measures mean</summary><dl class="legend">
<dt>motion</dt><dd>mean absolute change between consecutive frames, 0–1</dd>
<dt>flow px / dynamic degree</dt><dd>optical flow of the fastest 5 % of the picture per frame, in pixels / as a share
of the frame's shorter side; a video is static when fewer than 4 in 15 frame pairs move more than 6 px per 256 px</dd>
<dt>conformity (min)</dt><dd>CLIP cosine similarity of the photo and each frame (mean, minimum), 1 = same look</dd>
<dt>temporal consistency</dt><dd>CLIP cosine similarity of adjacent frames, 1 = no flicker</dd>
<dt>flags</dt><dd>black, flat (uniform), saturated (clipped) frames; static video</dd></dl></details>"""


def render(rows: list[str], failures: list[Mapping[str, Any]], title: str, flagged: int) -> str:
    """The whole page from rendered item rows and failure records."""
    heads = ['<th class="sortable">#</th>', "<th>photo</th>", "<th>video</th>", "<th>first · middle · last</th>",
             '<th class="sortable" data-key="flags">flags</th>', "<th>prompt</th>", '<th class="sortable">seed</th>',
             '<th class="sortable">image scale</th>']
    heads += [f'<th class="sortable" data-key="{key}">{_e(t)}</th>' for key, t, _ in MEASURE_COLUMNS]
    summary = f"{len(rows)} video{'s' * (len(rows) != 1)}, {flagged} flagged, {len(failures)} failed"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f'<h1>{_e(title)}</h1><p class="summary">{_e(summary)} · measures v{MEASURES_VERSION}</p>{_LEGEND}',
    ]
    if rows:
        parts.append(f'<table class="items"><thead><tr>{"".join(heads)}</tr></thead>'
                     f'<tbody>{"".join(rows)}</tbody></table>')
    if failures:
        parts.append('<h2>Failed</h2><table class="failures"><thead><tr><th>image</th><th>prompt</th><th>seed</th>'
                     f"<th>error</th></tr></thead><tbody>{_failure_rows(failures)}</tbody></table>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def build_report(
    folder: str | Path, out: str | Path | None = None, *, failures: Iterable[Mapping[str, Any]] | None = None
) -> Path:
    """Write the HTML report of the sidecars in ``folder`` to ``out`` (default ``folder/report.html``); returns it.

    ``failures`` are extra rows for inputs that produced no video: mappings with ``image`` and ``error`` (and
    optionally ``prompt``, ``seed``).  Sidecars without ``measures`` get the pixel measures computed from the decoded
    file.  The page is written to a temporary file beside ``out`` and renamed, so a reader never sees half a page.
    """
    folder = Path(folder)
    out = Path(out) if out is not None else folder / REPORT_NAME
    page_dir = out.parent if str(out.parent) else Path(".")
    page_dir.mkdir(parents=True, exist_ok=True)
    sidecars = read_sidecars(folder)
    items = [_item_row(i, path, record, page_dir) for i, (path, record) in enumerate(sidecars, start=1)]
    title = f"dynamicrafter report — {folder.resolve().name}"
    page = render([row for row, _ in items], list(failures or []), title, sum(flag for _, flag in items))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=page_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
