"""DDIM sampling math of DynamiCrafter: noise schedule, DDIM timesteps and per-step constants, guidance, the loop.

Plain functions over tensors; no model or conditioning knowledge.  Dtype paths follow the original code exactly
(schedule in float64 stored as float32, the mixed float32/float64 sigma computation, float32 per-step scalars), so a
float32 run reproduces the reference sampler bit for bit up to the model's own rounding.

Shape letters: N = DDPM training timesteps (1000), S = DDIM steps actually run, B = batch, C = latent channels,
T = frames, h×w = latent size.  Latents are (B, C, T, h, w) but nothing here depends on the layout beyond dim 0 = B.
Step indices: ``k`` is the position in the ascending timestep list (S−1 … 0 while sampling); ``i`` = S−1−k counts
steps from the first (noisiest) one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import NamesSetting

from .config import DiffusionConfig

ModelFn = Callable[[Tensor, int], Tensor]
NoiseFn = Callable[[int, tuple[int, ...]], Tensor]
SPACINGS = ("uniform", "uniform_trailing")


class NonFiniteError(NamesSetting, RuntimeError):
    """A sampling result holds NaN or inf (a reduced-precision overflow); names the ``dtype`` setting."""


# --------------------------------------------------------------------------------------------------------------
# Schedule


@dataclass(frozen=True)
class Schedule:
    """DDPM schedule buffers, float32 (N,), as stored in the checkpoints; ``scale_arr`` (N + turning_step,) or None."""

    betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    scale_arr: Tensor | None = None

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def _betas(cfg: DiffusionConfig) -> Tensor:
    """float64 betas (N,) of ``cfg.beta_schedule``."""
    n, start, end = cfg.timesteps, cfg.linear_start, cfg.linear_end
    if cfg.beta_schedule == "linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if cfg.beta_schedule == "sqrt_linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    if cfg.beta_schedule == "sqrt":
        return torch.linspace(start, end, n, dtype=torch.float64) ** 0.5
    if cfg.beta_schedule == "cosine":
        s = 8e-3
        f = torch.arange(n + 1, dtype=torch.float64) / n + s
        f = torch.cos(f / (1 + s) * math.pi / 2).pow(2)
        f = f / f[0]
        return (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}; expected linear, sqrt_linear, sqrt or cosine")


def _zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift/scale √ā so that ā[N−1] = 0 while ā[0] is kept (float64)."""
    s = torch.cumprod(1.0 - betas, 0).sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * (s0 / (s0 - s_last))
    abar = s**2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def make_schedule(cfg: DiffusionConfig) -> Schedule:
    """The schedule buffers of the original model (float64 math, float32 storage)."""
    betas = _betas(cfg)
    if cfg.rescale_betas_zero_snr:
        betas = _zero_terminal_snr(betas)
    abar = torch.cumprod(1.0 - betas, 0)
    scale_arr = None
    if cfg.use_dynamic_rescale:
        ramp = np.linspace(1.0, cfg.base_scale, cfg.turning_step)  # numpy's linspace, as the original
        scale_arr = torch.from_numpy(np.concatenate([ramp, np.full(cfg.timesteps, cfg.base_scale)])).float()
    return Schedule(
        betas=betas.float(),
        alphas_cumprod=abar.float(),
        sqrt_alphas_cumprod=abar.sqrt().float(),
        sqrt_one_minus_alphas_cumprod=(1.0 - abar).sqrt().float(),
        scale_arr=scale_arr,
    )


# --------------------------------------------------------------------------------------------------------------
# DDIM timesteps and per-step constants


def _raw_timesteps(num_steps: int, spacing: str, num_train: int) -> np.ndarray:
    if spacing == "uniform":
        return np.arange(0, num_train, num_train // num_steps) + 1
    if spacing == "uniform_trailing":
        return np.flip(np.round(np.arange(num_train, 0, -num_train / num_steps))).astype(np.int64) - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")


def _valid(ts: np.ndarray, num_train: int) -> bool:
    return bool(ts.min() >= 0 and ts.max() < num_train)


def ddim_timesteps(num_steps: int, spacing: str, num_train: int = 1000, start: int | None = None) -> Tensor:
    """Ascending DDPM timesteps (S,) int64 that DDIM visits; S may exceed ``num_steps`` for ``uniform``.

    The grid spans M = ``start`` training timesteps (None: all N = ``num_train``; CIL's start timestep M < N makes
    sampling begin lower).  ``uniform``: ``arange(0, M, M // num_steps) + 1`` (7 steps → 8 timesteps 1 … 995).
    ``uniform_trailing``: ``round(arange(M, 0, −M/num_steps))`` flipped, minus 1 (ends at M − 1).  Step counts for
    which the original produces timestep N or −1 (it crashes or misbehaves) raise ValueError naming the nearest
    working counts.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    grid = num_train if start is None else start
    if not 1 <= grid <= num_train:
        raise ValueError(f"the start timestep must be in 1..{num_train}, got {grid}")
    if not 1 <= num_steps <= grid:
        raise ValueError(f"num_steps must be in 1..{grid}, got {num_steps}")
    ts = _raw_timesteps(num_steps, spacing, grid)
    if not _valid(ts, num_train):
        ok = [s for s in range(1, grid + 1) if _valid(_raw_timesteps(s, spacing, grid), num_train)]
        below = max((s for s in ok if s < num_steps), default=None)
        above = min((s for s in ok if s > num_steps), default=None)
        nearby = " or ".join(str(s) for s in (below, above) if s is not None)
        bad = int(ts.max()) if ts.max() >= num_train else int(ts.min())
        raise ValueError(
            f"{num_steps} steps with {spacing!r} spacing would visit timestep {bad} (outside 0..{num_train - 1}),"
            f" which the original sampler cannot run; use {nearby} steps instead"
        )
    return torch.from_numpy(ts.astype(np.int64))


@dataclass(frozen=True)
class DDIMCoefficients:
    """Per-step DDIM constants, float32 (S,), indexed by the ascending position ``k``.

    ``direction`` = √(1 − a_prev − σ²) and ``scale_ratio`` = scale(t_prev)/scale(t) (None without dynamic rescale).
    """

    a_t: Tensor
    a_prev: Tensor
    sigma: Tensor
    sqrt_a_t: Tensor
    sqrt_a_prev: Tensor
    sqrt_one_minus_at: Tensor
    direction: Tensor
    scale_ratio: Tensor | None = None

    def __len__(self) -> int:
        return self.a_t.shape[0]


def _sqrt32(x: Tensor) -> Tensor:
    """Correctly rounded float32 square root of a float32 tensor."""
    return x.double().sqrt().float()


def ddim_coefficients(schedule: Schedule, timesteps: Tensor, eta: float) -> DDIMCoefficients:
    """Per-step constants for ascending ``timesteps`` with the original's dtype path.

    a_t = ā32[t_k]; a_prev = ā32[t_{k−1}] (ā32[0] for k = 0, not 1); σ = η·√((1 − a_prev)·r·(1 − a_t/a_prev)) with
    r = 1/(1 − a_t) in float32 and the rest in float64, rounded to float32; the direction coefficient
    √(1 − a_prev − σ²) is float32.  Square roots are correctly rounded (via float64; torch's CPU float32 sqrt can
    be one ulp off).

    Deliberate fix: with a zero-terminal-SNR schedule and trailing spacing, the first step has a_t = 0 and
    σ² ≈ 1 − a_prev, so for some step counts (e.g. 7, 11, 14 with η = 1) the float32 radicand of the direction
    coefficient is −5.96e-8 and the original returns an all-NaN video.  Negative radicands are clamped to 0 here;
    every other value is left untouched.
    """
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
    if not (eta >= 0):
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = timesteps.long().cpu()
    abar = schedule.alphas_cumprod.float().cpu()
    a_t = abar[ts]  # float32
    a_prev = torch.cat([abar[:1], abar[ts[:-1]]]).double()  # float32 values held in float64
    r = (1 - a_t).reciprocal()  # float32
    sigma64 = eta * torch.sqrt((1 - a_prev) * r.double() * (1 - a_t.double() / a_prev))
    a_prev, sigma = a_prev.float(), sigma64.float()
    radicand = 1 - a_prev - sigma**2  # float32
    direction = _sqrt32(torch.where(radicand < 0, torch.zeros_like(radicand), radicand))
    scale_ratio = None
    if schedule.scale_arr is not None:
        scale_t = schedule.scale_arr[ts]
        scale_ratio = torch.cat([scale_t[:1], scale_t[:-1]]) / scale_t
    return DDIMCoefficients(
        a_t=a_t,
        a_prev=a_prev,
        sigma=sigma,
        sqrt_a_t=_sqrt32(a_t),
        sqrt_a_prev=_sqrt32(a_prev),
        sqrt_one_minus_at=_sqrt32(1 - a_t),
        direction=direction,
        scale_ratio=scale_ratio,
    )


# --------------------------------------------------------------------------------------------------------------
# Guidance


def cfg_combine(e_cond: Tensor, e_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: e_u + s·(e_c − e_u)."""
    return e_uncond + scale * (e_cond - e_uncond)


def multi_cond_combine(e_cond: Tensor, e_uncond: Tensor, e_img_only: Tensor, s_txt: float, s_img: float) -> Tensor:
    """Two-scale guidance: e_u + s_img·(e_ui − e_u) + s_txt·(e_c − e_ui) (e_ui = empty text + real image)."""
    return e_uncond + s_img * (e_img_only - e_uncond) + s_txt * (e_cond - e_img_only)


def rescale_guidance(out: Tensor, e_cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale: blend ``out`` with ``out`` scaled to the per-sample std of ``e_cond`` (no-op for φ ≤ 0)."""
    if phi <= 0:
        return out
    dims = list(range(1, out.ndim))
    rescaled = out * (e_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * out


# --------------------------------------------------------------------------------------------------------------
# One step and the loop


def _scalar(values: Tensor, k: int, like: Tensor) -> Tensor:
    """0-d tensor ``values[k]`` in ``like``'s dtype and device."""
    return values[k].to(device=like.device, dtype=like.dtype)


def predict_eps_x0(
    out: Tensor, x: Tensor, t: int, k: int, schedule: Schedule, coeffs: DDIMCoefficients, parameterization: str
) -> tuple[Tensor, Tensor]:
    """(ε, x0) from the guided model output at DDPM timestep ``t`` = step ``k``'s timestep.

    v: ε = √ā[t]·v + √(1−ā)[t]·x, x0 = √ā[t]·x − √(1−ā)[t]·v with the schedule buffers at t;
    eps: ε = out, x0 = (x − √(1−a_t)·ε) / √a_t with the per-step constants.
    """
    if parameterization == "v":
        sa = _scalar(schedule.sqrt_alphas_cumprod, t, x)
        s1ma = _scalar(schedule.sqrt_one_minus_alphas_cumprod, t, x)
        return sa * out + s1ma * x, sa * x - s1ma * out
    if parameterization == "eps":
        return out, (x - _scalar(coeffs.sqrt_one_minus_at, k, x) * out) / _scalar(coeffs.sqrt_a_t, k, x)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected 'eps' or 'v'")


def ddim_step(
    x: Tensor,
    out: Tensor,
    t: int,
    k: int,
    schedule: Schedule,
    coeffs: DDIMCoefficients,
    parameterization: str,
    noise: Tensor,
) -> Tensor:
    """x at the previous DDIM timestep: √a_prev·x0 + √(1 − a_prev − σ²)·ε + σ·noise (x0 dynamically rescaled)."""
    eps, x0 = predict_eps_x0(out, x, t, k, schedule, coeffs, parameterization)
    if coeffs.scale_ratio is not None:
        x0 = x0 * _scalar(coeffs.scale_ratio, k, x)
    direction = _scalar(coeffs.direction, k, x) * eps
    noise = _scalar(coeffs.sigma, k, x) * noise.to(x)
    return _scalar(coeffs.sqrt_a_prev, k, x) * x0 + direction + noise


def sample_ddim(
    model_fn: ModelFn,
    x_T: Tensor,
    timesteps: Tensor,
    coeffs: DDIMCoefficients,
    *,
    schedule: Schedule,
    parameterization: str,
    noise_fn: NoiseFn,
    callback: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Run DDIM from ``x_T`` over ascending ``timesteps``, largest first; returns x after the last step (not x0).

    ``coeffs`` = ``ddim_coefficients(schedule, timesteps, eta)``.  ``model_fn(x, t)`` returns the already-guided
    raw model output (eps or v) for the batch; ``noise_fn(i, shape)`` returns ε for step i (i = 0 is the noisiest
    step; called every step, even when σ = 0, so random streams stay aligned); ``callback(i, S)`` is called after
    step i.  Computation happens in ``x_T``'s dtype and device.
    """
    if parameterization not in ("eps", "v"):
        raise ValueError(f"unknown parameterization {parameterization!r}; expected 'eps' or 'v'")
    total = timesteps.shape[0]
    if len(coeffs) != total:
        raise ValueError(f"{len(coeffs)} DDIM coefficients for {total} timesteps")
    x = x_T
    for i in range(total):
        k = total - 1 - i
        t = int(timesteps[k])
        out = model_fn(x, t)
        x = ddim_step(x, out, t, k, schedule, coeffs, parameterization, noise_fn(i, tuple(x.shape)))
        if callback is not None:
            callback(i, total)
    return x
