"""Conformance against the original implementation: ``python -m dynamicrafter.verify SCENARIO_DIR [--checkpoint P]``.

A scenario folder holds ``scenario.json`` (the original model config, an open_clip config, the inputs),
``expected.safetensors`` (every intermediate tensor of the original code) and the input images.  The model is built
from the scenario's own config, every stage runs through the same functions the pipeline uses, and each tensor is
compared: relative max-abs error <= 1e-3, token ids and timesteps exact, uint8 frames within +-1 on >= 99% of values.
Exit status 0 only when everything passes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model
from .config import from_reference
from .images import load_image, prepare_image
from .models.encoders import clip_preprocess
from .conditioning import encode_image_context, encode_latents, encode_text, make_conditioning
from .models.context import ImageScale
from .pipeline import decode_latents, guided_denoiser, sample
from .settings import SamplingSettings
from .sampling import ddim_timesteps
from .tokenizer import get_tokenizer
from .toon import decode_parts
from .models.toon_vae import splice
from .video import video_to_uint8

REL_TOL = 1e-3
FRAME_SHARE = 0.99
LAMBDA_PREFIX = "probe_unet_out_lambda_"


@dataclass(frozen=True)
class Check:
    key: str
    metric: str  # "rel max err", "exact", "|diff|<=1 share"
    value: float
    ok: bool


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double().cpu(), expected.double()
    if got.shape != expected.shape:
        return float("inf")
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def compare(key: str, got: torch.Tensor, expected: dict[str, torch.Tensor]) -> Check:
    exp = expected[key]
    if exp.dtype == torch.uint8:
        if got.shape != exp.shape:
            return Check(key, "|diff|<=1 share", 0.0, False)
        share = ((got.to(torch.int16) - exp.to(torch.int16)).abs() <= 1).double().mean().item()
        return Check(key, "|diff|<=1 share", share, share >= FRAME_SHARE)
    if not exp.is_floating_point():
        same = got.shape == exp.shape and torch.equal(got.cpu().to(exp.dtype), exp)
        return Check(key, "exact", 0.0 if same else 1.0, same)
    err = rel_error(got, exp)
    return Check(key, "rel max err", err, err <= REL_TOL)


def load_scenario(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    scenario = json.loads((folder / "scenario.json").read_text())
    return scenario, load_file(folder / "expected.safetensors")


@torch.no_grad()
def run_scenario(folder: str | Path, checkpoint: str | Path | None = None) -> Iterator[Check]:
    """Run every stage of ``folder``'s scenario and yield one :class:`Check` per expected tensor present."""
    torch.manual_seed(0)  # nothing here is random; fixed anyway so a stray draw cannot change results
    folder = Path(folder)
    scenario, expected = load_scenario(folder)
    inputs = scenario["inputs"]
    cfg = from_reference(scenario["reference_model_config"], scenario.get("tiny_clip_config"))
    model = load_model(cfg, checkpoint or folder / scenario["checkpoint"])
    has = expected.__contains__
    height, width, frames, mode = inputs["height"], inputs["width"], inputs["frames"], inputs.get("mode", "i2v")
    prompt, uncond_prompt = inputs["prompt"], inputs.get("uncond_prompt", "")

    if has("token_ids"):
        yield compare("token_ids", get_tokenizer()([prompt, uncond_prompt]), expected)
    if has("text_emb"):
        yield compare("text_emb", encode_text(model, [prompt]), expected)
    if has("uncond_text_emb"):
        yield compare("uncond_text_emb", encode_text(model, [uncond_prompt]), expected)

    start = prepare_image(load_image(folder / inputs["start_image"]), height, width)
    end = prepare_image(load_image(folder / inputs["end_image"]), height, width) if inputs.get("end_image") else None
    if has("clip_pixels"):
        yield compare("clip_pixels", clip_preprocess(start, cfg.vision), expected)
    if has("image_tokens"):
        yield compare("image_tokens", model.image_encoder(start), expected)
    if has("image_ctx"):
        yield compare("image_ctx", encode_image_context(model, start), expected)
    if has("uncond_image_ctx"):
        yield compare("uncond_image_ctx", encode_image_context(model, torch.zeros_like(start)), expected)
    if has("latent_z"):
        z_start = encode_latents(model, start)  # (1, 4, h, w): every frame of the input video is one of two images
        z_end = encode_latents(model, end) if mode == "interp" else z_start
        half = frames // 2 if mode == "interp" else frames
        video_z = torch.stack([z_start] * half + [z_end] * (frames - half), dim=2)  # (1, 4, T, h, w)
        yield compare("latent_z", video_z, expected)

    settings = SamplingSettings(
        steps=inputs["ddim_steps"],
        cfg_scale=inputs["cfg_scale"],
        cfg_img=inputs.get("cfg_img"),
        eta=inputs["ddim_eta"],
        fs=inputs.get("fs"),
        guidance_rescale=inputs.get("guidance_rescale", 0.0),
        timestep_spacing=inputs.get("timestep_spacing", "uniform"),
        frames=frames,
        start_timestep=inputs.get("start_timestep"),  # CIL's M; sample_x_T is then the recorded x_M
    )
    cond = make_conditioning(model, start, [prompt], settings, end=end, mode=mode, negative_prompts=[uncond_prompt])
    if has("concat_latent"):
        yield compare("concat_latent", cond.concat, expected)
    for i, ref in enumerate(cond.refs or ()):  # ToonCrafter: the encoder maps its decoder reads
        if has(f"ref_hidden_{i}"):
            yield compare(f"ref_hidden_{i}", ref, expected)

    if has("probe_x_t"):
        probe = SamplingSettings(cfg_scale=1.0, fs=settings.fs, frames=frames)  # one raw, unguided UNet call
        t = int(inputs["probe_t"])
        x_t = expected["probe_x_t"]

        def run(context: torch.Tensor, image_scale: float | None = None) -> torch.Tensor:
            scale = None if image_scale is None else ImageScale.of(image_scale)
            return guided_denoiser(model, replace(cond, context=context, image_scale=scale), probe)(x_t, t)

        if has("probe_unet_out"):
            yield compare("probe_unet_out", run(cond.context), expected)
        if has("probe_unet_out_uncond"):
            yield compare("probe_unet_out_uncond", run(cond.uncond_context), expected)
        for key in sorted(k for k in expected if k.startswith(LAMBDA_PREFIX)):
            yield compare(key, run(cond.context, float(key[len(LAMBDA_PREFIX) :])), expected)

    if has("sample_ddim_timesteps"):
        grid = ddim_timesteps(settings.steps, settings.timestep_spacing, cfg.diffusion.timesteps, settings.start_timestep)
        yield compare("sample_ddim_timesteps", grid, expected)
    if has("sample_x_T") and has("sample_noises"):
        noises = expected["sample_noises"]
        latent = sample(model, cond, settings, expected["sample_x_T"], lambda i, shape: noises[i])
        if has("sample_final_latent"):
            yield compare("sample_final_latent", latent, expected)
        if cond.refs is None:
            video = decode_latents(model, latent)  # (1, 3, T, H, W), unclamped
        else:  # ToonCrafter: two decodes, spliced
            video, middle = decode_parts(model, latent, cond.refs)
            if has("decoded_video_middle"):
                yield compare("decoded_video_middle", middle, expected)
            video = splice(video, middle)
        if has("decoded_video"):
            yield compare("decoded_video", video, expected)
        if has("frames_uint8"):
            frames_u8 = torch.from_numpy(video_to_uint8(video[0]))
            yield compare("frames_uint8", frames_u8[:-1] if mode == "loop" else frames_u8, expected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamicrafter.verify", description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path, help="folder with scenario.json, expected.safetensors and images")
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to use instead of the scenario's")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not args.scenario.is_dir():
        console.print(f"[red]error:[/] scenario folder not found: {args.scenario}")
        return 2
    if not (args.scenario / "scenario.json").is_file():
        console.print(f"[red]error:[/] no scenario.json in {args.scenario}")
        return 2
    table = Table(title=f"conformance: {args.scenario}")
    for column in ("tensor", "metric", "value", "result"):
        table.add_column(column)
    checks: list[Check] = []
    try:
        for check in run_scenario(args.scenario, args.checkpoint):
            checks.append(check)
            shown = f"{check.value:.3e}" if check.metric == "rel max err" else f"{check.value:.4g}"
            table.add_row(check.key, check.metric, shown, "[green]pass[/]" if check.ok else "[red]FAIL[/]")
    except (CheckpointError, ValueError, KeyError, OSError) as exc:
        console.print(table)
        console.print(f"[red]error:[/] {exc}")
        return 1
    console.print(table)
    failed = [c.key for c in checks if not c.ok]
    if not checks:
        console.print("[red]error:[/] the scenario has no tensors this tool knows")
        return 1
    console.print(f"{len(checks) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
