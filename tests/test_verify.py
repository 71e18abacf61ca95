"""Every fixture folder passes the conformance tool, and the tool fails loudly when something is wrong."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from dynamicrafter.verify import main, run_scenario

from .conftest import FIXTURES, SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fixture_passes_every_stage(scenario):
    checks = list(run_scenario(FIXTURES / scenario))
    expected = set(load_file(FIXTURES / scenario / "expected.safetensors"))
    inputs_only = {"probe_x_t", "sample_x_T", "sample_noises"}
    assert {c.key for c in checks} == expected - inputs_only  # every tensor of the fixture is compared
    failed = {c.key: c.value for c in checks if not c.ok}
    assert not failed
    for c in checks:
        if c.metric == "rel max err":
            assert c.value < 1e-4, (c.key, c.value)


def test_cli_exit_status_and_table(capsys):
    assert main([str(FIXTURES / "i2v_256_style")]) == 0
    out = capsys.readouterr().out
    assert "sample_final_latent" in out and "0 failed" in out


def test_wrong_checkpoint_fails(tmp_path, capsys):
    # The 512-style scenario with the 256-style checkpoint: the loader refuses it, the tool exits non-zero.
    assert main([str(FIXTURES / "i2v_512_style"), "--checkpoint", str(FIXTURES / "tiny_256_1234.ckpt")]) == 1
    assert "alpha" in capsys.readouterr().out


def test_corrupted_expectation_is_reported(tmp_path):
    folder = tmp_path / "scenario"
    shutil.copytree(FIXTURES / "i2v_256_style", folder)
    scenario = json.loads((folder / "scenario.json").read_text())
    scenario["checkpoint"] = str(FIXTURES / "tiny_256_1234.ckpt")
    (folder / "scenario.json").write_text(json.dumps(scenario))
    expected = load_file(folder / "expected.safetensors")
    expected["image_ctx"] = expected["image_ctx"] * 1.01
    save_file(expected, folder / "expected.safetensors")
    failed = [c.key for c in run_scenario(folder) if not c.ok]
    assert failed == ["image_ctx"]
