"""Reference-free video measures on synthetic videos whose answers are known."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason="the optical-flow measures need opencv-python-headless")

from dynamicrafter import measures as M  # noqa: E402

# Relative error allowed on the measured shift.  The top-5 % mean slightly overestimates a uniform shift (it keeps the
# largest estimates): over 10 textures the mean over pairs was 1 % high at 2 px and 2-4 % high at 4 px, single pairs
# at most 7 % off.
FLOW_TOLERANCE = 0.05  # mean over the pairs
PAIR_TOLERANCE = 0.10  # each pair


def smooth_texture(rng: np.random.Generator, h: int, w: int, sigma: float = 3.0) -> np.ndarray:
    """A smooth random grayscale texture (h, w) in [0, 1]: white noise blurred by a Gaussian of ``sigma`` pixels."""
    import cv2

    x = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), sigma)
    return (x - x.min()) / (x.max() - x.min())


def translating(shift: int, frames: int = 16, size: int = 128, seed: int = 0) -> np.ndarray:
    """A window sliding ``shift`` pixels per frame to the right over a larger texture: (T, size, size, 3) uint8."""
    margin = 8
    big = smooth_texture(np.random.default_rng(seed), size + 2 * margin, size + shift * frames + 2 * margin)
    crops = [big[margin : margin + size, margin + shift * t : margin + shift * t + size] for t in range(frames)]
    return np.repeat((np.stack(crops) * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def still(frames: int = 16, size: int = 128) -> np.ndarray:
    return np.repeat(translating(0, 1, size)[:1], frames, axis=0)


def unrelated(frames: int = 8, size: int = 64, seed: int = 1) -> np.ndarray:
    """Independent noise images, each with its own grain, colour and brightness."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(frames):
        x = np.stack([smooth_texture(rng, size, size, float(rng.uniform(0.5, 6))) for _ in range(3)], axis=-1)
        x = x * rng.uniform(0.2, 1.0, 3) + rng.uniform(0.0, 0.5, 3)
        out.append((np.clip(x, 0, 1) * 255).astype(np.uint8))
    return np.stack(out)


def as_photo(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def image_encoder():
    from dynamicrafter.checkpoint import build_random
    from dynamicrafter.presets import get_preset

    return build_random(get_preset("tiny").model_config(), 0, "cpu", torch.float32).image_encoder


# --------------------------------------------------------------------------------------------------------------
# Pixel and flow measures


def test_still_video_has_no_motion_and_is_static():
    m = M.measure_video(still())
    assert m["motion"] == 0.0
    assert m["flow_px"] < 0.1 and m["dynamic_degree"] < 1e-3
    assert m["moving"] is False and m["moving_pairs"] == 0
    assert m["flags"] == ["static"]
    assert M.warning_for(m) is not None and "image_scale" in M.warning_for(m)


def test_motion_is_the_mean_absolute_frame_difference():
    frames = translating(3)
    expected = np.abs(np.diff(frames.astype(np.float32) / 255, axis=0)).mean()
    assert M.motion(frames) == pytest.approx(expected, rel=1e-6)
    assert M.motion(frames) > 0.01
    assert M.motion(frames[:1]) == 0.0


@pytest.mark.parametrize("shift", [2, 4])
def test_flow_of_a_translation_is_the_shift(shift):
    frames = translating(shift)
    flows = M.pair_flows(frames)
    assert flows.shape == (15,)
    assert flows == pytest.approx(np.full(15, shift), rel=PAIR_TOLERANCE)
    d = M.dynamic_degree(frames)
    assert d["flow_px"] == pytest.approx(shift, rel=FLOW_TOLERANCE)
    assert d["dynamic_degree"] == pytest.approx(d["flow_px"] / 128, rel=1e-9)


def test_moving_verdict_follows_the_scaled_threshold():
    # At 128 px the threshold is 6 * 128 / 256 = 3 px per frame: a 2 px drift is static, a 4 px drift moves.
    assert M.move_threshold_px(128, 160) == pytest.approx(3.0)
    slow, fast = M.measure_video(translating(2)), M.measure_video(translating(4))
    assert slow["moving"] is False and "static" in slow["flags"]
    assert fast["moving"] is True and fast["moving_pairs"] == 15 and fast["flags"] == []
    assert M.warning_for(fast) is None


def test_moving_needs_enough_moving_pairs():
    assert [M.moving_pairs_needed(t) for t in (1, 2, 8, 16, 31)] == [1, 1, 2, 4, 8]
    # 16 frames where only 3 pairs move (4 px) and the rest stand still: under the 4 pairs needed.
    moving = translating(4, frames=4)
    frames = np.concatenate([moving, np.repeat(moving[-1:], 12, axis=0)])
    d = M.dynamic_degree(frames)
    assert d["moving_pairs"] == 3 and d["moving"] is False
    frames = np.concatenate([translating(4, frames=5), np.repeat(translating(4, frames=5)[-1:], 11, axis=0)])
    assert M.dynamic_degree(frames)["moving"] is True


def test_large_frames_are_measured_in_their_own_pixels():
    # 288 px short side > FLOW_MAX_SIDE: the flow runs on a shrunk copy, the result is still in full-size pixels.
    frames = translating(6, frames=4, size=288)
    assert M.dynamic_degree(frames)["flow_px"] == pytest.approx(6, rel=PAIR_TOLERANCE)


def test_a_single_frame_is_measured_but_not_judged_static(image_encoder):
    m = M.measure_video(translating(4, frames=1), image_encoder=image_encoder)
    assert (m["motion"], m["flow_px"], m["dynamic_degree"], m["moving"]) == (0.0, 0.0, 0.0, False)
    assert m["flags"] == [] and m["temporal_consistency"] == 1.0


def test_black_flat_and_saturated_flags():
    black = np.zeros((4, 32, 32, 3), np.uint8)
    gray = np.full((4, 32, 32, 3), 128, np.uint8)
    assert M.frame_flags(black) == ["black", "flat", "saturated"]
    assert M.frame_flags(gray) == ["flat"]
    assert "black" in M.measure_video(black)["flags"] and "flat" in M.measure_video(gray)["flags"]
    assert M.warning_for(M.measure_video(black)).startswith("frames are (nearly) black")
    assert M.warning_for(M.measure_video(gray)).startswith("some frames are uniform")
    # Half the values clipped in every frame of a textured video: saturated, not black and not flat.
    frames = translating(4, frames=4, size=64)
    frames[:, ::2] = 255
    frames[:, 1::4] = 0
    assert M.frame_flags(frames) == ["saturated"]
    assert M.frame_flags(translating(4, frames=4, size=64)) == []
    # One bad frame is enough.
    frames = translating(4, frames=4, size=64)
    frames[2] = 3
    assert "black" in M.frame_flags(frames)


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        M.measure_video(np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(ValueError):
        M.measure_video(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError):
        M.measure_video(still(2, 32), photo=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError):
        M.measure_video(still(2, 32), frame_embeds=torch.ones(2, 4), photo=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError):
        M.measure_video(still(2, 32), photo_embed=torch.ones(4))


def test_pixel_measures_are_fast():
    frames = translating(4)
    M.measure_video(frames)  # warm up (OpenCV import and first call)
    start = time.perf_counter()
    for _ in range(3):
        M.measure_video(frames)
    assert (time.perf_counter() - start) / 3 < 0.25  # about 0.035 s on 2 CPU cores; generous for slow CI


def test_result_is_json_ready_without_an_encoder():
    m = M.measure_video(translating(4))
    assert json.loads(json.dumps(m)) == m
    assert m["version"] == M.MEASURES_VERSION
    assert m["conformity"] is None and m["conformity_min"] is None and m["temporal_consistency"] is None


# --------------------------------------------------------------------------------------------------------------
# CLIP measures


def test_cosine_helpers_on_known_vectors():
    photo = np.array([1.0, 0.0])
    frames = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    mean, low = M.conformity_from(photo, torch.from_numpy(frames))
    assert mean == pytest.approx((1 + 0 + 2**-0.5) / 3) and low == pytest.approx(0.0, abs=1e-7)
    assert M.temporal_consistency_from(frames) == pytest.approx((0 + 2**-0.5) / 2)
    assert M.temporal_consistency_from(frames[:1]) == 1.0


def test_a_video_equal_to_the_photo_conforms(image_encoder):
    frames = still(6, 64)
    m = M.measure_video(frames, photo=as_photo(frames[0]), image_encoder=image_encoder)
    assert m["conformity"] == pytest.approx(1.0, abs=1e-5)
    assert m["conformity_min"] == pytest.approx(1.0, abs=1e-5)
    assert m["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    # A photo unrelated to the video conforms less.
    other = M.measure_video(frames, photo=as_photo(unrelated(1, 64)[0]), image_encoder=image_encoder)
    assert other["conformity"] < 0.99


def test_unrelated_frames_are_less_consistent_than_a_still_video(image_encoder):
    noisy = M.measure_video(unrelated(), image_encoder=image_encoder)
    calm = M.measure_video(still(8, 64), image_encoder=image_encoder)
    assert calm["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert noisy["temporal_consistency"] < 0.95  # observed about 0.77 with the tiny random tower
    assert noisy["conformity"] is None  # no photo, no conformity


def test_embeddings_do_not_depend_on_the_chunk_size(image_encoder):
    frames = unrelated(5, 48)
    photo = as_photo(frames[0])
    a, pa = M.embed_frames(image_encoder, frames, photo, chunk=2)
    b, pb = M.embed_frames(image_encoder, frames, photo)
    assert a.dtype == torch.float32 and a.shape == (5, image_encoder.cfg.embed_dim) and pa.shape == (a.shape[1],)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pa, a[0], atol=1e-5, rtol=1e-5)
    # Precomputed embeddings give the same measures as the encoder.
    direct = M.measure_video(frames, photo=photo, image_encoder=image_encoder)
    assert M.measure_video(frames, frame_embeds=a, photo_embed=pa) == direct
