"""Building blocks of MagicAnimate's UNets, frame-major.

Layout: a video batch is carried as frame-major 4D tensors ``(B*F, C, H, W)`` (sample b's
frames are rows ``b*F .. b*F+F-1``), so every per-frame operation (convolutions,
spatial transformers, up/down sampling) is a plain 2D op on a free view, and the few
operations that mix frames (the ResNet GroupNorm, the motion modules) take ``num_frames``
explicitly. The original keeps ``(B, C, F, H, W)`` and permutes around every 2D op; the
function is the same.

Where diffusers computes the reference function we use its modules (``Attention`` and
``FeedForward`` weight layouts, ``Downsample2D``, ``Upsample2D``, ``Timesteps``,
``TimestepEmbedding``); the attention arithmetic itself lives in :func:`attention` so that
reference attention (REFERENCE 3.6) can project the bank's keys and values once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..unet_memory import check_unet_memory
from .config import UNetConfig


# --------------------------------------------------------------------------- how the work is arranged
#: the ``scaled_dot_product_attention`` backends by the names Arithmetic uses
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
#: the kinds of attention with their own SDPA backend choice (``Arithmetic.<kind>_sdpa``)
ATTENTION_KINDS = ("spatial", "cross", "temporal")


@dataclass(frozen=True)
class Arithmetic:
    """How the UNet arranges work whose result is the same function (up to float rounding).

    The defaults are ours; :data:`ORIGINAL` is the way the original computes on a machine
    without xformers (every CPU), kept so that the reference-schedule benchmark measures
    the work the original does.

    Fields:
        bank_kv_per_frame: reference attention projects ``concat([frame, bank])`` for every
            frame (the original's ``attn1(h, concat([h] + bank))``) instead of the bank's
            keys/values once per block. Only in full forwards (the guided call always
            projects the bank once).
        text_kv_per_frame: cross-attention projects the text embedding's keys/values for
            every frame (the original repeats the embedding per frame,
            ``repeat(e, "b n c -> (b f) n c")``) instead of once per call.
        temporal_attention: "fused" (``scaled_dot_product_attention``) or "materialised":
            the motion modules' attention as the original's ``CrossAttention._attention``
            (``baddbmm`` scores, ``softmax``, ``bmm``), which it runs unless xformers is
            installed (xformers needs CUDA). Its spatial attention is diffusers'
            ``Attention`` (SDPA under PyTorch 2) in both.
        group_norm: the cross-frame GroupNorms (:class:`FrameGroupNorm`): "explicit"
            (``var_mean`` over a grouped view, then the affine map: several elementwise
            passes) or "fused": one ``F.group_norm`` kernel over the frames transposed
            into its spatial dims (a copy in and one out for NCHW memory; for NHWC memory
            none on the CPU, whose kernel reads NHWC, and the same two on CUDA, whose
            kernel reads NCHW). Both keep the statistics in float32 at least. On the CPU
            the fused one measured 2.8-30x faster per norm (docs/ARCHITECTURE.md).
        spatial_sdpa, cross_sdpa, temporal_sdpa: the ``scaled_dot_product_attention``
            backends each kind of attention may use, in order of preference, from
            :data:`SDPA_BACKENDS` ("cudnn", "flash", "efficient", "math"): spatial
            self-attention (with the reference bank: 4096 queries, 8192 keys at 512 px),
            cross-attention (77 text keys) and the motion modules' attention (16 frames,
            a batch of h*w pixels). ``()`` (the default): PyTorch's own choice. Every
            backend computes the same function; one that cannot run the shapes raises
            PyTorch's RuntimeError.
        ff_chunk: the GEGLU feed-forwards of the spatial and temporal transformer blocks
            run on ``ff_chunk`` tokens of every row at a time (the hidden layer, 8x the
            channels wide, exists for one chunk only). The FF is per token, so this is
            exact. None (the default): all tokens at once.
        cfg_sequential: the guided call (and deep-feature reuse's guided calls) computes
            the shared prefix (down path, skip features, the mid block's first ResNet)
            once, as always, then the rest of the UNet for the unconditional half and
            then for the conditional half, instead of both halves in one batch: half the
            mid/up working memory; the mid transformer's norm, proj_in and q/k/v (at
            1/8 size) are then computed for each half.
    """

    bank_kv_per_frame: bool = False
    text_kv_per_frame: bool = False
    temporal_attention: str = "fused"
    group_norm: str = "explicit"
    spatial_sdpa: tuple[str, ...] = ()
    cross_sdpa: tuple[str, ...] = ()
    temporal_sdpa: tuple[str, ...] = ()
    ff_chunk: Optional[int] = None
    cfg_sequential: bool = False

    def __post_init__(self):
        if self.temporal_attention not in ("fused", "materialised"):
            raise ValueError(f"temporal_attention must be 'fused' or 'materialised', got {self.temporal_attention!r}")
        if self.group_norm not in ("explicit", "fused"):
            raise ValueError(f"group_norm must be 'explicit' or 'fused', got {self.group_norm!r}")
        for kind in ATTENTION_KINDS:
            names = getattr(self, f"{kind}_sdpa")
            if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{kind}_sdpa must be a tuple of SDPA backend names, e.g. ('flash',), got {names!r}")
            unknown = [n for n in names if n not in SDPA_BACKENDS]
            if unknown:
                raise ValueError(f"{kind}_sdpa: unknown SDPA backend {unknown[0]!r}; "
                                 f"choose from {', '.join(SDPA_BACKENDS)}")
        if self.temporal_sdpa and self.temporal_attention != "fused":
            raise ValueError("temporal_sdpa chooses SDPA backends: it needs temporal_attention='fused'")
        check_unet_memory(self.cfg_sequential, self.ff_chunk)

    def sdpa(self, kind: str) -> tuple[str, ...]:
        """The SDPA backends chosen for attention ``kind`` ("spatial", "cross", "temporal")."""
        return getattr(self, f"{kind}_sdpa")


#: ours: shared projections and fused attention
FAST = Arithmetic()
#: the original's arrangement without xformers (CPU)
ORIGINAL = Arithmetic(bank_kv_per_frame=True, text_kv_per_frame=True, temporal_attention="materialised")


# --------------------------------------------------------------------------- CFG prefix sharing
# Classifier-free guidance runs the UNet twice per window, once per CFG half: unconditional
# (plain self-attention) and conditional (self-attention over [frame tokens, reference
# bank tokens]). Both halves get the same latents, timestep, text embedding and ControlNet
# residuals, so they differ only from the first self-attention that sees the bank on: the
# mid block's. TemporalUNet.guided therefore runs the down path, the mid block's first
# ResNet and that self-attention's q/k/v ONCE (the rows are "shared"); that self-attention
# forks its n shared rows into 2n (rows [:n] unconditional, [n:] conditional), and from
# there every layer runs on both halves in one batch. Three things follow, all here:
#   - each self-attention must know which rows are which half (CFGRows, passed down the
#     calls with the tensors: no module state);
#   - the forking layer's residual path (x + attention(x)) duplicates its input;
#   - tensors computed once for the shared rows and consumed later (the down path's skip
#     features, the ControlNet residuals) are repeated over the halves (shared_rows).
# The result equals two full forwards up to float rounding (tests/test_savings.py).
# Arithmetic.cfg_sequential keeps the shared prefix (and the mid block's first ResNet) but
# runs the rest for one half, then the other (TemporalUNet._halves_in_turn), each as a
# full forward's rest (ONE_HALF): half the mid/up working memory, the same function.
@dataclass(frozen=True)
class CFGRows:
    """Which rows of a batch of N rows are which CFG half.

    - ``CFGRows()`` (:data:`ONE_HALF`): every row is the same half: a full forward (the
      original's way, the appearance encoder, the down path). With a bank, every row uses
      reference attention; without, plain self-attention.
    - ``CFGRows.fork(n)``: the n rows are the copy both halves share; the layer returns
      2n rows, ``[:n]`` unconditional and ``[n:]`` conditional.
    - ``CFGRows.halves(n)``: rows ``[:n]`` are unconditional (plain self-attention), rows
      ``[n:]`` conditional (reference attention).
    """

    uncond: int = 0  #: leading unconditional rows (0: none; the whole batch is one half)
    forks: bool = False  #: the input is the shared copy: the layer doubles it

    @classmethod
    def fork(cls, n: int) -> "CFGRows":
        return cls(uncond=n, forks=True)

    @classmethod
    def halves(cls, n: int) -> "CFGRows":
        return cls(uncond=n, forks=False)

    def residual(self, x: Tensor) -> Tensor:
        """The residual-path input of a layer receiving these rows: both halves' copy of
        ``x`` when it forks, else ``x``."""
        return x.repeat(2, *([1] * (x.dim() - 1))) if self.forks else x


#: a full forward: the whole batch is one CFG half
ONE_HALF = CFGRows()


def shared_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` (M, ...) computed once for rows that ``rows`` (K*M) rows share (the CFG halves,
    or the B windows of a call), repeated K times along the batch."""
    return x if x.shape[0] == rows else x.repeat(rows // x.shape[0], *([1] * (x.dim() - 1)))


def add_shared(x: Tensor, r: Tensor) -> Tensor:
    """x (K*M, C, H, W) + r (M, C, H, W), r broadcast over the K leading groups without a
    copy: a window's per-frame ControlNet residual (M = F) for every window and CFG half,
    or per-row residuals (M = B*F) of B windows for both halves."""
    return (x.reshape(-1, *r.shape) + r).reshape(x.shape)


# --------------------------------------------------------------------------- attention
def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, fused: bool = True,
              backends: Sequence[str] = ()) -> Tensor:
    """Multi-head softmax attention with scale ``1/sqrt(head_dim)``.

    q: (N, Lq, C); k, v: (N, Lk, C) -> (N, Lq, C). Any float dtype; PyTorch's fused
    ``scaled_dot_product_attention`` keeps the softmax in float32 internally.
    ``backends``: names from :data:`SDPA_BACKENDS` SDPA may use, in order of preference
    (``()``: PyTorch's own choice); the choice is made while tracing, so it holds under
    ``torch.compile`` too (tests/test_arithmetic.py).
    ``fused=False`` computes it as the original's ``CrossAttention._attention`` does:
    heads folded into the batch, scores materialised by ``baddbmm``, softmax in the input
    dtype, ``bmm`` with the values (same function, more memory traffic).
    """
    n, lq, c = q.shape
    d = c // heads
    if not fused:
        def to_batch(x: Tensor) -> Tensor:  # (N, L, C) -> (N*heads, L, d)
            return x.reshape(n, -1, heads, d).permute(0, 2, 1, 3).reshape(n * heads, -1, d)

        qb, kb, vb = to_batch(q), to_batch(k), to_batch(v)
        scores = torch.baddbmm(torch.empty(qb.shape[0], lq, kb.shape[1], dtype=q.dtype, device=q.device),
                               qb, kb.transpose(-1, -2), beta=0, alpha=d**-0.5)
        out = torch.bmm(scores.softmax(dim=-1), vb)
        return out.reshape(n, heads, lq, d).permute(0, 2, 1, 3).reshape(n, lq, c)
    q = q.reshape(n, lq, heads, d).transpose(1, 2)
    k = k.reshape(n, -1, heads, d).transpose(1, 2)
    v = v.reshape(n, -1, heads, d).transpose(1, 2)
    if backends:
        with sdpa_kernel([SDPA_BACKENDS[b] for b in backends], set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(n, lq, c)


def self_attention(
    attn: Attention, h: Tensor, ref: Optional[Tensor] = None, cfg: CFGRows = ONE_HALF,
    ref_kv_per_frame: bool = False, backends: Sequence[str] = (),
) -> Tensor:
    """Self-attention of ``h`` (N, L, C) with optional MagicAnimate reference attention.

    Reference attention (REFERENCE 3.6): a row's keys/values are projected from
    ``concat([row tokens, ref tokens])``. Because the projections are per token, the bank's
    projection ``to_k(ref)`` / ``to_v(ref)`` is computed once (1, Lr, C) and shared by every
    row instead of once per frame: the same function, fewer FLOPs.

    - ``ref is None``: plain self-attention for every row.
    - ``ref`` given, ``cfg`` (:class:`CFGRows`): ``ONE_HALF``: reference attention for every
      row; ``halves(n)``: rows ``[:n]`` plain (the unconditional half), the rest with the
      reference; ``fork(n)``: ``h`` is the copy both halves share, q, k and v are computed
      once, and the result is (2N, L, C): rows ``[:N]`` plain, ``[N:]`` with the reference.
    - ``ref_kv_per_frame=True``: the original's way (full forwards only, ``ONE_HALF``):
      every row projects ``concat([row, ref])`` itself. Same function, more FLOPs; kept
      for the reference-schedule baseline.
    ``backends``: the SDPA backends it may use (``Arithmetic.spatial_sdpa``).
    Returns the attention output after ``to_out`` (before the residual add).
    """
    def sdpa(q_: Tensor, k_: Tensor, v_: Tensor) -> Tensor:
        return attention(q_, k_, v_, attn.heads, backends=backends)

    if ref is not None and ref_kv_per_frame:
        if cfg != ONE_HALF:
            raise ValueError("ref_kv_per_frame is the original's one-half-per-call schedule")
        kv = torch.cat([h, ref.expand(h.shape[0], -1, -1)], dim=1)
        return attn.to_out[0](sdpa(attn.to_q(h), attn.to_k(kv), attn.to_v(kv)))
    q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    if ref is None:
        out = sdpa(q, k, v)
    else:
        kr, vr = attn.to_k(ref), attn.to_v(ref)  # (1, Lr, C), shared by every frame

        def with_ref(q_, k_, v_):
            n = q_.shape[0]
            k_ = torch.cat([k_, kr.expand(n, -1, -1)], dim=1)
            v_ = torch.cat([v_, vr.expand(n, -1, -1)], dim=1)
            return sdpa(q_, k_, v_)

        if cfg.forks:
            out = torch.cat([sdpa(q, k, v), with_ref(q, k, v)], dim=0)
        elif cfg.uncond > 0:
            p = cfg.uncond
            out = torch.cat([sdpa(q[:p], k[:p], v[:p]), with_ref(q[p:], k[p:], v[p:])], dim=0)
        else:
            out = with_ref(q, k, v)
    return attn.to_out[0](out)


def cross_attention(attn: Attention, h: Tensor, context: Tensor, kv_per_frame: bool = False,
                    backends: Sequence[str] = ()) -> Tensor:
    """Cross-attention of ``h`` (N, L, C) to ``context`` (1, Lc, Cx), shared by all rows:
    its keys and values are projected once (``kv_per_frame``: once per row, as the
    original, which repeats the context per frame); ``backends``: the SDPA backends it may
    use (``Arithmetic.cross_sdpa``). Returns the output after ``to_out``."""
    n = h.shape[0]
    if kv_per_frame:
        ctx = context.expand(n, -1, -1)
        k, v = attn.to_k(ctx), attn.to_v(ctx)
    else:
        k = attn.to_k(context).expand(n, -1, -1)
        v = attn.to_v(context).expand(n, -1, -1)
    return attn.to_out[0](attention(attn.to_q(h), k, v, attn.heads, backends=backends))


# --------------------------------------------------------------------------- resnets
class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics span (channel group, F, H, W) jointly.

    Input (B*F, C, H, W) frame-major; the 16 frames of a window share their statistics
    (REFERENCE 3.5: AnimateDiff v1 applies a 2D ``nn.GroupNorm`` to a 5D tensor).
    diffusers' ``ResnetBlock2D`` normalises each frame on its own, which changes the output
    by several percent, so this is ours. Statistics are computed in float32 at least
    whatever the input dtype (fp16 variance over ~1M elements loses precision; float64
    inputs keep float64).
    With ``num_frames == 1`` it is an ordinary GroupNorm (the 2D appearance encoder).

    ``mode`` (``Arithmetic.group_norm``): "explicit" computes the statistics with
    ``var_mean`` on a grouped view and applies them and the affine map elementwise;
    "fused" runs PyTorch's one GroupNorm kernel on the frames moved next to the pixels,
    (B, C, F*H, W), whose groups are then exactly (channel group, F, H, W). That kernel
    accumulates in float32 for float16/bfloat16 inputs (CUDA: Welford in
    ``acc_type<T>``; CPU: the same error as an upcast input, measured), so neither mode
    loses the statistics' precision.
    """

    def forward(self, x: Tensor, num_frames: int = 1, mode: str = "explicit") -> Tensor:  # type: ignore[override]
        if mode == "fused":
            return self._fused(x, num_frames)
        n, c, h, w = x.shape
        g, b = self.num_groups, n // num_frames
        # NHWC memory (TorchOptions.channels_last): group each pixel's channels on a free
        # view and keep the layout, so the next convolution gets NHWC too
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        xg = x.permute(0, 2, 3, 1).reshape(b, num_frames * h * w, g, c // g) if nhwc \
            else x.reshape(b, num_frames, g, (c // g) * h * w)
        x32 = xg.to(torch.promote_types(xg.dtype, torch.float32))  # float64 stays float64
        var, mean = torch.var_mean(x32, dim=(1, 3), keepdim=True, correction=0)
        y = ((x32 - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        if nhwc:
            return (y.reshape(n, h, w, c) * self.weight + self.bias).permute(0, 3, 1, 2)
        return y.reshape(n, c, h, w) * self.weight[:, None, None] + self.bias[:, None, None]

    def _fused(self, x: Tensor, num_frames: int) -> Tensor:
        n, c, h, w = x.shape
        b = n // num_frames
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # NHWC memory is (B, F*H, W, C) already: a channels_last (B, C, F*H, W) view. The
            # CPU kernel reads and writes NHWC (no copy); CUDA's copies to NCHW and returns
            # NCHW (one copy each way, the second back to NHWC for the next convolution)
            xg = x.permute(0, 2, 3, 1).reshape(b, num_frames * h, w, c).permute(0, 3, 1, 2)
            y = F.group_norm(xg, self.num_groups, self.weight, self.bias, self.eps)
            return y.permute(0, 2, 3, 1).reshape(n, h, w, c).permute(0, 3, 1, 2)
        # NCHW: (B, F, C, H, W) -> (B, C, F*H, W) and back, a copy each way (free views
        # when num_frames == 1)
        xg = x.reshape(b, num_frames, c, h, w).transpose(1, 2).reshape(b, c, num_frames * h, w)
        y = F.group_norm(xg, self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(b, c, num_frames, h, w).transpose(1, 2).reshape(n, c, h, w)


class ResnetBlock(nn.Module):
    """SD's ResnetBlock2D (``time_embedding_norm="default"``) with cross-frame GroupNorms.

    x: (B*F, Cin, H, W); temb: (1, T) time embedding shared by every frame (one timestep per
    call) -> (B*F, Cout, H, W); ``arithmetic.group_norm`` chooses how the GroupNorms
    compute. Parameter names match diffusers' ``ResnetBlock2D``.
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, eps: float, out_scale: float = 1.0):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = FrameGroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.out_scale = out_scale

    def forward(self, x: Tensor, temb: Tensor, num_frames: int, arithmetic: Arithmetic = FAST) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x, num_frames, arithmetic.group_norm)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h, num_frames, arithmetic.group_norm)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.out_scale == 1.0 else out / self.out_scale


# --------------------------------------------------------------------------- spatial transformer
def feed_forward(ff: FeedForward, x: Tensor, chunk: Optional[int] = None) -> Tensor:
    """``ff(x)`` for tokens x (N, L, C); ``chunk`` (``Arithmetic.ff_chunk``): on ``chunk``
    tokens of every row at a time (the FF is per token: the same values, and the hidden
    layer exists for one chunk only)."""
    if chunk is None or x.shape[1] <= chunk:
        return ff(x)
    return torch.cat([ff(part) for part in x.split(chunk, dim=1)], dim=1)


class TransformerBlock(nn.Module):
    """SD's BasicTransformerBlock (self-attn, cross-attn to the text, GEGLU FF) with
    reference attention in its self-attention (see :func:`self_attention`).

    Parameter names match diffusers' ``BasicTransformerBlock``.
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim // heads, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim // heads, bias=False)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, x: Tensor, context: Tensor, ref: Optional[Tensor] = None, cfg: CFGRows = ONE_HALF,
                bank_out: Optional[list] = None, arithmetic: Arithmetic = FAST) -> Tensor:
        """x: (N, L, C) tokens; context: (1, 77, Cx); ref: (1, Lr, C) or None; ``cfg``: which
        rows are which CFG half (:class:`CFGRows`). Returns (N, L, C), or (2N, L, C) when
        ``cfg`` forks. ``bank_out``, when given, receives this block's ``norm1`` output (what
        the appearance encoder contributes to the bank)."""
        h = self.norm1(x)
        if bank_out is not None:
            bank_out.append(h)
        per_frame = arithmetic.bank_kv_per_frame and cfg == ONE_HALF  # full forwards only
        a = self_attention(self.attn1, h, ref, cfg, per_frame, arithmetic.spatial_sdpa)
        x = cfg.residual(x) + a
        x = x + cross_attention(self.attn2, self.norm2(x), context, arithmetic.text_kv_per_frame,
                                arithmetic.cross_sdpa)
        return x + feed_forward(self.ff, self.norm3(x), arithmetic.ff_chunk)


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel (one block), applied to each frame on its own:
    GroupNorm(eps 1e-6) -> proj_in -> TransformerBlock -> proj_out -> + input."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, linear_proj: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.linear_proj = linear_proj
        proj = (lambda: nn.Linear(channels, channels)) if linear_proj else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)])
        self.proj_out = proj()

    def tokens(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, H*W, C) after norm and proj_in."""
        n, c, hh, ww = x.shape
        h = self.norm(x)
        if self.linear_proj:
            return self.proj_in(h.permute(0, 2, 3, 1).reshape(n, hh * ww, c))
        return self.proj_in(h).permute(0, 2, 3, 1).reshape(n, hh * ww, c)

    def forward(self, x: Tensor, context: Tensor, ref: Optional[Tensor] = None, cfg: CFGRows = ONE_HALF,
                bank_out: Optional[list] = None, arithmetic: Arithmetic = FAST) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W), or (2N, C, H, W) when ``cfg`` forks."""
        _, c, hh, ww = x.shape
        t = self.transformer_blocks[0](self.tokens(x), context, ref, cfg, bank_out, arithmetic)
        n = t.shape[0]
        if self.linear_proj:
            h = self.proj_out(t).reshape(n, hh, ww, c).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(t.reshape(n, hh, ww, c).permute(0, 3, 1, 2))
        return h + cfg.residual(x)


# --------------------------------------------------------------------------- motion modules
class PositionalEncoding(nn.Module):
    """AnimateDiff's sinusoidal table over frames; ``pe`` (1, max_len, C) is a buffer that
    the motion checkpoint also carries (and overrides)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)


class TemporalAttention(Attention):
    """Self-attention across frames (AnimateDiff ``VersatileAttention``, mode "Temporal"):
    diffusers' Attention weights (q/k/v without bias, output with bias) plus the frame
    position table. Parameter names match the motion checkpoint."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__(dim, heads=heads, dim_head=dim // heads, bias=False)
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, h: Tensor, num_frames: int, arithmetic: Arithmetic = FAST) -> Tensor:  # type: ignore[override]
        """h: (B*F, L, C) normalised tokens -> (B*F, L, C) attention output
        (``arithmetic.temporal_attention``, ``.temporal_sdpa``: see :func:`attention`)."""
        n, l, c = h.shape
        b = n // num_frames
        # (b f) l c -> (b l) f c: each spatial position attends over its frames
        s = h.reshape(b, num_frames, l, c).transpose(1, 2).reshape(b * l, num_frames, c)
        s = s + self.pos_encoder.pe[:, :num_frames].to(s.dtype)
        out = attention(self.to_q(s), self.to_k(s), self.to_v(s), self.heads,
                        arithmetic.temporal_attention == "fused", arithmetic.temporal_sdpa)
        out = self.to_out[0](out)
        return out.reshape(b, l, num_frames, c).transpose(1, 2).reshape(n, l, c)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, n_attn: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len) for _ in range(n_attn)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(n_attn)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, num_frames: int, arithmetic: Arithmetic = FAST) -> Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = x + attn(norm(x), num_frames, arithmetic)
        return x + feed_forward(self.ff, self.ff_norm(x), arithmetic.ff_chunk)


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, max_len: int, n_attn: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, heads, max_len, n_attn)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, num_frames: int, arithmetic: Arithmetic = FAST) -> Tensor:
        n, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(n, hh * ww, c))
        h = self.transformer_blocks[0](h, num_frames, arithmetic)
        h = self.proj_out(h).reshape(n, hh, ww, c).permute(0, 3, 1, 2)
        return h + x


class MotionModule(nn.Module):
    """AnimateDiff v1 VanillaTemporalModule: (B*F, C, H, W) -> same, mixing frames."""

    def __init__(self, channels: int, heads: int, max_len: int, n_attn: int, groups: int):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, heads, max_len, n_attn, groups)

    def forward(self, x: Tensor, num_frames: int, arithmetic: Arithmetic = FAST) -> Tensor:
        return self.temporal_transformer(x, num_frames, arithmetic)


# --------------------------------------------------------------------------- blocks
class Block(nn.Module):
    """A down, mid or up block: a container whose attribute names match diffusers'
    (resnets, attentions, motion_modules, downsamplers / upsamplers). The UNets' forwards
    drive the pieces explicitly."""

    def __init__(self):
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()
        self.motion_modules = nn.ModuleList()


def build_blocks(cfg: UNetConfig, motion=None) -> tuple[nn.ModuleList, Block, nn.ModuleList]:
    """Down blocks, mid block and up blocks of SD's UNet for ``cfg``, with AnimateDiff
    motion modules where ``motion`` (a MotionModuleConfig) places them."""
    from diffusers.models.resnet import Downsample2D, Upsample2D

    ch = cfg.block_out_channels
    n = len(ch)
    temb = cfg.time_embed_dim
    g, eps = cfg.norm_num_groups, cfg.norm_eps

    def resnet(cin, cout, scale=1.0):
        return ResnetBlock(cin, cout, temb, g, eps, scale)

    def transformer(c, heads):
        return SpatialTransformer(c, heads, cfg.cross_attention_dim, g, cfg.use_linear_projection)

    def motion_module(c):
        return MotionModule(c, motion.heads, motion.max_frames, motion.attention_blocks, g)

    down = nn.ModuleList()
    cout = ch[0]
    for i, kind in enumerate(cfg.down_block_types):
        cin, cout = cout, ch[i]
        blk = Block()
        use_mm = motion is not None and 2**i in motion.resolutions
        for j in range(cfg.layers_per_block):
            blk.resnets.append(resnet(cin if j == 0 else cout, cout))
            if kind.startswith("CrossAttn"):
                blk.attentions.append(transformer(cout, cfg.heads[i]))
            if use_mm:
                blk.motion_modules.append(motion_module(cout))
        if i < n - 1:
            blk.downsamplers = nn.ModuleList(
                [Downsample2D(cout, use_conv=True, out_channels=cout, padding=cfg.downsample_padding, name="op")]
            )
        down.append(blk)

    mid = Block()
    mid.resnets.append(resnet(ch[-1], ch[-1], cfg.mid_block_scale_factor))
    mid.attentions.append(transformer(ch[-1], cfg.heads[-1]))
    mid.resnets.append(resnet(ch[-1], ch[-1], cfg.mid_block_scale_factor))
    if motion is not None and motion.mid_block:
        raise NotImplementedError("mid-block motion modules (MagicAnimate has none)")

    up = nn.ModuleList()
    rch = list(reversed(ch))
    rheads = list(reversed(cfg.heads))
    cout = rch[0]
    for i, kind in enumerate(cfg.up_block_types):
        prev, cout = cout, rch[i]
        cskip_in = rch[min(i + 1, n - 1)]
        blk = Block()
        use_mm = motion is not None and 2 ** (n - 1 - i) in motion.resolutions
        for j in range(cfg.layers_per_block + 1):
            skip = cskip_in if j == cfg.layers_per_block else cout
            blk.resnets.append(resnet((prev if j == 0 else cout) + skip, cout))
            if kind.startswith("CrossAttn"):
                blk.attentions.append(transformer(cout, rheads[i]))
            if use_mm:
                blk.motion_modules.append(motion_module(cout))
        if i < n - 1:
            blk.upsamplers = nn.ModuleList([Upsample2D(cout, use_conv=True, out_channels=cout)])
        up.append(blk)
    return down, mid, up


def run_down_blocks(
    blocks: Sequence[Block], h: Tensor, temb: Tensor, context: Tensor, num_frames: int,
    arithmetic: Arithmetic = FAST, stop_after: Optional[int] = None,
) -> tuple[Tensor, list[Tensor]]:
    """The down path shared by every UNet here: returns the last feature and the skip
    features (conv_in's output first, as ``h`` is given). ``stop_after=k``: return as soon
    as k skip features exist (the shallow part of deep-feature reuse needs only the first)."""
    skips = [h]
    for blk in blocks:
        for j, resnet in enumerate(blk.resnets):
            if stop_after is not None and len(skips) >= stop_after:
                return h, skips
            h = resnet(h, temb, num_frames, arithmetic)
            if len(blk.attentions):
                h = blk.attentions[j](h, context, arithmetic=arithmetic)
            if len(blk.motion_modules):
                h = blk.motion_modules[j](h, num_frames, arithmetic)
            skips.append(h)
        if hasattr(blk, "downsamplers"):
            if stop_after is not None and len(skips) >= stop_after:
                return h, skips
            h = blk.downsamplers[0](h)
            skips.append(h)
    return h, skips


def count_bank_blocks(mid: Block, up: Sequence[Block]) -> int:
    """Number of reference-bank tensors: transformer blocks of the mid and up blocks."""
    return len(mid.attentions) + sum(len(b.attentions) for b in up)
