"""The "same function" tests' tolerances and tools: comparing two computations of ours, and
showing that the switch between them changed the work done.

Why float64. A saving (a batching plan, shared projections, another attention kernel, ...)
changes the order of floating-point operations, so its result differs from the original
arrangement by rounding. On the tiny model set that rounding is not small in float32: at
64 px its lowest-resolution GroupNorms (ControlNet down_blocks.3, the mid block, the motion
modules at 1x1) normalise 2 values per group, and normalising 2 numbers amplifies a few
ulps of difference in them ~1e3..1e4. One DDIM step of the 32-frame loop with 2 windows
per UNet call and per-window ControlNet calls of 5 frames measured 2.9e-4 from the
baseline in float32 with 1 thread on this AMD CPU (4.4e-6 with 2); an Intel AVX-512 CPU
failed a 2e-5 bound with 2 threads. So these tests compare like with like in float64 (the
stages compute in float64 throughout, their GroupNorm statistics included), where a few
ulps are ~1e-16 and the same amplification leaves <= ~1e-12: F64_TOL (1e-9) is >= 1000x
that and >= 1e4x what the tests measure (<= 7e-14, 1 or 2 threads), while a changed
function (a window summed twice, a residual of the wrong frame, a missing reference bank)
differs by >= 1e-3.

ONNX graphs run in float32 only: FP32_GRAPH_TOL is for a graph against its float32 torch
stage (see its comment).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

#: float64 against float64: relative L2 (see the module docstring)
F64_TOL = 1e-9
#: results that went through a float32 rounding after the float64 stages: the DDIM update
#: (runtime/ddim.py computes it in float32 whatever the dtype) and AnimationResult.latents
#: (float32). Two float64 inputs equal to ~1e-14 round to the same float32 value except
#: within ~1e-14 of a rounding boundary, where they differ by one float32 ulp (<= 1.2e-7
#: relative): 1e-5 is >= 80x even that bound for every element at once. Measured: 0
#: (bitwise) after one step; 8.6e-8 for the loop bookkeeping against numpy (3 steps).
STEP_TOL = 1e-5
#: an ONNX graph (float32, ONNX Runtime's kernels) against its float32 torch stage at the
#: engines' 128 px. Both are ~1e-6 from the float64 function (measured, per stage: VAE
#: encoder 7e-7, appearance encoder 1.7e-6, ControlNet 1.1e-6, UNet 5e-7, VAE decoder
#: 1e-6): that is the float32 rounding of these deep networks, not the GroupNorm
#: conditioning (256 px measured the same, <= 2.7e-6), so no size makes it smaller. The
#: graph-vs-torch difference measured <= 2.0e-6 with 1 and 2 threads; 3e-4 is >= 150x that.
#: A wrong graph differs by far more: the two CFG halves differ by 6e-2, per-frame instead
#: of cross-frame GroupNorm statistics by > 1e-3 (test_models.py).
FP32_GRAPH_TOL = 3e-4


def _double(x) -> torch.Tensor:
    return (x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).double()


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 (tensors or arrays of the same shape)."""
    a, b = _double(a), _double(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).norm() / b.norm())


def max_rel(a: Sequence, b: Sequence) -> float:
    """The largest :func:`rel` over pairs of two equally long sequences."""
    assert len(a) == len(b), (len(a), len(b))
    return max(rel(x, y) for x, y in zip(a, b))


def assert_same(got, want, tol: float, what: str = "") -> float:
    """Assert rel(got, want) < tol (for sequences: every pair) and return the error.

    With MAGICANIMATE_EQUALITY_LOG set to a file, every comparison appends
    ``test id, what, error, tolerance, torch threads`` to it: the measured errors behind
    the tolerances (README, "Tests")."""
    err = max_rel(got, want) if isinstance(got, (list, tuple)) else rel(got, want)
    log = os.environ.get("MAGICANIMATE_EQUALITY_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(log, "a") as f:
            f.write(f"{test}\t{what}\t{err:.3e}\t{tol:.0e}\t{torch.get_num_threads()}\n")
    assert err < tol, f"{what}: relative error {err:.3e} >= tolerance {tol:.0e}"
    return err


# --------------------------------------------------------------------------- counting the work
def flops(fn, *args, **kwargs) -> tuple[object, int]:
    """(fn(*args, **kwargs), FLOPs it took) by torch's FlopCounterMode: matrix multiplies,
    convolutions and attention, 2 per multiply-add (benchmarks/flop_count.py's mapping for the
    CPU attention kernel)."""
    from benchmarks.flop_count import CUSTOM

    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM)
    with counter:
        out = fn(*args, **kwargs)
    return out, counter.get_total_flops()


def _layout(x: torch.Tensor) -> str:
    """'nhwc' or 'nchw' where the strides say which, 'either' where both hold (1x1 maps)."""
    cl, plain = x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()
    return "nhwc" if cl and not plain else "nchw" if plain and not cl else "either"


class AtenOps(TorchDispatchMode):
    """Counts the aten ops a computation runs (``ops``: name -> calls) and, for every 2D
    convolution, the memory layouts of its weight and input (``conv_layouts``: (weight,
    input) -> calls) and its batch (``conv_rows``: rows -> calls)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.conv_layouts: Counter = Counter()
        self.conv_rows: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in ("conv2d", "convolution") and args[0].dim() == 4:
            self.conv_layouts[_layout(args[1]), _layout(args[0])] += 1
            self.conv_rows[args[0].shape[0]] += 1
        return func(*args, **(kwargs or {}))

    def count(self, *names: str) -> int:
        return sum(self.ops[n] for n in names)
