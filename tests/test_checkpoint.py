"""Checkpoint reading, key mapping against the real checkpoints' manifests, strict loading and its errors."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dynamicrafter.checkpoint import (
    CheckpointError,
    build_skeleton,
    convert_checkpoint,
    load_model,
    load_state,
    read_checkpoint,
)
from dynamicrafter.config import from_reference
from dynamicrafter.presets import get_preset

from .conftest import FIXTURES, REFERENCE

TINY_256 = FIXTURES / "tiny_256_1234.ckpt"
TINY_512 = FIXTURES / "tiny_512_2345.ckpt"


def manifest(name: str) -> dict[str, torch.Tensor]:
    """The keys and shapes of a real checkpoint as meta tensors."""
    out = {}
    for line in (REFERENCE / f"keys_{name}.tsv").read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
        out[key] = torch.empty(dims, device="meta")
    return out


def tiny_cfg(scenario: str):
    import json

    s = json.loads((FIXTURES / scenario / "scenario.json").read_text())
    return from_reference(s["reference_model_config"], s["tiny_clip_config"])


@pytest.mark.parametrize("name", ["256", "512", "1024"])
def test_full_size_model_matches_manifest_exactly(name):
    """The meta-built full model has exactly the manifest's used keys and shapes, and loads it strictly."""
    sd = manifest(name)
    model = build_skeleton(get_preset(name).model_config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in convert_checkpoint(sd, model.cfg).items()}
    assert converted == ours
    loaded = load_state(model, sd, device="meta")
    assert sum(p.numel() for p in loaded.unet.parameters()) == 1_438_854_980 + (16 if name == "256" else 0)
    assert sum(p.numel() for p in loaded.image_proj.parameters()) == 48_787_456
    assert sum(p.numel() for p in loaded.vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in loaded.text_encoder.parameters()) == 340_387_840  # 23 of 24 blocks
    # the vision tower keeps proj (1280x1024) and ln_post for CLIP-similarity metrics
    assert sum(p.numel() for p in loaded.image_encoder.parameters()) == 630_763_520 + 1280 * 1024 + 2 * 1280
    assert len(loaded.unet.spatial_attentions()) == 16


def test_toon_model_matches_its_manifest_exactly():
    """ToonCrafter's checkpoint: the 512 keys plus 148 decoder keys (16,288,044 values), loaded strictly; only the
    VAE differs from 512-interp."""
    sd = manifest("toon512")
    model = build_skeleton(get_preset("toon").model_config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in convert_checkpoint(sd, model.cfg).items()} == ours
    loaded = load_state(model, sd, device="meta")
    assert sum(p.numel() for p in loaded.vae.parameters()) == 83_653_863 + 16_288_044
    refinement = sum(v.numel() for k, v in sd.items() if ".decoder.attn_refinement." in k)
    assert sum(p.numel() for p in loaded.vae.decoder.attn_refinement.parameters()) == refinement == 2_199_040
    interp = build_skeleton(get_preset("512-interp").model_config())
    assert {k: v.shape for k, v in interp.state_dict().items() if not k.startswith("vae.")} == {
        k: v.shape for k, v in loaded.state_dict().items() if not k.startswith("vae.")
    }


def test_toon_and_512_checkpoints_are_told_apart():
    with pytest.raises(CheckpointError, match=r"148 unexpected keys.*the ToonCrafter \(toon\) model"):
        load_state(build_skeleton(get_preset("512-interp").model_config()), manifest("toon512"), device="meta")
    with pytest.raises(CheckpointError, match="does not fit the toon model: .*missing keys.*a 512/1024 model"):
        load_state(build_skeleton(get_preset("toon").model_config()), manifest("512"), device="meta", expected_model="toon")


def test_legacy_framestride_key_is_accepted():
    sd = {k.replace("fps_embedding", "framestride_embed"): v for k, v in manifest("256").items()}
    from dynamicrafter.checkpoint import unwrap_container

    model = build_skeleton(get_preset("256").model_config())
    load_state(model, unwrap_container({"state_dict": sd}), device="meta")


def test_wrong_model_gets_a_hint():
    with pytest.raises(CheckpointError) as err:
        load_state(build_skeleton(get_preset("512").model_config()), manifest("256"), device="meta", expected_model="512")
    message = str(err.value)
    assert "16 unexpected keys" in message and "attn2.alpha" in message
    assert "the 256 model" in message and "\n" not in message


def test_tiny_checkpoint_for_full_model_is_refused():
    with pytest.raises(CheckpointError, match="shape mismatches.*custom architecture"):
        load_model(get_preset("512").model_config(), TINY_512, device="meta", expected_model="512")


def test_deepspeed_container_and_safetensors_load_the_same(tmp_path):
    cfg = tiny_cfg("i2v_512_style")
    sd = read_checkpoint(TINY_512)
    ref = load_model(cfg, TINY_512).state_dict()
    torch.save({"module": {f"_forward_module.{k}": v for k, v in sd.items()}}, tmp_path / "ds.ckpt")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    for path in (tmp_path / "ds.ckpt", tmp_path / "model.safetensors"):
        got = load_model(cfg, path).state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_weights_cast_while_loading():
    model = load_model(tiny_cfg("i2v_256_style"), TINY_256, dtype=torch.bfloat16)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.bfloat16}


def test_truncated_checkpoint(tmp_path):
    data = TINY_256.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.ckpt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors"):
        read_checkpoint(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("content", [b"hello world\n", bytes(range(256)) * 4, b"\x80\x04\x95garbage"])
def test_files_that_are_no_checkpoint_give_a_clear_error(tmp_path, content):
    """A text file, random bytes, a broken pickle: "not a PyTorch checkpoint", never a KeyError or a claim about
    code objects (a text file used to raise KeyError: 101)."""
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        read_checkpoint(path)
    assert "other than tensors" not in str(info.value)


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Path("/etc")}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"objects other than tensors \(pathlib"):
        read_checkpoint(tmp_path / "evil.ckpt")


def test_missing_key_is_named():
    sd = dict(read_checkpoint(TINY_256))
    del sd["model.diffusion_model.out.2.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing key \(unet.out.2.weight\)"):
        load_state(build_skeleton(tiny_cfg("i2v_256_style")), sd)


def test_not_a_file():
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(FIXTURES / "nope.ckpt")
