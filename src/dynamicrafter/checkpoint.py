"""Opening checkpoints safely and loading them strictly into :class:`DynamiCrafter`.

Accepted containers: the released ``.ckpt`` (``{"state_dict": ...}``), the DeepSpeed variant (``{"module": ...}``
with a 16-character ``_forward_module.`` prefix on every key), a bare dict of tensors, and ``.safetensors``
(either the original key names or the names written by ``dynamicrafter convert``).  Pickles are opened with
``weights_only=True`` (no arbitrary code runs) and memory-mapped; every tensor is cast to the target dtype and
device as it is assigned, so the float32 copy never exists in full.

Loading is strict: every parameter must be present with its exact shape and every key must be known (keys that
inference never uses are known and dropped).  A mismatch raises :class:`CheckpointError` naming the keys, with a
hint about which model the file looks like.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .models.dynamicrafter import DynamiCrafter
from .models.encoders import convert_text_state_dict, convert_vae_state_dict, convert_vision_state_dict
from .models.toon_vae import convert_toon_vae_state_dict


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# Original prefix -> our sub-module name, and the per-tower key conversion (None: names are identical).
COMPONENTS = (
    ("model.diffusion_model.", "unet", None),
    ("image_proj_model.", "image_proj", None),
    ("cond_stage_model.model.", "text_encoder", convert_text_state_dict),
    ("embedder.model.", "image_encoder", convert_vision_state_dict),
    ("first_stage_model.", "vae", convert_vae_state_dict),
)
# DDPM schedule buffers: recomputed from the config (sampling.make_schedule), never read from the file.
SCHEDULE_BUFFERS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 scale_arr".split()
)
DEEPSPEED_PREFIX_LEN = len("_forward_module.")
OUR_PREFIXES = tuple(f"{name}." for _, name, _ in COMPONENTS)


# --------------------------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict of a checkpoint file, container unwrapped; tensors memory-mapped where possible."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler's notes on pickle protocols
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle of tensors at all
            raise CheckpointError(f"cannot read {path}: not a PyTorch checkpoint") from exc
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors ({found.group(1)}); only weights-only "
            "checkpoints are loaded, so no code from the file runs"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read {path}: truncated or not a PyTorch checkpoint") from exc
    return unwrap_container(obj, path)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,  # convert --dtype fp8
}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Zero-copy: every tensor is a view of one read-only memory map of the file (nothing is read until used)."""
    import json
    import mmap

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(header_len))
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + header_len else b""
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    base = 8 + header_len
    out = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        if base + end > size:
            raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file (tensor {key} ends past the file)")
        count = (end - start) // dtype.itemsize
        with warnings.catch_warnings():  # copy-on-write map: writes never reach the file
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
        out[key] = flat.reshape(info["shape"])
    return out


def unwrap_container(obj: object, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """``state_dict`` / DeepSpeed ``module`` / bare dict -> flat ``{key: tensor}`` with the original key names."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        sd = dict(obj["state_dict"])
    elif isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):
        sd = {key[DEEPSPEED_PREFIX_LEN:]: value for key, value in obj["module"].items()}
    elif isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
    else:
        raise CheckpointError(f"{path}: not a model checkpoint (expected a dict with 'state_dict' or 'module')")
    return {key.replace("framestride_embed", "fps_embedding"): value for key, value in sd.items()}


# --------------------------------------------------------------------------------------------------------------
# Key conversion and strict checking


def convert_checkpoint(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Original key names -> our state-dict names.  Unused keys are dropped; unknown keys pass through unchanged.

    A state dict already in our naming (``dynamicrafter convert`` output) is returned as is.
    """
    if any(key.startswith(OUR_PREFIXES) for key in sd) and not any(key.startswith(COMPONENTS[0][0]) for key in sd):
        return dict(sd)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for _, name, _ in COMPONENTS}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in SCHEDULE_BUFFERS:
            continue
        for prefix, name, _ in COMPONENTS:
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = value
                break
        else:
            out[key] = value
    tower_cfg = {"text_encoder": cfg.text, "image_encoder": cfg.vision, "vae": cfg.vae}
    for _, name, convert in COMPONENTS:
        if name == "vae" and cfg.vae.decoder == "dualref":
            convert = convert_toon_vae_state_dict  # ToonCrafter's temporal decoder
        part = convert(parts[name], tower_cfg[name]) if convert else parts[name]
        out.update({f"{name}.{key}": value for key, value in part.items()})
    return out


def hint(sd: Mapping[str, torch.Tensor]) -> str:
    """The hint of a load error: which model the original-layout state dict looks like."""
    probe = "model.diffusion_model.input_blocks.0.0.weight"
    if probe not in sd:
        return "Hint: this is not a DynamiCrafter checkpoint (no model.diffusion_model.* weights)."
    return f"Hint: this looks like {identify(sd, sd[probe].shape[0])}."


def identify(sd: Mapping[str, torch.Tensor], channels: int) -> str:
    """A short guess of which model an original-layout state dict holds (``channels``: the UNet's first width)."""
    if channels != 320:
        return f"a custom architecture (UNet model_channels {channels}, not the released 320)"
    if any(key.startswith("first_stage_model.decoder.attn_refinement.") for key in sd):
        return "the ToonCrafter (toon) model"
    if any(key.endswith("attn2.alpha") for key in sd):
        return "the 256 model"
    scale = sd.get("scale_arr")
    if scale is not None and scale.device.type != "meta" and scale.numel():
        base = float(scale[-1])
        if abs(base - 0.3) < 1e-6:
            return "the 1024 model"
        if abs(base - 0.7) < 1e-6:
            return "the 512 (or 512-interp) model"
    return "a 512/1024 model"


def _summarise(one: str, many: str, keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit]) + (f", … (+{len(keys) - limit})" if len(keys) > limit else "")
    return f"{len(keys)} {one if len(keys) == 1 else many} ({shown})"


def check_state_dict(
    converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> list[str]:
    """Problems of ``converted`` against the model's ``expected`` keys and shapes (empty list: it fits)."""
    missing = sorted(k for k in expected if k not in converted)
    unexpected = sorted(k for k in converted if k not in expected)
    mismatched = sorted(
        f"{k} {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in converted and converted[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(_summarise("missing key", "missing keys", missing))
    if unexpected:
        problems.append(_summarise("unexpected key", "unexpected keys", unexpected))
    if mismatched:
        problems.append(_summarise("shape mismatch", "shape mismatches", mismatched))
    return problems


# --------------------------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Create every parameter on the meta device (no memory, no init cost); buffers stay real and small."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(cfg: ModelConfig) -> DynamiCrafter:
    """The model with meta parameters, ready for ``load_state_dict(..., assign=True)``."""
    with empty_parameters():
        model = DynamiCrafter(cfg)
    return model.eval().requires_grad_(False)


def build_random(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DynamiCrafter:
    """The model with random weights from ``seed`` (smoke runs, benchmarks); identical on every machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DynamiCrafter(cfg)
    model.device, model.dtype = torch.device(device), dtype
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_state(
    model: DynamiCrafter,
    sd: Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
    expected_model: str | None = None,
) -> DynamiCrafter:
    """Strictly load an original-layout (or converted) state dict into a skeleton, casting tensor by tensor."""
    converted = convert_checkpoint(sd, model.cfg)
    problems = check_state_dict(converted, model.state_dict())
    if problems:
        want = f"the {expected_model} model" if expected_model else "the chosen configuration"
        raise CheckpointError(f"{source} does not fit {want}: {'; '.join(problems)}. {hint(sd)}")
    cast = {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in converted.items()
    }
    model.load_state_dict(cast, strict=True, assign=True)
    model.device, model.dtype = torch.device(device), dtype
    return model.to(device=device).eval().requires_grad_(False)


def load_model(
    cfg: ModelConfig,
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    expected_model: str | None = None,
) -> DynamiCrafter:
    """Build the model for ``cfg`` and strictly load the checkpoint at ``path`` into it."""
    sd = read_checkpoint(path)
    return load_state(build_skeleton(cfg), sd, device, dtype, source=str(path), expected_model=expected_model)


def convert_to_safetensors(checkpoint: str | Path, out: str | Path, model: str, dtype: str = "fp16") -> tuple[int, int]:
    """Write a ``.safetensors`` copy of ``checkpoint`` with only the weights inference uses, in this tool's layout
    and ``dtype`` (``fp32``/``fp16``/``bf16``, or ``fp8``: float8 e4m3 for the layers ``--weights fp8`` stores in 8
    bits, fp16 for the rest), checked against ``model``'s architecture; atomically.  Returns (tensors read, tensors
    written)."""
    from safetensors.torch import save_file

    from .devices import torch_dtype
    from .files import atomic_path
    from .offload import fp8_layers
    from .presets import get_preset

    target = torch.float16 if dtype == "fp8" else torch_dtype(dtype)
    sd = read_checkpoint(checkpoint)
    skeleton = build_skeleton(get_preset(model).model_config())
    converted = convert_checkpoint(sd, skeleton.cfg)
    problems = check_state_dict(converted, skeleton.state_dict())
    if problems:
        raise CheckpointError(f"{checkpoint} does not fit the {model} model: {'; '.join(problems)}. {hint(sd)}")
    eight_bit: set[str] = set()
    if dtype == "fp8":
        names = {id(p): n for n, p in skeleton.named_parameters()}
        for part in ("unet", "text_encoder", "image_encoder"):
            eight_bit |= {names[id(p)] for layer in fp8_layers(getattr(skeleton, part)) for p in layer.parameters()}
    tensors = {
        k: (v.to(torch.float8_e4m3fn if k in eight_bit else target) if v.is_floating_point() else v).contiguous()
        for k, v in converted.items()
    }
    with atomic_path(Path(out)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "dynamicrafter_model": model, "dtype": dtype})
    return len(sd), len(tensors)
