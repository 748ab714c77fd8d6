"""The appearance encoder (reference net, REFERENCE 3.3).

An SD-UNet-shaped 2D UNet run on the clean reference latent whose only product is the
reference bank: the ``norm1`` output of every transformer block of its mid and up blocks.
Our module stops after the last bank tensor, and it does not even hold the layers after
it (the released checkpoint lacks their weights; :attr:`AppearanceEncoder.pruned_keys`
lists the names a full checkpoint may carry and that loading ignores).

Export contract of :meth:`AppearanceEncoder.forward`:

| name           | shape              | dtype       | meaning                              |
|----------------|--------------------|-------------|--------------------------------------|
| latent         | (1, 4, h, w)       | float       | VAE latent of the source image       |
| timestep       | (1,)               | float/int64 | the current diffusion timestep       |
| text_embedding | (1, 77, Cx)        | float       | CLIP embedding of ""                 |
| -> bank_j      | (1, h_j*w_j, C_j)  | float       | j < num_bank (10 for SD 1.5), module order: mid, up blocks |
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn

from .config import UNetConfig
from .layers import FAST, Arithmetic, build_blocks, count_bank_blocks, run_down_blocks
from .unet import time_embedding


class AppearanceEncoder(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c0 = config.block_out_channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_proj = Timesteps(c0, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim)
        self.down_blocks, self.mid_block, self.up_blocks = build_blocks(config, motion=None)
        self.num_bank = count_bank_blocks(self.mid_block, self.up_blocks)
        full = set(self.state_dict()) | {
            f"{m}.{p}" for m in ("conv_norm_out", "conv_out") for p in ("weight", "bias")
        }
        self._prune_after_last_bank_block()
        #: checkpoint keys of a full UNet that the bank does not need (ignored on load)
        self.pruned_keys = frozenset(full - set(self.state_dict()))

    def _prune_after_last_bank_block(self) -> None:
        """Drop every layer after the last bank tensor (the last mid/up transformer block's
        norm1): later up blocks, later resnets/attentions of its block, its upsampler, and
        everything of that transformer after norm1."""
        last_block = max(i for i, b in enumerate(self.up_blocks) if len(b.attentions))
        self.up_blocks = self.up_blocks[: last_block + 1]
        blk = self.up_blocks[last_block]
        n_att = len(blk.attentions)
        blk.resnets = blk.resnets[:n_att]
        if hasattr(blk, "upsamplers"):
            del blk.upsamplers
        last = blk.attentions[-1]
        del last.proj_out
        tb = last.transformer_blocks[0]
        for name in ("attn1", "norm2", "attn2", "norm3", "ff"):
            delattr(tb, name)

    def forward(self, latent: Tensor, timestep: Tensor, text_embedding: Tensor,
                arithmetic: Arithmetic = FAST) -> list[Tensor]:
        """latent (N, 4, h, w) -> the reference bank, ``num_bank`` tensors (N, L_j, C_j) (N is
        1 in the export contract; the original runs 2 identical copies). ``arithmetic``:
        its ``text_kv_per_frame`` (per copy, as the original), ``group_norm``, the spatial
        and cross ``*_sdpa`` and ``ff_chunk`` apply."""
        temb = time_embedding(self, timestep, latent.dtype)
        ctx = text_embedding
        h, skips = run_down_blocks(self.down_blocks, self.conv_in(latent), temb, ctx, 1, arithmetic)
        bank: list[Tensor] = []
        mid = self.mid_block
        h = mid.resnets[0](h, temb, 1, arithmetic)
        h = mid.attentions[0](h, ctx, bank_out=bank, arithmetic=arithmetic)
        h = mid.resnets[1](h, temb, 1, arithmetic)
        for blk in self.up_blocks:
            for j, resnet in enumerate(blk.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), temb, 1, arithmetic)
                if len(blk.attentions):
                    att = blk.attentions[j]
                    if len(bank) == self.num_bank - 1:  # the last bank tensor: stop here
                        bank.append(att.transformer_blocks[0].norm1(att.tokens(h)))
                        return bank
                    h = att(h, ctx, bank_out=bank, arithmetic=arithmetic)
            if hasattr(blk, "upsamplers"):
                h = blk.upsamplers[0](h)
        raise AssertionError("unreachable: the last up block holds the last bank tensor")
