"""The DensePose ControlNet (REFERENCE 3.4): diffusers' ``ControlNetModel`` behind a flat
signature.

Export contract of :meth:`ControlNet.forward` (N = a batch of frames, dynamic):

| name            | shape               | dtype       | meaning                                  |
|-----------------|---------------------|-------------|------------------------------------------|
| latents         | (N, 4, h, w)        | float       | noisy latents of N frames                |
| timestep        | (1,)                | float/int64 | diffusion timestep t                     |
| text_embedding  | (1, 77, Cx)         | float       | CLIP embedding of "" (cond half)         |
| cond            | (N, 3, H, W)        | float       | DensePose RGB frames / 255, in [0, 1]    |
| -> down_i       | (N, C_i, h_i, w_i)  | float       | i < 12: residuals for the 12 skip features |
| -> mid          | (N, C_mid, h/8, w/8)| float       | residual for the mid block output        |

Conditioning scale is 1.0, as in the original.
"""

from __future__ import annotations

from typing import Any, Mapping

from diffusers import ControlNetModel
from torch import Tensor, nn


class ControlNet(nn.Module):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        self.net = ControlNetModel.from_config(cfg)

    def forward(self, latents: Tensor, timestep: Tensor, text_embedding: Tensor, cond: Tensor) -> tuple[Tensor, ...]:
        n = latents.shape[0]
        down, mid = self.net(
            latents,
            timestep.reshape(1).expand(n),
            encoder_hidden_states=text_embedding.expand(n, -1, -1),
            controlnet_cond=cond,
            conditioning_scale=1.0,
            return_dict=False,
        )
        return (*down, mid)
