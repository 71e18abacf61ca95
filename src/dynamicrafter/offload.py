"""Smaller GPUs: 8-bit weight storage, offloading modes, and the memory mode that picks itself.

Weights (``weights``): ``fp8`` keeps the linear and convolution weights of the UNet and the CLIP towers in float8
(e4m3) and casts each layer up to the compute dtype while it runs (diffusers' layerwise-casting hooks: the same math
as the ComfyUI wrapper's fp8 UNet, with no kernel of our own); norms, embeddings, the UNet's first and last
convolutions, the Resampler and the VAE stay as they are.

Offloading (``offload``), where each part is while a stage runs (``cpu`` elsewhere):

| mode | encode | sample | decode |
|---|---|---|---|
| ``none`` | everything | UNet, VAE (towers leave after encoding) | UNet, VAE |
| ``model`` | towers, Resampler, VAE | UNet | VAE |
| ``group`` | towers, Resampler, VAE | UNet layers, each while it runs (diffusers' group offloading) | VAE |

``memory="auto"`` picks the first of (none, full weights), (none, fp8), (model, fp8), (group, fp8) whose need fits
the free device memory (or ``max_memory``): the weights resident during sampling (bytes counted exactly from the
model) plus the sampling activations of :data:`ACTIVATIONS_GIB`.
"""

from __future__ import annotations

import torch

from .errors import SettingsError
from .models.dynamicrafter import DynamiCrafter

OFFLOAD_MODES = ("none", "model", "group")
WEIGHT_MODES = ("full", "fp8")
PARTS = ("text_encoder", "image_encoder", "image_proj", "unet", "vae")
TOWERS = ("text_encoder", "image_encoder", "image_proj")
# Modules kept in the compute dtype under fp8 (names inside each part): norms, embeddings, the UNet's first and last
# convolutions (few weights, large effect)
FP8_SKIP = ("norm", "layrnorm", "embed", r"^input_blocks\.0\.0$", r"^out\.2$")

# Parts on the compute device during each stage (see the table above); the others are on the CPU.
ON_DEVICE = {
    "none": {"encode": set(PARTS), "sample": {"unet", "vae"}, "decode": {"unet", "vae"}},
    "model": {"encode": {*TOWERS, "vae"}, "sample": {"unet"}, "decode": {"vae"}},
    "group": {"encode": {*TOWERS, "vae"}, "sample": set(), "decode": {"vae"}},
}

# Sampling activations of one 16-frame video with guidance (two branches in one UNet batch), GiB: the original
# code's measured fp16 peak on an H100 (reference/PERF_H100.md: 5.8 GiB at 320x512, 7.9 GiB at 576x1024) minus its
# 4.74 GiB of fp16 weights, doubled for the batched branches; 256x256 scaled from 320x512 by pixels.  To be replaced
# by this tool's own measurements (scripts/bench_gpu.sh) once a GPU is lent.
ACTIVATIONS_GIB = {(256, 256): 0.9, (320, 512): 2.2, (576, 1024): 6.4}


def parse_size(text: str | None) -> int | None:
    """``6GiB``, ``6GB``, ``512MiB``, ``6`` (GiB) -> bytes; None passes through."""
    import re

    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*", text, re.I)
    if not match:
        raise SettingsError("max_memory", f"{{setting}} must look like 6GiB or 6GB (got {text!r})")
    units = {"": 2**30, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
             "gib": 2**30, "tib": 2**40}
    return int(float(match[1]) * units[(match[2] or "").lower()])


def check_modes(weights: str, offload: str) -> None:
    if weights not in WEIGHT_MODES:
        raise SettingsError("weights", f"unknown {{setting}} {weights!r}; choose {' or '.join(WEIGHT_MODES)}")
    if offload not in OFFLOAD_MODES:
        raise SettingsError("offload", f"unknown {{setting}} {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")


def store_in_fp8(model: DynamiCrafter) -> None:
    """Keep the UNet's and towers' linear and convolution weights in float8 e4m3, cast up per layer as it runs."""
    from diffusers.hooks import apply_layerwise_casting

    if model.device.type == "mps":
        raise SettingsError("weights", "{setting} fp8 is not available on Apple MPS (no float8 there); use full")
    for part in (model.unet, model.text_encoder, model.image_encoder):
        apply_layerwise_casting(part, storage_dtype=torch.float8_e4m3fn, compute_dtype=model.dtype,
                                skip_modules_pattern=FP8_SKIP)


def prepare(model: DynamiCrafter, weights: str = "full", offload: str = "none") -> DynamiCrafter:
    """Apply the weight storage and offloading modes to a loaded model (once, at load time)."""
    check_modes(weights, offload)
    if weights == "fp8":
        store_in_fp8(model)
    if offload == "group" and model.device.type != "cpu":
        from diffusers.hooks import apply_group_offloading

        model.unet.to("cpu")
        apply_group_offloading(model.unet, onload_device=model.device, offload_device="cpu",
                               offload_type="leaf_level", use_stream=model.device.type == "cuda")
    model.offload = offload
    return model


def place(model: DynamiCrafter, stage: str, keep_encoders: bool = False) -> None:
    """Move the parts to where ``stage`` (encode, sample, decode) wants them under the model's offload mode;
    ``keep_encoders``: the towers stay on the device after encoding (a caller with more runs to make)."""
    mode = getattr(model, "offload", "none")
    wanted = set(ON_DEVICE[mode][stage])
    if keep_encoders:
        wanted |= set(TOWERS)
    if model.device.type == "cpu":
        return
    for name in PARTS:
        if name == "unet" and mode == "group":
            continue  # its layers come and go with their own hooks
        getattr(model, name).to(model.device if name in wanted else "cpu")
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def part_bytes(module: torch.nn.Module) -> int:
    """Bytes of a part's parameters and buffers as stored now (float8 counts 1 byte)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def resident_bytes(model: DynamiCrafter, stage: str, keep_encoders: bool = False) -> int:
    """Bytes of weights on the compute device during ``stage`` (exact, from the stored tensors)."""
    mode = getattr(model, "offload", "none")
    wanted = set(ON_DEVICE[mode][stage]) | (set(TOWERS) if keep_encoders else set())
    return sum(part_bytes(getattr(model, name)) for name in PARTS if name in wanted)


def fp8_layers(part: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers :func:`store_in_fp8` stores in float8 (diffusers' rule: supported layer types, FP8_SKIP names)."""
    import re

    from diffusers.hooks.layerwise_casting import _GO_LC_SUPPORTED_PYTORCH_LAYERS as LAYERS

    found: list[torch.nn.Module] = []

    def walk(module: torch.nn.Module, name: str) -> None:
        if any(re.search(p, name) for p in FP8_SKIP):
            return
        if isinstance(module, LAYERS):
            found.append(module)
            return
        for child, sub in module.named_children():
            walk(sub, f"{name}.{child}" if name else child)

    walk(part, "")
    return found


def weight_bytes(model: DynamiCrafter, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Stored bytes of each part in ``dtype`` (``full``) and with fp8 storage (``fp8``), counted exactly from the
    model's tensors (a meta-device skeleton works: nothing is read), plus the UNet's largest layer
    (``unet_layer``, what group offloading holds at once)."""
    size = torch.tensor([], dtype=dtype).element_size()
    out: dict[str, dict[str, int]] = {"full": {}, "fp8": {}}
    for name in PARTS:
        part = getattr(model, name)
        total = sum(t.numel() for t in (*part.parameters(), *part.buffers())) * size
        out["full"][name] = total
        eightbit = sum(p.numel() for layer in fp8_layers(part) for p in layer.parameters()) if name in (
            "unet", "text_encoder", "image_encoder") else 0
        out["fp8"][name] = total - eightbit * (size - 1)
    leaves = [m for m in model.unet.modules() if not list(m.children())]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in leaves)
    for mode in out:
        out[mode]["unet_layer"] = largest * (1 if mode == "fp8" else size)
    return out


def choose(weights: dict[str, dict[str, int]], height: int, width: int, free_bytes: int) -> tuple[str, str]:
    """The fastest (weights, offload) whose sampling need fits ``free_bytes``: the parts on the device while
    sampling (``weights`` from :func:`weight_bytes`) plus the activations of :data:`ACTIVATIONS_GIB`, scaled by pixels
    from the nearest table resolution at least as large.  Falls back to (fp8, group), the least there is."""
    key = min((k for k in ACTIVATIONS_GIB if k[0] * k[1] >= height * width), default=max(ACTIVATIONS_GIB),
              key=lambda k: k[0] * k[1])
    activations = ACTIVATIONS_GIB[key] * 2**30 * height * width / (key[0] * key[1])
    for mode, offload in (("full", "none"), ("fp8", "none"), ("fp8", "model"), ("fp8", "group")):
        parts = weights[mode]
        need = activations + sum(parts[p] for p in ON_DEVICE[offload]["sample"])
        need += parts["unet_layer"] if offload == "group" else 0
        if need <= free_bytes:
            return mode, offload
    return "fp8", "group"
