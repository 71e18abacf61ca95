"""The public Python API: load a model once, then animate, interpolate, loop, sweep λ, or run many requests.

    >>> from dynamicrafter import Animator
    >>> anim = Animator.load("512", device="cuda")           # downloads the weights on first use
    >>> result = anim.animate("photo.jpg", "a man waving", steps=50, seed=1, image_scale=0.8)
    >>> result.save("waving.mp4")                            # the video and its JSON sidecar (waving.json)
    >>> result.frames.shape                                  # (T, H, W, 3) uint8

Every front end (the CLI, ``batch``, the Ray engine, ``bench``) stands on this module.  The flow of one call:
:func:`make_request` loads and prepares the photo(s) and checks every setting against the preset (no model
needed: front ends validate before loading), :meth:`Animator.run` animates one or more compatible requests as one
UNet batch, and :class:`Result` holds the uint8 frames and writes them with the sidecar.  Nothing here prints:
progress arrives through ``progress(step, steps)``; failures are the library's exceptions, settings named as they
are here (``steps``, ``cfg_scale``, ``image_scale``, ``dtype``; see :class:`~dynamicrafter.errors.SettingsError`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .errors import SettingsError
from .files import OutputError, check_replaceable, sidecar_path
from .presets import Preset, get_preset
from .request import ImageInput, Request, make_request

if TYPE_CHECKING:
    import torch

    from .models.dynamicrafter import DynamiCrafter
    from .sweep import SweepResult

Progress = Callable[[int, int], object]


@dataclass
class Result:
    """One video: ``frames`` (T, H, W, 3) uint8, the request it answers, its seed and how it was made."""

    frames: np.ndarray
    request: Request
    seed: int
    model: str
    checkpoint: str | None
    device: str
    dtype: str
    fps: int  # the preset's frame rate (``save`` may choose another)
    timings: dict[str, float] = field(default_factory=dict)
    measures: dict[str, Any] | None = None  # see dynamicrafter.measures; None when not measured
    attempts: list[dict[str, Any]] | None = None  # earlier tries of this video (e.g. static ones redone)

    @property
    def warning(self) -> str | None:
        """One line on what looks wrong with this video (black, flat, saturated, static) and what to try."""
        from .measures import warning_for

        return warning_for(self.measures)

    def record(self, output: Path | None = None, fps: int | None = None) -> dict[str, Any]:
        """The JSON sidecar: everything needed to reproduce this video."""
        from dataclasses import asdict

        r = self.request
        return {
            "tool": "dynamicrafter",
            "version": __version__,
            "image": r.image,
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "seed": self.seed,
            "settings": asdict(r.settings),
            "image_scale": r.image_scale,
            "fps": fps or self.fps,
            "device": self.device,
            "dtype": self.dtype,
            "output": None if output is None else str(output),
            "frames": int(self.frames.shape[0]),
            "height": int(self.frames.shape[1]),
            "width": int(self.frames.shape[2]),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "mode": r.mode,
            "end_image": r.end_image,
            "measures": self.measures,
            **({"attempts": self.attempts} if self.attempts else {}),
        }

    def save(
        self, path: str | Path, *, fmt: str | None = None, fps: int | None = None, overwrite: bool = False
    ) -> Path:
        """Write the video (``.mp4``/``.gif``/``.webp``, or a folder of PNG frames; ``fmt`` when the suffix does not
        say) and then its sidecar (``clip.mp4`` -> ``clip.json``), each atomically; returns the video's path.

        An existing video or sidecar is replaced only with ``overwrite`` (and never a folder of other files).
        """
        from .video import check_fps, write_frames, write_sidecar

        path = Path(path)
        check_fps(fps)
        check_replaceable(path)
        if not overwrite:
            for existing in (path, sidecar_path(path)):
                if existing.exists():
                    raise OutputError(f"{existing} exists; save with overwrite=True to replace it")
        written = write_frames(self.frames, path, fps or self.fps, fmt)
        write_sidecar(sidecar_path(written), self.record(written, fps))
        return written


class Animator:
    """A loaded model and where it runs; every call takes its settings as arguments and keeps none.

    Build it with :meth:`load`.  ``net`` is the :class:`~dynamicrafter.models.dynamicrafter.DynamiCrafter` network
    (for the pipeline's stage functions), ``preset`` its :class:`~dynamicrafter.presets.Preset`.
    """

    def __init__(
        self,
        net: DynamiCrafter,
        preset: Preset,
        *,
        device: str,
        dtype: torch.dtype,
        checkpoint: str | Path | None = None,
        load_s: float = 0.0,
    ) -> None:
        self.net, self.preset, self.device, self.dtype = net, preset, device, dtype
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.load_s = load_s
        self.weights, self.offload = "full", "none"  # set by load (see dynamicrafter.offload)

    @classmethod
    def load(
        cls,
        model: str | Preset = "512",
        *,
        checkpoint: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        download: bool = True,
        notify: Callable[[str], object] | None = None,
        random_weights: bool = False,
        weights_seed: int = 0,
        weights: str | None = None,
        offload: str | None = None,
        memory: str = "auto",
        max_memory: int | None = None,
    ) -> Animator:
        """Load ``model`` (a preset name from ``dynamicrafter models``, or a Preset) on ``device`` (default: cuda,
        then mps, then cpu) in ``dtype`` (``fp32``/``fp16``/``bf16``; default fp16 on cuda and mps, fp32 on cpu).

        Weights: ``checkpoint`` (.ckpt or .safetensors), else the preset's from the Hugging Face cache, downloaded
        first when missing and ``download`` (``notify`` gets one line when a download starts); ``random_weights``
        (or a built-in preset such as ``tiny``) builds random weights from ``weights_seed`` instead.
        Memory (:mod:`dynamicrafter.offload`): ``weights`` ``full`` or ``fp8`` (8-bit storage), ``offload``
        ``none``/``model``/``group``; what is not given, ``memory="auto"`` picks from the free CUDA memory (or
        ``max_memory`` bytes), ``memory="manual"`` (and any machine without CUDA and ``max_memory``) leaves at
        ``full``/``none``.
        """
        import torch

        from .checkpoint import build_random, build_skeleton, load_model
        from .devices import resolve_device
        from .hub import weights_for
        from .memory import available_bytes
        from .offload import check_modes, choose, prepare, weight_bytes

        preset = get_preset(model) if isinstance(model, str) else model
        torch_device, torch_dtype = resolve_device(device, dtype)
        if memory not in ("auto", "manual"):
            raise SettingsError("memory", f"unknown {{setting}} {memory!r}; choose auto or manual")
        free = max_memory  # else the free CUDA memory: on the CPU and MPS there is nothing to choose without it
        if free is None and torch_device.startswith("cuda"):
            free = available_bytes(torch_device)
        if memory == "auto" and free is not None and (weights is None or offload is None):
            skeleton = build_skeleton(preset.model_config())
            auto = choose(weight_bytes(skeleton, torch_dtype), preset.height, preset.width, free)
            weights, offload = weights or auto[0], offload or auto[1]
        weights, offload = weights or "full", offload or "none"
        check_modes(weights, offload)
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        if random_weights and checkpoint is not None:
            raise SettingsError("random_weights", "{setting} and a checkpoint exclude each other")
        path = checkpoint
        if path is None and not random_weights:
            path = weights_for(preset, download=download, notify=notify)
        started = time.perf_counter()
        cfg = preset.model_config()
        # with 8-bit storage or offloading the weights gather on the CPU first: the device never holds them all
        staging = "cpu" if (weights, offload) != ("full", "none") else torch_device
        if path is None:
            seed = weights_seed if random_weights else (preset.seed or 0)
            net = build_random(cfg, seed, staging, torch_dtype)
        else:
            net = load_model(cfg, path, staging, torch_dtype, expected_model=preset.name)
        net.device = torch.device(torch_device)
        prepare(net, weights, offload)
        if offload == "none":
            net.to(torch_device)
        animator = cls(net, preset, device=torch_device, dtype=torch_dtype, checkpoint=checkpoint,
                       load_s=time.perf_counter() - started)
        animator.weights, animator.offload = weights, offload
        return animator

    # ----------------------------------------------------------------------------------------------------------

    def request(self, image: ImageInput, prompt: str, **options: Any) -> Request:
        """:func:`make_request` for this model."""
        return make_request(self.preset, image, prompt, **options)

    def animate(
        self,
        image: ImageInput,
        prompt: str,
        *,
        progress: Progress | None = None,
        measures: bool = True,
        retry_static: int = 0,
        **options: Any,
    ) -> Result:
        """Animate ``image`` following ``prompt``: one video.  ``options`` are :func:`make_request`'s (``seed``,
        ``end_image``, ``loop``, ``negative_prompt``, ``image_scale`` (λ), ``steps``, ``cfg_scale``, ``frames``,
        ...); ``progress(step, steps)`` follows the denoising; ``measures`` and ``retry_static`` as for :meth:`run`."""
        if options.get("samples", 1) != 1:
            raise SettingsError("samples", "animate makes one video; for {setting} > 1 use run([request(...)])")
        request = self.request(image, prompt, **options)
        return self.run([request], progress=progress, measures=measures, retry_static=retry_static)[0]

    def run(
        self,
        requests: Sequence[Request],
        *,
        progress: Progress | None = None,
        keep_encoders: bool = False,
        measures: bool = True,
        retry_static: int = 0,
    ) -> list[Result]:
        """Animate ``requests`` (equal :attr:`Request.batch_key`) as one UNet batch: one :class:`Result` per
        request and sample, in order.  ``measures``: measure each video (:mod:`dynamicrafter.measures`, with the
        vision tower already loaded, back on the GPU only while measuring).  ``keep_encoders``: leave the text and
        image towers on the GPU for the next call (otherwise they leave it once encoding is done).  ``retry_static`` N: a video measured
        static is made again with the next unused seeds (seed + samples, + 2·samples, ...) up to N times; the
        result keeps every earlier attempt (seed and measures) in ``attempts``."""
        import torch

        from .measures import measure_video
        from .memory import check_fits, vision_tower_on_device
        from .pipeline import animate
        from .video import video_to_uint8

        if not requests:
            return []
        first = requests[0]
        if any(r.batch_key != first.batch_key for r in requests):
            raise ValueError("requests of one batch must share settings, mode and image_scale (see batch_key)")
        expand = [(r, seed) for r in requests for seed in r.seeds]
        check_fits(len(expand), first.settings.frames, *first.start.shape[2:], self.device)
        init = None
        if first.settings.analytic_init:  # CIL: the data statistics of the start noise (downloaded with the model)
            from .cil import load_analytic_init
            from .hub import weights_for

            init = load_analytic_init(first.init_statistics or weights_for(self.preset.init_statistics))
        started = time.perf_counter()
        video = animate(  # (N, 3, T, H, W)
            self.net,
            torch.cat([r.start for r, _ in expand]),
            [r.prompt for r, _ in expand],
            first.settings,
            [seed for _, seed in expand],
            end=torch.cat([r.end for r, _ in expand]) if first.mode == "interp" else None,
            mode=first.mode,
            negative_prompts=[r.negative_prompt for r, _ in expand],
            image_scale=first.image_scale,
            keep_encoders=keep_encoders,
            callback=progress,
            analytic_init=init,
        )
        timings = {"load_s": self.load_s, "generate_s": (time.perf_counter() - started) / len(expand)}
        results = [
            Result(
                frames=video_to_uint8(clip), request=r, seed=seed, model=self.preset.name, checkpoint=self.checkpoint,
                device=self.device, dtype=str(self.dtype).removeprefix("torch."), fps=self.preset.fps,
                timings=dict(timings),
            )
            for (r, seed), clip in zip(expand, video)
        ]
        if measures:
            started = time.perf_counter()
            with vision_tower_on_device(self.net) as tower:
                for result in results:
                    result.measures = measure_video(result.frames, photo=result.request.start, image_encoder=tower)
            for result in results:
                result.timings["measures_s"] = (time.perf_counter() - started) / len(results)
        if retry_static < 0:
            raise SettingsError("retry_static", f"{{setting}} must be >= 0 (got {retry_static})")
        for i, result in enumerate(results):
            attempts: list[dict[str, Any]] = []
            step = result.request.samples  # the seeds between are the other samples'
            while measures and "static" in result.measures["flags"] and len(attempts) < retry_static:
                attempts.append({"seed": result.seed, "measures": result.measures})
                again = replace(result.request, seed=result.seed + step, samples=1)
                result = self.run([again], progress=progress, keep_encoders=keep_encoders)[0]
            if attempts:
                result.attempts, results[i] = attempts, result
        return results

    def sweep(
        self,
        image: ImageInput,
        prompt: str,
        values: Sequence[float],
        *,
        layers: str | Sequence[int] = "all",
        batch_size: int | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> SweepResult:
        """One video per λ in ``values`` with the same seed and noise, on ``layers`` (``all``, ``input``,
        ``middle``, ``output`` or spatial-transformer indices), ``batch_size`` values per UNet batch (None: all;
        halved on a CUDA out-of-memory error), with motion and input-conformity measures; ``options`` as for
        :meth:`animate` (without ``image_scale``, ``loop`` or ``samples``)."""
        return self.sweep_request(
            self.request(image, prompt, **options), values, layers=layers, batch_size=batch_size, progress=progress
        )

    def sweep_request(
        self,
        request: Request,
        values: Sequence[float],
        *,
        layers: str | Sequence[int] = "all",
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> SweepResult:
        """:meth:`sweep` of a request made beforehand (:meth:`request` or :func:`make_request`)."""
        from .sweep import run_sweep

        return run_sweep(
            self.net, self.preset, request, values, layers, batch_size, progress, load_s=self.load_s
        )
