"""The web UI (``dynamicrafter ui``): a Gradio page on the public API, like the CLI a thin front end.

One :class:`~dynamicrafter.api.Animator` is loaded once and shared by every visitor; the three buttons that run the
model share one queue (``concurrency_id="model"``, one job at a time, the position shown), and a Stop button cancels
a queued job or stops a running one at its next denoising step.  The work itself (checking a form, naming and
writing outputs as the CLI does) is :mod:`dynamicrafter.ui_jobs`; this module only lays out the page and wires it.

Private by default: it binds to 127.0.0.1, Gradio's analytics and share links are off, the theme's fonts are the
ones Gradio ships, and the page loads nothing from outside the server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no version check, no telemetry

import gradio as gr  # noqa: E402

from .ui_jobs import (  # noqa: E402
    DEFAULT_SEED, FORMATS, AnimateForm, Cancelled, Jobs, Outcome, SweepForm, Upload, ui_message,
)

if TYPE_CHECKING:
    from .api import Animator

EXPECTED = (ValueError, OSError)  # the library's own failures (SettingsError, ImageError, OutputError, ...)
CSS = ".notes p { margin: 0.2em 0; }"


def upload(payload: Any) -> Upload | None:
    """A raw gr.Image value (handlers run with ``preprocess=False``: the file as uploaded, never re-encoded)."""
    if not payload:
        return None
    path = payload.get("path") if isinstance(payload, dict) else str(payload)
    if not path:
        raise gr.Error("the photo did not arrive; upload it again", title="error")
    name = (payload.get("orig_name") if isinstance(payload, dict) else None) or Path(path).name
    return Upload(path=str(path), name=Path(name).name)


def outcome_of(call: Callable[[], Outcome], uploads: list[Upload | None]) -> Outcome:
    """Run ``call``; an expected failure becomes the page's one-line error, a stop a short note."""
    try:
        return call()
    except Cancelled:
        raise gr.Error("stopped; nothing was written", title="stopped", print_exception=False) from None
    except EXPECTED as exc:
        names = {u.path: u.name for u in uploads if u is not None}
        raise gr.Error(ui_message(exc, names), title="error", duration=None, print_exception=False) from None


def reporter(progress: gr.Progress) -> Callable[[int, int, str], None]:
    return lambda done, total, what: progress((done, total), desc=what, unit="steps")


def notes_text(outcome: Outcome) -> str:
    wrote = ", ".join(f"`{p}`" for p in outcome.files)
    return "\n\n".join([f"wrote {wrote}"] + [f"**{n}**" if n.startswith("warning") else n for n in outcome.notes])


def _blank(value: Any) -> Any:
    return "" if value is None else value


def number(label: str, value: Any, whole: bool = True, **kw: Any) -> gr.Number:
    return gr.Number(label=label, value=value, precision=0 if whole else None, **kw)


# ----------------------------------------------------------------------------------------------------------------


def animate_tab(jobs: Jobs, tab: str) -> None:
    """The Animate tab (``tab="animate"``) or the Interpolate / Loop tab (``"interpolate"``)."""
    p = jobs.preset
    interpolate = tab == "interpolate"
    with gr.Row():
        with gr.Column():
            with gr.Row():
                photo = gr.Image(label="Start photo" if interpolate else "Photo", type="filepath", sources=["upload"],
                                 image_mode=None, height=280, elem_id=f"{tab}-photo")
                if interpolate:
                    end = gr.Image(label="End photo", type="filepath", sources=["upload"], image_mode=None,
                                   height=280, elem_id=f"{tab}-end")
            if interpolate:
                loop = gr.Checkbox(label="Loop: no end photo, the video returns to the start photo",
                                   elem_id=f"{tab}-loop")
            prompt = gr.Textbox(label="Prompt", placeholder="what should happen, e.g. waves crashing on rocks",
                                value="", elem_id=f"{tab}-prompt")
            negative = gr.Textbox(label="Negative prompt", value="", elem_id=f"{tab}-negative")
            with gr.Row():
                steps = number("Steps", p.steps, elem_id=f"{tab}-steps")
                cfg = number("Guidance", p.cfg_scale, whole=False, elem_id=f"{tab}-cfg")
                seed = number("Seed", DEFAULT_SEED, elem_id=f"{tab}-seed")
            lam = gr.Slider(0, 2, value=1, step=0.05, label="λ: image cross-attention scale (smaller: more motion)",
                            elem_id=f"{tab}-lambda")
            with gr.Row():
                fs = number("Motion (fs)", p.fs, elem_id=f"{tab}-fs")
                frames = number("Frames", p.frames, elem_id=f"{tab}-frames")
                fmt = gr.Dropdown(list(FORMATS), value="mp4", label="Format", elem_id=f"{tab}-format")
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    cfg_img = gr.Textbox(label="Image guidance (blank: off)", value="")
                    eta = number("Eta", p.eta, whole=False)
                    fps = number("Frames per second", p.fps)
                with gr.Row():
                    window = number("Window (frames per denoising window)", 16)
                    stride = number("Stride (frames between windows)", 8)
                    retry = number("Retry static (times)", 0)
            with gr.Row():
                go = gr.Button("Animate", variant="primary", elem_id=f"{tab}-run")
                stop = gr.Button("Stop", variant="stop", elem_id=f"{tab}-stop")
        with gr.Column():
            video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False, elem_id=f"{tab}-video")
            shown_seed = gr.Textbox(label="Seed", interactive=False, elem_id=f"{tab}-shown-seed")
            notes = gr.Markdown(label="Notes", elem_id=f"{tab}-notes", elem_classes=["notes"])
            again = gr.Button("Use this seed again", elem_id=f"{tab}-again")
            record = gr.JSON(label="Settings and measures (the sidecar)", elem_id=f"{tab}-record")
            files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id=f"{tab}-files")
    last = gr.State(None)
    settings = [prompt, negative, steps, cfg, lam, fs, seed, frames, fmt, cfg_img, eta, window, stride, fps, retry]

    def finish(outcome: Outcome) -> tuple:
        r = outcome.record
        return str(outcome.preview), str(r["seed"]), notes_text(outcome), r, [str(f) for f in outcome.files], r

    def run(photo_in, end_in, loop_in, prompt, negative_prompt, steps, cfg_scale, image_scale, fs, seed, frames,
            fmt, cfg_img, eta, window, stride, fps, retry_static, request: gr.Request, progress=gr.Progress()):
        start, end_upload = upload(photo_in), upload(end_in)
        form = AnimateForm(
            photo=start, prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale,
            image_scale=image_scale, fs=fs, seed=seed, frames=frames, fmt=fmt, cfg_img=cfg_img, eta=eta,
            window=window, stride=stride, fps=fps, retry_static=retry_static, end_photo=end_upload,
            loop=bool(loop_in), interpolate=interpolate,
        )
        return finish(outcome_of(lambda: jobs.animate(form, reporter(progress), request.session_hash),
                                 [start, end_upload]))

    if interpolate:
        def handler(photo, end_photo, loop, prompt, negative_prompt, steps, cfg_scale, image_scale, fs, seed,
                    frames, format, cfg_img, eta, window, stride, fps, retry_static, request: gr.Request,
                    progress=gr.Progress()):
            return run(photo, end_photo, loop, prompt, negative_prompt, steps, cfg_scale, image_scale, fs, seed,
                       frames, format, cfg_img, eta, window, stride, fps, retry_static, request, progress)
        inputs = [photo, end, loop, *settings]
    else:
        def handler(photo, prompt, negative_prompt, steps, cfg_scale, image_scale, fs, seed, frames, format,
                    cfg_img, eta, window, stride, fps, retry_static, request: gr.Request, progress=gr.Progress()):
            return run(photo, None, False, prompt, negative_prompt, steps, cfg_scale, image_scale, fs, seed, frames,
                       format, cfg_img, eta, window, stride, fps, retry_static, request, progress)
        inputs = [photo, *settings]

    event = go.click(handler, inputs, [video, shown_seed, notes, record, files, last], api_name=tab,
                     concurrency_id="model", concurrency_limit=1, preprocess=False, show_progress="full")
    _stop_button(stop, event, jobs, f"{tab}_stop")

    def reuse(r: dict | None):
        if not r:
            gr.Info("nothing to reuse yet: animate first")
            return [gr.update()] * len(settings)
        s = r["settings"]
        out = Path(r["output"] or "x.mp4")
        fmt_used = out.suffix.lstrip(".").lower() if out.suffix.lower() in (".mp4", ".gif", ".webp") else "png"
        return [r["prompt"], r["negative_prompt"], s["steps"], s["cfg_scale"],
                1.0 if r["image_scale"] is None else r["image_scale"], s["fs"], r["seed"], s["frames"], fmt_used,
                _blank(s["cfg_img"]), s["eta"], s["window"], s["stride"], r["fps"], gr.update()]

    again.click(reuse, [last], settings, queue=False, api_name=f"{tab}_again", api_visibility="undocumented")


def _stop_button(stop: gr.Button, event: Any, jobs: Jobs, name: str) -> None:
    """Stop: Gradio drops the visitor's queued job; a running one ends at its next denoising step."""

    def cancel(request: gr.Request) -> None:
        jobs.cancel(request.session_hash)
        gr.Info("stopped; nothing was written")

    stop.click(cancel, None, None, cancels=[event], concurrency_limit=None, api_name=name,
               api_visibility="undocumented")


def sweep_tab(jobs: Jobs) -> None:
    p = jobs.preset
    with gr.Row():
        with gr.Column():
            photo = gr.Image(label="Photo", type="filepath", sources=["upload"], image_mode=None, height=280,
                             elem_id="sweep-photo")
            prompt = gr.Textbox(label="Prompt", value="", elem_id="sweep-prompt")
            negative = gr.Textbox(label="Negative prompt", value="")
            with gr.Row():
                values = gr.Textbox(label="λ values", value="0,0.25,0.5,0.75,1", elem_id="sweep-values")
                layers = gr.Dropdown(["all", "input", "middle", "output"], value="all", allow_custom_value=True,
                                     label="Layers (or indices like 0,3,5)", elem_id="sweep-layers")
            with gr.Row():
                steps = number("Steps", p.steps, elem_id="sweep-steps")
                cfg = number("Guidance", p.cfg_scale, whole=False)
                fs = number("Motion (fs)", p.fs)
                seed = number("Seed", DEFAULT_SEED, elem_id="sweep-seed")
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    cfg_img = gr.Textbox(label="Image guidance (blank: off)", value="")
                    eta = number("Eta", p.eta, whole=False)
                    batch = gr.Textbox(label="Batch size (λ values per UNet batch; blank: all)", value="")
                    fps = number("Frames per second", p.fps)
            with gr.Row():
                go = gr.Button("Run the sweep", variant="primary", elem_id="sweep-run")
                stop = gr.Button("Stop", variant="stop", elem_id="sweep-stop")
        with gr.Column():
            video = gr.Video(label="Grid (one column per λ)", autoplay=True, loop=True, interactive=False,
                             elem_id="sweep-video")
            chart = gr.Image(label="Measures against λ", type="filepath", interactive=False, elem_id="sweep-chart")
            shown_seed = gr.Textbox(label="Seed", interactive=False, elem_id="sweep-shown-seed")
            notes = gr.Markdown(label="Notes", elem_id="sweep-notes", elem_classes=["notes"])
            again = gr.Button("Use this seed again", elem_id="sweep-again")
            record = gr.JSON(label="metrics.json", elem_id="sweep-record")
            files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="sweep-files")
    last = gr.State(None)

    def handler(photo, prompt, negative_prompt, values, layers, steps, cfg_scale, fs, seed, cfg_img, eta,
                batch_size, fps, request: gr.Request, progress=gr.Progress()):
        start = upload(photo)
        form = SweepForm(photo=start, prompt=prompt, values=values, layers=layers, negative_prompt=negative_prompt,
                         steps=steps, cfg_scale=cfg_scale, fs=fs, seed=seed, cfg_img=cfg_img, eta=eta,
                         batch_size=batch_size, fps=fps)
        o = outcome_of(lambda: jobs.sweep(form, reporter(progress), request.session_hash), [start])
        r = o.record
        return str(o.preview), str(o.chart), str(r["seed"]), notes_text(o), r, [str(f) for f in o.files], r

    inputs = [photo, prompt, negative, values, layers, steps, cfg, fs, seed, cfg_img, eta, batch, fps]
    event = go.click(handler, inputs, [video, chart, shown_seed, notes, record, files, last], api_name="sweep",
                     concurrency_id="model", concurrency_limit=1, preprocess=False, show_progress="full")
    _stop_button(stop, event, jobs, "sweep_stop")
    reused = [prompt, values, layers, steps, cfg, fs, seed, cfg_img, eta]

    def reuse(r: dict | None):
        if not r:
            gr.Info("nothing to reuse yet: run a sweep first")
            return [gr.update()] * len(reused)
        s = r["settings"]
        return [r["prompt"], ",".join(f"{row['lambda']:g}" for row in r["results"]), r["layers"], s["steps"],
                s["cfg_scale"], s["fs"], r["seed"], _blank(s["cfg_img"]), s["eta"]]

    again.click(reuse, [last], reused, queue=False, api_name="sweep_again", api_visibility="undocumented")


# ----------------------------------------------------------------------------------------------------------------


def build(jobs: Jobs) -> gr.Blocks:
    """The page for ``jobs`` (its model and output folder)."""
    p = jobs.preset

    def header() -> str:  # evaluated for every visitor: the model may still be loading when the page is served
        where = f"on {jobs.device}" if jobs.animator is not None else "(loading)"
        return (f"### DynamiCrafter: model `{p.name}` ({p.width}x{p.height}, {p.frames} frames) {where}; outputs go "
                f"to `{jobs.out_dir}`")

    with gr.Blocks(title="DynamiCrafter", analytics_enabled=False) as demo:
        gr.Markdown(header)
        with gr.Tabs():
            with gr.Tab("Animate", id="animate"):
                animate_tab(jobs, "animate")
            with gr.Tab("Interpolate / Loop", id="interpolate"):
                animate_tab(jobs, "interpolate")
            with gr.Tab("λ sweep", id="sweep"):
                sweep_tab(jobs)
    return demo


def serve(jobs: Jobs, host: str = "127.0.0.1", port: int = 7860) -> gr.Blocks:
    """Serve the page for ``jobs`` on ``host:port`` in the background (``demo.block_thread()`` waits for Ctrl-C,
    ``demo.close()`` stops it).  The model may still be loading: hand it over with ``jobs.ready(animator)``."""
    demo = build(jobs)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=True,
        prevent_thread_lock=True, allowed_paths=[str(jobs.out_dir.resolve()), str(jobs.previews)],
        theme=gr.themes.Default(), css=CSS, ssr_mode=False, mcp_server=False, pwa=False,
    )
    return demo


def launch(animator: Animator, out_dir: str | Path, host: str = "127.0.0.1", port: int = 7860) -> gr.Blocks:
    """The page for a loaded ``animator`` (the Python API's way in), served in the background; returns the Blocks
    (``.close()`` stops it)."""
    return serve(Jobs(animator.preset, animator.device, Path(out_dir), animator), host, port)
