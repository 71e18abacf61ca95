"""The whole model: the five networks DynamiCrafter runs, built from one :class:`ModelConfig`."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .encoders import ImageEncoder, TextEncoder, build_vae
from .resampler import Resampler
from .toon_vae import build_toon_vae
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
        self.vae = build_toon_vae(cfg.vae) if cfg.vae.decoder == "dualref" else build_vae(cfg.vae)
        # Where the networks compute and in which dtype, fixed when the weights are loaded (the loaders set them):
        # parts may sit elsewhere between stages (offloading) or be stored in float8, so neither is read from them.
        self.device, self.dtype = torch.device("cpu"), torch.float32
