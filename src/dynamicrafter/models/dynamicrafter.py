"""The whole model: the five networks DynamiCrafter runs, built from one :class:`ModelConfig`."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .encoders import ImageEncoder, TextEncoder, build_vae
from .resampler import Resampler
from .unet import UNet3D


class DynamiCrafter(nn.Module):
    """Container of the networks; the pipeline functions use them, this module has no forward of its own.

    Sub-module names are the prefixes of our state dict: ``unet.``, ``image_proj.``, ``text_encoder.``,
    ``image_encoder.``, ``vae.``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet3D(cfg.unet)
        self.image_proj = Resampler(cfg.resampler)
        self.text_encoder = TextEncoder(cfg.text)
        self.image_encoder = ImageEncoder(cfg.vision)
        self.vae = build_vae(cfg.vae)
