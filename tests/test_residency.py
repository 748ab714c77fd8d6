"""The residency planner (``--memory-gb``), banks up front, and the out-of-memory
step-down: what of issue 17's "8 GB at any length" runs without a GPU.

The plans under device budgets are checked on SD 1.5's real architecture, built on the
meta device (no weights, no memory): its exact weight bytes and this backend's CUDA fp16
memory model. The equalities run the tiny model set on the CPU through a stage wrapper
that declares what a CUDA backend declares (stages that can leave the device) and records
what the pipeline asks of it, or runs out of "memory" where a fake allocator says so.
"""

from __future__ import annotations

import subprocess
import sys
import numpy as np
import pytest
import torch
from equality import F64_TOL, rel  # tests/ is on sys.path

from magicanimate_rt.errors import InputError
from magicanimate_rt.runtime.backends.torch_backend import TorchStages
from magicanimate_rt.runtime.pipeline import AnimationPipeline, PipelineOptions
from magicanimate_rt.runtime.planner import (
    ALL_STAGES, GIB, HEADROOM, LoopPlan, RequestPlan, RequestShape, phase_bytes, plan_request, state_bytes,
)
from magicanimate_rt.runtime.stages import Capabilities, Stages
from magicanimate_rt.runtime.windows import context_windows

SIZE, FRAMES, STEPS = 64, 32, 2


# --------------------------------------------------------------------------- SD 1.5 on the meta device
@pytest.fixture(scope="module")
def sd15_cuda_stages():
    """SD 1.5's stages in fp16 "on CUDA": modules on the meta device (shapes, no storage), so
    weight_bytes and memory_model are the real ones; nothing can run."""
    from benchmarks.residency import meta_stages

    return meta_stages("sd15", "cuda", "float16")


def sd15_plan(stages, gib: float, frames: int):
    pipe = AnimationPipeline(stages, options=PipelineOptions(memory_gb=gib), ranks=None)
    return pipe.plan_request(512, frames, steps=25)


def test_sd15_weights_and_bank_are_the_architecture_s(sd15_cuda_stages):
    w = sd15_cuda_stages.weight_bytes()
    # fp16 parameter counts of SD 1.5's VAE (83.7M), UNet (860M) + motion modules (453M), its
    # ControlNet (361M) and the appearance encoder (a UNet without its last up blocks' tail)
    assert w["vae"] == pytest.approx(2 * 83.65e6, rel=0.01)
    assert w["controlnet"] == pytest.approx(2 * 361.3e6, rel=0.01)
    assert 2 * 1.25e9 < w["unet"] < 2 * 1.35e9
    m = sd15_cuda_stages.memory_model(512)
    # the "~14 MB per step at 512 px": mid 1280 x 8^2 + up (3 x 1280 x 16^2, 3 x 640 x 32^2,
    # 3 x 320 x 64^2) elements in fp16
    assert m.bank_per_step == 2 * (1280 * 64 + 3 * 1280 * 256 + 3 * 640 * 1024 + 3 * 320 * 4096)


# budgets (GiB, as --gpu-memory-gb) x frames -> what the plan must have chosen
TABLE = [
    # gib, frames, windows per call at least, residuals, banks up front, offloaded
    (80, 64, 4, "all", False, ()),
    (80, 256, 4, "all", False, ()),
    (12, 64, 2, "all", False, ()),
    (12, 256, 2, "per_window", False, ()),
    (8, 16, 1, "all", True, ("appearance_encoder",)),
    (8, 64, 1, "all", True, ("appearance_encoder",)),
    (8, 256, 1, "per_window", True, ("appearance_encoder",)),
    (6, 256, 1, "per_window", True, ALL_STAGES),
]


@pytest.mark.parametrize("gib, frames, windows, residuals, up_front, offload", TABLE)
def test_sd15_plans_under_device_budgets(sd15_cuda_stages, gib, frames, windows, residuals, up_front, offload):
    plan = sd15_plan(sd15_cuda_stages, gib, frames)
    assert plan.predicted_peak <= gib * GIB * HEADROOM  # within the budget, weights included
    assert plan.loop.windows_per_call >= windows
    assert plan.loop.controlnet_residuals == residuals
    assert plan.banks_up_front == up_front and plan.offload == offload
    # the phases' resident stages: the appearance encoder only while the banks are computed
    if up_front:
        assert "appearance_encoder" in plan.resident("reference")
        assert "appearance_encoder" not in plan.resident("loop") + plan.resident("decode")
    if offload == ALL_STAGES:
        assert plan.resident("loop") == ("controlnet", "unet") and plan.resident("decode") == ("vae",)


def test_residency_table_script(sd15_cuda_stages, tmp_path):
    from benchmarks.residency import main

    assert main(["--frames", "64", "--gib", "8,4", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "residency.md").read_text()
    assert "| 8 | 64 |" in md and "banks up front" in md and "| 4 | 64 | - | does not fit" in md


def test_sd15_plans_shrink_with_the_budget(sd15_cuda_stages):
    for frames in (64, 256):
        peaks = [sd15_plan(sd15_cuda_stages, gib, frames).predicted_peak for gib in (80, 24, 12, 10, 8, 7, 6, 5.5)]
        assert peaks == sorted(peaks, reverse=True)


def test_sd15_lean_unet_when_offloading_is_not_enough(sd15_cuda_stages):
    # with every idle stage off the device, 6 GiB needs the CFG halves one after the other,
    # 5.5 chunked feed-forwards too; 5 fits nothing (the loop's weights alone are 3.05 GiB)
    six = sd15_plan(sd15_cuda_stages, 6, 256)
    assert six.loop.cfg_sequential and six.loop.ff_chunk is None and six.loop.controlnet_chunk == 4
    tight = sd15_plan(sd15_cuda_stages, 5.5, 256)
    assert tight.offload == ALL_STAGES and tight.loop.cfg_sequential and tight.loop.ff_chunk is not None
    assert tight.predicted_peak <= 5.5 * GIB * HEADROOM
    with pytest.raises(InputError, match=r"does not fit in 4\.50 GiB .*its loop phase, 3\.05 GiB of it weights"):
        sd15_plan(sd15_cuda_stages, 5, 256)


def test_plan_counts_what_the_phases_hold():
    """phase_bytes by hand on a small made-up model: weights of the resident stages, the
    banks, the state and the loop's calls."""
    from magicanimate_rt.runtime.stages import MemoryModel

    m = MemoryModel(residuals_per_frame=10, unet_per_window=1000, controlnet_per_frame=20, decode_per_frame=300,
                    bank_per_step=7, appearance_call=50)
    w = {"vae": 100, "appearance_encoder": 200, "controlnet": 400, "unet": 800}
    shape = RequestShape(num_frames=32, num_windows=3, steps=5, width=64, height=64, state_bytes=99, frames_bytes=11)
    plan = RequestPlan(LoopPlan(1, "all", 16, 2), True, ("appearance_encoder",), None, w)
    got = phase_bytes(plan, m, shape)
    latents = 32 * 4 * 8 * 8 * 4
    assert got == {
        "reference": 1500 + 7 * 5 + 50,
        "loop": 1300 + 7 * 5 + 99 + 10 * 32 + max(1000, 20 * 16),
        "decode": 1300 + latents + 2 * 300 + 11,
    }


# --------------------------------------------------------------------------- the tiny set, "on a GPU"
class Recording(Stages):
    """The tiny set's torch stages declaring what CUDA stages declare (stages can leave the
    device), recording each placement and, with ``oom``, failing calls a fake allocator
    would refuse: ``oom(kind, batch) -> True`` raises torch.OutOfMemoryError."""

    def __init__(self, inner: TorchStages, oom=None, lean_unet: bool = False):
        self.inner, self.oom = inner, oom
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype
        self.text_embedding, self.window = inner.text_embedding, inner.window
        self.capabilities = Capabilities(max_windows_per_call=None, controlnet_in_two_parts=True,
                                         lean_unet=lean_unet, residency=True)
        self.placements: list[tuple[str, ...]] = []
        self.refused: list[tuple[str, int]] = []

    def _check(self, kind: str, batch: int) -> None:
        if self.oom is not None and self.oom(kind, batch):
            self.refused.append((kind, batch))
            raise torch.OutOfMemoryError(f"fake allocator: {kind} of {batch} refused")

    def memory_model(self, width, height=None):
        return self.inner.memory_model(width, height)

    def weight_bytes(self):
        return self.inner.weight_bytes()

    def set_resident(self, stages):
        self.placements.append(tuple(stages))

    def follow_plan(self, plan):
        self.inner.follow_plan(plan)

    def encode_reference(self, image):
        return self.inner.encode_reference(image)

    def bank(self, ref_latent, t):
        assert "appearance_encoder" in self.placements[-1], "the appearance encoder ran off the device"
        return self.inner.bank(ref_latent, t)

    def controlnet(self, latents, t, cond):
        return self.inner.controlnet(latents, t, cond)

    def controlnet_embed(self, cond):
        return self.inner.controlnet_embed(cond)

    def controlnet_embedded(self, latents, t, embedding):
        return self.inner.controlnet_embedded(latents, t, embedding)

    def unet_guided(self, latents, t, residuals, bank):
        self._check("unet", latents.shape[0])
        return self.inner.unet_guided(latents, t, residuals, bank)

    def unet_cond(self, latents, t, residuals, bank):
        self._check("unet", latents.shape[0])
        return self.inner.unet_cond(latents, t, residuals, bank)

    def decode(self, latents):
        self._check("decode", latents.shape[0])
        return self.inner.decode(latents)


@pytest.fixture(scope="module")
def tiny_stages(tiny_model_set):
    return TorchStages(tiny_model_set, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def inputs(shared_dir):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3),
                                                                                 dtype=np.uint8)


def run(stages, inputs, **options):
    pipe = AnimationPipeline(stages, options=PipelineOptions(reference_cache_entries=0, **options), ranks=None)
    return pipe.animate(*inputs, size=SIZE, steps=STEPS, guidance_scale=3.0, seed=1)


EXPLICIT = dict(windows_per_call=1, controlnet_residuals="per_window", decode_chunk=1)


def tiny_resident_plan(stages):
    """The tiny set's plan with the explicit batching and no budget: everything resident."""
    n = len(context_windows(FRAMES, 16, 4))
    shape = RequestShape(FRAMES, n, STEPS, SIZE, SIZE, state_bytes(FRAMES, SIZE, SIZE, 4), 2 * FRAMES * SIZE * SIZE * 3)
    return plan_request(float("inf"), stages.memory_model(SIZE), stages.weight_bytes(), shape,
                        Capabilities(max_windows_per_call=None, residency=True), **EXPLICIT)


def test_banks_up_front_equal_banks_per_step(tiny_stages, inputs):
    resident = tiny_resident_plan(tiny_stages)
    assert not resident.banks_up_front
    w = tiny_stages.weight_bytes()["appearance_encoder"]
    # a budget between "everything resident" and "the appearance encoder off after the banks"
    budget = resident.predicted_peak - w / 2
    rec = Recording(tiny_stages)
    got = run(rec, inputs, memory_gb=budget / GIB / HEADROOM, **EXPLICIT)
    assert got.plan.banks_up_front and got.plan.offload == ("appearance_encoder",) and got.plan.rung == 1
    assert got.plan.predicted_peak <= budget and got.stepped_down is None
    # the reference phase has the appearance encoder; the loop and the decode do not
    assert rec.placements == [("vae", "appearance_encoder", "controlnet", "unet"),
                              ("vae", "controlnet", "unet"), ("vae", "controlnet", "unet")]
    want = run(tiny_stages, inputs, **EXPLICIT)  # banks per step, on the CPU's own plan
    assert want.plan.banks_up_front is False and want.plan.rung == 0
    # the same calls on the same values in another order: bitwise equal
    assert torch.equal(got.latents, want.latents)
    assert np.array_equal(got.frames, want.frames)


@pytest.fixture(scope="module")
def tiny_stages64(tiny_models):
    from magicanimate_rt.models import load_model_set

    return TorchStages(load_model_set(tiny_models, dtype=torch.float64), torch.device("cpu"), torch.float64)


def test_out_of_memory_steps_the_loop_down_once_and_retries(tiny_stages64, inputs):
    tiny_stages = tiny_stages64
    # the fake allocator has room for one window per UNet call
    rec = Recording(tiny_stages, oom=lambda kind, batch: kind == "unet" and batch > 1)
    got = run(rec, inputs, windows_per_call=3, controlnet_residuals="all", decode_chunk=4)
    assert rec.refused == [("unet", 3)]  # once: the retried step and the rest run lean
    old, new = got.stepped_down
    assert (old.loop.windows_per_call, old.loop.controlnet_residuals, old.steps_down) == (3, "all", 0)
    assert (new.loop.windows_per_call, new.loop.controlnet_residuals, new.loop.controlnet_chunk,
            new.loop.decode_chunk, new.steps_down) == (1, "per_window", 4, 1, 1)
    assert got.plan == new
    # the same function as planning lean from the start: the failed call left nothing behind
    want = run(tiny_stages, inputs, windows_per_call=1, controlnet_residuals="per_window", controlnet_chunk=4,
               decode_chunk=1)
    # the retried step runs the ControlNet from the embedding the first plan made (two
    # parts), the lean plan in one part: float32 differs by 4.8e-6 rel L2 here, so compare
    # in float64, where only rounding of ~1e-16 is left
    assert rel(got.latents, want.latents) < F64_TOL


def test_out_of_memory_with_a_lean_unet_runs_the_halves_in_turn(tiny_stages64, inputs):
    rec = Recording(tiny_stages64, oom=lambda kind, batch: kind == "unet" and batch > 1, lean_unet=True)
    try:
        got = run(rec, inputs, windows_per_call=2)
        new = got.stepped_down[1]
        assert new.loop.cfg_sequential and new.loop.ff_chunk == 1024
        assert tiny_stages64._arithmetic.cfg_sequential  # the stages were told
        tiny_stages64.end_request()  # (the recording stages leave it to the pipeline's own)
        want = run(tiny_stages64, inputs, cfg_sequential=True, ff_chunk=1024, windows_per_call=1,
                   controlnet_residuals="per_window",
                   controlnet_chunk=new.loop.controlnet_chunk, decode_chunk=new.loop.decode_chunk)
        assert rel(got.latents, want.latents) < F64_TOL
        assert want.plan.loop.cfg_sequential and not tiny_stages64._arithmetic.cfg_sequential  # restored
    finally:
        tiny_stages64.end_request()


def test_a_second_out_of_memory_is_raised(tiny_stages, inputs):
    rec = Recording(tiny_stages, oom=lambda kind, batch: kind == "unet")
    with pytest.raises(torch.OutOfMemoryError):
        run(rec, inputs, windows_per_call=2)
    assert rec.refused == [("unet", 2), ("unet", 1)]


def test_out_of_memory_in_the_decode_quarters_the_chunk(tiny_stages, inputs):
    rec = Recording(tiny_stages, oom=lambda kind, batch: kind == "decode" and batch > 2)
    got = run(rec, inputs, decode_chunk=8)
    assert rec.refused == [("decode", 8)]
    want = run(tiny_stages, inputs, decode_chunk=2)
    # each frame decodes alone in the VAE: only the batching differs. Measured max abs
    # 0 of 255 on this CPU; a rounding flip of one level is allowed for other CPUs
    assert np.abs(got.frames.astype(int) - want.frames.astype(int)).max() <= 1


def test_bank_and_weight_bytes_are_the_tensors(tiny_stages):
    t = torch.tensor([500.0])
    bank = tiny_stages.bank(torch.zeros(1, 4, SIZE // 8, (SIZE * 2) // 8), t)
    assert tiny_stages.memory_model(SIZE * 2, SIZE).bank_per_step == sum(b.numel() * b.element_size() for b in bank)
    m = tiny_stages.models
    for name, mod in (("unet", m.unet), ("vae", m.vae), ("controlnet", m.controlnet)):
        want = sum(v.numel() * v.element_size() for v in mod.state_dict().values())
        assert tiny_stages.weight_bytes()[name] >= want  # state dict, plus any non-persistent buffers


def test_memory_gb_checked(tiny_models):
    from magicanimate_rt.serve.settings import ServeSettings

    with pytest.raises(InputError, match="--memory-gb must be a number of GiB > 0, got 0"):
        PipelineOptions(memory_gb=0)
    with pytest.raises(InputError, match="--memory-gb must be a number of GiB > 0, got -2"):
        ServeSettings(models=tiny_models, memory_gb=-2).check()
    assert ServeSettings(models=tiny_models, memory_gb=8).check().memory_gb == 8


def test_cli_memory_gb_too_small_is_one_line(tiny_models, tmp_path, shared_dir):
    from PIL import Image

    from magicanimate_rt.runtime.media import write_video

    src = tmp_path / "s.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src)
    drv = tmp_path / "d.mp4"
    write_video(drv, np.zeros((16, 64, 64, 3), np.uint8))
    out = tmp_path / "o.mp4"
    cmd = [sys.executable, "-m", "magicanimate_rt.cli", "animate", "--models", str(tiny_models), "--source", str(src),
           "--driving", str(drv), "--output", str(out), "--size", "64", "--steps", "1"]
    # the old name (--gpu-memory-gb) is the same setting, checked in the same place
    bad = subprocess.run(cmd + ["--gpu-memory-gb", "-1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--memory-gb" in bad.stderr
    small = subprocess.run(cmd + ["--memory-gb", "0.001"], capture_output=True, text=True, timeout=300)
    assert small.returncode == 2, small.stderr
    assert small.stderr.strip().startswith("magicanimate-rt: error: the request does not fit in 0.00 GiB")
    assert small.stderr.strip().count("\n") == 0  # one line, no traceback
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving stages to pinned host memory needs a CUDA GPU")
def test_set_resident_moves_weights_off_the_gpu_and_back(tiny_models):
    from magicanimate_rt.models import load_model_set

    st = TorchStages(load_model_set(tiny_models, device="cuda"), torch.device("cuda"), torch.float32)
    lat = torch.randn(1, 4, 8, 8, device="cuda")
    t = torch.tensor([500.0], device="cuda")
    before = [b.clone() for b in st.bank(lat, t)]
    held = torch.cuda.memory_allocated()
    st.set_resident(("vae", "controlnet", "unet"))
    torch.cuda.synchronize()
    gone = held - torch.cuda.memory_allocated()
    assert gone >= 0.9 * st.weight_bytes()["appearance_encoder"]
    assert next(st.models.appearance_encoder.parameters()).is_pinned()
    st.set_resident(ALL_STAGES)
    after = st.bank(lat, t)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the same weights came back
