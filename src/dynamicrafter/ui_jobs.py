"""The web UI's work, without Gradio: a form checked into a request before anything runs, one job at a time on
the model, cancellation between denoising steps, and outputs named and written as the CLI writes them.

:mod:`dynamicrafter.ui` lays out the page and hands each button's values here.  Errors are the library's; the
page shows :func:`ui_message`, the CLI's one-line message with the page's label for the setting it names (the CLI
shows its flag: ``--steps must be at least 1`` there, ``Steps must be at least 1`` here).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NamesSetting, SettingsError
from .files import check_name, ensure_writable_dir, sidecar_path

if TYPE_CHECKING:
    from .api import Animator, Result
    from .presets import Preset
    from .request import Request

# The page's label of each setting the library may name in an error or a warning.
LABELS = {
    "image": "Photo", "end_image": "End photo", "steps": "Steps", "cfg_scale": "Guidance", "cfg_img": "Image guidance",
    "image_scale": "λ", "fs": "Motion (fs)", "seed": "Seed", "frames": "Frames", "eta": "Eta",
    "window": "Window/Stride", "stride": "Stride", "fps": "Frames per second", "retry_static": "Retry static",
    "values": "λ values", "layers": "Layers", "batch_size": "Batch size", "loop": "Loop", "format": "Format",
}
FORMATS = ("mp4", "gif", "webp", "png")
DEFAULT_SEED = 123  # the CLI's --seed default
Report = Callable[[int, int, str], object]  # (done, total, what) for the page's progress bar


class Cancelled(Exception):
    """The job was stopped from the page."""


def ui_message(exc: BaseException, uploads: dict[str, str] | None = None) -> str:
    """The one-line message of an expected failure as the page shows it: a setting named by its label, an upload's
    temporary path by the file's own name."""
    text = exc.message_for(LABELS.get(exc.setting, exc.setting)) if isinstance(exc, NamesSetting) else str(exc)
    for path, name in (uploads or {}).items():
        text = text.replace(path, name)
    return text


def label_names(text: str) -> str:
    """A library sentence (a warning) with the page's labels for the settings it names."""
    return re.sub(r"\b(image_scale|fs|seed|steps|cfg_scale)\b", lambda m: LABELS[m.group(1)], text)


def real(value: Any, setting: str) -> float | None:
    """A number field: blank gives None (the preset's default); text, inf or nan are refused naming the setting."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise SettingsError(setting, f"{{setting}} must be a finite number (got {value!r})")
    return number


def whole(value: Any, setting: str, default: int | None = None) -> int | None:
    """A whole-number field: blank gives ``default``; 2.5 is refused naming the setting."""
    number = real(value, setting)
    if number is None:
        return default
    if number != int(number):
        raise SettingsError(setting, f"{{setting}} must be a whole number (got {value})")
    return int(number)


def parse_values(text: str) -> list[float]:
    """``"0,0.5,1"`` -> [0.0, 0.5, 1.0], as ``lambda-sweep --values`` (finite and distinct: checked by the library)."""
    parts = [v.strip() for v in (text or "").split(",")]
    if not any(parts) or not all(parts):
        raise SettingsError("values", f"{{setting}} {'is empty' if not any(parts) else 'has an empty entry'} (e.g. 0,0.5,1)")
    try:
        return [float(v) for v in parts]
    except ValueError:
        raise SettingsError("values", f"{{setting}} must be numbers separated by commas, e.g. 0,0.5,1 (got {text!r})") from None


def free_output(folder: Path, stem: str, fmt: str) -> Path:
    """The CLI's name for an output of photo ``stem`` in ``folder`` (``stem.mp4``, or a frame folder ``stem`` for
    png); when it or its sidecar exists, the first free ``stem_1``, ``stem_2``, ...: the page never replaces a file."""
    for i in itertools.count():
        name = stem if i == 0 else f"{stem}_{i}"
        path = folder / (name if fmt == "png" else f"{name}.{fmt}")
        if not (path.exists() or path.is_symlink() or sidecar_path(path).exists()):
            return path
    raise AssertionError("unreachable")


def free_folder(folder: Path, name: str) -> Path:
    """``folder/name`` (the CLI's ``<stem>_lambda_sweep``), else the first free ``name_1``, ``name_2``, ..."""
    return next(p for i in itertools.count() if not (p := folder / (name if i == 0 else f"{name}_{i}")).exists())


def stem_of(name: str | None) -> str:
    stem = Path(name or "").stem.strip()
    return stem if stem not in ("", ".", "..") else "photo"


@dataclass
class Upload:
    """A photo from the page: where Gradio keeps it and the name it had on the user's machine."""

    path: str
    name: str


@dataclass
class AnimateForm:
    """The Animate and Interpolate / Loop tabs' fields, as the page sends them (blank: the preset's default)."""

    photo: Upload | None
    prompt: str
    negative_prompt: str = ""
    steps: Any = None
    cfg_scale: Any = None
    image_scale: Any = None  # λ; 1 (the checkpoint's own) is recorded as null, as the CLI without --lambda
    fs: Any = None
    seed: Any = DEFAULT_SEED
    frames: Any = None
    fmt: str = "mp4"
    cfg_img: Any = None
    eta: Any = None
    window: Any = None
    stride: Any = None
    fps: Any = None
    retry_static: Any = 0
    end_photo: Upload | None = None
    loop: bool = False
    interpolate: bool = False  # the Interpolate / Loop tab: an end photo or Loop is needed


@dataclass
class SweepForm:
    photo: Upload | None
    prompt: str
    values: str = "0,0.25,0.5,0.75,1"
    layers: str = "all"
    negative_prompt: str = ""
    steps: Any = None
    cfg_scale: Any = None
    fs: Any = None
    seed: Any = DEFAULT_SEED
    cfg_img: Any = None
    eta: Any = None
    batch_size: Any = None
    fps: Any = None


@dataclass
class Outcome:
    """What one job wrote, for the page: the files, a playable preview, the sidecar record and notes."""

    files: list[Path]
    preview: Path
    record: dict[str, Any]
    notes: list[str]
    chart: Path | None = None


class Jobs:
    """The model and the output folder behind the page: one job at a time on the model (a lock, beside Gradio's
    queue, so that a cancelled job's last step is over before the next one starts).

    The page can be served before the model has loaded (:meth:`ready` hands it over, and with it the device):
    forms are checked at once, jobs wait for the model."""

    def __init__(self, preset: Preset, device: str | None, out_dir: Path, animator: Animator | None = None) -> None:
        self.preset, self.device, self.out_dir = preset, device, Path(out_dir)
        self.previews = Path(tempfile.mkdtemp(prefix="dynamicrafter-ui-"))
        self.animator: Animator | None = None
        self._loaded = threading.Event()
        self._model = threading.Lock()  # held by the running job
        self._guard = threading.Lock()  # guards _stops
        self._stops: dict[str, set[threading.Event]] = {}  # per visitor (Gradio session): their jobs' stop flags
        if animator is not None:
            self.ready(animator)

    def ready(self, animator: Animator) -> None:
        """The model has loaded: jobs may run."""
        self.animator, self.device = animator, str(animator.device)
        self._loaded.set()

    # -- one job at a time, and stopping it ------------------------------------------------------------------

    @contextlib.contextmanager
    def job(self, session: str) -> Iterator[threading.Event]:
        """Hold the model for one job of ``session`` (once it has loaded); the event is set by :meth:`cancel`."""
        stop = threading.Event()
        with self._guard:
            self._stops.setdefault(session, set()).add(stop)
        try:
            while not self._loaded.wait(0.1):
                if stop.is_set():
                    raise Cancelled()
            with self._model:
                if stop.is_set():
                    raise Cancelled()
                yield stop
        finally:
            with self._guard:
                stops = self._stops.get(session, set())
                stops.discard(stop)
                if not stops:
                    self._stops.pop(session, None)

    def cancel(self, session: str) -> int:
        """Stop every job of ``session`` at its next denoising step; returns how many there were."""
        with self._guard:
            stops = list(self._stops.get(session, ()))
        for stop in stops:
            stop.set()
        return len(stops)

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Stop every job at its next step and wait (up to ``timeout`` s) for the one holding the model: a video
        being written is finished, none is cut off.  False when a job still runs."""
        with self._guard:
            stops = [stop for group in self._stops.values() for stop in group]
        for stop in stops:
            stop.set()
        if not self._model.acquire(timeout=timeout):
            return False
        self._model.release()
        shutil.rmtree(self.previews, ignore_errors=True)
        return True

    @staticmethod
    def _progress(stop: threading.Event, report: Report, steps_total: int) -> Callable[[int, int], None]:
        """The API's ``progress(step, steps)`` fed to the page, counting on across chunks; raises when stopped."""
        done = itertools.count(1)

        def progress(step: int, steps: int) -> None:
            if stop.is_set():
                raise Cancelled()
            report(min(next(done), steps_total), steps_total, "denoising")

        return progress

    # -- animate, interpolate, loop ----------------------------------------------------------------------------

    def check_animate(self, form: AnimateForm) -> tuple[Request, str, int | None, int]:
        """The request, format, fps and static retries of ``form``, or the library's error; nothing runs."""
        from .api import make_request
        from .video import check_fps

        if form.photo is None:
            raise SettingsError("image", "no photo: upload the photo to animate")
        if form.interpolate and form.end_photo is None and not form.loop:
            raise SettingsError("end_image", "upload an end photo to interpolate towards, or tick Loop")
        if form.loop and form.end_photo is not None:
            raise SettingsError("loop", "{setting} and an end photo exclude each other: untick Loop or remove the photo")
        fmt = form.fmt or "mp4"
        if fmt not in FORMATS:
            raise SettingsError("format", f"unknown {{setting}} {fmt!r}; choose one of {', '.join(FORMATS)}")
        image_scale = real(form.image_scale, "image_scale")
        request = make_request(
            self.preset, form.photo.path, form.prompt, end_image=form.end_photo and form.end_photo.path,
            loop=bool(form.loop), seed=whole(form.seed, "seed", DEFAULT_SEED), negative_prompt=form.negative_prompt or "",
            image_scale=None if image_scale == 1.0 else image_scale, steps=whole(form.steps, "steps"),
            cfg_scale=real(form.cfg_scale, "cfg_scale"), cfg_img=real(form.cfg_img, "cfg_img"),
            eta=real(form.eta, "eta"), fs=whole(form.fs, "fs"), frames=whole(form.frames, "frames"),
            window=whole(form.window, "window"), stride=whole(form.stride, "stride"),
        )
        request = replace(request, image=form.photo.name, end_image=form.end_photo.name if form.end_photo else None)
        fps = whole(form.fps, "fps")
        check_fps(fps)
        retry = whole(form.retry_static, "retry_static", 0)
        if retry < 0:
            raise SettingsError("retry_static", f"{{setting}} must be >= 0 (got {retry})")
        self._check_fits(1, request)
        ensure_writable_dir(self.out_dir)
        check_name(free_output(self.out_dir, stem_of(form.photo.name), fmt))
        return request, fmt, fps, retry

    def animate(self, form: AnimateForm, report: Report, session: str) -> Outcome:
        """Check ``form``, animate it (waiting for the model), write the video and its sidecar."""
        request, fmt, fps, retry = self.check_animate(form)
        notes = self._prompt_notes(request)
        if request.mode != "i2v" and self.preset.mode == "i2v" and self.preset.architecture != "tiny":
            notes.append("interpolation and loops are meant for the 512-interp model")
        report(0, request.settings.steps, "starting" if self._loaded.is_set() else "loading the model")
        with self.job(session) as stop:
            self._check_fits(1, request)  # again: the device may have been unknown before the model loaded
            [result] = self.animator.run(
                [request], progress=self._progress(stop, report, request.settings.steps), retry_static=retry
            )
            if stop.is_set():
                raise Cancelled()
            report(request.settings.steps, request.settings.steps, "writing")
            written = self._save(result, stem_of(form.photo.name), fmt, fps)
        if result.attempts:
            notes.append(f"seed {result.seed} after {len(result.attempts)} static attempt(s)")
        if result.warning:
            notes.append(f"warning: {label_names(result.warning)}")
        sidecar = sidecar_path(written)
        preview = written
        if fmt != "mp4":
            from .video import write_frames

            preview = write_frames(result.frames, self.previews / f"{uuid.uuid4().hex}.mp4", fps or result.fps)
        files = ([] if written.is_dir() else [written]) + [sidecar]
        return Outcome(files=files, preview=preview, record=result.record(written, fps), notes=notes)

    def _save(self, result: Result, stem: str, fmt: str, fps: int | None) -> Path:
        from .files import OutputError

        for _ in range(100):  # another program may take the free name first
            path = free_output(self.out_dir, stem, fmt)
            try:
                return result.save(path, fmt=fmt, fps=fps)
            except OutputError:
                if not (path.exists() or sidecar_path(path).exists()):
                    raise
        raise AssertionError("no free output name")

    def _check_fits(self, batch: int, request: Request) -> None:
        """The memory check of the CLI (a frame count too long for the device), once the device is known."""
        if self.device is not None:
            from .memory import check_fits

            check_fits(batch, request.settings.frames, self.preset.height, self.preset.width, self.device)

    @staticmethod
    def _prompt_notes(request: Request) -> list[str]:
        from .tokenizer import get_tokenizer

        if get_tokenizer().is_truncated(request.prompt):
            return ["warning: the prompt is longer than 77 tokens; the end is cut off"]
        return []

    # -- λ sweeps ----------------------------------------------------------------------------------------------

    def check_sweep(self, form: SweepForm) -> tuple[Request, list[float], str, int | None, int | None]:
        from .api import make_request
        from .sweep import check_values, layer_indices
        from .video import check_fps

        if form.photo is None:
            raise SettingsError("image", "no photo: upload the photo to animate")
        lambdas = check_values(parse_values(form.values))
        layers = (form.layers or "all").strip()
        layer_indices(self.preset.model_config().unet, layers)
        request = make_request(
            self.preset, form.photo.path, form.prompt, seed=whole(form.seed, "seed", DEFAULT_SEED),
            negative_prompt=form.negative_prompt or "", steps=whole(form.steps, "steps"),
            cfg_scale=real(form.cfg_scale, "cfg_scale"), cfg_img=real(form.cfg_img, "cfg_img"),
            eta=real(form.eta, "eta"), fs=whole(form.fs, "fs"),
        )
        request = replace(request, image=form.photo.name)
        batch_size = whole(form.batch_size, "batch_size")
        if batch_size is not None and batch_size < 1:
            raise SettingsError("batch_size", f"{{setting}} must be at least 1 (got {batch_size})")
        fps = whole(form.fps, "fps")
        check_fps(fps)
        self._check_fits(batch_size or len(lambdas), request)
        ensure_writable_dir(self.out_dir)
        return request, lambdas, layers, batch_size, fps

    def sweep(self, form: SweepForm, report: Report, session: str) -> Outcome:
        """Check ``form``, run the sweep, write its folder (the CLI's files) under the output folder."""
        request, lambdas, layers, batch_size, fps = self.check_sweep(form)
        notes = self._prompt_notes(request)
        steps = request.settings.steps
        total = steps * math.ceil(len(lambdas) / (batch_size or len(lambdas)))
        report(0, total, "starting" if self._loaded.is_set() else "loading the model")
        with self.job(session) as stop:
            self._check_fits(batch_size or len(lambdas), request)
            result = self.animator.sweep_request(
                request, lambdas, layers=layers, batch_size=batch_size, progress=self._progress(stop, report, total)
            )
            if stop.is_set():
                raise Cancelled()
            report(total, total, "writing")
            folder = free_folder(self.out_dir, f"{stem_of(form.photo.name)}_lambda_sweep")
            record = result.save(folder, fps=fps)
        flagged = [f"λ={r['lambda']:g}: {', '.join(r['flags'])}" for r in record["results"] if r["flags"]]
        if flagged:
            notes.append("flagged: " + "; ".join(flagged))
        names = ["grid.mp4", "chart.png", "contact_sheet.png", "metrics.json"]
        return Outcome(files=[folder / n for n in names], preview=folder / "grid.mp4", record=record, notes=notes,
                       chart=folder / "chart.png")
