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

The forward is split in two (:meth:`ControlNet.embed`, :meth:`ControlNet.forward_embedded`)
because the conditioning embedding depends only on the driving frames: the runtime may
embed each frame once per request instead of once per step (the original), a third of
the ControlNet's FLOPs at the ``mid`` size. ``forward`` is the two composed.

| name            | shape               | dtype       | meaning                                  |
|-----------------|---------------------|-------------|------------------------------------------|
| cond            | (N, 3, H, W)        | float       | ``embed``'s input (as above)              |
| -> embedding    | (N, C_0, h, w)      | float       | ``controlnet_cond_embedding(cond)``      |
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from diffusers import ControlNetModel
from torch import Tensor, nn

from ..errors import ModelLoadError


class ControlNet(nn.Module):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        self.net = ControlNetModel.from_config(cfg)
        c = self.net.config
        # forward_embedded re-states diffusers' ControlNetModel.forward for MagicAnimate's
        # configuration only (diffusers offers no entry point after the conditioning
        # embedding); refuse configurations it does not cover.
        if c.class_embed_type is not None or c.addition_embed_type is not None or c.global_pool_conditions:
            raise ModelLoadError("controlnet config: class/addition embeddings and global pooling are not supported")

    def embed(self, cond: Tensor) -> Tensor:
        """(N, 3, H, W) DensePose frames in [0, 1] -> (N, C_0, h, w) conditioning embedding."""
        return self.net.controlnet_cond_embedding(cond)

    def forward_embedded(self, latents: Tensor, timestep: Tensor, text_embedding: Tensor,
                         embedding: Tensor, skips_only: Optional[int] = None) -> tuple[Tensor, ...]:
        """The ControlNet after its conditioning embedding: diffusers' ControlNetModel.forward
        steps 1-6 (time embedding, conv_in + embedding, down blocks, mid block, zero convs;
        conditioning scale 1.0 is the identity). Returns the 12 down residuals and mid.

        ``skips_only=k`` (the shallow steps of deep-feature reuse, ``runtime/modes.py``):
        only the first k down residuals, computing the down blocks only as far as they
        need (no mid block); the same values as the first k of a whole call."""
        net, n = self.net, latents.shape[0]
        text = text_embedding.expand(n, -1, -1)
        emb = net.time_embedding(net.time_proj(timestep.reshape(1).expand(n)).to(latents.dtype))
        sample = net.conv_in(latents) + embedding
        skips = [sample]
        for block in net.down_blocks:
            if skips_only is not None and len(skips) >= skips_only:
                break
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=text)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips.extend(res)
        if skips_only is not None:
            return tuple(zero_conv(s) for s, zero_conv in zip(skips[:skips_only], net.controlnet_down_blocks))
        sample = net.mid_block(sample, emb, encoder_hidden_states=text)
        down = [zero_conv(s) for s, zero_conv in zip(skips, net.controlnet_down_blocks)]
        return (*down, net.controlnet_mid_block(sample))

    def forward(self, latents: Tensor, timestep: Tensor, text_embedding: Tensor, cond: Tensor) -> tuple[Tensor, ...]:
        return self.forward_embedded(latents, timestep, text_embedding, self.embed(cond))
