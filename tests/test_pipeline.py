"""The whole pipeline through the public API against the original's output (case_c.npz),
and the sampling loop's bookkeeping against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from equality import STEP_TOL, assert_same

from magicanimate_rt import AnimationPipeline
from magicanimate_rt.errors import InputError
from magicanimate_rt.runtime.ddim import DDIMSampler
from magicanimate_rt.runtime.sampling import denoise, initial_noise
from magicanimate_rt.runtime.stages import Stages
from magicanimate_rt.runtime.windows import context_windows


@pytest.fixture(scope="module")
def pipe(shared_dir):
    with AnimationPipeline.from_pretrained(shared_dir / "conformance" / "tiny-models") as p:
        yield p


@pytest.fixture(scope="module")
def case_c(shared_dir):
    return dict(np.load(shared_dir / "conformance" / "case_c.npz"))


def test_case_c_reproduced_through_public_api(pipe, case_c):
    d = case_c
    result = pipe.animate(d["source"], d["control"], size=int(d["size"]), steps=int(d["steps"]),
                          guidance_scale=float(d["guidance"]), seed=int(d["seed"]))
    ref = torch.from_numpy(d["latents"])
    assert result.latents.shape == ref.shape == (1, 4, 32, 16, 16)
    rel = float((result.latents - ref).norm() / ref.norm())
    assert rel < 1e-4, rel
    assert result.frames.shape == (24, 128, 128, 3) and result.frames.dtype == np.uint8
    assert np.abs(result.frames.astype(np.float32) - d["video"] * 255).max() <= 2.0
    for stage in ("vae_encode", "appearance_encoder", "controlnet", "unet", "vae_decode", "total"):
        assert result.timings[stage] > 0


def test_initial_noise_is_one_window_tiled():
    z = initial_noise(3, 48, 16)
    g = torch.Generator().manual_seed(3)
    first = torch.randn((1, 4, 16, 16, 16), generator=g)
    for k in range(3):
        assert torch.equal(z[:, :, 16 * k : 16 * (k + 1)], first)


class FakeStages(Stages):
    """Deterministic stand-ins whose outputs depend on the inputs in simple known ways,
    so the loop's window bookkeeping can be recomputed independently."""

    name = "fake"
    device = torch.device("cpu")
    window = 16

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype
        self.text_embedding = torch.zeros(1, 77, 8, dtype=dtype)
        self.calls = {"guided": 0, "cond": 0}

    def encode_reference(self, image):
        return image.mean() * torch.ones(1, 4, 2, 2)

    def bank(self, ref_latent, t):
        return [ref_latent.flatten(2).transpose(1, 2) * 0 + float(t) / 1000]

    def controlnet(self, latents, t, cond):
        return [cond.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1) * torch.ones_like(latents)]

    def _eps(self, latents, residuals, bank, cond: bool):
        r = residuals[0].transpose(0, 1)[None]  # (1, 4, F, h, w)
        # frame position inside the window matters, so overlaps must be averaged right
        pos = torch.arange(latents.shape[2], dtype=latents.dtype).view(1, 1, -1, 1, 1) / 16
        return 0.1 * latents + r + pos + (bank[0].mean() if cond else 0.0)

    def unet_guided(self, latents, t, residuals, bank):
        self.calls["guided"] += 1
        return self._eps(latents, residuals, bank, False), self._eps(latents, residuals, bank, True)

    def unet_cond(self, latents, t, residuals, bank):
        self.calls["cond"] += 1
        return self._eps(latents, residuals, bank, True)

    def decode(self, latents):
        return torch.zeros(latents.shape[0], 3, 8, 8)


@pytest.mark.parametrize("frames,guidance", [(16, 7.5), (48, 7.5), (48, 1.0)])
def test_loop_bookkeeping_against_independent_numpy(frames, guidance):
    """float64 stages: the loop's sums are float64 and the three DDIM updates round to
    float32 (ddim.py), so the result is the numpy one to float32 rounding (measured
    8.4e-8); STEP_TOL (1e-5) is 119x that, and a bookkeeping mistake (an overlap counted
    once, a frame at another window position) changes the result by > 1e-3."""
    stages = FakeStages(torch.float64)
    n, h = frames, 2
    rng = np.random.default_rng(0)
    lat0 = rng.standard_normal((1, 4, n, h, h))
    control = rng.random((n, 3, 16, 16))
    ref = torch.ones(1, 4, h, h, dtype=torch.float64)
    sampler = DDIMSampler(3)
    out = denoise(stages, ref, torch.from_numpy(control), torch.from_numpy(lat0), sampler, guidance)
    assert out.dtype == torch.float64

    # independent recomputation with numpy, window by window
    lat = lat0
    a = sampler  # coefficients from the (separately tested) DDIM
    for i, t in enumerate(sampler.timesteps):
        res = control.mean(axis=(1, 2, 3))[:, None, None, None] * np.ones((n, 4, h, h))
        sum_u, sum_c, cnt = np.zeros_like(lat), np.zeros_like(lat), np.zeros(n)
        for w in context_windows(n, 16, 4):
            lw = lat[:, :, w]
            r = res[w].transpose(1, 0, 2, 3)[None]
            pos = (np.arange(len(w)) / 16).reshape(1, 1, -1, 1, 1)
            eu = 0.1 * lw + r + pos
            sum_u[:, :, w] += eu
            sum_c[:, :, w] += eu + t / 1000
            cnt[w] += 1
        eu, ec = sum_u / cnt.reshape(1, 1, n, 1, 1), sum_c / cnt.reshape(1, 1, n, 1, 1)
        eps = eu + guidance * (ec - eu)
        x0 = (lat - float(a._sqrt_one_minus_a_t[i]) * eps) / float(a._sqrt_a_t[i])
        lat = float(a._sqrt_a_prev[i]) * x0 + float(a._sqrt_one_minus_a_prev[i]) * eps
    assert_same(out, torch.from_numpy(lat), STEP_TOL, "latents after 3 steps")
    n_windows = len(context_windows(n, 16, 4)) * 3
    if guidance == 1.0:
        assert stages.calls == {"guided": 0, "cond": n_windows}  # cond half only
    else:
        assert stages.calls == {"guided": n_windows, "cond": 0}


@pytest.mark.parametrize("kwargs,match", [
    (dict(size=100), "size must be a positive multiple of 64"),
    (dict(size=0), "size must be a positive multiple of 64"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(guidance_scale=0.5), "guidance scale must be a number >= 1"),
])
def test_bad_settings_raise_input_error(kwargs, match):
    pipe = AnimationPipeline(FakeStages())
    with pytest.raises(InputError, match=match):
        pipe.animate(np.zeros((64, 64, 3), np.uint8), np.zeros((2, 64, 64, 3), np.uint8), **kwargs)


def test_driving_array_checked():
    pipe = AnimationPipeline(FakeStages())
    with pytest.raises(InputError, match="driving frames must be"):
        pipe.animate(np.zeros((64, 64, 3), np.uint8), np.zeros((2, 64, 64), np.uint8), size=64)
    with pytest.raises(InputError, match="no frames"):
        pipe.animate(np.zeros((64, 64, 3), np.uint8), np.zeros((0, 64, 64, 3), np.uint8), size=64)


def test_original_schedule_is_the_same_function(shared_dir, case_c):
    """The reference-schedule baseline (appearance encoder at batch 2, a full UNet per CFG
    half with per-frame bank and text projections, materialised temporal attention,
    per-frame VAE decode, no reference cache) gives the same result, doing the original's
    extra work. float64, one DDIM step at t = 501 (equality.STEP_TOL: the update rounds to
    float32; the eps it gets differ by float64 rounding only)."""
    from benchmarks.flop_count import CountingStages as FlopCounting

    from magicanimate_rt.runtime.backends.torch_backend import TorchOptions, TorchStages
    from magicanimate_rt.runtime.ddim import DDIMSettings
    from magicanimate_rt.runtime.pipeline import PipelineOptions

    d = case_c
    runs = {}
    for name, backend_options, options in (("original", TorchOptions.original(), PipelineOptions.original()),
                                           ("ours", TorchOptions(), PipelineOptions())):
        inner = TorchStages.from_pretrained(shared_dir / "conformance" / "tiny-models", dtype="float64",
                                            options=backend_options)
        counted = FlopCounting(inner)
        with AnimationPipeline(counted, ddim=DDIMSettings(steps_offset=500), options=options) as pipe:
            result = pipe.animate(d["source"], d["control"][:16], size=128, steps=1, guidance_scale=7.5, seed=3)
        inner.close()
        runs[name] = result, counted
    (r, work_r), (f, work_f) = runs["original"], runs["ours"]
    assert r.latents.dtype == f.latents.dtype == torch.float32  # the result's latents are float32
    assert_same(r.latents, f.latents, STEP_TOL, "latents after one step")
    assert np.abs(r.frames.astype(int) - f.frames.astype(int)).max() <= 1  # uint8 truncation of equal values
    # the original's work: the bank from two copies (measured 2.00x the FLOPs at 128 px),
    # the UNet as two full forwards with per-frame projections (measured 1.23x); the same
    # ControlNet FLOPs in one step (ours embeds the frames in a call of their own), the
    # same decode (1 frame per call in both at this size and dtype)
    assert work_r.flops["appearance_encoder"] > 1.8 * work_f.flops["appearance_encoder"]
    assert work_r.flops["unet"] > 1.15 * work_f.flops["unet"]
    assert work_r.calls["unet"] == work_f.calls["unet"] == 1
    assert work_r.flops["controlnet"] == work_f.flops["controlnet"] > 0


class Stop(Exception):
    """What a client's progress callback raises to stop a request (the service's cancel)."""


def _request_state(st) -> tuple:
    """The torch backend's per-request state: its UNet arithmetic (lean settings) and compile key."""
    return st._arithmetic, st._compile_key


def test_a_stopped_or_failed_request_leaves_the_pipeline_as_a_fresh_one(shared_dir):
    """Issue 26 item 5: a request stopped at step 2 (or failing in its decode) restores the
    backend's per-request state in ``finally``; the same request then gives a fresh
    pipeline's output bit for bit (float64, tiny set; the budget makes the plan lean, so the
    stopped request did change the UNet's settings)."""
    from magicanimate_rt import demo
    from magicanimate_rt.runtime.pipeline import PipelineOptions
    from magicanimate_rt.runtime.request import AnimationRequest

    models, options = shared_dir / "conformance" / "tiny-models", PipelineOptions(memory_gb=0.12)
    request = AnimationRequest(demo.source_image(64), demo.driving_clip(16, 64), size=64, steps=3, seed=5)
    with AnimationPipeline.from_pretrained(models, dtype="float64", options=options, ranks=None) as fresh:
        want = fresh.run(request)
    assert want.plan.loop.cfg_sequential  # the request runs lean: set on the backend, to be restored after it
    steps_seen = []

    def stop_at_2(step, steps):
        steps_seen.append(step)
        if step == 2:
            raise Stop()

    def failing_sink(first, frames):
        raise Stop()

    with AnimationPipeline.from_pretrained(models, dtype="float64", options=options, ranks=None) as pipe:
        before = _request_state(pipe.stages)
        with pytest.raises(Stop):
            pipe.run(request, progress=stop_at_2)
        assert steps_seen == [1, 2] and _request_state(pipe.stages) == before
        with pytest.raises(Stop):
            pipe.run(request, frame_sink=failing_sink)
        assert _request_state(pipe.stages) == before
        got = pipe.run(request)
    assert got.latents.dtype == torch.float32 and torch.equal(got.latents, want.latents)
    assert np.array_equal(got.frames, want.frames)
