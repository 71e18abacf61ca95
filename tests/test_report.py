"""The HTML report: contents, escaping, no reference outside its folder, and (when Chromium is here) a real browser."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from dynamicrafter.report import build_report
from dynamicrafter.video import write_frames

from .conftest import headless_chromium, poll

pytest.importorskip("cv2", reason="the report computes missing measures with opencv-python-headless")

EVIL_PROMPT = 'a <script>alert("x")</script> & friends'
EVIL_ERROR = "CUDA out of memory <b>&</b> more"


def texture_video(shift: int, frames: int = 16, size: int = 64, seed: int = 0) -> np.ndarray:
    """A coloured random texture sliding ``shift`` pixels per frame: (T, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, (size // 4 + 2, (size + shift * frames) // 4 + 2, 3), dtype=np.uint8)
    big = np.kron(big, np.ones((4, 4, 1), np.uint8))  # 4x4 blocks: visible, and still readable after H.264
    return np.stack([big[:size, shift * t : shift * t + size] for t in range(frames)])


def sidecar(output: str, image: str, seed: int, measures: dict | None, **extra) -> dict:
    record = {
        "tool": "dynamicrafter", "version": "0.1.0", "image": image, "prompt": f"prompt {seed}",
        "negative_prompt": "", "model": "tiny", "seed": seed, "settings": {"steps": 4, "cfg_scale": 7.5, "fs": 3},
        "image_scale": None, "fps": 8, "output": output, "frames": 16, "height": 64, "width": 64,
        "timings": {"sample": 1.5}, "mode": "i2v", **extra,
    }
    if measures is not None:
        record["measures"] = measures
    return record


def measures(motion: float, conformity: float, flags: list[str]) -> dict:
    return {"version": 1, "motion": motion, "flow_px": motion * 50, "dynamic_degree": motion * 50 / 64,
            "moving": "static" not in flags, "moving_pairs": 0 if "static" in flags else 15, "conformity": conformity,
            "conformity_min": conformity - 0.01, "temporal_consistency": 0.95, "flags": flags}


@pytest.fixture
def report_folder(tmp_path: Path) -> Path:
    """out/ with two MP4s and a PNG-frame folder with sidecars, a sweep's metrics.json; the photo lies outside."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    out.mkdir()
    import imageio.v2 as imageio

    imageio.imwrite(photos / "photo.png", texture_video(0, 1, 96)[0])
    write_frames(texture_video(2), out / "alpha.mp4", fps=8)
    write_frames(texture_video(0, seed=1), out / "beta.mp4", fps=8)
    write_frames(texture_video(3, frames=6, seed=2), out / "gamma", fps=8)
    records = {
        # relative to the cwd where the tool ran (tests run in tmp_path), output written as the tool did
        "alpha": sidecar("out/alpha.mp4", "photos/photo.png", 11, measures(0.08, 0.91, []), prompt=EVIL_PROMPT),
        "beta": sidecar(str(out / "beta.mp4"), str(photos / "photo.png"), 22, measures(0.0, 0.97, ["static"])),
        "gamma": sidecar("elsewhere/gamma", "gone/missing.png", 33, None),  # no measures: computed by the report
    }
    for name, record in records.items():
        (out / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps({"lambdas": [1.0], "conformity": [0.9]}), encoding="utf-8")
    (out / "broken.json").write_text("{not json", encoding="utf-8")
    return out


FAILURES = [{"image": "photos/bad <1>.png", "error": EVIL_ERROR, "seed": 7}]


def _urls(page: str) -> list[str]:
    urls = re.findall(r'\b(?:src|href|poster)="([^"]*)"', page)
    for frames in re.findall(r'data-frames="([^"]*)"', page):
        urls += json.loads(html.unescape(frames))
    return urls


def test_report_lists_items_and_failures(report_folder: Path):
    path = build_report(report_folder, failures=FAILURES)
    assert path == report_folder / "report.html"
    page = path.read_text(encoding="utf-8")
    assert [p.name for p in report_folder.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert page.count('<tr id="item-') == 3  # metrics.json and broken.json are skipped
    for name in ("alpha.mp4", "beta.mp4", "gamma"):
        assert name in page
    assert '<video class="media" src="alpha.mp4"' in page and '<video class="media" src="beta.mp4"' in page
    assert 'class="media flip" src="gamma/frame_0000.png"' in page
    # the flagged (static) item is highlighted, with advice in library terms
    beta = re.search(r'<tr id="item-2"[^>]*>', page).group(0)
    assert 'class="flagged"' in beta and "image_scale" in page
    assert 'class="flagged"' not in re.search(r'<tr id="item-1"[^>]*>', page).group(0)
    # measures of gamma were computed from its frames; its photo is missing
    assert "measures computed from the file" in page and "photo not found" in page
    # three stills per video, the photo embedded twice
    assert page.count('class="still"') == 9 and page.count('class="thumb" src="data:image/jpeg;base64,') == 2
    # failures, with every text escaped
    assert "photos/bad &lt;1&gt;.png" in page and "CUDA out of memory &lt;b&gt;&amp;&lt;/b&gt; more" in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; friends" in page
    assert "<script>alert" not in page and "<b>&</b>" not in page


def test_report_refers_to_nothing_outside_its_folder(report_folder: Path):
    page = build_report(report_folder, failures=FAILURES).read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    urls = _urls(page)
    assert len(urls) >= 2 + 6 + 2 + 9  # videos, PNG frames, photos, stills
    for url in urls:
        has_scheme = re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", url)
        assert url.startswith("data:") or not (has_scheme or url.startswith(("/", ".."))), url


def test_report_elsewhere_embeds_videos_outside_its_folder(report_folder: Path, tmp_path: Path):
    path = build_report(report_folder, tmp_path / "pages" / "r.html")
    page = path.read_text(encoding="utf-8")
    assert page.count('<video class="media" src="data:video/mp4;base64,') == 2
    assert all(u.startswith("data:") for u in _urls(page))


def test_empty_folder_gives_a_page(tmp_path: Path):
    page = build_report(tmp_path).read_text(encoding="utf-8")
    assert "0 videos, 0 flagged, 0 failed" in page


# --------------------------------------------------------------------------------------------------------------
# A real browser


def _browser():
    return headless_chromium(1600, 1000)




def test_report_in_chromium(report_folder: Path):
    path = build_report(report_folder, failures=FAILURES)
    browser = _browser()
    try:
        browser.get(path.as_uri())
        state_js = ("return Array.from(document.querySelectorAll('video')).map("
                    "v => [v.getAttribute('src'), v.readyState, v.duration, v.error ? v.error.code : 0])")

        def ready_or_failed() -> bool:
            videos = browser.execute_script(state_js)
            return all(rs >= 2 and d and d > 0 for _, rs, d, _ in videos) or any(err for *_, err in videos)

        poll(ready_or_failed)
        videos = browser.execute_script(state_js)
        assert len(videos) == 2
        for src, ready_state, duration, error in videos:
            assert error == 0, f"Chromium could not play {src} (MediaError {error}): no H.264 support?"
            assert ready_state >= 2 and duration > 1.5, (src, ready_state, duration)  # 16 frames at 8 fps: 2 s

        # sorting: a measure column orders the rows, a second click reverses them
        def order() -> list[str]:
            return [r.get_attribute("id") for r in browser.find_elements("css selector", "table.items > tbody > tr")]

        assert order() == ["item-1", "item-2", "item-3"]
        header = browser.find_element("css selector", 'th[data-key="conformity"]')
        header.click()  # conformity: alpha 0.91, beta 0.97, gamma none (last)
        assert order() == ["item-1", "item-2", "item-3"]
        header.click()
        assert order() == ["item-2", "item-1", "item-3"]
        browser.find_element("css selector", 'th[data-key="motion"]').click()  # beta 0, gamma computed > 0, alpha 0.08
        motions = [float(v) for v in browser.execute_script(
            "const col = Array.from(document.querySelectorAll('table.items > thead th'))"
            ".findIndex(h => h.dataset.key === 'motion');"
            "return Array.from(document.querySelectorAll('table.items > tbody > tr'))"
            ".map(r => r.children[col].dataset.v)")]
        assert motions == sorted(motions) and order()[0] == "item-2"

        # every request stays inside the page's folder.  Chromium leaves file:// loads out of the Resource Timing
        # list (performance.getEntriesByType('resource') is empty for a file:// page), so the DevTools network log,
        # which sees every request (file:, data:, http:), is what proves it; the Resource Timing names are checked too.
        inside = report_folder.resolve().as_uri() + "/"
        logged = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
        names = [m["params"]["request"]["url"] for m in logged if m["method"] == "Network.requestWillBeSent"]
        names += browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        for needed in ("report.html", "alpha.mp4", "beta.mp4", "gamma/frame_0000.png"):
            assert inside + needed in names, f"{needed} was not requested: the network log is incomplete"
        for name in names:
            assert name.startswith(("data:", inside)), name
        if os.environ.get("REPORT_SCREENSHOT"):
            browser.save_screenshot(os.environ["REPORT_SCREENSHOT"])
    finally:
        browser.quit()


def test_photos_are_found_from_anywhere(tmp_path: Path, monkeypatch):
    """A batch run from the folder above ``photos/`` records ``photos/a.png``; the page, built from another working
    folder, still finds the photo (relative to the folders above the sidecar)."""
    from PIL import Image

    from dynamicrafter.video import write_frames

    photos = tmp_path / "work" / "photos"
    (photos / "animated").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(photos / "a.png")
    write_frames(np.zeros((4, 32, 32, 3), np.uint8), photos / "animated" / "a.mp4", 8)
    (photos / "animated" / "a.json").write_text(json.dumps({
        "tool": "dynamicrafter", "image": "photos/a.png", "output": "photos/animated/a.mp4", "prompt": "p", "fps": 8}))
    monkeypatch.chdir(tmp_path)
    page = build_report(photos / "animated").read_text()
    assert "photo not found" not in page
