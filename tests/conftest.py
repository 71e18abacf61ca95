"""Shared test fixtures: the fixture folders, a tiny random model, scenario loading, relative error, and the guard
that no model loads before a command has validated its inputs."""

import json
from functools import cache
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = Path(__file__).parent / "reference"
SCENARIOS = sorted(p.parent.name for p in FIXTURES.glob("*/scenario.json"))

torch.set_num_threads(2)


def rel_err(got: torch.Tensor, exp: torch.Tensor) -> float:
    """max |got - exp| / max |exp|, in float64."""
    got, exp = got.detach().double().cpu(), exp.detach().double().cpu()
    return ((got - exp).abs().max() / exp.abs().max()).item()


@cache
def scenario(name: str) -> tuple[dict, object, dict[str, torch.Tensor]]:
    """(scenario.json, the ModelConfig it describes, the expected tensors) of a fixture folder."""
    from safetensors.torch import load_file

    from dynamicrafter.config import from_reference

    info = json.loads((FIXTURES / name / "scenario.json").read_text())
    cfg = from_reference(info["reference_model_config"], info.get("tiny_clip_config"))
    return info, cfg, load_file(FIXTURES / name / "expected.safetensors")


@cache
def fixture_state_dict(checkpoint: str) -> dict[str, torch.Tensor]:
    """The original-format state dict of a fixture checkpoint (``tiny_256_1234.ckpt``), memory-mapped."""
    return torch.load(FIXTURES / checkpoint, map_location="cpu", weights_only=True, mmap=True)["state_dict"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@cache
def tiny_model():
    """The built-in tiny model with random weights (seed 0), fp32 on the CPU; shared: tests must not modify it."""
    from dynamicrafter.checkpoint import build_random
    from dynamicrafter.presets import get_preset

    return build_random(get_preset("tiny").model_config(), 0)


@pytest.fixture(scope="session")
def tiny():
    """:func:`tiny_model` as a fixture."""
    return tiny_model()


@pytest.fixture
def never_load(monkeypatch):
    """Fail the test if a model gets loaded: every front end loads through ``Animator.load``, and must validate its
    inputs first."""
    from dynamicrafter.api import Animator

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the inputs were validated")

    monkeypatch.setattr(Animator, "load", boom)


def poll(fn, timeout: float = 20.0, every: float = 0.1):
    """``fn()`` again every ``every`` seconds until it returns something true or ``timeout`` passes; its last value."""
    import time

    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > end:
            return value
        time.sleep(every)


def headless_chromium(width: int = 1600, height: int = 1000):
    """Debian's Chromium driven headless by Selenium, with the performance (network) log on; skips the test with
    the reason where Selenium, Chromium or chromedriver is missing."""
    import shutil

    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("Chromium or chromedriver is not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture(autouse=True)
def _run_in_a_fresh_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty working folder: commands that write beside the current folder by default
    (animate without --out) never see, or leave, files in the checkout, such as the astronaut.mp4 that README's
    first command writes there."""
    monkeypatch.chdir(tmp_path)
