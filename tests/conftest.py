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
