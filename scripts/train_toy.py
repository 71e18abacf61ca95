"""Train the ``toy`` model: the tiny DynamiCrafter architecture on videos of a disc or square moving as told.

    python scripts/train_toy.py train --minutes 40        # VAE first, then UNet + Resampler + text tower
    python scripts/train_toy.py export                    # EMA weights -> src/dynamicrafter/data/toy.safetensors
    python scripts/train_toy.py decoder --seconds 720     # then the VAE decoder alone, objects' colours weighted up
    python scripts/train_toy.py evaluate --videos 40      # held-out scenes through the public API, tracked

A development tool, not a test: it never runs in CI.  Everything is deterministic from ``--seed`` (model
initialisation, every batch, every noise draw), and resumable: the state is saved to ``--work`` every few minutes
and at the end, and ``train`` continues from it (a larger ``--minutes`` trains on).  CPU by default (all cores),
CUDA when present.  docs/TOY.md tells what was trained, how long, and what it does.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dynamicrafter import toy
from dynamicrafter.models.dynamicrafter import DynamiCrafter
from dynamicrafter.presets import get_preset
from dynamicrafter.sampling import make_schedule
from dynamicrafter.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "dynamicrafter" / "data" / "toy.safetensors"
TRAINED = ("unet", "image_proj", "text_encoder")  # the vision tower keeps its random weights; the VAE trains first


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def generator(seed: int, *parts: int) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one batch: a pure function of the seed and the step."""
    ss = np.random.SeedSequence([seed, *parts])
    g = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))
    return np.random.default_rng(ss), g


def scenes_video(rng: np.random.Generator, n: int) -> tuple[list[toy.Scene], torch.Tensor]:
    scenes = [toy.random_scene(rng) for _ in range(n)]
    return scenes, torch.stack([toy.render(s) for s in scenes])  # (N, 3, T, S, S)


def one_frame_each(rng: np.random.Generator, n: int) -> tuple[list[toy.Scene], torch.Tensor]:
    """``n`` random scenes and one random frame of each (n, 3, S, S): what the VAE phases train on."""
    scenes, video = scenes_video(rng, n)
    pick = rng.integers(0, toy.FRAMES, n)
    return scenes, torch.stack([video[i, :, pick[i]] for i in range(n)])


def cosine_lr(opt: torch.optim.Optimizer, lr: float, started: float, seconds: float) -> None:
    """Decay the learning rate from ``lr`` to a tenth of it over a budget of ``seconds`` begun at ``started``."""
    for group in opt.param_groups:
        group["lr"] = lr * (0.55 + 0.45 * math.cos(math.pi * min(1.0, (time.perf_counter() - started) / seconds)))


def to_file(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A state dict as safetensors stores it: floating tensors in ``dtype``, contiguous."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


# --------------------------------------------------------------------------------------------------------------
# The VAE


def train_vae(net: DynamiCrafter, seed: int, seconds: float, device: torch.device) -> list[float]:
    """Reconstruction (L1 + MSE) from the posterior mean plus a little noise (so that the decoder forgives the
    diffusion model's small errors), on random frames of random scenes, for ``seconds``."""
    vae = net.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4, weight_decay=0.0)  # 1e-3 and 3e-4 stall near the mean colour
    started, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - started < seconds:
        rng, g = generator(seed, 1, step)
        frames = one_frame_each(rng, 8)[1].to(device)
        mean = vae.encode(frames).latent_dist.mean  # a plain autoencoder: sampling the posterior slowed it down
        recon = vae.decode(mean + 0.05 * mean.detach().std() * torch.randn(mean.shape, generator=g)).sample
        loss = F.l1_loss(recon, frames) + F.mse_loss(recon, frames)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 0.5)  # unclipped, a loss spike undid 1,300 steps
        cosine_lr(opt, 1e-4, started, seconds)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log(f"vae step {step}: loss {np.mean(losses[-50:]):.4f}")
        step += 1
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def normalise_latents(net: DynamiCrafter, seed: int, device: torch.device) -> float:
    """Fold a scale into the VAE's quant convolutions so that its scaled latents have unit standard deviation, as
    the diffusion schedule assumes (the decoder sees the same latents as before)."""
    _, video = scenes_video(generator(seed, 2, 0)[0], 32)
    frames = video.transpose(1, 2).flatten(0, 1).to(device)
    vae, factor = net.vae, net.cfg.diffusion.scale_factor
    std = float((vae.encode(frames).latent_dist.mean * factor).std())
    c = vae.quant_conv.out_channels // 2  # mean channels, then log-variance channels
    vae.quant_conv.weight[:c] /= std
    vae.quant_conv.bias[:c] /= std
    vae.quant_conv.bias[c:] -= 2 * math.log(std)
    vae.post_quant_conv.weight *= std
    return std


@torch.no_grad()
def vae_error(net: DynamiCrafter, seed: int, device: torch.device) -> float:
    _, video = scenes_video(generator(seed, 3, 0)[0], 8)
    frames = video.transpose(1, 2).flatten(0, 1).to(device)
    recon = net.vae.decode(net.vae.encode(frames).latent_dist.mean).sample
    return float((recon - frames).abs().mean())


def tune_decoder(args: argparse.Namespace) -> None:
    """Train the VAE decoder alone, on the frozen encoder's latents, with the objects' pixels weighted up.

    The first VAE phase learns the backgrounds (most of every frame) well and small objects' colours badly; the
    encoder stays as it is, so the latents the UNet was trained on do not change, only how they are drawn."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src = Path(args.checkpoint or OUT)
    torch.manual_seed(args.seed)
    net = DynamiCrafter(get_preset("toy").model_config()).requires_grad_(False)
    net.load_state_dict({k: v.float() for k, v in load_file(src).items()})
    vae = net.vae.to(device)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    started, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - started < args.seconds:
        rng, g = generator(args.seed, 6, step)
        scenes, frames = one_frame_each(rng, 8)
        frames = frames.to(device)
        background = torch.tensor([s.background for s in scenes], device=device).view(8, 3, 1, 1) * 2 - 1
        weight = 1 + args.object_weight * ((frames - background).abs().amax(1, keepdim=True) > 0.02)
        with torch.no_grad():
            mean = vae.encode(frames).latent_dist.mean
        noisy = mean + args.noise * mean.std() * torch.randn(mean.shape, generator=g).to(device)
        recon = vae.decode(noisy).sample
        loss = ((recon - frames).abs() + (recon - frames) ** 2).mul(weight).sum() / weight.expand_as(frames).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        cosine_lr(opt, args.lr, started, args.seconds)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            log(f"decoder step {step}: weighted loss {np.mean(losses[-50:]):.4f}")
    with safe_open(src, "pt") as f:
        metadata = {**f.metadata(), "decoder_steps": str(step), "decoder_seconds": str(round(args.seconds))}
    out = Path(args.out)
    save_file(to_file(net.state_dict(), torch.float16), out, metadata=metadata)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {step} decoder steps")


# --------------------------------------------------------------------------------------------------------------
# The diffusion model


@torch.no_grad()
def make_pool(net: DynamiCrafter, seed: int, videos: int, device: torch.device) -> dict:
    """``videos`` random scenes and their scaled VAE latents (N, 4, T, h, w), encoded once: encoding is most of
    a step's time on the CPU, so the UNet trains on this pool (each video about seven times in 40 minutes)."""
    scenes, latents = [], []
    factor = net.cfg.diffusion.scale_factor
    for i in range(0, videos, 8):
        batch, video = scenes_video(generator(seed, 5, i)[0], min(8, videos - i))
        z = net.vae.encode(video.transpose(1, 2).flatten(0, 1).to(device)).latent_dist.mean * factor
        latents.append(z.unflatten(0, video.shape[:1] + video.shape[2:3]).transpose(1, 2).cpu())
        scenes += batch
        if i % 400 == 0:
            log(f"pool: {i}/{videos} videos encoded")
    return {"scenes": scenes, "latents": torch.cat(latents)}


schedule_of = functools.cache(make_schedule)  # once per run, not once per step (the config is frozen, hashable)


def diffusion_loss(net: DynamiCrafter, pool: dict, seed: int, step: int, batch: int, device: torch.device,
                   drop_text: float, drop_image: float, drop_both: float = 0.0, high_noise: float = 0.0,
                   high_from: float = 0.5) -> torch.Tensor:
    """The v-prediction loss of one batch from ``pool``, conditioned as sampling conditions: text tokens and
    Resampler tokens of the start image as context, the start latent concatenated to every frame; prompts dropped
    to "" and start images to black (the unconditional branch of guidance) with the given probabilities, and both
    at once (what guidance's unconditional branch sees) with ``drop_both``."""
    rng, g = generator(seed, 4, step)
    pick = rng.integers(0, len(pool["scenes"]), batch)
    both = rng.random(batch) < drop_both if drop_both > 0 else np.zeros(batch, dtype=bool)  # (same stream at 0)
    scenes = [pool["scenes"][i] for i in pick]
    z = pool["latents"][torch.from_numpy(pick)].to(device)  # (B, 4, T, h, w)
    b, _, t = z.shape[:3]
    with torch.no_grad():
        start = torch.stack([toy.render(s, frames=1)[:, 0] for s in scenes]).to(device)
        keep_image = torch.from_numpy((rng.random(b) >= drop_image) & ~both).to(device).view(b, 1, 1, 1)
        clip_tokens = net.image_encoder(start * keep_image)
    prompts = [
        "" if rng.random() < drop_text or drop else toy.prompt(s.direction, s.shape, int(rng.integers(len(toy.TEMPLATES))))
        for s, drop in zip(scenes, both)
    ]
    ids = get_tokenizer()(prompts, context_length=net.cfg.text.context_length).to(device)
    context = torch.cat([net.text_encoder(ids), net.image_proj(clip_tokens)], dim=1)
    fs = torch.full((b,), net.cfg.unet.default_fs, dtype=torch.long, device=device)
    prepared = net.unet.prepare(context, fs, t)
    schedule = schedule_of(net.cfg.diffusion)
    n = schedule.num_timesteps
    ts = torch.randint(0, n, (b,), generator=g)
    if high_noise > 0:  # the direction is decided in the first, noisiest steps: train there more often
        high = torch.rand(b, generator=g) < high_noise
        ts = torch.where(high, torch.randint(int(n * high_from), n, (b,), generator=g), ts)
    noise = torch.randn(z.shape, generator=g).to(device)
    a = schedule.sqrt_alphas_cumprod[ts].view(b, 1, 1, 1, 1).to(device)
    s = schedule.sqrt_one_minus_alphas_cumprod[ts].view(b, 1, 1, 1, 1).to(device)
    x_t = a * z + s * noise
    target = a * noise - s * z  # v
    concat = z[:, :, :1].expand(-1, -1, t, -1, -1)
    out = net.unet(torch.cat([x_t, concat], dim=1), ts.to(device), prepared)
    return F.mse_loss(out, target)


def trained_parameters(net: DynamiCrafter) -> dict[str, torch.nn.Parameter]:
    return {f"{part}.{n}": p for part in TRAINED for n, p in getattr(net, part).named_parameters()}


def save_state(path: Path, net: DynamiCrafter, ema: dict, opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step, **extra}, tmp)
    tmp.replace(path)


def train(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = get_preset("toy").model_config()
    torch.manual_seed(args.seed)
    net = DynamiCrafter(cfg).to(device).requires_grad_(False)
    log(f"device {device}, {sum(p.numel() for p in trained_parameters(net).values()) / 1e6:.2f} M trained parameters")
    state_path, info = work / "state.pt", {}
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        net.load_state_dict(state["model"])
        info = state.get("info", {})
        log(f"resumed at step {state['step']}")
    else:
        losses = train_vae(net, args.seed, args.vae_seconds, device)
        info["vae_steps"], info["vae_loss"] = len(losses), float(np.mean(losses[-50:]))
        info["latent_std_folded"] = normalise_latents(net, args.seed, device)
        info["vae_error"] = vae_error(net, args.seed, device)
        log(f"vae: {len(losses)} steps, mean abs error {info['vae_error']:.4f} (pixels in [-1, 1])")
        state = None
    pool_path = work / "pool.pt"
    if pool_path.exists():
        pool = torch.load(pool_path, weights_only=False)
    else:
        pool = make_pool(net, args.seed, args.pool, device)
        torch.save(pool, pool_path)
    params = trained_parameters(net)
    for p in params.values():
        p.requires_grad_(True)
    # the text path (text tower, and the text keys and values of every cross-attention) may learn faster: it is
    # the only way the direction gets in, and at one learning rate the model learned to move but not to listen
    text_kv = {id(p) for a in net.unet.context_attentions() for p in (*a.to_k.parameters(), *a.to_v.parameters())}
    fast = {k for k, p in params.items() if k.startswith("text_encoder.") or id(p) in text_kv}
    groups = [{"params": [params[k] for k in params if k not in fast], "scale": 1.0},
              {"params": [params[k] for k in fast], "scale": args.text_lr_scale}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    ema = {k: p.detach().clone() for k, p in params.items()}
    step = 0
    if state is not None:
        if len(state["opt"]["param_groups"]) == len(opt.param_groups):
            opt.load_state_dict(state["opt"])
            for i, group in enumerate(opt.param_groups):  # a group saved in another order: its moments start afresh
                if any(p in opt.state and opt.state[p]["exp_avg"].shape != p.shape for p in group["params"]):
                    log(f"optimizer group {i} was saved in another parameter order: its moments start afresh")
                    for p in group["params"]:
                        opt.state.pop(p, None)
        else:
            log("optimizer state of another grouping: starting it afresh")
        ema, step = state["ema"], state["step"]
    started, last_save = time.perf_counter(), time.perf_counter()
    budget = args.minutes * 60 - info.get("unet_seconds", 0.0)
    losses: list[float] = []
    net.unet.train(), net.image_proj.train(), net.text_encoder.train()
    while time.perf_counter() - started < budget:
        lr = args.lr * min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"]
        loss = diffusion_loss(net, pool, args.seed, step, args.batch, device, args.drop_text, args.drop_image,
                              args.drop_both, args.high_noise, args.high_from)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in params.items():
                ema[k].lerp_(p.detach(), 1 - decay)
        losses.append(float(loss.detach()))
        step += 1
        if step % 25 == 0:
            elapsed = time.perf_counter() - started
            log(f"step {step}: loss {np.mean(losses[-100:]):.4f}, {len(losses) / elapsed:.2f} steps/s")
        if time.perf_counter() - last_save > 300:
            info["unet_seconds"] = info.get("unet_seconds", 0.0) + time.perf_counter() - last_save
            info["final_loss"] = float(np.mean(losses[-100:]))  # what an export of this state says (export adds the step)
            last_save = time.perf_counter()
            save_state(state_path, net, ema, opt, step, {"info": info})
    info["unet_seconds"] = info.get("unet_seconds", 0.0) + time.perf_counter() - last_save
    info.update(steps=step, batch=args.batch, pool=len(pool["scenes"]), lr=args.lr, seed=args.seed, final_loss=float(np.mean(losses[-100:] or [0])))
    save_state(state_path, net, ema, opt, step, {"info": info})
    (work / "info.json").write_text(json.dumps(info, indent=2))
    log(f"done: {json.dumps(info)}")


def export(args: argparse.Namespace) -> None:
    """The EMA weights (trained parts) and the rest (VAE, vision tower) as one fp16 safetensors file."""
    from safetensors.torch import save_file

    state = torch.load(Path(args.work) / "state.pt", map_location="cpu", weights_only=False)
    sd = dict(state["model"])
    sd.update(state["ema"])
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    tensors = to_file(sd, dtype)
    info = {k: str(v) for k, v in {**state.get("info", {}), "steps": state["step"]}.items()}
    out = Path(args.out)
    save_file(tensors, out, metadata={"format": "pt", "dynamicrafter_model": "toy", "dtype": args.dtype, **info})
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(tensors)} tensors, step {state['step']})")


def evaluate(args: argparse.Namespace) -> None:
    """Held-out scenes (another seed stream than training's) through the public API, each animated with all four
    prompts from the same noise seed, so that only the prompt differs; direction hits, a confusion table, distance."""
    from dynamicrafter import Animator

    anim = Animator.load("toy", checkpoint=args.checkpoint)
    rng = np.random.default_rng(10_000 + args.seed)
    rows = []
    started = time.perf_counter()
    for i in range(args.videos):
        direction = toy.DIRECTIONS[i % 4]
        if i % 4 == 0:
            image = toy.first_frame_uint8(toy.random_scene(rng))
        result = anim.animate(image, toy.prompt(direction), seed=1000 + i // 4,
                              image_scale=args.image_scale, steps=args.steps, cfg_scale=args.cfg_scale)
        tr = toy.track(result.frames)
        rows.append({"want": direction, "got": tr.direction, "distance": round(tr.distance, 2)})
    hits = sum(r["want"] == r["got"] for r in rows)
    dist = [r["distance"] for r in rows if r["want"] == r["got"]]
    confusion = {w: {g: sum(r["want"] == w and r["got"] == g for r in rows) for g in (*toy.DIRECTIONS, "still")}
                 for w in toy.DIRECTIONS}
    summary = {"videos": len(rows), "direction_hits": hits, "hit_rate": hits / len(rows),
               "mean_distance": float(np.mean(dist)) if dist else 0.0, "training_distance": toy.DISTANCE,
               "mean_distance_all": float(np.mean([r["distance"] for r in rows])),
               "seconds_per_video": (time.perf_counter() - started) / len(rows), "confusion": confusion}
    print(json.dumps(summary))
    if args.verbose:
        for r in rows:
            print(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--minutes", type=float, default=40.0, help="UNet training time in all (resumed runs included)")
    t.add_argument("--vae-seconds", type=float, default=480.0)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--pool", type=int, default=2400, help="training videos, VAE-encoded once")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--drop-text", type=float, default=0.1)
    t.add_argument("--drop-image", type=float, default=0.1)
    t.add_argument("--high-noise", type=float, default=0.0, help="share of samples with t >= high-from * 1000")
    t.add_argument("--high-from", type=float, default=0.5)
    t.add_argument("--text-lr-scale", type=float, default=1.0, help="learning-rate factor of the text path")
    t.add_argument("--drop-both", type=float, default=0.0, help="drop prompt and image together (guidance's uncond)")
    e = sub.add_parser("export")
    e.add_argument("--out", default=str(OUT))
    e.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    v = sub.add_parser("evaluate")
    d = sub.add_parser("decoder", help="train the VAE decoder alone (objects' colours), on a checkpoint")
    d.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    d.add_argument("--out", default=str(OUT))
    d.add_argument("--seconds", type=float, default=900.0)
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--noise", type=float, default=0.1, help="latent noise, relative to the latents' std")
    d.add_argument("--object-weight", type=float, default=20.0, help="extra loss weight of the object's pixels")
    v.add_argument("--checkpoint", default=None)
    v.add_argument("--videos", type=int, default=40)
    v.add_argument("--steps", type=int, default=None)
    v.add_argument("--cfg-scale", type=float, default=None)
    v.add_argument("--image-scale", type=float, default=1.0)
    v.add_argument("--verbose", action="store_true")
    for p in (t, e, v, d):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--work", default=str(ROOT / ".toy-train"))
    args = ap.parse_args()
    {"train": train, "export": export, "evaluate": evaluate, "decoder": tune_decoder}[args.command](args)


if __name__ == "__main__":
    main()
