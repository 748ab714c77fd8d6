"""Opt-in fast sampling (issue 18, runtime/modes.py): each knob off is exactly today's path,
each knob on changes the work it says, DPM-Solver++(2M) is diffusers' update step by step,
and the shallow part of deep-feature reuse computes the same tail as a whole call.

Float64 on the tiny set (tests/equality.py says why); 64 px, 16-32 frames, few steps.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from equality import F64_TOL, assert_same, flops
from magicanimate_rt.errors import InputError
from magicanimate_rt.models import load_model_set
from magicanimate_rt.runtime.backends.torch_backend import TorchStages
from magicanimate_rt.runtime.ddim import DDIMSampler, ddim_timesteps
from magicanimate_rt.runtime.dpm_solver import DPMSolverPP2M
from magicanimate_rt.runtime.modes import PRESETS, SamplingMode, resolve_mode
from magicanimate_rt.runtime.pipeline import AnimationPipeline, PipelineOptions
from magicanimate_rt.runtime.sampling import initial_noise

SIZE, FRAMES = 64, 32  # 32 frames: three windows
DT = torch.float64
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(shared_dir):
    return load_model_set(shared_dir / "conformance" / "tiny-models", dtype=DT)


class Counting(TorchStages):
    """The torch stages counting calls per method (and, for unet_cached, whole / shallow)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: Counter = Counter()

    def unet_guided(self, *a):
        self.calls["unet_guided"] += 1
        return super().unet_guided(*a)

    def unet_cond(self, *a):
        self.calls["unet_cond"] += 1
        return super().unet_cond(*a)

    def unet_cached(self, latents, t, residuals, bank, depth, deep, guided):
        self.calls[f"unet_cached {'shallow' if deep is not None else 'whole'} {'guided' if guided else 'cond'}"] += 1
        return super().unet_cached(latents, t, residuals, bank, depth, deep, guided)

    def controlnet_embedded(self, *a):
        self.calls["controlnet_embedded"] += 1
        return super().controlnet_embedded(*a)

    def controlnet_shallow(self, *a):
        self.calls["controlnet_shallow"] += 1
        return super().controlnet_shallow(*a)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    driving = rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    return source, driving


def run(models, inputs, mode=None, steps=4):
    st = Counting(models, CPU, DT)
    pipe = AnimationPipeline(st, options=PipelineOptions(reference_cache_entries=0, decode_chunk=8), ranks=None)
    with torch.inference_mode():
        r = pipe.animate(*inputs, size=SIZE, steps=steps, seed=2, mode=mode)
    return r, st.calls


@pytest.fixture(scope="module")
def exact(models, inputs):
    return run(models, inputs)


# --------------------------------------------------------------------------- the samplers
def diffusers_dpmpp(steps: int):
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                    solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
                                    prediction_type="epsilon")
    s.set_timesteps(timesteps=ddim_timesteps(steps))
    s.sigmas = s.sigmas.double()  # its sigmas are float32 values; the update math in float64
    return s


@pytest.mark.parametrize("steps", [1, 2, 5, 15, 25])
def test_dpmpp_2m_is_diffusers_update_step_by_step(steps):
    """Ours against diffusers' DPMSolverMultistepScheduler math (convert_model_output and
    its first- and second-order updates, chosen as its step() chooses them; step() itself
    casts the sample to float32, so it is driven here by hand in float64)."""
    ref = diffusers_dpmpp(steps)
    ours = DPMSolverPP2M(steps)
    assert ours.timesteps == [int(t) for t in ref.timesteps]
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(1, 4, 3, 8, 8, generator=g, dtype=DT)
    theirs = x.clone()
    worst, orders = 0.0, []
    for i, t in enumerate(ref.timesteps):
        eps = torch.randn(x.shape, generator=g, dtype=DT)
        if ref.step_index is None:
            ref._init_step_index(t)
        m = ref.convert_model_output(eps, sample=theirs)
        ref.model_outputs = ref.model_outputs[1:] + [m]
        last = ref.step_index == len(ref.timesteps) - 1
        if ref.lower_order_nums < 1 or last:
            theirs = ref.dpm_solver_first_order_update(m, sample=theirs)
            orders.append(1)
        else:
            theirs = ref.multistep_dpm_solver_second_order_update(ref.model_outputs, sample=theirs)
            orders.append(2)
        ref.lower_order_nums = min(ref.lower_order_nums + 1, 2)
        ref._step_index += 1
        x = ours.step(i, x, eps)
        worst = max(worst, float((x - theirs).norm() / theirs.norm()))
    assert orders == [ours.order(i) for i in range(steps)]
    assert worst < 1e-10, worst  # the bound; measured ~4e-16
    if steps >= 3:
        assert 2 in orders  # the second-order update was exercised


def test_dpmpp_steps_must_run_in_order():
    s = DPMSolverPP2M(5)
    x = torch.zeros(1, 4, 1, 2, 2)
    s.step(0, x, x)
    with pytest.raises(InputError, match="in order"):
        s.step(2, x, x)


def test_dpmpp_first_step_is_ddim():
    """DPM-Solver++'s first-order update is DDIM's: the same first step."""
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 2, 4, 4, generator=g, dtype=DT), torch.randn(1, 4, 2, 4, 4, generator=g, dtype=DT)
    a = DPMSolverPP2M(10).step(0, x, eps)
    b = DDIMSampler(10).step(0, x.float(), eps.float()).double()
    assert_same(a, b, 1e-6, "first step")  # DDIM rounds its update to float32


# --------------------------------------------------------------------------- off is today's path
@pytest.mark.parametrize("mode", ["exact", SamplingMode(cache_interval=1, cache_depth=3, guidance_until=1.0)])
def test_knobs_off_are_exactly_todays_path(models, inputs, exact, mode):
    (want, want_calls), (got, calls) = exact, run(models, inputs, mode)
    assert torch.equal(got.latents, want.latents) and np.array_equal(got.frames, want.frames)
    assert calls == want_calls and calls["unet_guided"] == 4 * 3 and not any("cached" in k for k in calls)


def test_presets():
    assert resolve_mode(None) == resolve_mode("exact") == SamplingMode() and SamplingMode().is_exact
    fast = PRESETS["fast"]
    assert not fast.is_exact and fast.request_steps(None) == 15 and fast.request_steps(20) == 20
    assert SamplingMode().request_steps(None) == 25
    with pytest.raises(InputError, match="preset must be one of exact, fast"):
        resolve_mode("fastest")


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "euler"}, "sampler must be one of ddim, dpmpp-2m"),
    ({"cache_interval": 0}, "cache_interval must be an integer >= 1"),
    ({"guidance_until": 1.5}, "guidance_until must be a number in 0..1"),
])
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(InputError, match=message):
        SamplingMode(**kwargs)


def test_a_depth_the_unet_lacks_is_refused(models, inputs):
    with pytest.raises(InputError, match="cache depth must be in 1..3"):
        run(models, inputs, SamplingMode(cache_interval=2, cache_depth=4))


def test_engine_backends_refuse_deep_feature_reuse(models, inputs):
    class NoReuse(TorchStages):
        capabilities = TorchStages.capabilities.__class__(max_windows_per_call=1)

    pipe = AnimationPipeline(NoReuse(models, CPU, DT), ranks=None)
    with pytest.raises(InputError, match="needs the torch backend"):
        pipe.animate(*inputs, size=SIZE, steps=2, mode=SamplingMode(cache_interval=2))


# --------------------------------------------------------------------------- each knob changes the work
def test_guidance_cutoff_runs_the_conditional_half_after_it(models, inputs, exact):
    got, calls = run(models, inputs, SamplingMode(guidance_until=0.5))
    assert calls["unet_guided"] == 2 * 3 and calls["unet_cond"] == 2 * 3  # 2 guided steps of 4, then 2 cond
    assert float((got.latents - exact[0].latents).norm() / exact[0].latents.norm()) > 1e-3  # a different function
    assert SamplingMode(guidance_until=0.5).guided_steps(15) == 8 and SamplingMode(guidance_until=0.0).guided_steps(4) == 0


def test_dpmpp_changes_only_the_update(models, inputs, exact):
    got, calls = run(models, inputs, SamplingMode(sampler="dpmpp-2m"))
    assert calls == exact[1]  # the same model calls
    assert float((got.latents - exact[0].latents).norm() / exact[0].latents.norm()) > 1e-3


def test_deep_feature_reuse_runs_the_shallow_part_between_whole_steps(models, inputs, exact):
    got, calls = run(models, inputs, SamplingMode(cache_interval=2, cache_depth=1))
    assert calls["unet_cached whole guided"] == 2 * 3 and calls["unet_cached shallow guided"] == 2 * 3
    assert calls["unet_guided"] == 0 and calls["controlnet_shallow"] == 2 * 2  # 2 shallow steps x 2 chunks of 16
    assert float((got.latents - exact[0].latents).norm() / exact[0].latents.norm()) > 1e-4
    assert got.plan.loop.deep_cache_bytes == 3 * TorchStages(models, CPU, DT).deep_feature_bytes(SIZE, SIZE, 1)
    assert exact[0].plan.loop.deep_cache_bytes == 0
    # with the guidance cut off as well, the kept guided features serve the conditional calls
    _, calls = run(models, inputs, SamplingMode(cache_interval=2, guidance_until=0.25))
    assert calls["unet_cached whole guided"] == 3 and calls["unet_cached shallow cond"] == 2 * 3
    assert calls["unet_cached whole cond"] == 3


@pytest.fixture(scope="module")
def window(models):
    """One window's inputs at t = 501: latents, t, 13 residuals, bank."""
    rng = np.random.default_rng(1)
    st = TorchStages(models, CPU, DT)
    latents = initial_noise(3, 16, SIZE // 8).to(DT)
    control = torch.from_numpy(rng.integers(0, 256, (16, 3, SIZE, SIZE), dtype=np.uint8)).to(DT) / 255
    ref = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(4), dtype=DT)
    t = torch.tensor([501.0], dtype=DT)
    with torch.inference_mode():
        res = st.controlnet(latents[0].transpose(0, 1), t, control)
        return st, latents, t, res, st.bank(ref, t), control


@torch.inference_mode()
@pytest.mark.parametrize("depth, guided", [(1, True), (3, True), (2, False)])
def test_whole_cached_call_is_the_plain_call_and_the_shallow_part_recomputes_its_tail(window, depth, guided):
    st, latents, t, res, bank, control = window
    u, c, deep = st.unet_cached(latents, t, res, bank, depth, None, guided)
    if guided:
        want_u, want_c = st.unet_guided(latents, t, res, bank)
        assert_same(u, want_u, F64_TOL, "whole cached call, uncond")
    else:
        want_c = st.unet_cond(latents, t, res, bank)
        assert u is None
    assert_same(c, want_c, F64_TOL, "whole cached call, cond")
    # the shallow part on the same inputs and that deep feature gives the whole call's output:
    # it recomputes exactly the part it claims (down path to its skips, the last up blocks)
    k = st.shallow_skips(depth)
    shallow_res = st.controlnet_shallow(latents[0].transpose(0, 1), t, control, k, embedded=False)
    assert len(shallow_res) == k
    for a, b in zip(shallow_res, res[:k]):
        assert_same(a, b, F64_TOL, "shallow ControlNet residual")
    (u2, c2, deep2), shallow_flops = flops(st.unet_cached, latents, t, shallow_res, bank, depth, deep, guided)
    _, whole_flops = flops(st.unet_cached, latents, t, res, bank, depth, None, guided)
    assert_same(c2, c, F64_TOL, "shallow call, cond")
    if guided:
        assert_same(u2, u, F64_TOL, "shallow call, uncond")
    assert deep2 is deep
    if guided:  # what the plan reserves for it is what it holds (16 frames x both halves)
        assert deep.numel() * deep.element_size() == st.deep_feature_bytes(SIZE, SIZE, depth)
    # it skipped the deep blocks: the mid block and the low-resolution up blocks (cheap at depth
    # 3, whose shallow part keeps every block but the first up block; most at depth 1)
    assert shallow_flops < (0.9 if depth == 1 else 1.0) * whole_flops, (shallow_flops, whole_flops)
    _, cn_shallow = flops(st.controlnet_shallow, latents[0].transpose(0, 1), t, control, k, False)
    _, cn_whole = flops(st.controlnet, latents[0].transpose(0, 1), t, control)
    assert cn_shallow < cn_whole


def test_fast_preset_does_less_work(models, inputs, exact):
    def request_flops(mode, steps):
        st = TorchStages(models, CPU, DT)
        pipe = AnimationPipeline(st, options=PipelineOptions(reference_cache_entries=0), ranks=None)
        with torch.inference_mode():  # 16 frames: one window
            _, n = flops(pipe.animate, inputs[0], inputs[1][:16], size=SIZE, steps=steps, seed=2, mode=mode)
        return n

    fast, exact5 = PRESETS["fast"], request_flops("exact", 5)
    # at the same 5 steps: steps 1, 2 and 4 shallow, steps 3 and 4 the conditional half alone
    same_steps = request_flops(fast.with_steps(5), None) / exact5
    assert same_steps < 0.85, same_steps  # measured 0.76 (the decode, encode and banks do not shrink)
    # and its fewer steps on top (3 of 5); the VAE encode and decode are the same in both
    fewer = request_flops(fast.with_steps(3), None) / exact5
    assert fewer < 0.9 * same_steps, (fewer, same_steps)  # measured 0.63 vs 0.76
