"""ToonCrafter: each piece of the dual-reference decoder and of its encode/decode/splice against the recorded
scenario (``fixtures/toon_512_style``, from the original code), the math of the refinement blocks against plain
re-statements of the original's, the presets, and the CLI end to end with the fixture's tiny weights."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache

import pytest
import torch

from dynamicrafter.checkpoint import build_skeleton, check_state_dict, convert_checkpoint, load_model, read_checkpoint
from dynamicrafter.conditioning import encode_with_refs
from dynamicrafter.images import load_image, prepare_image
from dynamicrafter.models.toon_vae import Combiner, Fusion, encode_with_hidden, middle_indices, splice, toon_decode
from dynamicrafter.presets import get_preset

from .conftest import FIXTURES, rel_err, scenario

NAME = "toon_512_style"
CKPT = FIXTURES / "tiny_toon_4567.ckpt"
TOL = 1e-4  # the verify tool's tolerance is 1e-3; these pieces agree to ~1e-5
SPLICED = [7, 8]  # the frames the splice takes from the second decode (T = 16)


@cache
def model():
    _, cfg, _ = scenario(NAME)
    return load_model(cfg, CKPT)


def images() -> tuple[torch.Tensor, torch.Tensor]:
    info, _, _ = scenario(NAME)
    inputs = info["inputs"]
    return tuple(
        prepare_image(load_image(FIXTURES / NAME / inputs[k]), inputs["height"], inputs["width"])
        for k in ("start_image", "end_image")
    )


def expected_refs() -> list[torch.Tensor]:
    return [scenario(NAME)[2][f"ref_hidden_{i}"] for i in range(5)]


def decode(latents: torch.Tensor, refs, window: int = 16) -> torch.Tensor:
    m = model()
    return toon_decode(m.vae, latents, refs, m.cfg.diffusion.scale_factor, window)


# --------------------------------------------------------------------------------------------------------------
# Against the recorded scenario


def test_encoder_maps_and_latents_of_the_original_call():
    """The original encodes the 16-frame input video (8 x start, 8 x end) in one call and keeps the maps of frames
    0 and 15: the same call here gives ref_hidden_0..4 and latent_z."""
    _, cfg, exp = scenario(NAME)
    start, end = images()
    video = torch.cat([start.repeat(8, 1, 1, 1), end.repeat(8, 1, 1, 1)])  # (16, 3, H, W)
    z, maps = encode_with_hidden(model().vae, video, cfg.diffusion.scale_factor)
    assert rel_err(z.transpose(0, 1)[None], exp["latent_z"]) < TOL
    for i, m in enumerate(maps):
        assert rel_err(torch.stack([m[0], m[-1]], dim=1)[None], exp[f"ref_hidden_{i}"]) < TOL, i
    # the pipeline's call on the two distinct images gives the same references (batching differs by ~1e-6)
    z_start, z_end, refs = encode_with_refs(model(), start, end)
    assert rel_err(torch.stack([z_start, z_end], dim=2), exp["latent_z"][:, :, [0, -1]]) < TOL
    assert all(rel_err(r, e) < TOL for r, e in zip(refs, expected_refs()))


def test_without_end_image_both_references_are_the_start():
    start, _ = images()
    z_start, z_end, refs = encode_with_refs(model(), start, None)
    assert torch.equal(z_start, z_end)
    assert all(torch.equal(r[:, :, 0], r[:, :, 1]) for r in refs)


def test_decoder_and_splice_reproduce_the_recorded_video():
    """From the recorded final latent and references: the second decode, and the spliced video."""
    _, _, exp = scenario(NAME)
    latents, refs = exp["sample_final_latent"], expected_refs()
    video = decode(latents, refs)
    middle = decode(latents[:, :, middle_indices(16)], refs)
    assert rel_err(middle, exp["decoded_video_middle"]) < TOL
    assert rel_err(splice(video, middle), exp["decoded_video"]) < TOL


@cache
def plain_decode() -> torch.Tensor:
    _, _, exp = scenario(NAME)
    return decode(exp["sample_final_latent"], expected_refs())


def kept(video: torch.Tensor) -> torch.Tensor:
    """The frames the splice does not touch."""
    return video[:, :, [i for i in range(16) if i not in SPLICED]]


@pytest.mark.parametrize("mistake", ["no references", "references swapped", "post_quant_conv", "frame by frame",
                                     "alpha swapped", "no splice"])
def test_the_fixture_catches_typical_mistakes(mistake):
    """Each plausible mistake moves the video well past the tolerance, so the checks above mean something."""
    _, _, exp = scenario(NAME)
    latents, refs = exp["sample_final_latent"], expected_refs()
    vae, scale = model().vae, model().cfg.diffusion.scale_factor
    assert rel_err(kept(plain_decode()), kept(exp["decoded_video"])) < TOL
    if mistake == "no splice":
        assert rel_err(plain_decode(), exp["decoded_video"]) > 1e-3
        return
    if mistake == "no references":
        wrong = decode(latents, None)
    elif mistake == "references swapped":
        wrong = decode(latents, [r.flip(2) for r in refs])
    elif mistake == "post_quant_conv":
        flat = latents[0].transpose(0, 1) * (1 / scale)
        wrong = vae.decoder(vae.post_quant_conv(flat), refs, 16).transpose(0, 1)[None]
    elif mistake == "frame by frame":
        wrong = decode(latents, refs, window=1)
    else:
        mixes = [p for n, p in vae.decoder.named_parameters() if n.endswith("mix_factor")]
        saved = [p.detach().clone() for p in mixes]
        try:
            for p in mixes:
                p.data.neg_()  # sigmoid(-m) = 1 - sigmoid(m)
            wrong = decode(latents, refs)
        finally:
            for p, s in zip(mixes, saved):
                p.data.copy_(s)
    assert rel_err(kept(wrong), kept(exp["decoded_video"])) > 1e-3


# --------------------------------------------------------------------------------------------------------------
# The pieces, against the original's algorithm restated


def test_fusion_is_cross_attention_per_frame():
    """The original repeats the start and end tokens for every frame and attends frame by frame; folding the frames
    into one query sequence is the same math (two samples, three frames)."""
    torch.manual_seed(0)
    fusion = Fusion(64).eval()
    for p in fusion.parameters():
        p.data.normal_(0, 0.2)
    b, n, c, h, w = 2, 3, 64, 4, 5
    x, ref = torch.randn(b * n, c, h, w), torch.randn(b, c, 2, h, w)
    q = fusion.to_q(fusion.norm(x).flatten(2).transpose(1, 2))  # (b*n, hw, 512)
    tokens = torch.cat([ref[:, :, 0].flatten(2), ref[:, :, 1].flatten(2)], dim=2).transpose(1, 2)  # (b, 2hw, c)
    k = fusion.to_k(tokens).repeat_interleave(n, dim=0)  # (b*n, 2hw, 512): every frame gets its sample's keys
    v = fusion.to_v(tokens).repeat_interleave(n, dim=0)
    heads = lambda t: t.unflatten(-1, (8, 64)).transpose(1, 2)  # noqa: E731  (b*n, 8, L, 64)
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 8.0, dim=-1)
    out = fusion.to_out((weights @ heads(v)).transpose(1, 2).flatten(2))  # (b*n, hw, c)
    want = x + out.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(fusion(x, ref), want, rtol=1e-5, atol=1e-5)


def test_combiner_adds_start_to_first_and_end_to_last_frame():
    combiner = Combiner(32)
    torch.nn.init.eye_(combiner.conv.weight[:, :, 0, 0])
    torch.nn.init.zeros_(combiner.conv.bias)  # the 1x1 conv is the identity
    x, ref = torch.zeros(2 * 3, 32, 2, 2), torch.stack([torch.full((2, 32, 2, 2), 1.0), torch.full((2, 32, 2, 2), 10.0)], 2)
    ref[1] *= 100  # the second sample's references
    got = combiner(x, ref).unflatten(0, (2, 3))[:, :, 0, 0, 0]  # (sample, frame)
    assert got.tolist() == [[1, 0, 10], [100, 0, 1000]]
    one = combiner(torch.zeros(2, 32, 2, 2), ref).unflatten(0, (2, 1))[:, 0, 0, 0, 0]  # one frame: both references
    assert one.tolist() == [11, 1100]


def test_video_resblock_mixes_the_temporal_branch_by_sigmoid_of_mix_factor():
    """output = y + sigmoid(m) * (time_stack(y) - y), y the 2-D block's output (the original's alpha*x + (1-alpha)*x_mix)."""
    resnet = model().vae.decoder.up_blocks[0].resnets[0]  # diffusers' SpatioTemporalResBlock (LDM up.3.block.0)
    x = torch.randn(4, 64, 3, 5)
    indicator = torch.zeros(1, 4)
    y = resnet.spatial_res_block(x, None)
    video = y.unflatten(0, (1, 4)).transpose(1, 2)  # (1, C, 4, h, w)
    branch = (resnet.temporal_res_block(video, None) - video).transpose(1, 2).flatten(0, 1)
    alpha = torch.sigmoid(resnet.time_mixer.mix_factor)
    torch.testing.assert_close(resnet(x, image_only_indicator=indicator), y + alpha * branch, rtol=1e-5, atol=1e-5)


def test_splice_by_hand():
    """T = 6: the second decode sees latent frames 0, 2, 3, 5; output frames 2 and 3 come from it (its frames 1, 2)."""
    assert middle_indices(6) == [0, 2, 3, 5]
    assert middle_indices(16)[6:8] == [7, 8]  # T = 16: output frames 7 and 8 are latent frames 7, 8 decoded among 14
    video = torch.arange(6.0).view(1, 1, 6, 1, 1)
    middle = 100 + torch.tensor([0.0, 2, 3, 5]).view(1, 1, 4, 1, 1)
    assert splice(video, middle).flatten().tolist() == [0, 1, 102, 103, 4, 5]
    with pytest.raises(ValueError, match="at least 4 frames"):
        middle_indices(3)


def test_samples_decode_independently():
    """A batch of two samples decodes as two runs of one (each with its own references)."""
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 4, 8, 16)
    refs = [torch.cat([r, r.flip(2)]) for r in expected_refs()]  # sample 1: start and end swapped
    both = decode(latents, refs)
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], decode(latents[i : i + 1], [r[i : i + 1] for r in refs]))


# --------------------------------------------------------------------------------------------------------------
# Presets and the command line


def test_tiny_toon_is_the_fixture_architecture():
    _, cfg, _ = scenario(NAME)
    ours = get_preset("tiny-toon").model_config()
    assert replace(ours, diffusion=cfg.diffusion) == cfg
    skeleton = build_skeleton(ours)
    assert not check_state_dict(convert_checkpoint(read_checkpoint(CKPT), ours), skeleton.state_dict())


def test_toon_preset_follows_the_run_script():
    p = get_preset("toon")
    assert (p.repo, p.file, p.height, p.width, p.frames, p.mode) == ("Doubiiu/ToonCrafter", "model.ckpt", 320, 512, 16, "interp")
    s = p.sampling()
    assert (s.fs, s.steps, s.eta, s.cfg_scale, s.timestep_spacing, s.guidance_rescale) == (10, 50, 1.0, 7.5, "uniform_trailing", 0.7)
    cfg = p.model_config()
    assert cfg.vae.decoder == "dualref" and cfg.unet == get_preset("512-interp").model_config().unet


def test_too_few_frames_are_refused():
    from dynamicrafter.errors import SettingsError
    from dynamicrafter.request import make_request

    start = FIXTURES / NAME / "start.png"
    with pytest.raises(SettingsError, match="at least 4") as info:
        make_request("tiny-toon", start, "a ball", end_image=start, frames=3)
    assert info.value.setting == "frames"


def test_cli_interpolates_with_the_fixture_weights(tmp_path):
    from typer.testing import CliRunner

    from dynamicrafter.cli.app import app
    from dynamicrafter.video import read_video

    folder, out = FIXTURES / NAME, tmp_path / "toon.mp4"
    args = ["animate", folder / "start.png", "a red ball bouncing", "--end-image", folder / "end.png", "-m", "tiny-toon",
            "--checkpoint", CKPT, "--steps", "2", "--out", out, "--no-measures", "--json"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert (record["model"], record["mode"], record["frames"], record["height"], record["width"]) == ("tiny-toon", "interp", 16, 64, 128)
    assert read_video(out).shape == (16, 64, 128, 3)
