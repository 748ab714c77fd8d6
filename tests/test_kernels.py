"""benchmarks/attention_kernels.py on the CPU: the representative attention shapes, the SDPA backend
table (errors and reasons, not speed), the kernel-name classes, and a real CPU profile
summed per class."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.attention_kernels import (
    CLASSES, AttentionShape, attention_shapes, kernel_class, pick_fastest_exact, profile_classes,
    time_sdpa_backends,
)
from magicanimate_rt.models.config import UNetConfig


def test_attention_shapes_sd15_at_512(shared_dir):
    cfg = json.loads((shared_dir / "conformance" / "sd15-configs" / "stable-diffusion-v1-5" / "unet"
                      / "config.json").read_text())
    shapes = attention_shapes(UNetConfig.from_dict(cfg), 512, 512)
    assert shapes == [
        AttentionShape("spatial", 16 * 8, 4096, 8192, 40, 8),  # 16 frames x 8 heads, frame + bank tokens
        AttentionShape("cross", 16 * 8, 4096, 77, 40, 8),
        AttentionShape("temporal", 4096 * 8, 16, 16, 40, 8),  # every pixel, across the 16 frames
    ]
    # a portrait's token counts follow h x w
    assert attention_shapes(UNetConfig(), 512, 768)[0][1:4] == (128, 6144, 12288)


def test_sdpa_backend_table_on_the_cpu():
    """float32 against the math backend in float32: the CPU's flash kernel differs by
    rounding only, a few float32 ulps of outputs of size ~1 (measured 6.6e-7; math against
    itself 0); 1e-4 is >= 150x that. The CUDA-only backends give their reason."""
    rows = time_sdpa_backends(AttentionShape("spatial", 2 * 2, 24, 48, 40, 2), "cpu", torch.float32, repeats=2)
    by = {r["backend"]: r for r in rows}
    assert list(by) == ["cudnn", "flash", "efficient", "math"]
    for name in ("flash", "math"):
        assert by[name]["error"] is None and by[name]["ms"] > 0 and by[name]["max_abs_err"] < 1e-4, by[name]
    for name in ("cudnn", "efficient"):
        r = by[name]
        assert r["ms"] is None and r["max_abs_err"] is None
        assert "No viable backend" in r["error"] and "\n" not in r["error"], r
    assert pick_fastest_exact(rows, 1e-4) in ("flash", "math")
    assert pick_fastest_exact(rows, -1.0) is None


def test_pick_fastest_exact_skips_inexact_and_unsupported():
    rows = [{"backend": "cudnn", "ms": None, "max_abs_err": None, "error": "not here"},
            {"backend": "flash", "ms": 1.0, "max_abs_err": 2e-3, "error": None},
            {"backend": "efficient", "ms": 2.0, "max_abs_err": 1e-6, "error": None},
            {"backend": "math", "ms": 9.0, "max_abs_err": 0.0, "error": None}]
    assert pick_fastest_exact(rows, 1e-3) == "efficient"
    assert pick_fastest_exact(rows, 1e-2) == "flash"
    assert pick_fastest_exact(rows, 0.0) == "math"


@pytest.mark.parametrize("cls,names", [
    ("gemm/conv", [
        "ampere_sgemm_128x64_nn",
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
        "void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_256x128_32x3_nn_align8>(Params)",
        "sm80_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x32_stage4_warpsize2x2x1_g1_"
        "tensor16x8x16_kernel_cudnn",
        "void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>(int, int, int, float "
        "const*, int, float*, float const*, kernel_conv_params, unsigned long long, int, float, float, int, float "
        "const*, float const*, bool, int, int)",
        "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false>(...)",
        "triton_tem_fused_mm_0",
        "aten::mkldnn_convolution", "aten::addmm", "aten::mm", "aten::bmm",
    ]),
    ("attention", [
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::half_t, "
        "Flash_kernel_traits<64, 128, 128, 4, cutlass::half_t> >, false, false, false, false, true, true, false>("
        "pytorch_flash::Flash_fwd_params)",
        "fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t, "
        "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x64_4x1x1_kernel0_0",
        "void (anonymous namespace)::softmax_warp_forward<c10::Half, c10::Half, float, 10, false, false>(...)",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
    ]),
    ("norm", [
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>(long, c10::Half, c10::Half "
        "const*, c10::Half*, c10::Half*)",
        "void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<c10::Half>(...)",
        "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::(anonymous "
        "namespace)::GroupNormKernelImplInternal<c10::Half>(...)::{lambda(c10::Half, float, float)#1}>(...)",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>(int, float, "
        "c10::Half const*, c10::Half const*, c10::Half const*, float*, float*, c10::Half*)",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::WelfordOps<float, float, int, "
        "thrust::pair<float, float> >, unsigned int, float, 2, 4> >(...)",
        "triton_red_fused_native_group_norm_0", "triton_per_fused__native_batch_norm_legit_1",
        "aten::native_group_norm", "aten::native_layer_norm", "aten::var_mean",
    ]),
    ("copy", [
        "Memcpy HtoD (Pageable -> Device)", "Memset (Device)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(c10::Half)#1}, "
        "at::detail::Array<char*, 2> >(int, ...)",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, "
        "unsigned int, 4, 64, 64>(...)",
        "void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true, (cudnn::reduced_divisor)2>(...)",
        "triton_poi_fused_cat_0", "aten::copy_", "aten::cat",
    ]),
    ("elementwise", [
        "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(at::TensorIteratorBase&)::{lambda()"
        "#1}::operator()() const::{lambda()#5}::operator()() const::{lambda(c10::Half)#1}, at::detail::Array<char*, 2> >"
        "(int, ...)",
        "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl<at::native::CUDAFunctor_add<c10::Half> "
        ">(at::TensorIteratorBase&, ...)::{lambda(int)#1}>(int, ...)",
        "triton_poi_fused_add_convolution_silu_0",  # a convolution's bias add, fused: not the convolution
        "aten::add", "aten::mul", "aten::silu", "aten::gelu",
    ]),
    ("other", ["aten::empty", "aten::normal_", "aten::view", "void at::native::(anonymous namespace)::"
               "upsample_nearest2d_out_frame<c10::Half, ...>"]),
])
def test_kernel_class(cls, names):
    assert {n: kernel_class(n) for n in names} == {n: cls for n in names}


def test_profile_classes_on_a_cpu_profile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 32, 32, generator=g)
    w = torch.randn(16, 16, 3, 3, generator=g)
    lin = torch.randn(64, 16, generator=g)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            y = F.conv2d(x, w, padding=1)
            y = F.silu(F.group_norm(y, 4))
            t = F.layer_norm(y.flatten(2).transpose(1, 2), (16,))
            t = torch.cat([t @ lin.T, t @ lin.T], dim=1)
    by = profile_classes(prof.key_averages())
    assert set(by) == set(CLASSES)
    assert by["gemm/conv"] > 0 and by["norm"] > 0 and by["elementwise"] > 0 and by["copy"] > 0, by
    # the events themselves give the same sums
    assert profile_classes(prof.events())["norm"] == pytest.approx(by["norm"])
