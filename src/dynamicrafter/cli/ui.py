"""``dynamicrafter ui``: the web UI (Gradio, the optional ``ui`` extra) on 127.0.0.1, the model loaded once."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from .app import UsageError, app, console, handle_errors
from .common import (
    CheckpointOpt, DeviceOpt, DtypeOpt, MaxMemoryOpt, MemoryOpt, ModelOpt, OffloadOpt, WeightsOpt, check_checkpoint_path,
    check_memory_options, load_animator,
)

INSTALL = "pip install 'dynamicrafter[ui]'"


def check_port(host: str, port: int) -> None:
    """Refuse a host:port that cannot be served (in use, not an address of this machine) before the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UsageError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); choose another --port") from None


@app.command("ui")
@handle_errors
def ui(
    model: ModelOpt = "512",
    checkpoint: CheckpointOpt = None,
    host: Annotated[str, typer.Option(help="Address to serve on; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 7860,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Folder for the videos and sidecars.")] = Path("dynamicrafter-ui"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    weights: WeightsOpt = None,
    offload: OffloadOpt = None,
    memory: MemoryOpt = "auto",
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Serve the web UI: animate, interpolate / loop and λ sweeps in the browser, on a model loaded once."""
    started = time.perf_counter()
    if importlib.util.find_spec("gradio") is None:
        raise UsageError(f"the web UI needs Gradio, an optional extra: {INSTALL}")
    from ..devices import check_device_names, resolve_device
    from ..files import OutputError, ensure_writable_dir
    from ..presets import get_preset

    preset = get_preset(model)
    check_checkpoint_path(checkpoint)
    if str(out_dir) == "-":
        raise UsageError("--out-dir - is not a folder; name one")
    try:
        ensure_writable_dir(out_dir)
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    check_port(host, port)
    check_device_names(device, dtype)  # the names now; the device and memory options before the model loads

    def load():
        resolve_device(device, dtype)  # these import torch and the networks: after the page is up
        check_memory_options(weights, offload, memory, max_memory)
        return load_animator(preset, checkpoint, device, dtype, weights=weights, offload=offload, memory=memory,
                             max_memory=max_memory)

    from ..hub import local_weights
    from ..ui import serve
    from ..ui_jobs import Jobs

    # a model still to download comes first (its bar on this terminal; a failed download serves nothing); else the
    # page is served at once and the model loads behind it: a job sent meanwhile waits for it
    first = checkpoint is None and preset.downloadable and local_weights(preset) is None
    jobs = Jobs(preset, None, out_dir, load() if first else None)
    demo = serve(jobs, host, port)
    try:
        console.print(f"dynamicrafter ui: http://{host}:{port} (page up in {time.perf_counter() - started:.1f} s)")
        if jobs.animator is None:
            jobs.ready(load())
        console.print(f"model {preset.name} ready on {jobs.device} after {time.perf_counter() - started:.1f} s; "
                      f"outputs go to {out_dir}; Ctrl-C stops the server")
        while demo.is_running:  # until Ctrl-C or SIGTERM
            time.sleep(0.1)
    except KeyboardInterrupt:  # the way to stop a server: not a failure
        console.print("stopped the server; no partial output was left behind")
    finally:
        jobs.shutdown()  # a running job stops at its next step; a video being written is finished first
        if getattr(demo, "server", None) is not None:  # uvicorn: drop open connections now, not after 5 s, quietly
            logging.getLogger("uvicorn.error").disabled = True
            demo.server.force_exit = True
        demo.close()
