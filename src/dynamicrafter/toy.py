"""The toy world the ``toy`` model is trained on, and the tracker that checks its videos.

A scene is one disc or square of one colour on a plain background of another (both from ``PALETTE``), moving in a straight line at constant speed
(``DISTANCE`` pixels over the video) left, right, up or down; the prompt names the direction.  ``render`` draws a
scene's frames with anti-aliased edges, so that the object moves by fractions of a pixel too; ``track`` finds the
object in any video (ours or the model's) and measures where it went.  ``scripts/train_toy.py`` trains the model on
these scenes; the tests use the trained model as an oracle through ``track``.

Letters: N scenes, T frames, S size (pixels, square frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SIZE, FRAMES = 64, 16  # the toy model's frames: 64 x 64 pixels, 16 of them
DISTANCE = 16.0  # pixels the object travels from the first frame to the last
RADIUS_MAX = 7.0  # discs' radius and squares' half side: 5 to 7 pixels
DIRECTIONS = ("left", "right", "up", "down")
UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y downwards
SHAPES = ("disc", "square")
# object and background colours: two different ones of these (a small VAE learns a few flat colours quickly)
PALETTE = (
    (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.9, 0.2, 0.15), (0.15, 0.7, 0.25), (0.15, 0.3, 0.9), (0.95, 0.85, 0.1),
    (0.1, 0.8, 0.85), (0.85, 0.25, 0.8), (0.5, 0.5, 0.5),
)
# the prompts it is trained on; the first is the canonical one (README, tests), the others teach it variety
TEMPLATES = ("moving {d}", "a {s} moving {d}", "the {s} moves {d}", "{d}")


def prompt(direction: str, shape: str = "disc", template: int = 0) -> str:
    return TEMPLATES[template].format(d=direction, s=shape)


@dataclass(frozen=True)
class Scene:
    """One toy video: ``shape`` of ``radius`` pixels (half the side of a square) starting at (``x``, ``y``) and
    moving ``direction``; ``color`` and ``background`` RGB in [0, 1]."""

    shape: str
    direction: str
    x: float
    y: float
    radius: float
    color: tuple[float, float, float]
    background: tuple[float, float, float]

    @property
    def end(self) -> tuple[float, float]:
        dx, dy = UNIT[self.direction]
        return self.x + DISTANCE * dx, self.y + DISTANCE * dy


def random_scene(rng: np.random.Generator, size: int = SIZE, direction: str | None = None) -> Scene:
    """A scene starting in the central square from which every direction's path stays inside the frame, so that
    where the object starts says nothing about where it goes (only the prompt does); object and background of two
    different palette colours."""
    direction = direction or str(rng.choice(DIRECTIONS))
    shape = str(rng.choice(SHAPES))
    radius = float(rng.uniform(5.0, 7.0))
    lo, hi = RADIUS_MAX + 1.0 + DISTANCE, size - RADIUS_MAX - 1.0 - DISTANCE  # 24 .. 40 at 64 pixels
    x, y = (float(v) for v in rng.uniform(lo, hi, 2))
    background, color = rng.choice(len(PALETTE), 2, replace=False)
    return Scene(shape, direction, x, y, radius, PALETTE[color], PALETTE[background])


def render(scene: Scene, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """The scene's video (3, T, S, S) float32 in [-1, 1]."""
    dx, dy = UNIT[scene.direction]
    step = torch.linspace(0.0, DISTANCE, frames)
    cx = (scene.x + dx * step).view(frames, 1, 1)
    cy = (scene.y + dy * step).view(frames, 1, 1)
    grid = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    ox, oy = grid.view(1, 1, size) - cx, grid.view(1, size, 1) - cy
    if scene.shape == "disc":
        dist = torch.sqrt(ox**2 + oy**2)
    else:
        dist = torch.maximum(ox.abs(), oy.abs())
    cover = (scene.radius - dist + 0.5).clamp(0.0, 1.0)  # (T, S, S): 1 inside, 0 outside, a 1-pixel ramp
    color = torch.tensor(scene.color, dtype=torch.float32).view(3, 1, 1, 1)
    background = torch.tensor(scene.background, dtype=torch.float32).view(3, 1, 1, 1)
    video = background + (color - background) * cover.unsqueeze(0)
    return video * 2.0 - 1.0


def first_frame_uint8(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene's first frame as an (S, S, 3) uint8 picture (the image a user animates)."""
    frame = render(scene, frames=1, size=size)[:, 0]
    return ((frame + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------------------------------
# Tracking


@dataclass(frozen=True)
class Track:
    """Where the object went: its centre per frame (T, 2) as (x, y) pixels, the displacement first -> last, and
    the direction that displacement points to (``still`` when it is under a quarter of ``DISTANCE``)."""

    centres: np.ndarray
    dx: float
    dy: float

    @property
    def distance(self) -> float:
        return math.hypot(self.dx, self.dy)

    @property
    def direction(self) -> str:
        if self.distance < DISTANCE / 4:
            return "still"
        if abs(self.dx) >= abs(self.dy):
            return "right" if self.dx > 0 else "left"
        return "down" if self.dy > 0 else "up"


def track(frames: np.ndarray) -> Track:
    """Track the one object of a toy video, (T, S, S, 3) uint8: the background is the median colour of the first
    frame's border, the object in each frame the pixels far from it (over half the largest difference), weighted by
    that difference."""
    video = frames.astype(np.float32) / 255.0
    first = video[0]
    border = np.concatenate([first[0], first[-1], first[:, 0], first[:, -1]])
    background = np.median(border, axis=0)
    diff = np.linalg.norm(video - background, axis=-1)  # (T, S, S)
    ys, xs = np.mgrid[0 : video.shape[1], 0 : video.shape[2]] + 0.5
    centres = []
    for d in diff:
        weight = np.where(d > 0.5 * d.max(), d, 0.0) if d.max() > 0 else np.ones_like(d)
        total = weight.sum()
        centres.append(((weight * xs).sum() / total, (weight * ys).sum() / total))
    c = np.array(centres)
    return Track(c, float(c[-1, 0] - c[0, 0]), float(c[-1, 1] - c[0, 1]))


__all__ = [
    "DIRECTIONS", "DISTANCE", "FRAMES", "PALETTE", "SHAPES", "SIZE", "TEMPLATES", "Scene", "Track", "first_frame_uint8",
    "prompt", "random_scene", "render", "track",
]
