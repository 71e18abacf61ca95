from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = Path(__file__).parent / "reference"
SCENARIOS = sorted(p.parent.name for p in FIXTURES.glob("*/scenario.json"))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True)
def _run_in_a_fresh_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty working folder: commands that write beside the current folder by default
    (animate without --out) never see, or leave, files in the checkout, such as the astronaut.mp4 that README's
    first command writes there."""
    monkeypatch.chdir(tmp_path)
