"""The temporal UNet (REFERENCE 3.5, 3.6): SD 1.5's UNet inflated to video.

Export contract of :meth:`TemporalUNet.guided` (one 16-frame window, the production call):

| name            | shape                       | dtype        | meaning                              |
|-----------------|-----------------------------|--------------|--------------------------------------|
| latents         | (1, 4, F, h, w)             | float        | noisy latents of the window's frames |
| timestep        | (1,)                        | float/int64  | diffusion timestep t                 |
| text_embedding  | (1, 77, Cx)                 | float        | CLIP embedding of "" (a constant)    |
| down_residual_i | (F, C_i, h_i, w_i), i<12    | float        | ControlNet residuals of the frames   |
| mid_residual    | (F, C_mid, h/8, w/8)        | float        | ControlNet mid residual              |
| bank_j          | (1, h_j*w_j, C_j), j<10     | float        | reference bank (appearance encoder)  |
| -> eps_uncond   | (1, 4, F, h, w)             | float        | noise prediction, unconditional half |
| -> eps_cond     | (1, 4, F, h, w)             | float        | noise prediction, conditional half   |

F is the window length (16); h, w = size/8. The ControlNet residuals are the same for both
CFG halves (the original feeds the same residuals to both), so they are per frame, not per
batch row. How :meth:`TemporalUNet.guided` shares the two halves' common prefix is written
down in one place: ``models/layers.py``, "CFG prefix sharing".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn

from .config import MotionModuleConfig, UNetConfig
from .layers import (
    FAST, ONE_HALF, Arithmetic, CFGRows, FrameGroupNorm, add_shared, build_blocks, count_bank_blocks,
    run_down_blocks, shared_rows,
)


def time_embedding(unet: nn.Module, timestep: Tensor, dtype: torch.dtype) -> Tensor:
    """SD's sinusoidal timestep embedding -> MLP: (1, time_embed_dim). One timestep for the
    whole call; the sinusoid is computed in float32 (as the original) and then cast."""
    return unet.time_embedding(unet.time_proj(timestep.reshape(1)).to(dtype))


def to_frames(latents: Tensor) -> Tensor:
    """(B, C, F, H, W) -> frame-major (B*F, C, H, W)."""
    b, c, f, h, w = latents.shape
    return latents.transpose(1, 2).reshape(b * f, c, h, w)


def from_frames(x: Tensor, num_frames: int) -> Tensor:
    """Frame-major (B*F, C, H, W) -> (B, C, F, H, W)."""
    n, c, h, w = x.shape
    return x.reshape(n // num_frames, num_frames, c, h, w).transpose(1, 2)


class TemporalUNet(nn.Module):
    """SD UNet + AnimateDiff motion modules + MagicAnimate reference attention.

    Parameter names are SD's UNet2DConditionModel names plus the motion checkpoint's
    ``*.motion_modules.*`` names, so both files load directly.
    """

    def __init__(self, config: UNetConfig, motion: MotionModuleConfig = MotionModuleConfig()):
        super().__init__()
        self.config = config
        self.motion_config = motion
        c0 = config.block_out_channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_proj = Timesteps(c0, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim)
        self.down_blocks, self.mid_block, self.up_blocks = build_blocks(config, motion)
        self.conv_norm_out = FrameGroupNorm(config.norm_num_groups, c0, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)
        self.num_bank = count_bank_blocks(self.mid_block, self.up_blocks)

    # ------------------------------------------------------------------ public calls
    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_embedding: Tensor,
        down_residuals: Optional[Sequence[Tensor]] = None,
        mid_residual: Optional[Tensor] = None,
        bank: Optional[Sequence[Tensor]] = None,
        arithmetic: Arithmetic = FAST,
    ) -> Tensor:
        """One full forward, as the original runs each CFG half.

        latents (B, 4, F, h, w) -> eps (B, 4, F, h, w). With ``bank`` (the conditional half)
        every mid/up self-attention uses reference attention; without it (the
        unconditional half) plain self-attention. Residuals are per frame (see module doc).
        ``arithmetic`` (:class:`~.layers.Arithmetic`) chooses how some work is arranged;
        ``layers.ORIGINAL`` does it the original's way (same function, more work: the
        reference-schedule baseline).
        """
        f = latents.shape[2]
        x = to_frames(latents)
        temb = time_embedding(self, timestep, x.dtype)
        h, skips = self._down(x, temb, text_embedding, f, down_residuals, arithmetic)
        refs = list(bank) if bank is not None else [None] * self.num_bank
        self._check_bank(refs)
        h = self._mid(h, temb, text_embedding, f, refs[0], mid_residual, ONE_HALF, arithmetic)
        h = self._up(h, skips, temb, text_embedding, f, refs[1:], ONE_HALF, arithmetic)
        return self._out(h, f, arithmetic)

    def guided(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_embedding: Tensor,
        down_residuals: Optional[Sequence[Tensor]],
        mid_residual: Optional[Tensor],
        bank: Sequence[Tensor],
        arithmetic: Arithmetic = FAST,
    ) -> tuple[Tensor, Tensor]:
        """Both CFG halves of B windows: latents (B, 4, F, h, w) -> (eps_uncond, eps_cond),
        each (B, 4, F, h, w). B is 1 in the export contract; the residuals are (F, ...)
        shared by the B windows or (B*F, ...) one per window frame.

        The halves share everything up to the first mid-block self-attention, which is
        computed once and forks the B*F shared rows into both halves (unconditional rows
        first, then conditional); the up path consumes the shared skip features for both
        (``models/layers.py``, "CFG prefix sharing"). Equal to ``forward(bank=None)`` and
        ``forward(bank=bank)`` up to float rounding. ``arithmetic`` as in :meth:`forward`
        (the bank is always projected once); with ``arithmetic.cfg_sequential`` the halves
        run one after the other after the shared prefix (:meth:`_halves_in_turn`).
        """
        b, f = latents.shape[0], latents.shape[2]
        refs = list(bank)
        self._check_bank(refs)
        x = to_frames(latents)
        temb = time_embedding(self, timestep, x.dtype)
        h, skips = self._down(x, temb, text_embedding, f, down_residuals, arithmetic)  # shared rows
        if arithmetic.cfg_sequential:
            h = self.mid_block.resnets[0](h, temb, f, arithmetic)  # still shared
            eps_u, eps_c = self._halves_in_turn((h, h), skips, temb, text_embedding, f, refs, arithmetic,
                                                mid=True, mid_residual=mid_residual,
                                                finish=lambda y: self._out(y, f, arithmetic))
            return eps_u, eps_c
        # the mid self-attention forks the shared rows: from there both halves, 2 * B * F rows
        h = self._mid(h, temb, text_embedding, f, refs[0], mid_residual, CFGRows.fork(b * f), arithmetic)
        h = self._up(h, skips, temb, text_embedding, f, refs[1:], CFGRows.halves(b * f), arithmetic)
        eps = self._out(h, f, arithmetic)
        return eps[:b], eps[b:]

    def shallow_skips(self, depth: int) -> int:
        """Skip features (and so ControlNet down residuals) the last ``depth`` up blocks read:
        the first ones of the down path."""
        if not 1 <= depth < len(self.up_blocks):
            raise ValueError(f"cache depth must be in 1..{len(self.up_blocks) - 1}, got {depth}")
        return sum(len(blk.resnets) for blk in self.up_blocks[len(self.up_blocks) - depth:])

    def cached(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_embedding: Tensor,
        down_residuals: Optional[Sequence[Tensor]],
        mid_residual: Optional[Tensor],
        bank: Sequence[Tensor],
        depth: int,
        deep: Optional[Tensor] = None,
        guided: bool = True,
        arithmetic: Arithmetic = FAST,
    ) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """Deep-feature reuse (``runtime/modes.py``): -> (eps_uncond or None, eps_cond, deep).

        ``deep`` None: the whole UNet, as :meth:`guided` (``guided``) or :meth:`forward`
        with the bank (the conditional half alone), computed the same way; also returns
        ``deep``, the feature entering the last ``depth`` up blocks (both halves' rows when
        guided). ``deep`` given (from a whole call of the same window): only the shallow
        part: conv_in and the down path up to the first ``shallow_skips(depth)`` skips (the
        residuals given are those first ones), then the last ``depth`` up blocks on
        ``deep`` and the output head; the mid block and the deeper blocks do not run.
        A guided ``deep`` serves a conditional-only call through its conditional rows.
        ``arithmetic.cfg_sequential`` (guided): the halves in turn after the shared prefix,
        in the whole call's deep part and in the tail alike; ``deep`` is the same rows.
        """
        b, f = latents.shape[0], latents.shape[2]
        refs = list(bank)
        self._check_bank(refs)
        n = len(self.up_blocks)
        tail = self.up_blocks[n - depth:]
        n_tail = sum(len(blk.attentions) for blk in tail)  # the tail's bank tensors: the last ones
        deep_refs, tail_refs = refs[: len(refs) - n_tail], refs[len(refs) - n_tail :]
        sequential = guided and arithmetic.cfg_sequential
        cfg = CFGRows.halves(b * f) if guided else ONE_HALF
        x = to_frames(latents)
        temb = time_embedding(self, timestep, x.dtype)
        if deep is None:
            h, skips = self._down(x, temb, text_embedding, f, down_residuals, arithmetic)
            if sequential:
                h = self.mid_block.resnets[0](h, temb, f, arithmetic)  # still shared
                deep = torch.cat(self._halves_in_turn((h, h), skips, temb, text_embedding, f, deep_refs, arithmetic,
                                                      self.up_blocks[: n - depth], True, mid_residual))
                del skips[self.shallow_skips(depth):]  # what the deep part consumed (each half read a copy)
            else:
                h = self._mid(h, temb, text_embedding, f, refs[0], mid_residual,
                              CFGRows.fork(b * f) if guided else ONE_HALF, arithmetic)
                deep = self._up(h, skips, temb, text_embedding, f, deep_refs[1:], cfg, arithmetic,
                                self.up_blocks[: n - depth])
            h = deep
        else:
            _, skips = self._down(x, temb, text_embedding, f, down_residuals, arithmetic,
                                  stop_after=self.shallow_skips(depth))
            h = deep if guided or deep.shape[0] == b * f else deep[b * f :]  # a guided deep's conditional rows
        if sequential:
            eps_u, eps_c = self._halves_in_turn((h[: b * f], h[b * f :]), skips, temb, text_embedding, f, tail_refs,
                                                arithmetic, tail, finish=lambda y: self._out(y, f, arithmetic))
            return eps_u, eps_c, deep
        h = self._up(h, skips, temb, text_embedding, f, tail_refs, cfg, arithmetic, tail)
        eps = self._out(h, f, arithmetic)
        return (eps[:b], eps[b:], deep) if guided else (None, eps, deep)

    # ------------------------------------------------------------------ pieces
    def _check_bank(self, refs: list) -> None:
        if len(refs) != self.num_bank:
            raise ValueError(f"reference bank has {len(refs)} tensors, the UNet has {self.num_bank} mid/up blocks")

    def _down(self, x, temb, context, f, down_residuals, arithmetic, stop_after=None):
        h, skips = run_down_blocks(self.down_blocks, self.conv_in(x), temb, context, f, arithmetic, stop_after)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down residuals, got {len(down_residuals)}")
            skips = [add_shared(s, r) for s, r in zip(skips, down_residuals)]
        return h, skips

    def _mid(self, h, temb, context, f, ref, mid_residual, cfg: CFGRows, arithmetic):
        """The mid block (``cfg``: ONE_HALF, or a fork into both CFG halves at its
        self-attention), then the ControlNet's mid residual."""
        h = self.mid_block.resnets[0](h, temb, f, arithmetic)
        return self._mid_rest(h, temb, context, f, ref, mid_residual, cfg, arithmetic)

    def _mid_rest(self, h, temb, context, f, ref, mid_residual, cfg: CFGRows, arithmetic):
        """The mid block after its first ResNet (whose output ``h`` is), then the mid residual."""
        mid = self.mid_block
        h = mid.attentions[0](h, context, ref=ref, cfg=cfg, arithmetic=arithmetic)
        h = mid.resnets[1](h, temb, f, arithmetic)
        return h if mid_residual is None else add_shared(h, mid_residual)

    def _halves_in_turn(self, hs, skips, temb, context, f, refs, arithmetic, blocks=None, mid: bool = False,
                        mid_residual=None, finish: Optional[Callable[[Tensor], Tensor]] = None) -> list[Tensor]:
        """``Arithmetic.cfg_sequential``: the unconditional half, then the conditional half,
        each a full forward's rest (``ONE_HALF``; plain self-attention, then reference
        attention with ``refs``) from its input in ``hs`` (B*F rows each): with ``mid``,
        ``hs`` are the mid block's first ResNet output (shared by both) and the rest
        starts with :meth:`_mid_rest` (``refs[0]``, ``mid_residual``); then the up blocks
        ``blocks`` (all: None). Each half reads its own copy of ``skips``. ``finish``
        (e.g. the output head) runs on a half before the next starts. The bank is
        projected once per block, as in every guided call."""
        once = replace(arithmetic, bank_kv_per_frame=False)
        out = []
        for h, half_refs in zip(hs, ([None] * len(refs), refs)):
            if mid:
                h = self._mid_rest(h, temb, context, f, half_refs[0], mid_residual, ONE_HALF, once)
                half_refs = half_refs[1:]
            h = self._up(h, list(skips), temb, context, f, half_refs, ONE_HALF, once, blocks)
            out.append(h if finish is None else finish(h))
        return out

    def _up(self, h, skips, temb, context, f, refs, cfg: CFGRows, arithmetic, blocks=None):
        refs = iter(refs)
        for blk in self.up_blocks if blocks is None else blocks:
            for j, resnet in enumerate(blk.resnets):
                skip = shared_rows(skips.pop(), h.shape[0])  # computed once, fed to both halves
                h = resnet(torch.cat([h, skip], dim=1), temb, f, arithmetic)
                if len(blk.attentions):
                    h = blk.attentions[j](h, context, ref=next(refs), cfg=cfg, arithmetic=arithmetic)
                if len(blk.motion_modules):
                    h = blk.motion_modules[j](h, f, arithmetic)
            if hasattr(blk, "upsamplers"):
                h = blk.upsamplers[0](h)
        return h

    def _out(self, h, f, arithmetic):
        h = self.conv_out(F.silu(self.conv_norm_out(h, f, arithmetic.group_norm)))
        return from_frames(h, f)
