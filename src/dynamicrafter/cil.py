"""CIL ("conditional image leakage", Zhao et al., NeurIPS 2024): the analytic initial noise of a sampler that starts
at training timestep M instead of at the end of the schedule.

At large timesteps an image-to-video model leans on the conditioning image and ignores the noisy video, which damps
motion.  Starting lower (M < 1000: the DDIM grid spans timesteps 0..M-1; see
:func:`~dynamicrafter.sampling.ddim_timesteps`) skips those steps, but x_M is then not pure noise: given the data
it is N(√ā·x0, (1-ā)·I) with ā = ā[M-1].  Analytic-Init replaces the unknown x0 by the statistics of the training
latents that the authors ship: the mean E[x0] (one value per latent element) and tr(Cov[x0])/d (the mean
per-element variance, one number), and draws

    x_M = √ā·E[x0] + √(1 - ā + ā·tr(Cov)/d)·ε,     ε ~ N(0, I),

the Gaussian closest to the true marginal of x_M.  As the authors compute it, √ā is the schedule's float32
``sqrt_alphas_cumprod[M-1]`` and ā its square.  With a zero-terminal-SNR schedule (512, 1024) and M = 1000, ā = 0 and
x_M = ε exactly: the standard start.  Letters: B batch, C latent channels, T frames, h x w latent size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SettingsError
from .sampling import Schedule

MEAN_KEY, VARIANCE_KEY = "Expectation_X0", "Tr_Cov_d"  # the names in the authors' files


@dataclass(frozen=True)
class AnalyticInit:
    """The data statistics of Analytic-Init: ``mean`` E[x0] (C, T, h, w) and ``variance`` tr(Cov[x0])/d (a 0-d or
    broadcastable tensor)."""

    mean: torch.Tensor
    variance: torch.Tensor


def load_analytic_init(path: str | Path) -> AnalyticInit:
    """The authors' file (a torch pickle of ``{"Expectation_X0": tensor, "Tr_Cov_d": tensor or number}``), read
    with ``weights_only`` (no code runs); a leading batch dimension of 1 is dropped."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, or a pickle of anything but tensors
        raise SettingsError("analytic_init", f"cannot read the {{setting}} statistics {path}: {exc}") from None
    if not isinstance(data, dict) or MEAN_KEY not in data or VARIANCE_KEY not in data:
        raise SettingsError("analytic_init", f"{path} holds no {MEAN_KEY}/{VARIANCE_KEY} statistics for {{setting}}")
    mean = torch.as_tensor(data[MEAN_KEY]).float()
    mean = mean[0] if mean.ndim == 5 and mean.shape[0] == 1 else mean
    return AnalyticInit(mean=mean, variance=torch.as_tensor(data[VARIANCE_KEY]).float())


def start_noise(noise: torch.Tensor, schedule: Schedule, start: int, init: AnalyticInit | None) -> torch.Tensor:
    """Standard normal ``noise`` (B, C, T, h, w) -> x_M = √ā·E[x0] + √(1 - ā + ā·tr(Cov)/d)·noise at
    M = ``start``, in ``noise``'s dtype and device.  Where ā = 0 (M = 1000 on a zero-terminal-SNR schedule) that
    is ``noise`` itself, for any frame count, and ``init`` may be None (callers without the statistics: sweeps,
    the benchmark)."""
    sqrt_a = schedule.sqrt_alphas_cumprod[start - 1].float()  # float32, as the original's buffer
    if sqrt_a == 0:  # the formula gives 0·E[x0] + 1·noise: exactly the noise, whatever the statistics
        return noise
    if init is None:
        raise SettingsError("analytic_init", f"{{setting}} at start timestep {start} needs the data statistics")
    if init.mean.shape != noise.shape[1:]:
        c, t, h, w = init.mean.shape if init.mean.ndim == 4 else (None,) * 4
        raise SettingsError(
            "analytic_init",
            f"the {{setting}} statistics are for {t} frames of {c}x{h}x{w} latents, this video has "
            f"{noise.shape[2]} frames of {noise.shape[1]}x{noise.shape[3]}x{noise.shape[4]}; use the model's own "
            "resolution and frame count, or turn {setting} off",
        )
    a = sqrt_a * sqrt_a
    sigma = torch.sqrt(1 - a + a * init.variance)
    mean, sigma = (sqrt_a * init.mean).to(noise), sigma.to(noise)
    return mean + sigma * noise
