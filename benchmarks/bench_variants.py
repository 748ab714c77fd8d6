"""What the benchmark compares: the reference schedule, each exact saving alone on top of
it (the ablation), and the default runtime with all of them.

Every variant computes the same function (tests/test_savings.py); they differ in how much
work they do and how they batch it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from magicanimate_rt.runtime.backends.torch_backend import TorchOptions
from magicanimate_rt.runtime.pipeline import PipelineOptions

REF_T, REF_P = TorchOptions.original(), PipelineOptions.original()


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark.

    Fields:
        key: short identifier (JSON, command line).
        label: the row's name in reports.
        torch: the torch backend's options.
        pipeline: the pipeline's options.
        warm_reference: measured as a repeated request with the same source image, so the
            reference cache holds its latent and banks (a priming request runs first,
            untimed); every other variant starts each timed request with an empty cache.
        backend: "torch", or "onnxruntime" (engines; ``torch`` options unused).
        note: what it changes, for the report.
    """

    key: str
    label: str
    torch: TorchOptions = field(default_factory=TorchOptions)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    warm_reference: bool = False
    backend: str = "torch"
    note: str = ""


REFERENCE = Variant("reference", "reference schedule", REF_T, REF_P,
                    note="the original's schedule: appearance encoder at batch 2, a full UNet per CFG half with "
                         "per-frame bank and text K/V, materialised temporal attention (no xformers on a CPU), "
                         "per-frame decode, no cache")
DEFAULT = Variant("default", "default runtime (all savings)", note="TorchOptions() + PipelineOptions()")

ABLATION = (
    Variant("ae_batch1", "+ appearance encoder at batch 1", replace(REF_T, appearance_batch=1), REF_P,
            note="one copy of the reference latent instead of two identical CFG copies"),
    Variant("cfg_prefix", "+ CFG prefix sharing", replace(REF_T, share_cfg_prefix=True), REF_P,
            note="down path + first mid resnet once for both halves (guided call)"),
    Variant("bank_kv_once", "+ bank K/V projected once", replace(REF_T, bank_kv_once=True), REF_P,
            note="to_k/to_v of the bank once per block instead of once per frame"),
    Variant("text_kv_once", "+ text K/V projected once", replace(REF_T, text_kv_once=True), REF_P,
            note="cross-attention to_k/to_v of the text embedding once per call instead of once per frame"),
    Variant("fused_temporal", "+ fused temporal attention", replace(REF_T, temporal_attention="fused"), REF_P,
            note="motion-module attention by scaled_dot_product_attention instead of baddbmm/softmax/bmm "
                 "(CPU only: the original uses xformers on CUDA)"),
    Variant("control_embed_once", "+ ControlNet conditioning embedded once", REF_T,
            replace(REF_P, embed_control_once=True),
            note="each driving frame's conditioning embedding once per request instead of once per step"),
    Variant("ref_cache", "+ reference cache (repeat request)", REF_T, replace(REF_P, reference_cache_entries=4),
            warm_reference=True, note="same source again: no VAE encode, no appearance encoder"),
    Variant("decode_batch", "+ batched VAE decode", REF_T, replace(REF_P, decode_chunk=None),
            note="decode chunk from the memory budget (at most 4 on the CPU, 16 on CUDA) instead of 1 frame per "
                 "call"),
    Variant("windows_batch", "+ all windows in one UNet call", REF_T, replace(REF_P, windows_per_call=8),
            note="the guided call takes B windows (fewer, larger calls)"),
    Variant("control_u8", "+ uint8 driving frames", REF_T, replace(REF_P, control_uint8=True),
            note="memory: frames kept as uint8, converted per ControlNet call"),
    Variant("cn_per_window", "ControlNet per window (bounded memory)", REF_T,
            replace(REF_P, controlnet_residuals="per_window"),
            note="memory: residuals only for the current call's windows; overlaps computed twice"),
)

DEFAULT_WARM = Variant("default_warm", "default runtime, repeat request", warm_reference=True,
                       note="the default with the reference cache holding the source")

DEFAULT_BOUNDED = Variant("default_bounded", "default, ControlNet per window",
                          pipeline=PipelineOptions(controlnet_residuals="per_window"),
                          note="the default with the bounded-memory residual mode (what a small memory budget picks)")

ALL = (REFERENCE, DEFAULT) + ABLATION + (DEFAULT_WARM, DEFAULT_BOUNDED)
BY_KEY = {v.key: v for v in ALL}


def torch_options_on(v: Variant, device_type: str) -> TorchOptions:
    """A variant's torch options on a device: the original's temporal attention is the one
    it runs there (``TorchOptions.original(device)``: xformers' fused kernel on CUDA)."""
    if v.torch.temporal_attention != "materialised":
        return v.torch
    return replace(v.torch, temporal_attention=TorchOptions.original(device_type).temporal_attention)


def onnxruntime_variant(engine_dir: str) -> Variant:
    return Variant("onnxruntime", "onnxruntime engines (default schedule)", backend="onnxruntime",
                   note=f"AnimationPipeline.from_engines({engine_dir!r}, backend='onnxruntime')")


def select(keys) -> tuple[Variant, ...]:
    """Variants by key, the reference and the default always first."""
    chosen = [REFERENCE, DEFAULT]
    for k in keys:
        if k not in BY_KEY:
            raise ValueError(f"unknown variant {k!r}; choose from {', '.join(BY_KEY)}")
        if BY_KEY[k] not in chosen:
            chosen.append(BY_KEY[k])
    return tuple(chosen)
