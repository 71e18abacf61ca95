"""``dynamicrafter bench``: time and measure the real pipeline on a chosen architecture (random weights allowed)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import UsageError, app, handle_errors
from .common import MaxMemoryOpt, MemoryOpt, OffloadOpt, WeightsOpt, check_memory_options, CheckpointOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, StepsOpt, check_checkpoint_path

RandomOpt = Annotated[bool, typer.Option("--random-weights", help="Random weights (speed does not depend on them).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (the first step compiles).")]

# (field, label, format) of the table; the JSON object has every field of BenchResult.
ROWS = (
    ("build_s", "model build/load", "{:.2f} s"),
    ("encode_s", "encode (text, image, VAE)", "{:.3f} s"),
    ("unet_call_s", "one UNet call", "{:.3f} s"),
    ("step_s", "one guided DDIM step", "{:.3f} s"),
    ("first_step_s", "first step (one-time work)", "{:.3f} s"),
    ("sample_s", "all steps", "{:.2f} s"),
    ("decode_s", "decode", "{:.3f} s"),
    ("end_to_end_s", "end to end (encode + steps + decode)", "{:.2f} s"),
    ("measures_s", "quality measures per video", "{:.3f} s"),
    ("peak_memory_gib", "peak memory", "{:.2f} GiB"),
    ("weights_gib", "weights stored", "{:.3f} GiB"),
    ("resident_sample_gib", "weights on the device while sampling", "{:.3f} GiB"),
    ("unet_tflop", "work per UNet call", "{:.3f} TFLOP"),
    ("tflops", "achieved", "{:.2f} TFLOP/s"),
)


@app.command()
@handle_errors
def bench(
    model: ModelOpt = "tiny",
    height: Annotated[Optional[int], typer.Option(help="Image height in pixels (default: the preset's).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width in pixels (default: the preset's).")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames to generate (default: the preset's 16).")] = None,
    steps: StepsOpt = None,
    batch: Annotated[int, typer.Option(help="Videos generated at once.")] = 1,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    weights: WeightsOpt = None,
    offload: OffloadOpt = None,
    memory: MemoryOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    random_weights: RandomOpt = False,
    checkpoint: CheckpointOpt = None,
    compile_unet: CompileOpt = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights, the start image and the noise.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Run the pipeline once and report build, encode, per-call, per-step, decode and end-to-end times, peak memory
    and achieved TFLOP/s."""
    from ..bench import BenchSpec, run_benchmark
    from ..offload import parse_size
    from ..devices import resolve_device
    from ..hub import local_weights
    from ..presets import get_preset

    preset = get_preset(model)
    if random_weights and checkpoint is not None:
        raise UsageError("--random-weights and --checkpoint exclude each other")
    check_checkpoint_path(checkpoint)
    if checkpoint is None and preset.downloadable and not random_weights:
        checkpoint = local_weights(preset)
        if checkpoint is None:
            raise UsageError(
                f"the {preset.name} model's weights are not on this machine; pass --random-weights (speed does not "
                f"depend on weight values) or --checkpoint PATH"
            )
    if batch < 1:
        raise UsageError(f"--batch must be at least 1 (got {batch})")
    resolve_device(device, dtype)
    check_memory_options(weights, offload, memory, max_memory)
    settings = preset.sampling(steps=steps, frames=frames)
    spec = BenchSpec(
        preset=preset,
        settings=settings,
        height=preset.height if height is None else height,
        width=preset.width if width is None else width,
        batch=batch,
        device=device,
        dtype=dtype,
        checkpoint=checkpoint,
        compile=compile_unet,
        seed=seed,
        weights=weights,
        offload=offload,
        memory=memory,
        max_memory=parse_size(max_memory),
    )
    result = run_benchmark(spec).to_dict()
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table(title=(
        f"dynamicrafter bench: {result['model']} ({result['weights']}), {result['height']}x{result['width']}, "
        f"{result['frames']} frames, {result['steps']} steps, batch {result['batch']}, "
        f"UNet batch {result['unet_batch']}; {result['device_name']}, {result['dtype']}"
    ))
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, label, fmt in ROWS:
        table.add_row(label, fmt.format(result[key]))
    table.add_row("memory measured as", result["memory_kind"])
    table.add_row("outputs finite", "yes" if result["finite"] else "NO")
    Console().print(table)
