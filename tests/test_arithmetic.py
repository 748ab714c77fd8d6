"""The arrangements of models/layers.py ``Arithmetic`` that choose kernels or working sets
(the fused GroupNorm, SDPA backends per attention kind, the chunked feed-forward), each
against the default on small layers, in float64 where the claim is "the same function"
(tests/equality.py), with the work it changes counted (aten ops); and the options'
validation. The UNet-level equalities (these options and cfg_sequential in a guided call)
are in tests/test_savings.py."""

from __future__ import annotations

import pytest
import torch
from equality import F64_TOL, AtenOps, assert_same, rel

from magicanimate_rt.errors import InputError
from magicanimate_rt.models.layers import (
    ATTENTION_KINDS, FAST, Arithmetic, CFGRows, FrameGroupNorm, TemporalTransformerBlock, TransformerBlock,
    attention, self_attention,
)
from magicanimate_rt.runtime.backends.torch_backend import TorchOptions
from magicanimate_rt.runtime.pipeline import PipelineOptions

F64 = torch.float64
FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu"  # PyTorch's choice on a CPU
MATH = "_safe_softmax"  # the math backend's softmax (one per call)


def _norm(channels: int = 32, groups: int = 8, dtype=F64, seed: int = 7) -> FrameGroupNorm:
    g = torch.Generator().manual_seed(seed)
    norm = FrameGroupNorm(groups, channels, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=g))
        norm.bias.copy_(torch.randn(channels, generator=g))
    return norm.to(dtype)


# --------------------------------------------------------------------------- fused GroupNorm
@pytest.mark.parametrize("frames", [1, 4])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fused_group_norm_equals_explicit(frames, layout):
    """One F.group_norm over (B, C, F*H, W) against var_mean over (group, F, H, W).

    float64: the same values to rounding (measured <= 2.9e-16, 1 and 2 threads); F64_TOL.
    float32: 4 channels x 4 frames x 6 x 5 = 480 values per group (120 at F = 1), well
    conditioned, so they differ by float32 rounding (measured <= 8.9e-8); 1e-5 is >= 110x."""
    g = torch.Generator().manual_seed(frames)
    x = torch.randn(2 * frames, 32, 6, 5, generator=g, dtype=F64) * 3 + 1
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    for dtype, tol in ((F64, F64_TOL), (torch.float32, 1e-5)):
        norm, xd = _norm(dtype=dtype), x.to(dtype)
        explicit, fused = norm(xd, frames), norm(xd, frames, "fused")
        assert fused.dtype == dtype and fused.shape == xd.shape
        assert_same(fused, explicit, tol, f"{layout} {dtype} F={frames}")
        # NHWC stays NHWC (the next convolution wants it); NCHW stays NCHW
        assert fused.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    # the statistics span the frames: per-frame statistics would differ
    per_frame = _norm()(x, 1, "fused")
    assert frames == 1 or rel(per_frame, norm(x.to(F64), frames)) > 1e-2


def test_fused_group_norm_is_one_kernel():
    x, norm = torch.randn(8, 32, 6, 5, dtype=F64), _norm()
    ops = {}
    for mode in ("explicit", "fused"):
        ops[mode] = AtenOps()
        with ops[mode]:
            norm(x, 4, mode)
    gn = ("group_norm", "native_group_norm")  # the dispatcher's name under inference_mode, and not
    assert ops["fused"].count(*gn) == 1 and ops["fused"].count("var_mean") == 0
    assert ops["explicit"].count(*gn) == 0 and ops["explicit"].count("var_mean") == 1


def test_fused_group_norm_keeps_float32_statistics_in_bfloat16():
    """bfloat16 input whose groups (4 channels x 4 frames x 32 x 32 = 16384 values) have
    mean 3 and standard deviation 0.1. Statistics in bfloat16 (8-bit mantissa) lose the
    variance to cancellation (E[x^2] - E[x]^2 rounds to 0: relative error 22.6 measured);
    in float32 only the bfloat16 rounding of the output is left (measured 2.5e-3 fused,
    3.2e-3 explicit, which rounds before the affine map). 2e-2 lies between, >= 6x the
    rounding (not a float-rounding equality: the rounding itself is the measured thing)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 8, 32, 32, generator=g, dtype=F64) * 0.1 + 3).to(torch.bfloat16)
    with torch.no_grad():
        want = _norm(8, 2)(x.to(F64), 4)
        norm = _norm(8, 2, torch.bfloat16)
        for mode in ("explicit", "fused"):
            y = norm(x, 4, mode)
            assert y.dtype == torch.bfloat16
            assert rel(y, want) < 2e-2, mode


# --------------------------------------------------------------------------- SDPA backends
@pytest.fixture(scope="module")
def blocks():
    torch.manual_seed(0)
    return (TransformerBlock(16, 2, 12).to(F64).eval(),
            TemporalTransformerBlock(16, 2, max_len=8, n_attn=2).to(F64).eval())


def _block_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, 16, generator=g, dtype=F64)  # B*F = 2 x 3 rows of 10 tokens
    context = torch.randn(1, 5, 12, generator=g, dtype=F64)
    ref = torch.randn(1, 10, 16, generator=g, dtype=F64)
    return x, context, ref


def _run(blocks, arithmetic):
    """(spatial block with the bank, temporal block) outputs and the aten ops of each."""
    spatial, temporal = blocks
    x, context, ref = _block_inputs()
    ops_s, ops_t = AtenOps(), AtenOps()
    with torch.no_grad():
        with ops_s:
            ys = spatial(x, context, ref, CFGRows.fork(6), arithmetic=arithmetic)
        with ops_t:
            yt = temporal(x, 3, arithmetic)
    return ys, yt, ops_s, ops_t


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_sdpa_backend_choice_per_kind(blocks, kind):
    """"math" for one kind against PyTorch's choice (the CPU's flash kernel), float64:
    the same function (measured <= 1.3e-16), and only that kind's attention changed kernel.
    The spatial block forks into both CFG halves: 2 self-attentions (plain, with the
    bank) and 1 cross-attention; the temporal block has 2 attentions."""
    base = _run(blocks, FAST)
    got = _run(blocks, Arithmetic(**{f"{kind}_sdpa": ("math",)}))
    assert_same(got[0], base[0], F64_TOL, "spatial block")
    assert_same(got[1], base[1], F64_TOL, "temporal block")
    math_calls = {"spatial": (2, 0), "cross": (1, 0), "temporal": (0, 2)}[kind]
    assert (got[2].count(MATH), got[3].count(MATH)) == math_calls
    assert got[2].count(FLASH_CPU) == 3 - math_calls[0] and got[3].count(FLASH_CPU) == 2 - math_calls[1]
    assert (base[2].count(FLASH_CPU), base[3].count(FLASH_CPU), base[2].count(MATH)) == (3, 2, 0)


def test_sdpa_backend_that_cannot_run_raises(blocks):
    """The choice is applied, not a hint: the CUDA-only backend has no CPU kernel."""
    with pytest.raises(RuntimeError, match="No viable backend"):
        _run(blocks, Arithmetic(cross_sdpa=("efficient",)))
    # a later one in the list serves where the first cannot run
    ys, *_ = _run(blocks, Arithmetic(cross_sdpa=("efficient", "math")))
    assert_same(ys, _run(blocks, FAST)[0], F64_TOL, "spatial block")


def test_sdpa_backend_choice_traces_under_torch_compile():
    """sdpa_kernel inside attention() compiles without a graph break (aot_eager: the
    graph AOT autograd would hand inductor) and the choice holds in the compiled call."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, n, 16, generator=g, dtype=F64) for n in (7, 9, 9))

    def fn(q, k, v, backends):
        return attention(q, k, v, 2, backends=backends)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert_same(compiled(q, k, v, ("math",)), attention(q, k, v, 2), F64_TOL, "compiled math")
    with pytest.raises(RuntimeError, match="No viable backend"):
        compiled(q, k, v, ("efficient",))
    torch._dynamo.reset()


# --------------------------------------------------------------------------- chunked feed-forward
def test_ff_chunk_is_the_same_function(blocks):
    """10 tokens per row in chunks of 3 (3, 3, 3, 1): each FF's GEGLU runs 4 times on a
    quarter of the tokens; float64, the same values up to the matmuls' blocking (measured
    <= 6.2e-17)."""
    base = _run(blocks, FAST)
    got = _run(blocks, Arithmetic(ff_chunk=3))
    assert_same(got[0], base[0], F64_TOL, "spatial block")
    assert_same(got[1], base[1], F64_TOL, "temporal block")
    assert (base[2].count("gelu"), base[3].count("gelu")) == (1, 1)
    assert (got[2].count("gelu"), got[3].count("gelu")) == (4, 4)
    # a chunk at least the token count runs the FF once
    assert _run(blocks, Arithmetic(ff_chunk=10))[2].count("gelu") == 1


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    ({"group_norm": "apex"}, "group_norm must be 'explicit' or 'fused'"),
    ({"spatial_sdpa": ("flashy",)}, "spatial_sdpa: unknown SDPA backend 'flashy'; choose from cudnn, flash"),
    ({"cross_sdpa": "math"}, "cross_sdpa must be a tuple"),
    ({"temporal_sdpa": ["math"]}, "temporal_sdpa must be a tuple"),
    ({"temporal_sdpa": ("math",), "temporal_attention": "materialised"}, "needs temporal_attention='fused'"),
    ({"ff_chunk": 0}, "ff_chunk must be None or a positive"),
    ({"ff_chunk": True}, "ff_chunk must be None or a positive"),
    ({"ff_chunk": 2.5}, "ff_chunk must be None or a positive"),
    ({"cfg_sequential": "yes"}, "cfg_sequential must be True or False"),
])
def test_arithmetic_and_torch_options_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Arithmetic(**kwargs)
    lean = {"ff_chunk", "cfg_sequential"} & set(kwargs)  # the plan's (PipelineOptions), the rest the backend's
    with pytest.raises(InputError, match=match) as e:
        PipelineOptions(**kwargs) if lean else TorchOptions(**kwargs)
    assert "\n" not in str(e.value)


def test_torch_options_forward_to_arithmetic():
    a = TorchOptions(group_norm="fused", spatial_sdpa=("cudnn", "flash"), cross_sdpa=("efficient",),
                     temporal_sdpa=("math",)).arithmetic
    assert (a.group_norm, a.spatial_sdpa, a.cross_sdpa, a.temporal_sdpa, a.ff_chunk, a.cfg_sequential) == \
        ("fused", ("cudnn", "flash"), ("efficient",), ("math",), None, False)
    assert a.sdpa("spatial") == ("cudnn", "flash")
    assert TorchOptions().arithmetic == FAST  # the defaults are today's arithmetic
