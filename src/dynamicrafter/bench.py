"""Speed and memory benchmark of the real pipeline: build/load, encode, UNet calls, guided DDIM steps, decode.

:func:`run_benchmark` loads the chosen architecture through the public API (:meth:`Animator.load`: random
weights from a seed, or a checkpoint), makes a synthetic start image and runs the pipeline itself
(:func:`~dynamicrafter.pipeline.animate`), which times its stages (encode, sample, decode) with device
synchronisation when handed a :class:`~dynamicrafter.pipeline.StageTimes`; forward hooks on the UNet time its calls.  Per-call
and per-step figures are medians over the sampling run without its first step, which carries one-time work
(context projection, kernel selection, compilation).  ``measures_s`` is the quality measures of one video
(:func:`~dynamicrafter.measures.measure_video`, outside ``end_to_end_s``).  The FLOPs of one UNet call are counted once, with
``torch.utils.flop_counter`` on a meta-device copy of the UNet fed the shapes of the real call, so counting costs
no compute.  Peak memory is ``torch.cuda.max_memory_allocated`` over the whole run on CUDA, and the peak resident
set size of the process (``resource.getrusage``; it includes whatever the process held before) on the CPU.

On CUDA the pipeline's two memory policies apply, as in every run: the text and image encoders (and the
Resampler) leave the GPU once the conditioning is made (``offload.place``), and the VAE decodes in
chunks sized so that decoding does not raise the peak already reached while sampling
(``memory.decode_within_peak``).

Shape letters: B batch, T frames, H x W pixels, h x w latent.  ``unet_batch`` is the batch of one UNet call: B times
the guidance branches (1-3), times the windows of a long video.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import __version__
from .api import Animator
from .measures import measure_video
from .memory import vision_tower_on_device
from .offload import PARTS, part_bytes, resident_bytes
from .models.context import UNetContext
from .models.dynamicrafter import DynamiCrafter
from .models.unet import UNet3D
from .pipeline import StageTimes, animate, latent_shape
from .presets import Preset
from .settings import SamplingSettings
from .video import video_to_uint8

PROMPT = "a benchmark scene with gentle motion"


@dataclass(frozen=True)
class BenchSpec:
    """What to run: a preset's architecture and sampler settings at a resolution, batch, device and dtype."""

    preset: Preset
    settings: SamplingSettings
    height: int
    width: int
    batch: int = 1
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # fp32/fp16/bf16; None: fp16 on cuda, fp32 elsewhere
    checkpoint: Path | None = None  # None: random weights from ``seed``
    compile: bool = False
    seed: int = 0
    weights: str | None = None  # memory modes (dynamicrafter.offload); None: chosen by ``memory``
    offload: str | None = None
    memory: str = "auto"
    max_memory: int | None = None


@dataclass(frozen=True)
class BenchResult:
    """Timings in seconds, memory in GiB; ``unet_tflop`` is the work of one UNet call, ``tflops`` its rate."""

    model: str
    weights: str
    device: str
    device_name: str
    dtype: str
    height: int
    width: int
    frames: int
    steps: int
    batch: int
    unet_batch: int
    compile: bool
    build_s: float
    encode_s: float
    unet_call_s: float
    unet_calls: int
    step_s: float
    first_step_s: float
    sample_s: float
    decode_s: float
    decode_chunk: int
    weights_mode: str
    offload: str
    weights_gib: float  # all stored weights (exact)
    resident_encode_gib: float  # weights on the compute device during each stage (exact)
    resident_sample_gib: float
    resident_decode_gib: float
    peak_encode_gib: float  # CUDA: max_memory_allocated within each stage; 0 elsewhere
    peak_sample_gib: float
    peak_decode_gib: float
    measures_s: float
    end_to_end_s: float
    peak_memory_gib: float
    memory_kind: str
    unet_tflop: float
    tflops: float
    finite: bool
    torch: str
    version: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Clocks and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    _sync(device)
    return time.perf_counter()


def process_peak_rss_gib() -> float:
    """Peak resident set size of this process so far (KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------------------------------------
# FLOPs


def unet_flops(model: DynamiCrafter, x: torch.Tensor, timesteps: torch.Tensor, context: UNetContext) -> int:
    """FLOPs of one UNet call with the shapes and dtypes of x, timesteps and a prepared ``context``.

    Counted on a meta-device copy (no memory, no compute), without the once-per-run context projection
    (``UNet3D.prepare``), as every sampling step reuses it.
    """
    with torch.device("meta"):
        unet = UNet3D(model.cfg.unet).to(x.dtype).eval()
        tokens = torch.empty(context.batch, context.tokens, model.cfg.unet.context_dim, dtype=x.dtype)
        fs = torch.zeros(context.batch, dtype=torch.long) if context.fs_emb is not None else None
    counter = FlopCounterMode(display=False)
    with torch.no_grad():
        prepared = unet.prepare(tokens, fs, context.frames, context.image_scale)
        meta_x, meta_t = (torch.empty(a.shape, dtype=a.dtype, device="meta") for a in (x, timesteps))
        with counter:
            unet(meta_x, meta_t, prepared)
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------------------------
# Reduced precision


@torch.no_grad()
def unet_precision(
    preset: Preset,
    height: int,
    width: int,
    device: str,
    dtype: torch.dtype,
    *,
    frames: int = 16,
    batch: int = 2,
    seed: int = 0,
) -> dict[str, object]:
    """One UNet call of ``preset``'s architecture with random weights, in float32 and then in ``dtype``.

    Inputs are random: latent (B, 8, T, h, w), timesteps spread over 999…1, a context in the 77 + 16·T layout.
    The float32 reference runs with TF32 off.  Returns the relative max error (max |low − ref| / max |ref|), whether
    both outputs are finite, and the time of each call (the first of its kind, so including kernel selection).
    """
    cfg = preset.model_config().unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet3D(cfg)
    dev = torch.device(device)
    unet = unet.to(dev).eval().requires_grad_(False)
    down = preset.model_config().vae.downscale
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cfg.in_channels, frames, height // down, width // down, generator=g)
    context = torch.randn(batch, cfg.text_tokens + cfg.image_tokens_per_frame * frames, cfg.context_dim, generator=g)
    inputs = (x, torch.linspace(999, 1, batch).long(), context, torch.full((batch,), cfg.default_fs))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        start = _clock(dev)
        ref = unet(*(t.to(dev) for t in inputs)).float()
        ref_s = _clock(dev) - start
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    unet.to(dtype)
    start = _clock(dev)
    low = unet(*(t.to(dev, dtype) if t.is_floating_point() else t.to(dev) for t in inputs)).float()
    low_s = _clock(dev) - start
    return {
        "check": "unet_precision",
        "model": preset.name,
        "device": str(dev),
        "device_name": device_name(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "height": height,
        "width": width,
        "frames": frames,
        "batch": batch,
        "rel_max_err": ((low - ref).abs().max() / ref.abs().max()).item(),
        "finite": bool(torch.isfinite(low).all()),
        "reference_finite": bool(torch.isfinite(ref).all()),
        "fp32_call_s": ref_s,
        "low_call_s": low_s,
    }


# --------------------------------------------------------------------------------------------------------------
# The run


def synthetic_image(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A smooth deterministic start image (B, 3, H, W) in [-1, 1] (speed does not depend on its content)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def _timed_unet(model: DynamiCrafter, device: torch.device, calls: list[float], first_call: list) -> Callable[[], None]:
    """Hooks that time every UNet call and keep the arguments (x, timesteps, context) of the first one; returns
    the function that removes them."""
    started: list[float] = []

    def before(_module, args, kwargs):
        if not first_call:
            names = ("x", "timesteps", "context")[len(args) :]
            first_call.extend([*args, *(kwargs.get(name) for name in names)])
        started.append(_clock(device))

    def after(_module, _args, _out):
        calls.append(_clock(device) - started.pop())

    handles = [model.unet.register_forward_pre_hook(before, with_kwargs=True), model.unet.register_forward_hook(after)]
    return lambda: [h.remove() for h in handles]


@torch.no_grad()
def run_benchmark(spec: BenchSpec) -> BenchResult:
    """Run the pipeline once as specified and measure it (see the module docstring)."""
    if spec.batch < 1:
        raise ValueError(f"batch must be at least 1, got {spec.batch}")
    settings = spec.settings
    if spec.device is not None and spec.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(spec.device))

    start = time.perf_counter()
    animator = Animator.load(
        spec.preset, checkpoint=spec.checkpoint, device=spec.device, dtype=spec.dtype, download=False,
        random_weights=spec.checkpoint is None, weights_seed=spec.seed, weights=spec.weights, offload=spec.offload,
        memory=spec.memory, max_memory=spec.max_memory,
    )
    device, model = torch.device(animator.device), animator.net
    build_s = _clock(device) - start
    latent_shape(model, spec.batch, settings.frames, spec.height, spec.width)  # validates H and W
    if spec.compile:
        model.unet = torch.compile(model.unet)

    image = synthetic_image(spec.batch, spec.height, spec.width, spec.seed)
    calls: list[float] = []
    first_call: list = []
    stamps: list[float] = []
    times = StageTimes()
    remove = _timed_unet(model, device, calls, first_call)
    try:
        video = animate(
            model, image, [PROMPT] * spec.batch, settings, [spec.seed + i for i in range(spec.batch)],
            callback=lambda i, total: stamps.append(_clock(device)), times=times,
        )
    finally:
        remove()
    encode_s, sample_s, decode_s = (times.seconds[k] for k in ("encode", "sample", "decode"))
    start = _clock(device)
    with vision_tower_on_device(model) as tower:  # the quality measures every output gets, as Animator.run does
        for clip, photo in zip(video, image):
            measure_video(video_to_uint8(clip), photo=photo[None], image_encoder=tower)
    measures_s = (_clock(device) - start) / spec.batch
    begin = stamps[-1] - sample_s
    steps = [b - a for a, b in zip([begin, *stamps[:-1]], stamps)]

    if device.type == "cuda":
        peak = max(times.peak_bytes, torch.cuda.max_memory_allocated(device)) / 2**30  # the measures too
        kind = "cuda max_memory_allocated"
    else:
        peak, kind = process_peak_rss_gib(), "process peak RSS"
    later_calls = calls[len(calls) // len(steps) :] or calls  # the calls of steps 2.., or all with one step
    unet_call_s = statistics.median(later_calls)
    flop = unet_flops(model, *first_call[:3])
    return BenchResult(
        model=spec.preset.name,
        weights=str(spec.checkpoint) if spec.checkpoint else f"random (seed {spec.seed})",
        device=str(device),
        device_name=device_name(device),
        dtype=str(animator.dtype).removeprefix("torch."),
        height=spec.height,
        width=spec.width,
        frames=settings.frames,
        steps=len(steps),
        batch=spec.batch,
        unet_batch=first_call[0].shape[0],
        compile=spec.compile,
        build_s=build_s,
        encode_s=encode_s,
        unet_call_s=unet_call_s,
        unet_calls=len(calls),
        step_s=statistics.median(steps[1:] or steps),
        first_step_s=steps[0],
        sample_s=sample_s,
        decode_s=decode_s,
        decode_chunk=times.decode_chunk,
        weights_mode=animator.weights,
        offload=animator.offload,
        weights_gib=sum(part_bytes(getattr(model, p)) for p in PARTS) / 2**30,
        resident_encode_gib=resident_bytes(model, "encode") / 2**30,
        resident_sample_gib=resident_bytes(model, "sample") / 2**30,
        resident_decode_gib=resident_bytes(model, "decode") / 2**30,
        peak_encode_gib=times.peaks.get("encode", 0) / 2**30,
        peak_sample_gib=times.peaks.get("sample", 0) / 2**30,
        peak_decode_gib=times.peaks.get("decode", 0) / 2**30,
        measures_s=measures_s,
        end_to_end_s=encode_s + sample_s + decode_s,
        peak_memory_gib=peak,
        memory_kind=kind,
        unet_tflop=flop / 1e12,
        tflops=flop / 1e12 / unet_call_s,
        finite=bool(torch.isfinite(video).all()),
        torch=torch.__version__,
        version=__version__,
    )
