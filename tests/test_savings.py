"""Every exact saving is the same function, and does change the work: each switch alone
against the default on the tiny conformance model set (64 px, few frames, one or few
steps, to stay fast), compared in float64 (tests/equality.py says why, and what the
tolerances mean), each with the work the switch saves or moves counted (FLOPs, calls,
aten ops, memory layouts); plus the batching planner and the reference cache on their own."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from equality import F64_TOL, STEP_TOL, AtenOps, assert_same, flops, rel

from magicanimate_rt import AnimationPipeline
from magicanimate_rt.errors import InputError
from magicanimate_rt.models import load_model_set
from magicanimate_rt.models.layers import TemporalAttention, TransformerBlock
from magicanimate_rt.runtime.backends.torch_backend import TorchOptions, TorchStages
from magicanimate_rt.runtime.cache import ReferenceCache
from magicanimate_rt.runtime.ddim import DDIMSampler, DDIMSettings
from magicanimate_rt.runtime.pipeline import PipelineOptions
from magicanimate_rt.runtime.planner import GIB, HEADROOM, state_bytes
from magicanimate_rt.runtime.planner import LoopPlan, RequestPlan, plan_loop
from magicanimate_rt.runtime.sampling import denoise, initial_noise
from magicanimate_rt.runtime.stages import MemoryModel

SIZE, FRAMES = 64, 32  # 32 frames: three windows, the last wrapping around to frames 0..7
DT = torch.float64
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(shared_dir):
    return load_model_set(shared_dir / "conformance" / "tiny-models", dtype=DT)


def stages(models, cfg_sequential: bool = False, ff_chunk=None, **options) -> TorchStages:
    """The torch stages with ``options``, following a plan with these lean UNet settings."""
    st = TorchStages(models, CPU, DT, TorchOptions(**options))
    st.follow_plan(RequestPlan(LoopPlan(cfg_sequential=cfg_sequential, ff_chunk=ff_chunk)))
    return st


class Counting(TorchStages):
    """The torch stages, counting per stage method the calls (``calls``) and the rows they
    got (``rows``: images, frames or windows); ``decode_rows`` lists the frames of each
    decode call and ``decoded`` keeps its outputs; ``cond_bytes`` the storage size behind
    each ControlNet conditioning input (a view of the whole converted video, or the call's
    own frames)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: Counter = Counter()
        self.rows: Counter = Counter()
        self.decode_rows: list[int] = []
        self.decoded: list[torch.Tensor] = []
        self.cond_bytes: set[int] = set()

    def _count(self, method: str, rows: int) -> None:
        self.calls[method] += 1
        self.rows[method] += rows

    def work(self, method: str) -> tuple[int, int]:
        return self.calls[method], self.rows[method]

    def encode_reference(self, image):
        self._count("encode_reference", image.shape[0])
        return super().encode_reference(image)

    def bank(self, ref_latent, t):
        self._count("bank", ref_latent.shape[0])
        return super().bank(ref_latent, t)

    def controlnet(self, latents, t, cond):
        self._count("controlnet", cond.shape[0])
        self.cond_bytes.add(cond.untyped_storage().nbytes())
        return super().controlnet(latents, t, cond)

    def controlnet_embed(self, cond):
        self._count("controlnet_embed", cond.shape[0])
        self.cond_bytes.add(cond.untyped_storage().nbytes())
        return super().controlnet_embed(cond)

    def controlnet_embedded(self, latents, t, embedding):
        self._count("controlnet_embedded", latents.shape[0])
        return super().controlnet_embedded(latents, t, embedding)

    def unet_guided(self, latents, t, residuals, bank):
        self._count("unet_guided", latents.shape[0])
        return super().unet_guided(latents, t, residuals, bank)

    def unet_cond(self, latents, t, residuals, bank):
        self._count("unet_cond", latents.shape[0])
        return super().unet_cond(latents, t, residuals, bank)

    def decode(self, latents):
        self._count("decode", latents.shape[0])
        self.decode_rows.append(latents.shape[0])
        out = super().decode(latents)
        self.decoded.append(out.clone())
        return out


class RecordingSampler(DDIMSampler):
    """DDIM that keeps the guided eps the loop hands its update: the loop's own result,
    before the update rounds it to float32 (equality.STEP_TOL)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps: list[torch.Tensor] = []

    def step(self, i, sample, eps):
        self.eps.append(eps.clone())
        return super().step(i, sample, eps)


@pytest.fixture(scope="module")
def inputs(models):
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (1, 3, SIZE, SIZE), dtype=np.uint8)).to(DT)
    control = torch.from_numpy(rng.integers(0, 256, (FRAMES, 3, SIZE, SIZE), dtype=np.uint8))
    with torch.inference_mode():
        ref = models.vae.encode(image)
    return ref, control, initial_noise(5, FRAMES, SIZE // 8).to(DT)


# one DDIM step at t = 501, where the update depends strongly on the predicted noise
ONE_STEP = DDIMSettings(steps_offset=500)


def run_loop(st, inputs, plan: LoopPlan, uint8: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents after one step, the guided eps of that step)."""
    ref, control, latents = inputs
    if not uint8:
        control = control.to(latents.dtype) / 255.0
    sampler = RecordingSampler(1, ONE_STEP)
    with torch.inference_mode():
        out = denoise(st, ref, control, latents, sampler, 7.5, plan=RequestPlan(plan))
    assert out.dtype == DT and len(sampler.eps) == 1 and sampler.eps[0].dtype == DT
    return out, sampler.eps[0]


@pytest.fixture(scope="module")
def baseline(models, inputs):
    """One window per UNet call, residuals of all frames, control converted up front."""
    st = Counting(models, CPU, DT)
    out, eps = run_loop(st, inputs, LoopPlan(), uint8=False)
    # 3 windows, one per call; the 32 frames' residuals in 2 calls of 16
    assert (st.work("unet_guided"), st.work("controlnet")) == ((3, 3), (2, 32))
    return out, eps


@pytest.mark.parametrize("plan,work", [
    # one call: frames 0..7, 12..15 and 24..27 twice in it
    (LoopPlan(windows_per_call=3), {"unet_guided": (1, 3), "controlnet": (2, 32)}),
    # each window's 16 frames just before its call: the 16 frames two windows share, twice
    (LoopPlan(controlnet_residuals="per_window"), {"unet_guided": (3, 3), "controlnet": (3, 48)}),
    # frames 0..27 (windows 0, 1) in 6 calls of <= 5, then window 2's 16 frames in 4
    (LoopPlan(windows_per_call=2, controlnet_residuals="per_window", controlnet_chunk=5),
     {"unet_guided": (2, 3), "controlnet": (10, 44)}),
    # all three windows in one call: their 32 distinct frames in 7 calls of <= 5
    (LoopPlan(windows_per_call=3, controlnet_residuals="per_window", controlnet_chunk=5),
     {"unet_guided": (1, 3), "controlnet": (7, 32)}),
], ids=["3-windows-per-call", "controlnet-per-window", "per-window-2-windows-per-call-chunk5",
        "per-window-3-windows-per-call-chunk5"])
def test_loop_batching_is_the_same_function(models, inputs, baseline, plan, work):
    """Every plan gives the baseline's guided eps to float64 rounding (equality.F64_TOL),
    with the UNet and ControlNet calls (calls, windows / frames) the plan makes."""
    st = Counting(models, CPU, DT)
    out, eps = run_loop(st, inputs, plan)
    assert {m: st.work(m) for m in work} == work
    assert_same(eps, baseline[1], F64_TOL, "guided eps")
    assert_same(out, baseline[0], STEP_TOL, "latents after the float32 DDIM update")


@torch.inference_mode()
def test_appearance_encoder_batch_one_gives_the_same_bank(models, inputs):
    ref, t = inputs[0], torch.tensor([501.0])
    one, flops_one = flops(stages(models, appearance_batch=1).bank, ref, t)
    two, flops_two = flops(stages(models, appearance_batch=2).bank, ref, t)
    assert len(one) == len(two) == models.unet.num_bank
    assert [a.shape for a in one] == [b.shape for b in two]
    assert_same(one, two, F64_TOL, "bank")
    # the original's two identical copies: every batch-dependent FLOP twice (measured 1.90x;
    # the time embedding and the text keys/values are computed once per call either way)
    assert flops_two > 1.8 * flops_one


@pytest.fixture(scope="module")
def window_inputs(models, inputs):
    ref, control, latents = inputs
    t = torch.tensor([501.0])
    with torch.inference_mode():
        st = stages(models)
        res = [r[:16] for r in st.controlnet(latents[0].transpose(0, 1)[:16], t, control[:16].to(DT) / 255)]
        return latents[:, :, :16], t, res, st.bank(ref, t)


@torch.inference_mode()
def test_cfg_prefix_sharing_is_the_same_function(models, window_inputs):
    shared, flops_shared = flops(stages(models, share_cfg_prefix=True).unet_guided, *window_inputs)
    full, flops_full = flops(stages(models, share_cfg_prefix=False).unet_guided, *window_inputs)
    assert_same(shared, full, F64_TOL, "eps (uncond, cond)")
    # the shared prefix (down path, first mid resnet) computed once: two full forwards cost
    # >= 15% more UNet FLOPs (measured 20.8% at 64 px)
    assert flops_full > 1.15 * flops_shared


@torch.inference_mode()
def test_bank_kv_once_is_the_same_function(models, window_inputs):
    once, flops_once = flops(stages(models, bank_kv_once=True).unet_cond, *window_inputs)
    per_frame, flops_per_frame = flops(stages(models, bank_kv_once=False).unet_cond, *window_inputs)
    assert_same(once, per_frame, F64_TOL, "eps_cond")
    # projecting concat([frame, bank]) per frame computes each bank tensor's keys and values
    # (2 projections of L x C by C x C, 2 FLOPs per multiply-add) for every one of the 16
    # frames instead of once: exactly 15 more times
    bank, frames = window_inputs[3], window_inputs[0].shape[2]
    per_projection = sum(4 * b.shape[1] * b.shape[2] ** 2 for b in bank)
    assert flops_per_frame - flops_once == (frames - 1) * per_projection > 0


@torch.inference_mode()
def test_text_kv_once_is_the_same_function(models, window_inputs):
    once, flops_once = flops(stages(models, text_kv_once=True, share_cfg_prefix=False).unet_guided, *window_inputs)
    per_frame, flops_per_frame = flops(stages(models, text_kv_once=False, share_cfg_prefix=False).unet_guided,
                                       *window_inputs)
    assert_same(once, per_frame, F64_TOL, "eps (uncond, cond)")
    # every cross-attention projects the 77 text tokens' keys and values (77 x Cx by Cx x C,
    # twice) per frame instead of once per call: 15 more times, in each of the 2 forwards
    frames, tokens = window_inputs[0].shape[2], models.text_embedding.shape[1]
    blocks = [m.attn2.to_k for m in models.unet.modules() if isinstance(m, TransformerBlock)]
    per_projection = sum(4 * tokens * k.in_features * k.out_features for k in blocks)
    assert flops_per_frame - flops_once == 2 * (frames - 1) * per_projection > 0


@torch.inference_mode()
def test_fused_temporal_attention_is_the_same_function(models, window_inputs):
    ops = {}
    for mode in ("fused", "materialised"):
        ops[mode] = AtenOps()
        with ops[mode]:
            out = stages(models, temporal_attention=mode).unet_guided(*window_inputs)
        ops[mode].out = out
    fused, mat = ops["fused"].out, ops["materialised"].out
    assert_same(fused, mat, F64_TOL, "eps (uncond, cond)")
    assert rel(fused[1], fused[0]) > 1e-3  # the halves differ: the comparison can fail
    # each motion-module attention (one call each in a guided call): SDPA, or the
    # original's baddbmm scores, softmax and bmm; the spatial attention is SDPA in both
    n = sum(isinstance(m, TemporalAttention) for m in models.unet.modules())
    sdpa = {mode: sum(v for k, v in o.ops.items() if "scaled_dot_product" in k) for mode, o in ops.items()}
    assert n == 40 and ops["fused"].count("baddbmm", "bmm") == 0
    assert ops["materialised"].count("baddbmm") == ops["materialised"].count("bmm") == n
    assert sdpa["fused"] - sdpa["materialised"] == n and sdpa["materialised"] > 0


@torch.inference_mode()
def test_channels_last_is_the_same_function(shared_dir, models, window_inputs):
    models_cl = load_model_set(shared_dir / "conformance" / "tiny-models", dtype=DT)  # converted in place
    layouts = {}
    for name, st in (("plain", stages(models)), ("channels_last", stages(models_cl, channels_last=True))):
        ops = AtenOps()
        with ops:
            layouts[name] = st.unet_guided(*window_inputs)
        weights, inputs = Counter(), Counter()
        for (w, x), calls in ops.conv_layouts.items():
            weights[w] += calls
            inputs[x] += calls
        layouts[name + " weights"], layouts[name + " inputs"] = weights, inputs
    assert_same(layouts["channels_last"], layouts["plain"], F64_TOL, "eps (uncond, cond)")
    pw, pi = layouts["plain weights"], layouts["plain inputs"]
    cw, ci = layouts["channels_last weights"], layouts["channels_last inputs"]
    # every k x k (k > 1) convolution's weight is NHWC (52 calls at 64 px), none without
    assert pw["nhwc"] == 0 and cw["nhwc"] == pw["nchw"] >= 40
    # and the activations follow: NHWC convolution inputs 58 vs 27, NCHW 19 vs 50 (of 97;
    # some NHWC without the option come from the transformers' token permutes)
    assert ci["nhwc"] >= 1.5 * pi["nhwc"] and ci["nchw"] <= 0.6 * pi["nchw"]


@torch.inference_mode()
def test_cfg_sequential_is_the_same_function(models, window_inputs):
    """The halves in turn after the shared prefix: the same eps (float64, measured
    <= 3.0e-15), each convolution after the prefix on one half's 16 rows instead of both
    halves' 32, and the prefix still once: the rows all convolutions see add up to the
    batched call's plus the mid transformer's proj_in (a 1x1 convolution, before the fork
    in the batched call, once per half here: 16 rows)."""
    ops, out = {}, {}
    for seq in (False, True):
        ops[seq] = AtenOps()
        with ops[seq]:
            out[seq] = stages(models, cfg_sequential=seq).unet_guided(*window_inputs)
    assert_same(out[True], out[False], F64_TOL, "eps (uncond, cond)")
    assert rel(out[True][1], out[True][0]) > 1e-3  # the halves differ: a mix-up would show
    rows = {seq: ops[seq].conv_rows for seq in ops}
    assert max(rows[False]) == 32 and max(rows[True]) == 16
    total = {seq: sum(r * calls for r, calls in rows[seq].items()) for seq in rows}
    assert total[True] == total[False] + 16


@torch.inference_mode()
def test_cfg_sequential_deep_feature_reuse_is_the_same_function(models, window_inputs):
    """TemporalUNet.cached with cfg_sequential: the whole call (eps and the kept deep
    feature, both halves' rows) and a shallow call on that feature equal the batched
    ones (float64, measured <= 3.0e-15)."""
    latents, t, res, bank = window_inputs
    depth = 2
    skips = models.unet.shallow_skips(depth)
    got = {}
    for seq in (False, True):
        st = stages(models, cfg_sequential=seq)
        whole = st.unet_cached(latents, t, res, bank, depth, None, True)
        shallow = st.unet_cached(latents, t, res[:skips], bank, depth, whole[2], True)
        got[seq] = whole, shallow
    for part in (0, 1):
        assert_same(got[True][part], got[False][part], F64_TOL, ("whole", "shallow")[part])
    assert got[True][0][2].shape[0] == 2 * latents.shape[2]  # both halves' rows kept


@torch.no_grad()  # not inference_mode: under it the dispatcher shows SDPA undecomposed, whichever backend
def test_kernel_choices_are_the_same_function(models, window_inputs, inputs):
    """The fused GroupNorm, the math SDPA backend for every attention kind and the chunked
    feed-forward (7 tokens: not dividing any level's 64, 16, 4 or 1 tokens) together,
    against the defaults: the same eps and bank (float64, measured <= 3.6e-15), with the
    work they change counted: every cross-frame GroupNorm one native_group_norm instead
    of a var_mean, no flash attention call left, more GEGLU calls."""
    ops, out = {}, {}
    choices = dict(group_norm="fused", spatial_sdpa=("math",), cross_sdpa=("math",), temporal_sdpa=("math",),
                   ff_chunk=7)
    for name, opts in (("default", {}), ("choices", choices)):
        ops[name] = AtenOps()
        st = stages(models, **opts)
        with ops[name]:
            out[name] = st.unet_guided(*window_inputs)
        out[name + " bank"] = st.bank(inputs[0], window_inputs[1])
    assert_same(out["choices"], out["default"], F64_TOL, "eps (uncond, cond)")
    assert_same(out["choices bank"], out["default bank"], F64_TOL, "bank")
    d, c = ops["default"], ops["choices"]
    assert d.count("var_mean") > 0 and c.count("var_mean") == 0
    assert c.count("native_group_norm") == d.count("native_group_norm") + d.count("var_mean")
    flash = "_scaled_dot_product_flash_attention_for_cpu"
    assert d.count(flash) > 0 and c.count(flash) == 0 and c.count("_safe_softmax") == d.count(flash)
    assert c.count("gelu") > d.count("gelu")


def test_original_options_follow_the_device():
    assert TorchOptions.original().temporal_attention == "materialised"  # no xformers on a CPU
    assert TorchOptions.original("cuda").temporal_attention == "fused"  # xformers, as the original's demo
    with pytest.raises(InputError, match="temporal_attention"):
        TorchOptions(temporal_attention="flash")


# --------------------------------------------------------------------------- pipeline level
@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    driving = rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    return source, driving


def test_reference_cache_skips_encoder_and_gives_identical_latents(models, clip):
    source, driving = clip
    st = Counting(models, CPU, DT)
    pipe = AnimationPipeline(st)

    def calls():
        return st.calls["encode_reference"], st.calls["bank"]

    first = pipe.animate(source, driving[:4], size=SIZE, steps=2, seed=1)  # t = 501, 1
    assert calls() == (1, 2) and not first.reference_cached
    again = pipe.animate(source, driving[:4], size=SIZE, steps=2, seed=1)
    assert calls() == (1, 2) and again.reference_cached
    # the same computation on the same (cached) tensors: bitwise equal
    assert torch.equal(again.latents, first.latents)
    assert np.array_equal(again.frames, first.frames)
    # the same photo with another clip and 1 step (t = 1, seen before): nothing recomputed
    pipe.animate(source, driving[:3], size=SIZE, steps=1)
    assert calls() == (1, 2)
    # one pixel changed: another source
    other = source.copy()
    other[0, 0, 0] ^= 1
    pipe.animate(other, driving[:3], size=SIZE, steps=1)
    assert calls() == (2, 3)


def test_reference_cache_off_recomputes(models, clip):
    source, driving = clip
    st = Counting(models, CPU, DT)
    pipe = AnimationPipeline(st, options=PipelineOptions(reference_cache_entries=0))
    pipe.animate(source, driving[:2], size=SIZE, steps=1)
    pipe.animate(source, driving[:2], size=SIZE, steps=1)
    assert (st.calls["encode_reference"], st.calls["bank"]) == (2, 2)
    assert PipelineOptions.original().reference_cache_entries == 0


def test_control_embedded_once_is_the_same_function(models, clip):
    source, driving = clip[0], clip[1][:4]  # 4 frames -> 16 padded, one window
    runs = {}
    for once in (True, False):
        st = Counting(models, CPU, DT)
        pipe = AnimationPipeline(st, options=PipelineOptions(embed_control_once=once, reference_cache_entries=0))
        runs[once] = (pipe.animate(source, driving, size=SIZE, steps=2, seed=3), st)
    (a, st_once), (b, st_each) = runs[True], runs[False]
    assert a.plan.loop.embed_control_once and not b.plan.loop.embed_control_once
    # the 16 frames embedded once per request (then 2 steps from the embedding) vs once per
    # step inside every ControlNet call
    assert st_once.work("controlnet_embed") == (1, 16) and st_once.work("controlnet_embedded") == (2, 32)
    assert st_once.calls["controlnet"] == 0 and st_each.work("controlnet") == (2, 32)
    assert st_each.calls["controlnet_embed"] + st_each.calls["controlnet_embedded"] == 0
    # the same operations on the same values (the embedding, then the rest): bitwise equal
    assert torch.equal(a.latents, b.latents)
    # bounded-memory residuals compute the embedding per call, as the original
    bounded = AnimationPipeline(stages(models), options=PipelineOptions(controlnet_residuals="per_window"))
    assert not bounded.animate(source, driving[:2], size=SIZE, steps=1).plan.loop.embed_control_once


def test_control_uint8_is_bitwise_the_same(models, clip):
    """The driving frames kept as uint8 and converted per ControlNet call (same arithmetic,
    x.to(dtype) / 255) give bitwise the same result as the video converted up front; the
    ControlNet calls then get their own frames' conversion, not views of a float video."""
    source, driving = clip[0], clip[1][:4]  # 4 frames -> 16 padded
    runs = {}
    for uint8 in (True, False):
        st = Counting(models, CPU, DT)
        pipe = AnimationPipeline(st, options=PipelineOptions(control_uint8=uint8, controlnet_chunk=4,
                                                             reference_cache_entries=0))
        runs[uint8] = (pipe.animate(source, driving, size=SIZE, steps=1, seed=3), st)
    (a, st_uint8), (b, st_float) = runs[True], runs[False]
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)
    frame_bytes = 3 * SIZE * SIZE * torch.empty((), dtype=DT).element_size()
    assert st_uint8.work("controlnet_embed") == st_float.work("controlnet_embed") == (4, 16)
    assert st_uint8.cond_bytes == {4 * frame_bytes}  # each call's 4 frames, converted for it
    assert st_float.cond_bytes == {16 * frame_bytes}  # views of the whole converted video


@torch.inference_mode()
def test_decode_in_chunks_is_the_same_function(models, inputs):
    latents = inputs[2][:, :, :7] * 0.5
    runs = {}
    for chunk in (1, 3, 7, 16):
        st = Counting(models, CPU, DT)
        frames, _ = AnimationPipeline(st)._decode(latents, RequestPlan(LoopPlan(decode_chunk=chunk)))
        runs[chunk] = frames, torch.cat(st.decoded), st.decode_rows
    one, video_one, rows_one = runs[1]
    assert one.shape == (7, SIZE, SIZE, 3) and one.dtype == np.uint8 and rows_one == [1] * 7
    for chunk, rows in ((3, [3, 3, 1]), (7, [7]), (16, [7])):
        frames, video, got_rows = runs[chunk]
        assert got_rows == rows
        assert_same(video, video_one, F64_TOL, f"decoded video, chunks of {chunk}")
        # uint8 truncation: a value within rounding of an integer may land on either side
        assert np.abs(frames.astype(int) - one.astype(int)).max() <= 1


def test_plan_reported_and_budget_respected(models, clip):
    source, driving = clip
    st = stages(models)
    # a budget (weights included) with room for the weights, one step's bank, the step
    # state and the loop's per-window plan (one call's residuals, its ControlNet call), but
    # short of the residuals of all 16 frames with their conditioning embeddings by half
    # the embeddings: per-window residuals, one window per call, one frame per decode call
    m, n = st.memory_model(SIZE), 16
    need = (sum(st.weight_bytes().values()) + m.bank_per_step + state_bytes(n, SIZE, SIZE, 8)
            + n * m.residuals_per_frame + max(m.unet_per_window, 16 * m.controlnet_per_frame))
    budget = need + n * m.control_embedding_per_frame / 2
    tight = AnimationPipeline(st, options=PipelineOptions(memory_gb=budget / GIB / HEADROOM))
    result = tight.animate(source, driving[:2], size=SIZE, steps=1)
    assert result.plan.loop == LoopPlan(windows_per_call=1, controlnet_residuals="per_window", decode_chunk=1)


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
    with pytest.raises(InputError, match="--memory-gb"):
        PipelineOptions(memory_gb=0)
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
