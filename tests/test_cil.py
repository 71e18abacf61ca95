"""CIL: the start-timestep grid and the Analytic-Init start noise against values derived by hand, the statistics
file, the presets, the checks on requests, and the command line with the tiny model and a statistics file."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dynamicrafter.cil import AnalyticInit, load_analytic_init, start_noise
from dynamicrafter.errors import SettingsError
from dynamicrafter.presets import get_preset
from dynamicrafter.request import make_request
from dynamicrafter.sampling import Schedule, ddim_timesteps, make_schedule

EXAMPLE = Path(__file__).parents[1] / "examples" / "astronaut.jpg"


def schedule_with(sqrt_abar: list[float]) -> Schedule:
    """A schedule whose only meaningful buffer is √ā (what Analytic-Init reads)."""
    s = torch.tensor(sqrt_abar, dtype=torch.float32)
    return Schedule(betas=torch.zeros_like(s), alphas_cumprod=s * s, sqrt_alphas_cumprod=s,
                    sqrt_one_minus_alphas_cumprod=(1 - s * s).sqrt())


def test_start_timestep_grid_by_hand():
    # trailing, M = 940, 5 steps: c = 940/5 = 188; 940, 752, 564, 376, 188 flipped, minus 1
    assert ddim_timesteps(5, "uniform_trailing", 1000, 940).tolist() == [187, 375, 563, 751, 939]
    # uniform, M = 940, 5 steps: 0, 188, ..., 752 plus 1
    assert ddim_timesteps(5, "uniform", 1000, 940).tolist() == [1, 189, 377, 565, 753]
    # M = 1000 is the whole schedule; the authors' 50 steps from M = 940 begin at t = 939 in steps of 18.8
    assert torch.equal(ddim_timesteps(50, "uniform_trailing", 1000, 1000), ddim_timesteps(50, "uniform_trailing"))
    grid = ddim_timesteps(50, "uniform_trailing", 1000, 940)
    assert grid[-1] == 939 and grid[-2] == round(940 - 18.8) - 1 == 920 and grid[0] == round(18.8) - 1 == 18
    with pytest.raises(ValueError, match="num_steps must be in 1..4"):
        ddim_timesteps(5, "uniform_trailing", 1000, 4)


def test_start_noise_by_hand():
    """√ā[M-1] = 0.6: x_M = 0.6·E[x0] + √(1 - 0.36 + 0.36·tr/d)·ε; E[x0] = (2, -1, 0), tr/d = 0.5: σ = √0.82."""
    schedule = schedule_with([0.9, 0.8, 0.6, 0.1])
    init = AnalyticInit(mean=torch.tensor([2.0, -1.0, 0.0]).view(3, 1, 1, 1), variance=torch.tensor(0.5))
    eps = torch.tensor([1.0, -1.0, 2.0]).view(1, 3, 1, 1, 1)
    got = start_noise(eps, schedule, 3, init).flatten().tolist()
    sigma = math.sqrt(0.82)
    assert got == pytest.approx([1.2 + sigma, -0.6 - sigma, 2 * sigma], abs=1e-6)
    # no data variance and no mean: the forward process's own √(1-ā)·ε; unit variance: σ = 1
    zero = AnalyticInit(mean=torch.zeros(3, 1, 1, 1), variance=torch.tensor(0.0))
    assert start_noise(eps, schedule, 3, zero).flatten().tolist() == pytest.approx([0.8, -0.8, 1.6], abs=1e-6)
    unit = AnalyticInit(mean=torch.zeros(3, 1, 1, 1), variance=torch.tensor(1.0))
    assert start_noise(eps, schedule, 3, unit).flatten().tolist() == pytest.approx([1.0, -1.0, 2.0], abs=1e-6)


def test_zero_terminal_snr_at_1000_is_plain_noise():
    """512/1024 schedules end at ā = 0, so M = 1000 with Analytic-Init is exactly the standard start (the CIL
    scripts' setting); at M = 940 the statistics matter."""
    schedule = make_schedule(get_preset("cil-512").model_config().diffusion)
    init = AnalyticInit(mean=torch.randn(4, 2, 3, 3), variance=torch.tensor(0.7))
    eps = torch.randn(2, 4, 2, 3, 3)
    assert torch.equal(start_noise(eps, schedule, 1000, init), eps)
    assert start_noise(eps, schedule, 1000, None) is eps  # so sweeps and benchmarks need no statistics there
    with pytest.raises(SettingsError, match="at start timestep 940 needs the data statistics"):
        start_noise(eps, schedule, 940, None)
    sqrt_a = float(schedule.sqrt_alphas_cumprod[939])
    # the paper's rescale of the scaled-linear schedule, restated in numpy: √ā shifted to 0 at the end, scaled to
    # keep √ā[0]
    import numpy as np

    s = np.sqrt(np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2))
    assert sqrt_a == pytest.approx((s[939] - s[-1]) * s[0] / (s[0] - s[-1]), rel=1e-6) and 0.03 < sqrt_a < 0.031
    want = sqrt_a * init.mean + math.sqrt(1 - sqrt_a**2 + sqrt_a**2 * 0.7) * eps
    torch.testing.assert_close(start_noise(eps, schedule, 940, init), want)


def test_statistics_file(tmp_path):
    path = tmp_path / "initial_noise.pt"
    torch.save({"Expectation_X0": torch.ones(1, 4, 16, 8, 8), "Tr_Cov_d": torch.tensor(0.3)}, path)
    init = load_analytic_init(path)
    assert init.mean.shape == (4, 16, 8, 8) and float(init.variance) == pytest.approx(0.3)
    with pytest.raises(SettingsError, match="16 frames of 4x8x8 latents, this video has 8 frames") as info:
        start_noise(torch.zeros(1, 4, 8, 8, 8), make_schedule(get_preset("512").model_config().diffusion), 940, init)
    assert info.value.setting == "analytic_init"
    torch.save({"mean": torch.ones(1)}, path)
    with pytest.raises(SettingsError, match="no Expectation_X0/Tr_Cov_d"):
        load_analytic_init(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(SettingsError, match="cannot read"):
        load_analytic_init(path)


def test_cil_presets_follow_the_authors_scripts():
    for name, base, height in (("cil-512", "512", 320), ("cil-1024", "1024", 576)):
        p = get_preset(name)
        assert (p.repo, p.file) == (f"GraceZhao/DynamiCrafter-CIL-{name[4:]}", "timenoise.ckpt")
        assert (p.init_repo, p.init_file) == ("GraceZhao/DynamiCrafter-Analytic-Init", f"initial_noise_{name[4:]}.pt")
        assert p.height == height and p.model_config() == get_preset(base).model_config()  # same architecture
        s = p.sampling()
        assert (s.start_timestep, s.analytic_init, s.fs, s.steps, s.timestep_spacing) == (1000, True, 24, 50, "uniform_trailing")
        assert p.init_statistics.file == p.init_file and p.init_statistics.repo == p.init_repo
    # the original 512 model with the paper's inference strategy (its inference_512.sh): M = 940, Analytic-Init
    s = get_preset("512").sampling(start_timestep=940, analytic_init=True)
    assert ddim_timesteps(s.steps, s.timestep_spacing, 1000, s.start_timestep)[-1] == 939


def test_requests_are_checked():
    with pytest.raises(SettingsError) as info:
        make_request("tiny", EXAMPLE, "waving", start_timestep=1001)
    assert info.value.setting == "start_timestep"
    with pytest.raises(SettingsError) as info:
        make_request("tiny", EXAMPLE, "waving", start_timestep=5, steps=10)
    assert info.value.setting == "steps"
    with pytest.raises(SettingsError, match="no Analytic-Init statistics") as info:
        make_request("tiny", EXAMPLE, "waving", analytic_init=True)
    assert info.value.setting == "analytic_init"
    with pytest.raises(SettingsError, match="not found") as info:
        make_request("tiny", EXAMPLE, "waving", init_statistics="nowhere.pt")
    assert info.value.setting == "init_statistics"


def test_sampler_starts_at_m_from_the_analytic_noise(monkeypatch, tiny):
    """pipeline.sample hands DDIM the grid below M and the analytic start (the UNet is not run here)."""
    from dynamicrafter import pipeline
    from dynamicrafter.conditioning import make_conditioning

    seen = {}
    monkeypatch.setattr(pipeline, "sample_ddim", lambda fn, x, ts, coeffs, **kw: seen.update(x=x, ts=ts) or x)
    settings = replace(get_preset("tiny").sampling(steps=5, frames=2), start_timestep=940, analytic_init=True)
    cond = make_conditioning(tiny, torch.zeros(1, 3, 64, 64), ["a"], settings)
    init = AnalyticInit(mean=torch.full((4, 2, 8, 8), 0.5), variance=torch.tensor(0.2))
    x_T = torch.randn(1, 4, 2, 8, 8)
    pipeline.sample(tiny, cond, settings, x_T, lambda i, shape: torch.zeros(shape), analytic_init=init)
    assert seen["ts"].tolist() == [187, 375, 563, 751, 939]
    schedule = make_schedule(tiny.cfg.diffusion)
    assert torch.equal(seen["x"], start_noise(x_T, schedule, 940, init))


def test_cli_runs_cil_settings_with_tiny_weights(tmp_path):
    from typer.testing import CliRunner

    from dynamicrafter.cli.app import app

    stats = tmp_path / "stats.pt"  # the tiny model: 16 frames of 4x16x16 latents
    torch.save({"Expectation_X0": 0.1 * torch.randn(1, 4, 16, 16, 16), "Tr_Cov_d": torch.tensor(0.5)}, stats)
    args = ["animate", EXAMPLE, "waving", "-m", "tiny", "--steps", "2", "--start-timestep", "940", "--init-statistics",
            stats, "--out", tmp_path / "cil.mp4", "--no-measures", "--json"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout.strip().splitlines()[-1])["settings"]
    assert (settings["start_timestep"], settings["analytic_init"]) == (940, True)
    bad = CliRunner().invoke(app, [str(a) for a in ["animate", EXAMPLE, "waving", "-m", "tiny", "--start-timestep", "1",
                                                     "--out", tmp_path / "x.mp4"]])
    assert bad.exit_code == 2 and "--start-timestep must be within 2..1000" in bad.output
