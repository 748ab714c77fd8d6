"""The VAE (REFERENCE 3.2): diffusers' ``AutoencoderKL`` with MagicAnimate's scaling.

Export contracts (N frames, dynamic):

| call     | input                                      | output                                  |
|----------|--------------------------------------------|-----------------------------------------|
| encode   | images (N, 3, H, W) float, pixel values 0..255 | latents (N, 4, H/8, W/8): mean x 0.18215 |
| decode   | latents (N, 4, H/8, W/8) float              | images (N, 3, H, W) in [0, 1]            |
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

# The original hard-codes SD's latent scale (the config's scaling_factor agrees).
LATENT_SCALE = 0.18215


class VAE(nn.Module):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        self.vae = AutoencoderKL.from_config(cfg)

    def encode(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W), 0..255 -> latents (N, 4, H/8, W/8). The distribution's mean,
        no sampling."""
        x = images / 127.5 - 1
        moments = self.vae.encoder(x)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean = moments[:, : moments.shape[1] // 2]
        return mean * LATENT_SCALE

    def decode_raw(self, latents: Tensor) -> Tensor:
        """latents -> the decoder's output in about [-1, 1], before the clamp."""
        z = latents * (1 / LATENT_SCALE)
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

    def decode(self, latents: Tensor) -> Tensor:
        """latents (N, 4, h, w) -> images (N, 3, 8h, 8w) in [0, 1]."""
        return torch.clamp(self.decode_raw(latents) / 2 + 0.5, 0, 1)


class VAEEncoder(nn.Module):
    """``VAE.encode`` as a module of its own (for export)."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, images: Tensor) -> Tensor:
        return self.vae.encode(images)


class VAEDecoder(nn.Module):
    """``VAE.decode`` as a module of its own (for export)."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents)
