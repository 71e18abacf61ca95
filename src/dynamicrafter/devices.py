"""Where a model runs and in which precision: names checked, CPU-safe defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import SettingsError

if TYPE_CHECKING:
    import torch

DTYPES = ("fp32", "fp16", "bf16")


def check_device_names(device: str | None, dtype: str | None) -> None:
    """Refuse unknown device and dtype names (all that can be checked where the GPUs are elsewhere, as with Ray)."""
    if device is not None and not (device in ("cpu", "mps") or device.startswith("cuda")):
        raise SettingsError("device", f"unknown {{setting}} {device!r}; use cpu, cuda or mps")
    if dtype is not None and dtype not in DTYPES:
        raise SettingsError("dtype", f"unknown {{setting}} {dtype!r}; choose fp32, fp16 or bf16")


def torch_dtype(name: str) -> torch.dtype:
    """``fp32``/``fp16``/``bf16`` -> the torch dtype."""
    import torch

    check_device_names(None, name)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(device: str | None = None, dtype: str | None = None) -> tuple[str, torch.dtype]:
    """(device, torch dtype): cuda when available, else mps (Apple silicon), else cpu; fp16 on cuda and mps, fp32
    on the cpu; a SettingsError for impossible choices (no such device, no bf16 support)."""
    import torch

    check_device_names(device, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else ("mps" if mps_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError("device", "{setting} cuda was asked for, but no CUDA GPU is available; use {setting} cpu")
    if device == "mps" and not mps_available():
        raise SettingsError("device", "{setting} mps was asked for, but this machine has no Apple GPU; use {setting} cpu")
    dtype = dtype or ("fp32" if device == "cpu" else "fp16")
    if dtype == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise SettingsError("dtype", "this GPU has no bf16 support; use {setting} fp16 or fp32")
    return device, torch_dtype(dtype)
