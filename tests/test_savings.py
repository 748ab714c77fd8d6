"""Every exact saving is the same function: each switch alone against the default, on the
tiny conformance model set (64 px, few frames, few steps, to stay fast), plus the batching
planner and the reference cache on their own."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from magicanimate_rt import AnimationPipeline
from magicanimate_rt.errors import InputError
from magicanimate_rt.models import load_model_set
from magicanimate_rt.runtime.backends.torch_backend import TorchOptions, TorchStages
from magicanimate_rt.runtime.cache import ReferenceCache
from magicanimate_rt.runtime.ddim import DDIMSampler, DDIMSettings
from magicanimate_rt.runtime.pipeline import PipelineOptions
from magicanimate_rt.runtime.sampling import LoopPlan, MemoryModel, denoise, initial_noise, plan_loop

SIZE, FRAMES = 64, 32  # 32 frames: three windows, the last wrapping around to frames 0..7


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def models(shared_dir):
    return load_model_set(shared_dir / "conformance" / "tiny-models")


def stages(models, **options) -> TorchStages:
    return TorchStages(models, torch.device("cpu"), torch.float32, TorchOptions(**options))


@pytest.fixture(scope="module")
def inputs(models):
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (1, 3, SIZE, SIZE), dtype=np.uint8)).float()
    control = torch.from_numpy(rng.integers(0, 256, (FRAMES, 3, SIZE, SIZE), dtype=np.uint8))
    with torch.inference_mode():
        ref = models.vae.encode(image)
    return ref, control, initial_noise(5, FRAMES, SIZE // 8)


# one DDIM step at t = 501, where the update depends strongly on the predicted noise
ONE_STEP = DDIMSettings(steps_offset=500)


def run_loop(st, inputs, plan: LoopPlan, uint8: bool = True) -> torch.Tensor:
    ref, control, latents = inputs
    if not uint8:
        control = control.to(latents.dtype) / 255.0
    with torch.inference_mode():
        return denoise(st, ref, control, latents, DDIMSampler(1, ONE_STEP), 7.5, plan=plan)


@pytest.fixture(scope="module")
def baseline(models, inputs):
    """One window per UNet call, residuals of all frames, control converted up front."""
    return run_loop(stages(models), inputs, LoopPlan(), uint8=False)


@pytest.mark.parametrize("plan", [
    LoopPlan(windows_per_call=3),  # one call: frames 0..7, 12..15 and 24..27 twice in it
    LoopPlan(controlnet_residuals="per_window"),
    LoopPlan(windows_per_call=2, controlnet_residuals="per_window", controlnet_chunk=5),
], ids=["3-windows-per-call", "controlnet-per-window", "per-window-2-windows-per-call-chunk5"])
def test_loop_batching_is_the_same_function(models, inputs, baseline, plan):
    """float32: equal up to rounding (GEMMs of other sizes round differently)."""
    out = run_loop(stages(models), inputs, plan)
    assert rel(out, baseline) < 2e-5


def test_loop_batching_in_float64_is_exact_to_rounding(shared_dir, inputs):
    """In float64 the rounding is 1e-16, so a batching that changed the function (a window
    summed twice, a residual of the wrong frame) could not hide under the tolerance."""
    models64 = load_model_set(shared_dir / "conformance" / "tiny-models", dtype=torch.float64)
    st = TorchStages(models64, torch.device("cpu"), torch.float64)
    ref, control, latents = inputs
    with torch.inference_mode():
        ref64 = models64.vae.encode(torch.from_numpy(np.random.default_rng(0).integers(
            0, 256, (1, 3, SIZE, SIZE), dtype=np.uint8)).double())
    inputs64 = (ref64, control, latents.double())
    one = run_loop(st, inputs64, LoopPlan(), uint8=False)
    batched = run_loop(st, inputs64, LoopPlan(windows_per_call=3, controlnet_residuals="per_window",
                                              controlnet_chunk=5))
    assert one.dtype == torch.float64 and rel(batched, one) < 1e-12


def test_control_uint8_is_bitwise_the_same(models, inputs, baseline):
    assert torch.equal(run_loop(stages(models), inputs, LoopPlan(), uint8=True), baseline)


@torch.inference_mode()
def test_appearance_encoder_batch_one_gives_the_same_bank(models, inputs):
    ref, t = inputs[0], torch.tensor([501.0])
    one, two = stages(models, appearance_batch=1).bank(ref, t), stages(models, appearance_batch=2).bank(ref, t)
    assert len(one) == len(two) == models.unet.num_bank
    for a, b in zip(one, two):
        assert a.shape == b.shape and rel(a, b) < 1e-5


@pytest.fixture(scope="module")
def window_inputs(models, inputs):
    ref, control, latents = inputs
    t = torch.tensor([501.0])
    with torch.inference_mode():
        st = stages(models)
        res = [r[:16] for r in st.controlnet(latents[0].transpose(0, 1)[:16], t, control[:16].float() / 255)]
        return latents[:, :, :16], t, res, st.bank(ref, t)


@torch.inference_mode()
def test_cfg_prefix_sharing_is_the_same_function(models, window_inputs):
    shared = stages(models, share_cfg_prefix=True).unet_guided(*window_inputs)
    full = stages(models, share_cfg_prefix=False).unet_guided(*window_inputs)
    assert rel(shared[0], full[0]) < 1e-5 and rel(shared[1], full[1]) < 1e-5


@torch.inference_mode()
def test_bank_kv_once_is_the_same_function(models, window_inputs):
    once = stages(models, bank_kv_once=True).unet_cond(*window_inputs)
    per_frame = stages(models, bank_kv_once=False).unet_cond(*window_inputs)
    assert rel(once, per_frame) < 1e-6


@torch.inference_mode()
def test_text_kv_once_is_the_same_function(models, window_inputs):
    once = stages(models, text_kv_once=True, share_cfg_prefix=False).unet_guided(*window_inputs)
    per_frame = stages(models, text_kv_once=False, share_cfg_prefix=False).unet_guided(*window_inputs)
    assert rel(once[0], per_frame[0]) < 1e-6 and rel(once[1], per_frame[1]) < 1e-6


@torch.inference_mode()
def test_fused_temporal_attention_is_the_same_function(models, window_inputs):
    fused = stages(models, temporal_attention="fused").unet_guided(*window_inputs)
    mat = stages(models, temporal_attention="materialised").unet_guided(*window_inputs)
    assert rel(fused[0], mat[0]) < 1e-5 and rel(fused[1], mat[1]) < 1e-5
    assert rel(fused[1], fused[0]) > 1e-3  # the halves differ: the comparison can fail


@torch.inference_mode()
def test_channels_last_is_the_same_function(shared_dir, window_inputs):
    models_cl = load_model_set(shared_dir / "conformance" / "tiny-models")  # converted in place: its own copy
    plain = stages(load_model_set(shared_dir / "conformance" / "tiny-models")).unet_guided(*window_inputs)
    cl = stages(models_cl, channels_last=True).unet_guided(*window_inputs)
    assert rel(cl[0], plain[0]) < 1e-5 and rel(cl[1], plain[1]) < 1e-5


def test_original_options_follow_the_device():
    assert TorchOptions.original().temporal_attention == "materialised"  # no xformers on a CPU
    assert TorchOptions.original("cuda").temporal_attention == "fused"  # xformers, as the original's demo
    with pytest.raises(InputError, match="temporal_attention"):
        TorchOptions(temporal_attention="flash")


# --------------------------------------------------------------------------- pipeline level
class CountingStages(TorchStages):
    """The torch stages, counting the calls the reference cache should save."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"encode_reference": 0, "bank": 0}

    def encode_reference(self, image):
        self.calls["encode_reference"] += 1
        return super().encode_reference(image)

    def bank(self, ref_latent, t):
        self.calls["bank"] += 1
        return super().bank(ref_latent, t)


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    driving = rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    return source, driving


def test_reference_cache_skips_encoder_and_gives_identical_latents(models, clip):
    source, driving = clip
    st = CountingStages(models, torch.device("cpu"), torch.float32)
    pipe = AnimationPipeline(st)
    first = pipe.animate(source, driving, size=SIZE, steps=2, seed=1)  # t = 501, 1
    assert st.calls == {"encode_reference": 1, "bank": 2} and not first.reference_cached
    again = pipe.animate(source, driving, size=SIZE, steps=2, seed=1)
    assert st.calls == {"encode_reference": 1, "bank": 2} and again.reference_cached
    assert torch.equal(again.latents, first.latents)
    assert np.array_equal(again.frames, first.frames)
    # the same photo with another clip and 1 step (t = 1, seen before): nothing recomputed
    pipe.animate(source, driving[:3], size=SIZE, steps=1)
    assert st.calls == {"encode_reference": 1, "bank": 2}
    # one pixel changed: another source
    other = source.copy()
    other[0, 0, 0] ^= 1
    pipe.animate(other, driving[:3], size=SIZE, steps=1)
    assert st.calls == {"encode_reference": 2, "bank": 3}


def test_reference_cache_off_recomputes(models, clip):
    source, driving = clip
    st = CountingStages(models, torch.device("cpu"), torch.float32)
    pipe = AnimationPipeline(st, options=PipelineOptions(reference_cache_entries=0))
    pipe.animate(source, driving[:2], size=SIZE, steps=1)
    pipe.animate(source, driving[:2], size=SIZE, steps=1)
    assert st.calls == {"encode_reference": 2, "bank": 2}
    assert PipelineOptions.original().reference_cache_entries == 0


class EmbedCounting(TorchStages):
    """Counts the frames whose ControlNet conditioning is embedded, by either path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedded_frames = 0

    def controlnet(self, latents, t, cond):
        self.embedded_frames += cond.shape[0]
        return super().controlnet(latents, t, cond)

    def controlnet_embed(self, cond):
        self.embedded_frames += cond.shape[0]
        return super().controlnet_embed(cond)


def test_control_embedded_once_is_the_same_function(models, clip):
    source, driving = clip  # 12 frames -> 16 padded, one window
    runs = {}
    for once in (True, False):
        st = EmbedCounting(models, torch.device("cpu"), torch.float32)
        pipe = AnimationPipeline(st, options=PipelineOptions(embed_control_once=once, reference_cache_entries=0))
        runs[once] = (pipe.animate(source, driving, size=SIZE, steps=3, seed=3), st.embedded_frames)
    (a, frames_once), (b, frames_each) = runs[True], runs[False]
    assert a.plan.embed_control_once and not b.plan.embed_control_once
    assert (frames_once, frames_each) == (16, 48)  # once per request vs once per step
    assert rel(a.latents, b.latents) < 1e-5
    # bounded-memory residuals compute the embedding per call, as the original
    bounded = AnimationPipeline(stages(models), options=PipelineOptions(controlnet_residuals="per_window"))
    assert not bounded.animate(source, driving[:2], size=SIZE, steps=1).plan.embed_control_once


@torch.inference_mode()
def test_decode_in_chunks_is_the_same_function(models, inputs):
    pipe = AnimationPipeline(stages(models))
    latents = inputs[2][:, :, :7] * 0.5
    one = pipe._decode(latents, 1)
    assert one.shape == (7, SIZE, SIZE, 3) and one.dtype == np.uint8
    for chunk in (3, 7, 16):
        assert np.abs(pipe._decode(latents, chunk).astype(int) - one.astype(int)).max() <= 1


def test_plan_reported_and_budget_respected(models, clip):
    source, driving = clip
    tight = AnimationPipeline(stages(models), options=PipelineOptions(memory_budget_mb=1))
    result = tight.animate(source, driving[:2], size=SIZE, steps=1)
    assert result.plan == LoopPlan(windows_per_call=1, controlnet_residuals="per_window", decode_chunk=1)


# --------------------------------------------------------------------------- the planner
MM = MemoryModel(residuals_per_frame=10, unet_per_window=1000, controlnet_per_frame=20, decode_per_frame=100)


def test_plan_without_budget_keeps_all_residuals_and_caps():
    plan = plan_loop(64, 6, None, MM, max_auto_windows=4, max_auto_decode=16)
    assert plan == LoopPlan(windows_per_call=4, controlnet_residuals="all", decode_chunk=16)
    # the backend's own limit wins (fixed-shape engines take one window)
    assert plan_loop(64, 6, None, MM, max_windows_per_call=1).windows_per_call == 1


def test_plan_counts_the_control_embedding_in_the_residual_store():
    mm = MemoryModel(residuals_per_frame=10, unet_per_window=1000, controlnet_per_frame=20, decode_per_frame=100,
                     control_embedding_per_frame=5)
    # 64 frames: residuals 640 B + embeddings 320 B + one window 1000 B
    assert plan_loop(64, 6, 1960, mm, embed_control=True) == LoopPlan(1, "all", 16, 16, embed_control_once=True)
    assert plan_loop(64, 6, 1959, mm, embed_control=True).controlnet_residuals == "per_window"
    assert not plan_loop(64, 6, 1959, mm, embed_control=True).embed_control_once
    assert not plan_loop(64, 6, None, mm, controlnet_residuals="per_window", embed_control=True).embed_control_once


def test_plan_fits_the_budget():
    # residuals of 64 frames: 640 B; one window 1000 B; ControlNet call 320 B
    assert plan_loop(64, 6, 1640, MM) == LoopPlan(1, "all", 16, 16)
    assert plan_loop(64, 6, 2640, MM).windows_per_call == 2
    assert plan_loop(64, 6, 1639, MM).controlnet_residuals == "per_window"  # 16 frames' own: 160 B
    # the loop's own 160 B + 1000 B also bound the decode: 11 frames of 100 B, not 12
    assert plan_loop(64, 6, 1200, MM) == LoopPlan(1, "per_window", 16, 11)
    assert plan_loop(64, 6, 10, MM) == LoopPlan(1, "per_window", 16, 1)  # never below one
    # explicit settings are kept whatever the budget
    assert plan_loop(64, 6, 10, MM, windows_per_call=3, controlnet_residuals="all", decode_chunk=2) == \
        LoopPlan(3, "all", 16, 2)


def test_decode_never_sets_the_peak():
    # a large budget: the decode chunk is still bounded by the loop's working memory
    mm = replace(MM, decode_per_frame=1000)
    assert plan_loop(64, 6, 10**9, mm) == LoopPlan(4, "all", 16, 4)  # 640 + 4 x 1000 B
    assert plan_loop(64, 6, 10**9, mm, windows_per_call=1).decode_chunk == 1  # 640 + 1000 B
    assert plan_loop(64, 6, 10**9, mm, windows_per_call=1, decode_chunk=8).decode_chunk == 8  # asked for


def test_options_validated():
    with pytest.raises(InputError, match="controlnet_residuals"):
        PipelineOptions(controlnet_residuals="sometimes")
    with pytest.raises(InputError, match="memory_budget_mb"):
        PipelineOptions(memory_budget_mb=0)
    with pytest.raises(InputError, match="windows_per_call"):
        PipelineOptions(windows_per_call=0)


# --------------------------------------------------------------------------- the cache alone
def test_reference_cache_lru_by_entries_and_bytes():
    def px(v):
        return np.full((4, 4, 3), v, np.uint8)

    cache = ReferenceCache(max_entries=2, max_bytes=10_000)
    cpu = torch.device("cpu")
    keys = [ReferenceCache.key(px(v), cpu, torch.float32) for v in range(3)]
    assert len(set(keys)) == 3
    assert ReferenceCache.key(px(0), cpu, torch.float16) != keys[0]
    entries = [cache.insert(k, torch.zeros(100)) for k in keys[:2]]  # 400 B each
    assert cache.lookup(keys[0]) is entries[0]  # now the most recent
    cache.insert(keys[2], torch.zeros(100))
    assert cache.lookup(keys[1]) is None and cache.lookup(keys[0]) is entries[0]
    # a bank that would overflow the byte bound is not kept; one that fits is
    cache.add_bank(keys[0], entries[0], 961, [torch.zeros(3000)])
    assert 961 not in entries[0].banks
    cache.add_bank(keys[0], entries[0], 921, [torch.zeros(1000)])
    assert 921 in entries[0].banks
    # a view of a batch-2 bank is stored without pinning its whole batch
    big = torch.zeros(2, 10)
    cache.add_bank(keys[0], entries[0], 881, [big[:1]])
    assert entries[0].banks[881][0].untyped_storage().nbytes() == 40
    disabled = ReferenceCache(max_entries=0)
    disabled.insert(keys[0], torch.zeros(1))
    assert disabled.lookup(keys[0]) is None and len(disabled) == 0


def test_cuda_graph_steps_marked_and_first_half_kept(models, monkeypatch):
    """compile_mode="reduce-overhead" (CUDA graphs): every UNet call starts a new graph step,
    and the unconditional half of a two-forward call is copied out before the same graph
    runs again. The compiled calls are replaced by fakes that share one output buffer, as
    a CUDA graph does (torch.compile itself is lazy: nothing compiles here)."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    st = stages(models, compile_mode="reduce-overhead", share_cfg_prefix=False)
    pool = torch.zeros(1, 4, 16, 8, 8)

    def fake_forward(latents, t, e, down, mid, bank, arithmetic):
        pool.fill_(2.0 if bank is not None else 1.0)
        return pool

    st._forward = fake_forward
    eps_u, eps_c = st.unet_guided(torch.zeros(1, 4, 16, 8, 8), torch.tensor([1.0]), [None] * 13, [None])
    assert len(marks) == 2
    assert float(eps_u.mean()) == 1.0 and float(eps_c.mean()) == 2.0  # not overwritten by the second run
    st.unet_cond(torch.zeros(1, 4, 16, 8, 8), torch.tensor([1.0]), [None] * 13, [None])
    assert len(marks) == 3
