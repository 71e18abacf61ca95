"""The web UI (``dynamicrafter ui``): its checks and names without a server, then a real server on 127.0.0.1 with the
tiny model, driven through ``gradio_client`` and in headless Chromium, its outputs compared with the CLI's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynamicrafter.cli import app
from dynamicrafter.presets import get_preset
from dynamicrafter.ui_jobs import AnimateForm, Jobs, SweepForm, Upload, free_folder, free_output, ui_message

from .conftest import headless_chromium, poll

EXAMPLE = Path(__file__).parents[1] / "examples" / "astronaut.jpg"
CLI = [sys.executable, "-c", "from dynamicrafter.cli import app; app(prog_name='dynamicrafter')"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}  # torch's threads as in the tests (conftest): the same CPU sums
runner = CliRunner()


def cli_error(*args) -> str:
    """The CLI's one-line message (without ``error: ``) for ``args``."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    return line.removeprefix("error: ")


# ----------------------------------------------------------------------------------------------------------------
# Without a server


def test_without_gradio_the_command_names_the_extra(monkeypatch, never_load):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    result = runner.invoke(app, ["ui", "--model", "tiny"])
    assert result.exit_code == 2 and "pip install 'dynamicrafter[ui]'" in result.output, result.output


def test_bad_options_fail_before_loading(tmp_path, never_load):
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        pytest.skip("the web UI is the optional extra: pip install 'dynamicrafter[ui]'")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_error("ui", "--model", "tiny", "--port", port).startswith(f"cannot serve on 127.0.0.1:{port}")
    assert cli_error("ui", "--model", "huge").startswith("unknown model 'huge'")
    assert cli_error("ui", "--model", "tiny", "--checkpoint", tmp_path / "no.ckpt").startswith("checkpoint not found")
    # the name now; whether this machine has the device once the page is up (torch loads after it), still before
    # the model (resolve_device, as for animate)
    assert cli_error("ui", "--model", "tiny", "--device", "tpu").startswith("unknown --device 'tpu'")
    (tmp_path / "file").write_text("")
    assert cli_error("ui", "--model", "tiny", "--out-dir", tmp_path / "file" / "out").startswith("cannot create output folder")


def test_outputs_are_named_as_the_cli_names_them_and_never_replaced(tmp_path):
    assert free_output(tmp_path, "photo", "mp4") == tmp_path / "photo.mp4"
    assert free_output(tmp_path, "photo", "png") == tmp_path / "photo"  # a folder of frames
    (tmp_path / "photo.mp4").write_bytes(b"")
    assert free_output(tmp_path, "photo", "mp4") == tmp_path / "photo_1.mp4"
    (tmp_path / "photo_1.json").write_text("{}")  # a sidecar alone is enough to take the name
    assert free_output(tmp_path, "photo", "gif") == tmp_path / "photo.gif"
    assert free_output(tmp_path, "photo", "webp") == tmp_path / "photo.webp"
    (tmp_path / "photo.json").write_text("{}")
    assert free_output(tmp_path, "photo", "gif") == tmp_path / "photo_2.gif"
    (tmp_path / "photo_lambda_sweep").mkdir()
    assert free_folder(tmp_path, "photo_lambda_sweep") == tmp_path / "photo_lambda_sweep_1"


@pytest.fixture
def jobs(tmp_path):
    jobs = Jobs(get_preset("tiny"), "cpu", tmp_path / "out")
    yield jobs
    assert jobs.shutdown(timeout=1)


def ui_error(check, form) -> str:
    with pytest.raises((ValueError, OSError)) as caught:
        check(form)
    uploads = [u for u in (getattr(form, "photo", None), getattr(form, "end_photo", None)) if u]
    return ui_message(caught.value, {u.path: u.name for u in uploads})


def test_bad_input_gives_the_cli_message_and_writes_nothing(tmp_path, jobs, never_load):
    """The page's message is the CLI's line, with the page's label where the CLI names a flag; the upload's
    temporary path is shown as the file's own name.  Nothing is written, no model is loaded."""
    photo = tmp_path / "photo.jpg"
    shutil.copy(EXAMPLE, photo)
    (tmp_path / "broken.jpg").write_text("not a photo")
    uploads = tmp_path / "gradio" / "0123abcd"
    uploads.mkdir(parents=True)
    shutil.copy(tmp_path / "broken.jpg", uploads / "broken.jpg")
    good = Upload(str(photo), "photo.jpg")

    def form(**kw) -> AnimateForm:
        return AnimateForm(**{"photo": good, "prompt": "waving", **kw})

    check = jobs.check_animate
    assert ui_error(check, form(prompt="  ")) == cli_error("animate", photo, "  ", "--model", "tiny")
    assert ui_error(check, form(steps=0)) == cli_error("animate", photo, "w", "--model", "tiny", "--steps", 0).replace(
        "--steps", "Steps") == "Steps must be at least 1 (got 0)"
    assert ui_error(check, form(steps=61)) == cli_error("animate", photo, "w", "--model", "tiny", "--steps", 61).replace(
        "--steps", "Steps")
    assert ui_error(check, form(photo=Upload(str(uploads / "broken.jpg"), "broken.jpg"))) == cli_error(
        "animate", "broken.jpg", "w", "--model", "tiny")  # the CLI given the file's name in the current folder
    assert ui_error(check, form(photo=None)) == "no photo: upload the photo to animate"
    assert ui_error(check, form(steps=2.5)) == "Steps must be a whole number (got 2.5)"
    assert ui_error(check, form(fps=0)) == "Frames per second must be at least 1 (got 0)"
    assert ui_error(check, form(interpolate=True)) == "upload an end photo to interpolate towards, or tick Loop"
    assert ui_error(check, form(image_scale="x")) == "λ must be a finite number (got 'x')"
    sweep = jobs.check_sweep
    assert ui_error(sweep, SweepForm(photo=good, prompt="w", values="0,0")) == "λ values lists 0 more than once"
    assert ui_error(sweep, SweepForm(photo=good, prompt="w", values="0,,1")).startswith("λ values has an empty entry")
    assert ui_error(sweep, SweepForm(photo=good, prompt="w", layers="99")).startswith("Layers indices must be between 0")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_lambda_one_is_the_checkpoints_own(tmp_path, jobs, never_load):
    """λ 1 on the slider is the CLI without --lambda (recorded as null); another value is recorded as given."""
    photo = Upload(str(EXAMPLE), "astronaut.jpg")
    request = jobs.check_animate(AnimateForm(photo=photo, prompt="w", image_scale=1.0))[0]
    assert request.image_scale is None and request.image == "astronaut.jpg"
    assert jobs.check_animate(AnimateForm(photo=photo, prompt="w", image_scale=0.8))[0].image_scale == 0.8


# ----------------------------------------------------------------------------------------------------------------
# A real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.lines = folder, free_port(), []
        self.url = f"http://127.0.0.1:{self.port}/"
        self.out = folder / "dynamicrafter-ui"  # the default --out-dir, in the folder it starts from
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*CLI, "ui", "--model", "tiny", "--port", str(self.port), "--device", "cpu"], cwd=folder,
            env={**ENV, "GRADIO_TEMP_DIR": str(folder / "gradio-tmp")}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        self.page_s = self.ready_s = None
        while time.perf_counter() - started < 120 and self.proc.poll() is None:
            if self.page_s is None:
                try:
                    urllib.request.urlopen(self.url, timeout=1).read()
                    self.page_s = time.perf_counter() - started
                except OSError:
                    pass
            if any("ready on cpu" in line for line in self.lines):
                self.ready_s = time.perf_counter() - started
                break
            time.sleep(0.05)
        assert self.page_s and self.ready_s, "".join(self.lines)

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM: like Ctrl-C, the server closes
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio", reason="the web UI is the optional extra: pip install 'dynamicrafter[ui]'")
    pytest.importorskip("gradio_client", reason="gradio_client comes with gradio")
    folder = tmp_path_factory.mktemp("ui")
    shutil.copy(EXAMPLE, folder / "photo.jpg")
    (folder / "broken.jpg").write_text("not a photo")
    s = Server(folder)
    yield s
    assert s.stop() == 0, "".join(s.lines)


def test_the_ui_starts_fast_and_binds_to_localhost(server):
    print(f"\npage answers {server.page_s:.1f} s after the command starts; model ready after {server.ready_s:.1f} s")
    assert server.page_s < 30 and server.ready_s < 60  # this machine, unloaded: see README ("Web UI")
    if shutil.which("ss"):  # the listening socket is on the loopback address only
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True).stdout
        assert listening and all("127.0.0.1:" in line for line in listening.splitlines()), listening


def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=str(server.folder / "downloads"))


SETTINGS = dict(negative_prompt="blurry", steps=2, cfg_scale=5.0, image_scale=0.8, fs=10, seed=7)
CLI_FLAGS = ["--negative-prompt", "blurry", "--steps", "2", "--cfg", "5", "--lambda", "0.8", "--fs", "10", "--seed", "7"]


def test_animate_through_the_client_writes_what_the_cli_writes(server):
    from gradio_client import handle_file

    video, seed, notes, record, files = client(server).predict(
        photo=handle_file(server.folder / "photo.jpg"), prompt="an astronaut waving", **SETTINGS, api_name="/animate")
    assert seed == "7" and "photo.mp4" in notes
    ui_video, ui_sidecar = server.out / "photo.mp4", server.out / "photo.json"
    assert json.loads(ui_sidecar.read_text()) == record
    assert [Path(f).read_bytes() for f in files] == [ui_video.read_bytes(), ui_sidecar.read_bytes()]
    assert Path(video).read_bytes() == ui_video.read_bytes()

    cli = Path.cwd()  # this test's own empty folder (conftest); torch runs on 2 threads here as in the server
    shutil.copy(server.folder / "photo.jpg", cli / "photo.jpg")
    result = runner.invoke(app, ["animate", "photo.jpg", "an astronaut waving", "--model", "tiny", "--device", "cpu",
                                 *CLI_FLAGS, "--quiet"])
    assert result.exit_code == 0, result.output
    assert (cli / "photo.mp4").read_bytes() == ui_video.read_bytes()
    expected, got = json.loads((cli / "photo.json").read_text()), dict(record)
    assert got.pop("output") == "dynamicrafter-ui/photo.mp4" and expected.pop("output") == "photo.mp4"
    assert got.pop("timings").keys() == expected.pop("timings").keys()
    assert got == expected  # image, prompt, seed, settings, λ, measures, ... all the same
    assert not [p for p in server.out.rglob("*") if ".partial" in p.name]


def test_bad_input_through_the_client_writes_nothing(server):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    c, before = client(server), sorted(server.out.iterdir())
    for photo, prompt, steps, text in [
        ("photo.jpg", " ", 2, "the prompt is empty"),
        ("photo.jpg", "waving", 0, "Steps must be at least 1 (got 0)"),
        ("broken.jpg", "waving", 2, "not a readable image (not a format Pillow knows, or not an image at all): broken.jpg"),
    ]:
        with pytest.raises(AppError, match=text.replace("(", r"\(").replace(")", r"\)")):
            c.predict(photo=handle_file(server.folder / photo), prompt=prompt, steps=steps, api_name="/animate")
    assert sorted(server.out.iterdir()) == before


def test_sweep_through_the_client(server):
    from gradio_client import handle_file

    grid, chart, seed, notes, metrics, files = client(server).predict(
        photo=handle_file(server.folder / "photo.jpg"), prompt="waving", values="0,1", steps=2, seed=3,
        api_name="/sweep")
    folder = server.out / "photo_lambda_sweep"
    assert seed == "3" and [r["lambda"] for r in metrics["results"]] == [0.0, 1.0]
    assert json.loads((folder / "metrics.json").read_text()) == metrics
    for name in ("grid.mp4", "chart.png", "contact_sheet.png", "lambda_0.mp4", "lambda_1.mp4"):
        assert (folder / name).stat().st_size > 0, name
    assert Path(grid).read_bytes() == (folder / "grid.mp4").read_bytes()


def test_loop_and_interpolation_through_the_client(server):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    c, photo = client(server), handle_file(server.folder / "photo.jpg")
    video, seed, notes, record, files = c.predict(photo=photo, end_photo=None, loop=True, prompt="breathing", steps=2,
                                                  seed=4, api_name="/interpolate")
    assert record["mode"] == "loop" and record["end_image"] is None and record["image"] == "photo.jpg"
    assert (server.folder / record["output"]).read_bytes() == Path(video).read_bytes()
    with pytest.raises(AppError, match="upload an end photo to interpolate towards, or tick Loop"):
        c.predict(photo=photo, end_photo=None, loop=False, prompt="w", steps=2, api_name="/interpolate")
    with pytest.raises(AppError, match="Loop and an end photo exclude each other"):
        c.predict(photo=photo, end_photo=photo, loop=True, prompt="w", steps=2, api_name="/interpolate")


def test_jobs_queue_one_at_a_time_and_stop(server):
    """A second visitor's job waits in the queue, its position shown; the first visitor's Stop ends a 500-step job
    at its next step, nothing of it is written, and the queued job runs at once."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    first, second = client(server), client(server)
    photo = handle_file(server.folder / "photo.jpg")
    long = first.submit(photo=photo, prompt="slow", steps=500, seed=11, api_name="/animate")
    assert poll(lambda: (p := long.status().progress_data) and p[0].desc == "denoising", 60)
    short = second.submit(photo=photo, prompt="quick", steps=2, seed=12, api_name="/animate")
    status = poll(lambda: (s := short.status()).rank is not None and s, 30)
    assert status and status.rank == 0 and status.queue_size >= 1  # next in line, behind the running job
    stopped = time.monotonic()
    first.predict(api_name="/animate_stop")
    with pytest.raises(AppError, match="stopped; nothing was written"):
        long.result(timeout=60)
    assert short.result(timeout=120)[1] == "12"
    assert time.monotonic() - stopped < 60  # far less than the 500 steps the stopped job had left
    seeds = [json.loads(p.read_text())["seed"] for p in server.out.glob("*.json")]
    assert 12 in seeds and 11 not in seeds


# ----------------------------------------------------------------------------------------------------------------
# In a real browser




def _browser():
    return headless_chromium(1600, 1400)


def test_a_visitor_animates_a_photo_in_chromium(server):
    """Upload a photo, set the steps, λ and the seed, press Animate: the video loads and plays, the seed shows,
    and the output lands beside the earlier one under a free name.  A broken file shows the CLI's message.  The
    page asks nothing of any other host."""
    from selenium.webdriver.common.by import By

    browser = _browser()

    def find(css: str):
        return browser.find_element(By.CSS_SELECTOR, css)

    def fill(css: str, value) -> None:
        field = find(css)
        field.clear()
        field.send_keys(str(value))

    try:
        browser.get(server.url)
        assert poll(lambda: browser.find_elements(By.CSS_SELECTOR, "#animate-photo input[type=file]"), 30)
        find("#animate-photo input[type=file]").send_keys(str(server.folder / "photo.jpg"))
        find("#animate-prompt textarea").send_keys("an astronaut waving")
        fill("#animate-steps input", 2)
        fill("#animate-seed input", 5)
        fill("#animate-lambda input[type=number]", 0.6)
        find("#animate-lambda input[type=number]").send_keys("\t")
        poll(lambda: find("#animate-photo img").get_attribute("src"), 20)
        expected = free_output(server.out, "photo", "mp4")  # taken names are skipped: photo_1.mp4, ...
        find("#animate-run").click()
        state = ("const v = document.querySelector('#animate-video video');"
                 "return v ? [v.readyState, v.duration, v.error ? v.error.code : 0, v.currentTime] : null")
        assert poll(lambda: (s := browser.execute_script(state)) and s[0] >= 2 and s[1] > 0, 180), "no video came"
        ready_state, duration, error, t0 = browser.execute_script(state)
        assert error == 0 and duration > 1.5  # 16 frames at 8 fps
        assert poll(lambda: browser.execute_script(state)[3] > t0, 10), "the video does not play"
        assert find("#animate-shown-seed textarea").get_attribute("value") == "5"
        record = json.loads(expected.with_suffix(".json").read_text())
        assert record["seed"] == 5 and record["image_scale"] == 0.6 and record["settings"]["steps"] == 2
        assert "image_scale" in find("#animate-record").text  # the sidecar, shown

        fill("#animate-seed input", 99)  # "Use this seed again" puts the result's settings back
        fill("#animate-lambda input[type=number]", 1.5)
        find("#animate-again").click()
        assert poll(lambda: find("#animate-seed input").get_attribute("value") == "5", 10)
        assert find("#animate-lambda input[type=number]").get_attribute("value") == "0.6"
        assert find("#animate-steps input").get_attribute("value") == "2"

        before = sorted(server.out.iterdir())
        find("#animate-photo button[aria-label='Remove Image']").click()
        find("#animate-photo input[type=file]").send_keys(str(server.folder / "broken.jpg"))
        time.sleep(0.5)
        find("#animate-run").click()
        text = "not a readable image (not a format Pillow knows, or not an image at all): broken.jpg"
        assert poll(lambda: text in find("body").text, 30), find("body").text[-2000:]
        assert sorted(server.out.iterdir()) == before

        logged = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
        urls = [m["params"]["request"]["url"] for m in logged if m["method"] == "Network.requestWillBeSent"]
        assert any(u.endswith(".mp4") for u in urls)
        assert [u for u in urls if not u.startswith((server.url, "data:", "blob:"))] == []
        if os.environ.get("UI_SCREENSHOT"):
            browser.save_screenshot(os.environ["UI_SCREENSHOT"])
    finally:
        browser.quit()
