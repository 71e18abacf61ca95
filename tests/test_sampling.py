"""Sampler math: schedule buffers vs the fixture checkpoints, DDIM timesteps and per-step constants vs the original's
dtype path, guidance formulas, one DDIM step by hand, loop order, the zero-SNR NaN fix, and the fixtures' DDIM run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamicrafter.config import DiffusionConfig, from_reference
from dynamicrafter.models.unet import UNet3D
from dynamicrafter.sampling import (
    cfg_combine,
    ddim_coefficients,
    ddim_step,
    ddim_timesteps,
    make_schedule,
    multi_cond_combine,
    predict_eps_x0,
    rescale_guidance,
    sample_ddim,
)

from .conftest import fixture_state_dict, rel_err, scenario as load_scenario

SCENARIOS = ["i2v_256_style", "i2v_512_style", "interp_512_style", "i2v_512_fullres"]
CHECKPOINTS = {"i2v_256_style": "tiny_256_1234.ckpt", "i2v_512_style": "tiny_512_2345.ckpt"}
ZERO_SNR = DiffusionConfig(rescale_betas_zero_snr=True)


def scenario(name: str) -> dict:
    return load_scenario(name)[0]


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_scenario(name)[2]


def state_dict(name: str) -> dict[str, torch.Tensor]:
    return fixture_state_dict(CHECKPOINTS[name])


def diffusion_cfg(name: str) -> DiffusionConfig:
    return from_reference(scenario(name)["reference_model_config"]).diffusion


# --------------------------------------------------------------------------------------------------------------
# Schedule


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_schedule_bit_identical_to_checkpoint(name: str) -> None:
    sd, cfg = state_dict(name), diffusion_cfg(name)
    schedule = make_schedule(cfg)
    for key in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        assert getattr(schedule, key).dtype == torch.float32
        assert torch.equal(getattr(schedule, key), sd[key]), key
    if cfg.use_dynamic_rescale:
        assert schedule.scale_arr.shape == (1400,)
        assert torch.equal(schedule.scale_arr, sd["scale_arr"])
    else:
        assert schedule.scale_arr is None and "scale_arr" not in sd


def test_schedule_values() -> None:
    plain, zero = make_schedule(DiffusionConfig()), make_schedule(ZERO_SNR)
    assert plain.num_timesteps == 1000
    assert plain.alphas_cumprod[999].item() == pytest.approx(0.0046601, abs=1e-7)
    assert zero.alphas_cumprod[999].item() == 0 and zero.betas[999].item() == 1
    assert zero.alphas_cumprod[0].item() == plain.alphas_cumprod[0].item() == pytest.approx(0.99915)
    scale = make_schedule(DiffusionConfig(use_dynamic_rescale=True, base_scale=0.7)).scale_arr
    t = torch.arange(400, dtype=torch.float64)
    assert torch.allclose(scale[:400].double(), 1 - 0.3 * t / 399, atol=1e-7)
    assert (scale[400:] == torch.tensor(0.7)).all()


def test_other_beta_schedules() -> None:
    sqrt_linear = make_schedule(DiffusionConfig(beta_schedule="sqrt_linear"))
    assert torch.equal(sqrt_linear.betas, torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64).float())
    sqrt = make_schedule(DiffusionConfig(beta_schedule="sqrt"))
    assert torch.allclose(sqrt.betas, torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64).sqrt().float())
    cosine = make_schedule(DiffusionConfig(beta_schedule="cosine"))
    assert cosine.betas.max().item() == pytest.approx(0.999) and (cosine.betas >= 0).all()
    assert (cosine.alphas_cumprod.diff() < 0).all()
    with pytest.raises(ValueError, match="beta_schedule"):
        make_schedule(DiffusionConfig(beta_schedule="quadratic"))


# --------------------------------------------------------------------------------------------------------------
# DDIM timesteps


@pytest.mark.parametrize("name", SCENARIOS)
def test_fixture_timesteps(name: str) -> None:
    inputs = scenario(name)["inputs"]
    got = ddim_timesteps(inputs["ddim_steps"], inputs["timestep_spacing"])
    assert got.dtype == torch.int64 and torch.equal(got, expected(name)["sample_ddim_timesteps"])


def test_spec_timesteps() -> None:
    assert ddim_timesteps(7, "uniform").tolist() == [1, 143, 285, 427, 569, 711, 853, 995]
    assert ddim_timesteps(50, "uniform").tolist() == list(range(1, 1000, 20))
    assert ddim_timesteps(5, "uniform").tolist() == [1, 201, 401, 601, 801]
    assert len(ddim_timesteps(60, "uniform")) == 63
    assert ddim_timesteps(50, "uniform_trailing").tolist() == list(range(19, 1000, 20))
    assert ddim_timesteps(5, "uniform_trailing").tolist() == [199, 399, 599, 799, 999]
    assert ddim_timesteps(4, "uniform_trailing").tolist() == [249, 499, 749, 999]
    assert ddim_timesteps(7, "uniform_trailing").tolist() == [142, 285, 428, 570, 713, 856, 999]


@pytest.mark.parametrize(
    ("steps", "spacing", "nearby"),
    [
        (3, "uniform", "2 or 4"),
        (9, "uniform", "8 or 10"),
        (600, "uniform", "500"),
        (61, "uniform_trailing", "60 or 62"),
    ],
)
def test_rejected_step_counts(steps: int, spacing: str, nearby: str) -> None:
    with pytest.raises(ValueError, match=f"use {nearby} steps"):
        ddim_timesteps(steps, spacing)


def test_bad_timestep_arguments() -> None:
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(10, "quad")
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            ddim_timesteps(steps, "uniform")


# --------------------------------------------------------------------------------------------------------------
# Per-step constants


def reference_constants(abar: torch.Tensor, ts: torch.Tensor, eta: float) -> tuple[torch.Tensor, ...]:
    """The original's mixed numpy/torch path (float32 ā gathered, float64 numpy a_prev, numpy / tensor division),
    then torch.full's rounding to float32; returns a_t, a_prev, σ, the float32 direction radicand."""
    t = ts.numpy()
    alphas = abar[t]
    alphas_prev = np.asarray([abar[0]] + abar[t[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    a_prev = torch.tensor([float(v) for v in alphas_prev], dtype=torch.float32)
    sigma = torch.tensor([float(v) for v in sigmas], dtype=torch.float32)
    return alphas, a_prev, sigma, 1.0 - a_prev - sigma**2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", ["uniform", "uniform_trailing"])
def test_coefficients_follow_reference_dtype_path(zero_snr: bool, spacing: str) -> None:
    schedule = make_schedule(DiffusionConfig(rescale_betas_zero_snr=zero_snr))
    for steps in (2, 4, 5, 7, 10, 25, 50, 100, 200):
        ts = ddim_timesteps(steps, spacing)
        for eta in (0.0, 0.5, 1.0):
            c = ddim_coefficients(schedule, ts, eta)
            a_t, a_prev, sigma, radicand = reference_constants(schedule.alphas_cumprod, ts, eta)
            assert torch.equal(c.a_t, a_t) and torch.equal(c.a_prev, a_prev) and torch.equal(c.sigma, sigma)
            assert c.a_prev[0] == schedule.alphas_cumprod[0]  # not 1.0
            assert torch.equal(c.sqrt_one_minus_at, torch.from_numpy(np.sqrt((1 - a_t).numpy())))
            ok = radicand >= 0
            assert torch.equal(c.direction[ok], torch.from_numpy(np.sqrt(radicand[ok].numpy())))
            assert (c.direction[~ok] == 0).all()
            if eta == 0:
                assert (c.sigma == 0).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_zero_snr_nan_fix() -> None:
    schedule = make_schedule(ZERO_SNR)
    ts = ddim_timesteps(7, "uniform_trailing")
    *_, radicand = reference_constants(schedule.alphas_cumprod, ts, 1.0)
    # the original takes √ of −5.96e-8 at the first step (t = 999, a_t = 0) and returns NaN
    assert torch.isnan(radicand.sqrt()).tolist() == [False] * 6 + [True]
    assert radicand[6].item() == pytest.approx(-5.96e-8, rel=1e-3)
    c = ddim_coefficients(schedule, ts, 1.0)
    assert all(torch.isfinite(v).all() for v in (c.a_t, c.a_prev, c.sigma, c.direction))
    assert c.direction[6] == 0 and torch.equal(c.direction[:6], radicand[:6].sqrt())
    # S = 50: tiny positive radicand kept (coefficient ≈ 2.4e-4); S = 5: exactly 0
    assert ddim_coefficients(schedule, ddim_timesteps(50, "uniform_trailing"), 1.0).direction[-1].item() == (
        pytest.approx(2.44e-4, rel=1e-2)
    )
    assert ddim_coefficients(schedule, ddim_timesteps(5, "uniform_trailing"), 1.0).direction[-1] == 0
    # a whole run stays finite
    x = sample_ddim(
        lambda x, t: 0.5 * x,
        torch.ones(1, 4, 2, 2, 2),
        ts,
        c,
        schedule=schedule,
        parameterization="v",
        noise_fn=lambda i, shape: torch.ones(shape),
    )
    assert torch.isfinite(x).all()


def test_dynamic_rescale_ratio() -> None:
    schedule = make_schedule(DiffusionConfig(rescale_betas_zero_snr=True, use_dynamic_rescale=True))
    c = ddim_coefficients(schedule, ddim_timesteps(5, "uniform_trailing"), 1.0)  # 199, 399, 599, 799, 999
    s199 = torch.tensor(1 - 0.3 * 199 / 399, dtype=torch.float32)
    assert c.scale_ratio[0] == 1 and torch.equal(c.scale_ratio[2:], torch.ones(3))
    assert c.scale_ratio[1] == s199 / torch.tensor(0.7)  # step at t = 399 rescales by scale(199) / scale(399)
    assert ddim_coefficients(make_schedule(DiffusionConfig()), torch.tensor([1, 501]), 1.0).scale_ratio is None


def test_coefficient_arguments() -> None:
    schedule = make_schedule(DiffusionConfig())
    with pytest.raises(ValueError, match="eta"):
        ddim_coefficients(schedule, torch.tensor([1, 501]), -1.0)
    with pytest.raises(ValueError, match="1-D"):
        ddim_coefficients(schedule, torch.tensor([], dtype=torch.long), 1.0)


# --------------------------------------------------------------------------------------------------------------
# Guidance


def test_guidance_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    e_c, e_u, e_ui = (torch.randn(2, 4, 3, 5, 6, generator=g) for _ in range(3))
    assert torch.equal(cfg_combine(e_c, e_u, 7.5), e_u + 7.5 * (e_c - e_u))
    assert torch.allclose(multi_cond_combine(e_c, e_u, e_ui, 7.5, 7.5), cfg_combine(e_c, e_u, 7.5), atol=1e-5)
    assert torch.allclose(multi_cond_combine(e_c, e_u, e_ui, 7.5, 1.0), e_ui + 7.5 * (e_c - e_ui), atol=1e-5)

    out = cfg_combine(e_c, e_u, 7.5)
    got = rescale_guidance(out, e_c, 0.7)
    for b in range(2):  # per-sample std over all non-batch dims
        ratio = e_c[b].double().std() / out[b].double().std()
        direct = 0.7 * out[b].double() * ratio + 0.3 * out[b].double()
        assert torch.allclose(got[b].double(), direct, rtol=1e-5, atol=1e-6)
    assert got[0].std().item() != pytest.approx(out[0].std().item(), rel=1e-2)
    assert rescale_guidance(out, e_c, 0.0) is out


# --------------------------------------------------------------------------------------------------------------
# One step and the loop


def fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
    return 0.3 * x + 1e-3 * t


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_one_step_by_hand(parameterization: str) -> None:
    schedule = make_schedule(DiffusionConfig(rescale_betas_zero_snr=True, use_dynamic_rescale=True))
    ts = ddim_timesteps(5, "uniform_trailing")
    c = ddim_coefficients(schedule, ts, 1.0)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 4, 2, 4, 4, generator=g)
    k, t = 1, 399
    out = fake_model(x, t)
    got = ddim_step(x, out, t, k, schedule, c, parameterization, noise)

    abar = schedule.alphas_cumprod.double()
    a_t, a_prev = abar[399], abar[199]
    sigma = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = sigma.sqrt()
    xd, od = x.double(), out.double()
    if parameterization == "v":
        eps, x0 = a_t.sqrt() * od + (1 - a_t).sqrt() * xd, a_t.sqrt() * xd - (1 - a_t).sqrt() * od
    else:
        eps, x0 = od, (xd - (1 - a_t).sqrt() * od) / a_t.sqrt()
    x0 = x0 * (1 - 0.3 * 199 / 399) / 0.7
    hand = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps + sigma * noise.double()
    assert got.dtype == torch.float32
    assert rel_err(got.double(), hand) < 1e-6

    eps_got, x0_got = predict_eps_x0(out, x, t, k, schedule, c, parameterization)
    assert rel_err(eps_got.double(), eps) < 1e-6
    with pytest.raises(ValueError, match="parameterization"):
        predict_eps_x0(out, x, t, k, schedule, c, "x0")


def test_loop_order_noise_and_callback() -> None:
    schedule = make_schedule(DiffusionConfig())
    ts = ddim_timesteps(5, "uniform")
    c = ddim_coefficients(schedule, ts, 0.0)  # σ = 0: noise is still drawn every step
    seen_t, seen_noise, seen_cb = [], [], []
    g = torch.Generator().manual_seed(2)
    noises = torch.randn(5, 1, 4, 2, 4, 4, generator=g)
    x_T = torch.randn(1, 4, 2, 4, 4, generator=g)

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        seen_t.append(t)
        return fake_model(x, t)

    def noise_fn(i: int, shape: tuple[int, ...]) -> torch.Tensor:
        seen_noise.append((i, shape))
        return noises[i]

    got = sample_ddim(
        model_fn,
        x_T,
        ts,
        c,
        schedule=schedule,
        parameterization="eps",
        noise_fn=noise_fn,
        callback=lambda i, total: seen_cb.append((i, total)),
    )
    assert seen_t == [801, 601, 401, 201, 1]
    assert seen_noise == [(i, (1, 4, 2, 4, 4)) for i in range(5)]
    assert seen_cb == [(i, 5) for i in range(5)]

    x = x_T  # same loop by hand with ddim_step
    for i, k in enumerate(range(4, -1, -1)):
        t = int(ts[k])
        x = ddim_step(x, fake_model(x, t), t, k, schedule, c, "eps", noises[i])
    assert torch.equal(got, x)
    with pytest.raises(ValueError, match="coefficients"):
        sample_ddim(model_fn, x_T, ts[:3], c, schedule=schedule, parameterization="eps", noise_fn=noise_fn)


def test_noise_enters_with_sigma() -> None:
    schedule = make_schedule(DiffusionConfig())
    ts = ddim_timesteps(5, "uniform")
    x_T = torch.zeros(1, 4, 1, 2, 2)
    runs = {}
    for eta in (0.0, 1.0):
        c = ddim_coefficients(schedule, ts, eta)
        runs[eta] = [
            sample_ddim(
                fake_model,
                x_T,
                ts,
                c,
                schedule=schedule,
                parameterization="eps",
                noise_fn=lambda i, shape, v=v: torch.full(shape, v),
            )
            for v in (0.0, 1.0)
        ]
    assert torch.equal(runs[0.0][0], runs[0.0][1])  # σ = 0: the noise value is irrelevant
    assert not torch.allclose(runs[1.0][0], runs[1.0][1])


# --------------------------------------------------------------------------------------------------------------
# The fixtures' DDIM run with the UNet


@pytest.mark.parametrize("name", ["i2v_256_style", "i2v_512_style"])
def test_fixture_final_latent(name: str) -> None:
    s, exp = scenario(name), expected(name)
    cfg = from_reference(s["reference_model_config"], s["tiny_clip_config"])
    prefix = "model.diffusion_model."
    unet = UNet3D(cfg.unet).eval()
    unet.load_state_dict({k[len(prefix):]: v for k, v in state_dict(name).items() if k.startswith(prefix)})
    inputs = s["inputs"]
    ctx = torch.cat([exp["text_emb"], exp["image_ctx"]], dim=1)
    uctx = torch.cat([exp["uncond_text_emb"], exp["uncond_image_ctx"]], dim=1)
    fs = torch.tensor([inputs["fs"]])

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        xin = torch.cat([x, exp["concat_latent"]], dim=1)  # (1, 8, T, h, w)
        ts = torch.tensor([t])
        e_c, e_u = unet(xin, ts, ctx, fs), unet(xin, ts, uctx, fs)
        return rescale_guidance(cfg_combine(e_c, e_u, inputs["cfg_scale"]), e_c, inputs["guidance_rescale"])

    schedule = make_schedule(cfg.diffusion)
    ts = ddim_timesteps(inputs["ddim_steps"], inputs["timestep_spacing"])
    with torch.no_grad():
        got = sample_ddim(
            model_fn,
            exp["sample_x_T"],
            ts,
            ddim_coefficients(schedule, ts, inputs["ddim_eta"]),
            schedule=schedule,
            parameterization=cfg.diffusion.parameterization,
            noise_fn=lambda i, shape: exp["sample_noises"][i],
        )
    err = rel_err(got, exp["sample_final_latent"])
    print(f"{name}: sample_final_latent rel err {err:.2e}")
    assert err < 1e-5
