"""Kernel-level tools for a GPU check (benchmarks/gpu_check.py): which
``scaled_dot_product_attention`` backend is fastest, and still exact, at the UNet's three
attention shapes; and where a profiled call's device time goes, by kind of kernel.

- :func:`attention_shapes`: the three representative SDPA calls of a guided UNet call at
  the top (largest) level, per CFG half: spatial self-attention with the reference bank,
  cross-attention to the text, the motion modules' attention across the window.
- :func:`time_sdpa_backends`: each backend on one shape: median milliseconds and the
  largest absolute error against the math backend in float32, or why it cannot run.
  :func:`pick_fastest_exact` chooses among the rows (what ``TorchOptions.*_sdpa`` takes).
- :func:`kernel_class` / :func:`profile_classes`: a profiler kernel (or CPU operator) name
  -> "gemm/conv", "attention", "norm", "elementwise", "copy" or "other", and a
  ``torch.profiler`` result's self device time (CPU time where it has no device events)
  summed per class.

Nothing here is timed by the test suite (tests/test_kernels.py checks the arithmetic and
the classification on the CPU).
"""

from __future__ import annotations

import re
import statistics
import time
import warnings
from typing import Iterable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from magicanimate_rt.models.config import MotionModuleConfig, UNetConfig
from magicanimate_rt.models.layers import SDPA_BACKENDS

#: CLIP's text length: the cross-attention's keys
TEXT_TOKENS = 77


class AttentionShape(NamedTuple):
    """One SDPA call: ``batch_heads`` = rows x heads, ``lq`` queries, ``lk`` keys, head size
    ``head_dim``; ``heads`` of them per row (the layout: (rows, L, heads*d) transposed to
    (rows, heads, L, d), as ``models/layers.py`` ``attention`` lays them out)."""

    kind: str
    batch_heads: int
    lq: int
    lk: int
    head_dim: int
    heads: int


def attention_shapes(unet_config: UNetConfig, width: int, height: int, window: int = 16,
                     motion: MotionModuleConfig = MotionModuleConfig()) -> list[AttentionShape]:
    """The top level's three attention kinds for one CFG half of a ``window``-frame guided
    call at ``width`` x ``height`` pixels (latent h x w = height/8 x width/8):

    - "spatial": the conditional half's self-attention with the reference bank, per frame:
      h*w queries, 2*h*w keys (the frame's and the bank's tokens);
    - "cross": per frame, h*w queries to the 77 text tokens;
    - "temporal": per pixel (h*w rows), the window's frames attend to each other.

    SD 1.5 at 512 px: spatial (128, 4096, 8192, 40), cross (128, 4096, 77, 40), temporal
    (32768, 16, 16, 40). The up path runs each for both halves (twice the rows)."""
    hw = (height // 8) * (width // 8)
    c, heads = unet_config.block_out_channels[0], unet_config.heads[0]
    mh = motion.heads
    return [
        AttentionShape("spatial", window * heads, hw, 2 * hw, c // heads, heads),
        AttentionShape("cross", window * heads, hw, TEXT_TOKENS, c // heads, heads),
        AttentionShape("temporal", hw * mh, window, window, c // mh, mh),
    ]


def _qkv(shape: AttentionShape, device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """float32 q, k, v (rows, heads, L, d) in the model's layout (a transposed view)."""
    g = torch.Generator().manual_seed(seed)
    rows, h, d = shape.batch_heads // shape.heads, shape.heads, shape.head_dim

    def make(length: int) -> torch.Tensor:
        x = torch.randn(rows, length, h, d, generator=g)
        return x.to(device).transpose(1, 2)

    return make(shape.lq), make(shape.lk), make(shape.lk)


def _math_reference(q, k, v, chunk_bytes: int = 1 << 30) -> torch.Tensor:
    """The math backend in float32, a few rows at a time (its score matrix: rows x heads x
    Lq x Lk floats; 17 GB at once for SD 1.5's spatial shape at 512 px)."""
    rows, h, lq, _ = q.shape
    per_row = h * lq * k.shape[2] * 4
    step = max(1, chunk_bytes // per_row)
    with sdpa_kernel([SDPA_BACKENDS["math"]]):
        return torch.cat([F.scaled_dot_product_attention(q[i:i + step], k[i:i + step], v[i:i + step])
                          for i in range(0, rows, step)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sdpa_backends(shape: AttentionShape, device="cpu", dtype=torch.float32,
                       backends: Sequence[str] = ("cudnn", "flash", "efficient", "math"),
                       repeats: int = 10) -> list[dict]:
    """Each of ``backends`` alone on ``shape`` in ``dtype``: a row per backend,
    ``{"backend", "ms", "max_abs_err", "error"}``: the median of ``repeats`` timed calls
    (after one untimed) and the largest absolute difference from the math backend on the
    same values in float32; or ``ms`` and ``max_abs_err`` None and ``error`` the one-line
    reason it cannot run (PyTorch's RuntimeError, with its first warning, which names the
    condition that failed)."""
    device = torch.device(device)
    q32, k32, v32 = _qkv(shape, device)
    ref = _math_reference(q32, k32, v32)
    q, k, v = (x.to(dtype) for x in (q32, k32, v32))
    rows = []
    for name in backends:
        row = {"backend": name, "ms": None, "max_abs_err": None, "error": None}
        try:
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([SDPA_BACKENDS[name]]):
                warnings.simplefilter("always")
                out = F.scaled_dot_product_attention(q, k, v)  # the untimed call
                _sync(device)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v)
                    _sync(device)
                    times.append((time.perf_counter() - t0) * 1e3)
        except RuntimeError as e:
            reason = _first_line(str(e))
            if caught:
                reason += f" ({_first_line(str(caught[0].message))})"
            row["error"] = reason
        else:
            row["ms"] = statistics.median(times)
            row["max_abs_err"] = float((out.float() - ref).abs().max())
        rows.append(row)
    return rows


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def pick_fastest_exact(rows: Iterable[dict], tol: float) -> Optional[str]:
    """The fastest backend of :func:`time_sdpa_backends`'s rows whose error is within
    ``tol``, or None when none ran within it."""
    ok = [r for r in rows if r["error"] is None and r["max_abs_err"] <= tol]
    return min(ok, key=lambda r: r["ms"])["backend"] if ok else None


# --------------------------------------------------------------------------- kernel classes
#: class -> name patterns (case-insensitive regular expressions), tried in this order: the
#: attention kernels first (cuDNN's SDPA kernels say "fprop", efficient attention's are
#: cutlass-made), then the norms (their elementwise passes carry the norm's name), then
#: matrix products and convolutions, copies (PyTorch's copy kernel is an elementwise
#: kernel), elementwise. The materialised attention's softmax counts as attention, memsets
#: as copies. Triton's pointwise/reduction kernels (``triton_poi``/``red``/``per``) are
#: never gemm/conv: the ops their names list include the convolution or matmul whose
#: epilogue (a bias add) they compute.
CLASS_PATTERNS = (
    ("attention", (r"flash", r"fmha", r"efficient_attention", r"scaled_dot_product", r"sdpa", r"attention",
                   r"softmax")),
    ("norm", (r"group_?norm", r"layer_?norm", r"batch_?norm", r"rms_?norm", r"rowwisemoments",
              r"computefusedparams", r"welford", r"var_mean")),
    ("gemm/conv", (r"gemm", r"gemv", r"cublas", r"cutlass", r"xmma", r"convolution", r"convolve", r"conv2d",
                   r"conv_", r"fprop", r"dgrad", r"wgrad", r"triton_tem", r"aten::(add|b|badd)?mm\b", r"aten::linear",
                   r"aten::matmul")),
    ("copy", (r"memcpy", r"memset", r"copy", r"(^|[^a-z])cat([^a-z]|$)", r"clone", r"contiguous", r"nchwtonhwc",
              r"nhwctonchw")),
    ("elementwise", (r"elementwise", r"vectorized", r"triton_poi", r"unrolled", r"aten::(add|sub|mul|div|silu|gelu|"
                     r"neg|exp|rsqrt|sqrt|pow|clamp|sigmoid|tanh)_?\b")),
)
CLASSES = tuple(c for c, _ in CLASS_PATTERNS) + ("other",)
_COMPILED = tuple((c, re.compile("|".join(p), re.IGNORECASE)) for c, p in CLASS_PATTERNS)
_TRITON_NOT_GEMM = re.compile(r"triton_(poi|red|per)_")


def kernel_class(name: str) -> str:
    """A profiler kernel name (cuBLAS, cutlass, cuDNN, PyTorch or Triton) or CPU operator
    name (``aten::...``) -> one of :data:`CLASSES`."""
    for cls, pattern in _COMPILED:
        if cls == "gemm/conv" and _TRITON_NOT_GEMM.search(name):
            continue
        if pattern.search(name):
            return cls
    return "other"


def profile_classes(prof_events) -> dict[str, float]:
    """Milliseconds of self time per :data:`CLASSES` entry of a ``torch.profiler.profile``
    result's ``key_averages()`` (or ``events()``): the device (CUDA) events' self time
    when there are any (the kernels and memory copies), else the CPU operators'."""
    events = list(prof_events)
    device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    out = dict.fromkeys(CLASSES, 0.0)
    for e in device or events:
        us = _self_device_us(e) if device else e.self_cpu_time_total
        out[kernel_class(e.key if hasattr(e, "key") else e.name)] += us / 1e3
    return out


def _self_device_us(event) -> float:
    """Self device time (PyTorch >= 2.4 calls it ``self_device_time_total``)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return getattr(event, attr)
    return 0.0
