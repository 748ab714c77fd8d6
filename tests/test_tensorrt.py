"""The TensorRT builder and backend, run against a recording fake ``tensorrt`` module on the
CPU (tests/fake_tensorrt.py): the builder's and the runtime's call sequences, the backend's
stages end to end, the refusals of plans built for another GPU or TensorRT, and a static
check that every TensorRT name our code uses exists in the real module's binary."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_tensorrt import FakeTensorRT, fake_outputs, write_fake_engine_dir

from magicanimate_rt import AnimationPipeline
from magicanimate_rt import plans
from magicanimate_rt.engines import tensorrt_plan as tp
from magicanimate_rt.engines.manifest import FileRecord, load_manifest, read_manifest
from magicanimate_rt.engines.specs import STAGE_NAMES
from magicanimate_rt.engines.tensorrt_build import PlanBuildSettings, build_plans, plan_staleness
from magicanimate_rt.engines.tensorrt_plan import PlanTarget
from magicanimate_rt.errors import EngineError, InputError
from magicanimate_rt.runtime import stages as stages_module
from magicanimate_rt.runtime.backends import engine_factory
from magicanimate_rt.runtime.backends import tensorrt_backend as tbe
from magicanimate_rt.runtime.backends.tensorrt_backend import TensorRTOptions, TensorRTStages
from magicanimate_rt.runtime.pipeline import PipelineOptions

ROOT = Path(__file__).resolve().parents[1]
H100 = PlanTarget("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
SOURCES = [ROOT / "magicanimate_rt" / "engines" / "tensorrt_plan.py",
           ROOT / "magicanimate_rt" / "engines" / "tensorrt_build.py",
           ROOT / "magicanimate_rt" / "runtime" / "backends" / "tensorrt_backend.py",
           ROOT / "magicanimate_rt" / "densepose" / "tensorrt_stages.py"]


def quiet(msg: str) -> None:
    pass


@pytest.fixture
def engine_dir(tmp_path):
    return write_fake_engine_dir(tmp_path / "engines")


@pytest.fixture
def built(engine_dir):
    """(engine dir, the fake that built its plans)."""
    trt = FakeTensorRT(H100.version)
    build_plans(engine_dir, trt=trt, target=H100, log=quiet)
    return engine_dir, trt


def load(d, trt=None, options=None, target=H100):
    return TensorRTStages.from_engines(d, device="cpu", options=options, trt=trt or FakeTensorRT(target.version),
                                       target=target)


# --------------------------------------------------------------------------- building
def test_build_calls_and_manifest(engine_dir):
    trt = FakeTensorRT(H100.version)
    settings = PlanBuildSettings(optimization_level=4, workspace_bytes=3 << 30)
    reports = build_plans(engine_dir, settings, trt=trt, target=H100, log=quiet)

    assert [r.stage for r in reports] == list(STAGE_NAMES) and all(r.skipped is None for r in reports)
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert [c[1] for c in trt.events("create_network")] == [strongly_typed] * 5
    assert [Path(c[1]).name for c in trt.events("parse_from_file")] == [f"{s}.onnx" for s in STAGE_NAMES]
    assert trt.events("set_memory_pool_limit") == [("set_memory_pool_limit", trt.MemoryPoolType.WORKSPACE,
                                                    3 << 30)] * 5
    builds = trt.events("build_serialized_network")
    assert [(b[1], b[2], b[3]) for b in builds] == [(s, strongly_typed, 4) for s in STAGE_NAMES]
    # one profile per stage with dynamic axes, holding exactly the spec's min/opt/max
    m = read_manifest(engine_dir)
    want = [("set_shape", name, *shapes) for s in STAGE_NAMES for name, shapes in m.spec(s).profile().items()
            if any(isinstance(d, str) for d in m.spec(s).tensors[name].shape)]
    assert trt.events("set_shape") == want
    assert [n for _, n, *_ in want] == ["images", "latents", "cond", "latents"]
    assert want[1][2:] == ((1, 4, 8, 8), (16, 4, 8, 8), (16, 4, 8, 8))
    assert len(trt.events("add_optimization_profile")) == 3  # vae_encoder, controlnet, vae_decoder
    # the timing cache: created empty once, attached to every config, saved after each stage
    assert trt.events("create_timing_cache") == [("create_timing_cache", b"")]
    assert len(trt.events("set_timing_cache")) == 5 and len(trt.events("serialize_timing_cache")) == 5
    assert json.loads((engine_dir / tp.TIMING_CACHE).read_text())["entries"] == list(STAGE_NAMES)
    # plans beside the graphs, recorded in the manifest with the target
    m = load_manifest(engine_dir)
    assert m.tensorrt == H100.to_dict()
    for s in STAGE_NAMES:
        rec = m.stages[s].plans
        assert rec["file"] == FileRecord.of(engine_dir, f"{s}.plan").to_dict()
        assert rec["onnx_sha256"] == m.stages[s].files[0].sha256
        assert rec["settings"] == {"optimization_level": 4, "workspace_bytes": 3 << 30}
        assert json.loads((engine_dir / f"{s}.plan").read_text())["spec"]["name"] == s
    assert m.stages["controlnet"].plans["profile"] == {"latents": [[1, 4, 8, 8], [16, 4, 8, 8], [16, 4, 8, 8]],
                                                       "cond": [[1, 3, 64, 64], [16, 3, 64, 64], [16, 3, 64, 64]]}
    assert m.stages["unet"].plans["profile"] == {}
    tp.check_plans(m, H100, verify_hashes=True)


def test_defaults_leave_the_workspace_to_tensorrt(engine_dir):
    trt = FakeTensorRT(H100.version)
    build_plans(engine_dir, trt=trt, target=H100, log=quiet)
    assert trt.events("set_memory_pool_limit") == []
    assert {b[3] for b in trt.events("build_serialized_network")} == {3}


def test_up_to_date_plans_are_kept_and_the_timing_cache_reused(built):
    d, _ = built
    trt = FakeTensorRT(H100.version)
    reports = build_plans(d, trt=trt, target=H100, log=quiet)
    assert {r.skipped for r in reports} == {"up to date"} and trt.calls == []

    saved = (d / tp.TIMING_CACHE).read_bytes()
    build_plans(d, PlanBuildSettings(force=True), trt=trt, target=H100, log=quiet)
    assert trt.events("create_timing_cache")[0] == ("create_timing_cache", saved)
    assert len(trt.events("build_serialized_network")) == 5

    trt = FakeTensorRT(H100.version)  # other settings: those plans are stale
    build_plans(d, PlanBuildSettings(optimization_level=5, stages=("unet",)), trt=trt, target=H100, log=quiet)
    assert [b[1] for b in trt.events("build_serialized_network")] == ["unet"]
    stale = plan_staleness(read_manifest(d), H100, PlanBuildSettings(optimization_level=5))
    assert stale["unet"] is None and "other settings" in stale["controlnet"]


def test_another_gpu_rebuilds_every_plan_and_only_the_plans(built):
    d, _ = built
    onnx_before = {s: (d / f"{s}.onnx").read_bytes() for s in STAGE_NAMES}
    a100 = PlanTarget(H100.version, "NVIDIA A100-SXM4-80GB", "8.0")
    assert set(plan_staleness(read_manifest(d), a100).values()) == {f"built for {H100.describe()}"}
    (d / tp.TIMING_CACHE).write_bytes(b"other-gpu timing cache")
    trt = FakeTensorRT(H100.version)
    msgs = []
    build_plans(d, trt=trt, target=a100, log=msgs.append)
    assert len(trt.events("build_serialized_network")) == 5
    assert any("another GPU" in msg for msg in msgs)
    assert [c[1] for c in trt.events("create_timing_cache")] == [b"other-gpu timing cache", b""]
    m = load_manifest(d)
    assert m.tensorrt == a100.to_dict() and {s: (d / f"{s}.onnx").read_bytes() for s in STAGE_NAMES} == onnx_before
    tp.check_plans(m, a100)


def test_a_changed_graph_or_a_damaged_plan_is_stale(built):
    d, _ = built
    m = read_manifest(d)
    stages = dict(m.stages)
    stages["vae_decoder"] = replace(stages["vae_decoder"], files=(FileRecord("vae_decoder.onnx", 1, "f" * 64),))
    replace(m, stages=stages).write()
    (d / "unet.plan").write_bytes(b"truncated")
    stale = plan_staleness(read_manifest(d), H100)
    assert "graph changed" in stale["vae_decoder"] and "truncated" in stale["unet"]
    assert stale["vae_encoder"] is None


def rewrite_graph(d: Path, stage: str, content: dict) -> None:
    """Replace a stage's "ONNX file" and its manifest record (so only the content differs)."""
    (d / f"{stage}.onnx").write_text(json.dumps(content))
    m = read_manifest(d)
    stages = dict(m.stages)
    stages[stage] = replace(stages[stage], files=(FileRecord.of(d, f"{stage}.onnx"),))
    replace(m, stages=stages).write()


def test_parser_errors_are_reported(engine_dir):
    spec = read_manifest(engine_dir).spec("controlnet").to_dict()
    rewrite_graph(engine_dir, "controlnet", {**spec, "parser_errors": [
        {"desc": "Unsupported ONNX data type: UINT4 (16)", "node": "/conv_in/Conv", "op": "Conv"},
        {"desc": "Invalid node - /mid/Add"}]})
    with pytest.raises(EngineError) as e:
        build_plans(engine_dir, trt=FakeTensorRT(H100.version), target=H100, log=quiet)
    msg = str(e.value)
    assert "controlnet.onnx" in msg and "ONNX parser failed" in msg
    assert "UINT4 (16) (node '/conv_in/Conv', op Conv); Invalid node - /mid/Add" in msg
    # the stages before it were built and recorded; the failed one stays without a plan
    m = read_manifest(engine_dir)
    assert m.stages["appearance_encoder"].plans and not m.stages["controlnet"].plans


def test_a_graph_that_is_not_the_manifest_stage_is_refused(engine_dir):
    spec = read_manifest(engine_dir).spec("vae_decoder").to_dict()
    spec["inputs"][0]["dtype"] = "float32"  # an fp32 graph in an fp16 directory
    rewrite_graph(engine_dir, "vae_decoder", spec)
    with pytest.raises(EngineError, match=r"input latents is \(-1, 4, 8, 8\) .*FLOAT.* spec says \(-1, 4, 8, 8\) "
                                          r"float16"):
        build_plans(engine_dir, trt=FakeTensorRT(H100.version), target=H100, log=quiet)
    spec["inputs"][0]["name"] = "z"
    rewrite_graph(engine_dir, "vae_decoder", spec)
    with pytest.raises(EngineError, match=r"inputs are \['z'\], the stage spec says \['latents'\]"):
        build_plans(engine_dir, trt=FakeTensorRT(H100.version), target=H100, log=quiet)


def test_a_failed_build_reports_tensorrt_errors(engine_dir):
    trt = FakeTensorRT(H100.version)
    trt.fail_build.add("unet")
    with pytest.raises(EngineError, match="unet: TensorRT could not build a plan from unet.onnx: no implementation "
                                          "for a layer of unet"):
        build_plans(engine_dir, trt=trt, target=H100, log=quiet)


def test_build_settings_are_checked():
    for bad in ({"optimization_level": 6}, {"optimization_level": True}, {"workspace_bytes": 1000},
                {"stages": ("unet", "text_encoder")}):
        with pytest.raises(InputError):
            PlanBuildSettings(**bad)


def test_missing_tensorrt_is_one_clear_error(engine_dir):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("a tensorrt module is installed here")
    with pytest.raises(EngineError, match="TensorRT is not importable.*--onnx-only"):
        build_plans(engine_dir, log=quiet)
    proc = subprocess.run([sys.executable, "-m", "magicanimate_rt.plans", str(engine_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "TensorRT is not importable" in proc.stderr


# --------------------------------------------------------------------------- loading and refusing
@pytest.mark.parametrize("target, needles", [
    (PlanTarget(H100.version, "NVIDIA A100-SXM4-80GB", "8.0"),
     ["built for NVIDIA H100 80GB HBM3 (compute capability 9.0)", "this GPU is NVIDIA A100-SXM4-80GB"]),
    (PlanTarget("10.9.0.34", H100.gpu, H100.compute_capability),
     ["built with TensorRT 10.8.0.43, this is TensorRT 10.9.0.34"]),
])
def test_plans_of_another_gpu_or_tensorrt_are_refused(built, target, needles):
    d, _ = built
    trt = FakeTensorRT(target.version)
    with pytest.raises(EngineError) as e:
        load(d, trt, target=target)
    msg = str(e.value)
    for n in needles:
        assert n in msg
    assert (f"python build_engines.py --models /models/tiny --out {d} --size 64 --precision fp16" in msg
            and f"python -m magicanimate_rt.plans {d}" in msg)
    assert trt.calls == []  # refused before deserializing anything


def test_missing_or_damaged_plans_are_refused(engine_dir, built):
    d, _ = built
    fresh = write_fake_engine_dir(d.parent / "onnx-only")
    with pytest.raises(EngineError, match="has no TensorRT plans .*rebuild the plans on this machine"):
        load(fresh)
    (d / "decoder-copy").write_bytes((d / "vae_decoder.plan").read_bytes())
    (d / "vae_decoder.plan").write_bytes((d / "vae_decoder.plan").read_bytes()[:-10])
    with pytest.raises(EngineError, match="vae_decoder.plan is .* bytes, the manifest says"):
        load(d)
    plan = (d / "decoder-copy").read_bytes()
    (d / "vae_decoder.plan").write_bytes(b"\0" * len(plan))  # same size, not a plan
    with pytest.raises(EngineError, match="does not match its recorded sha256"):
        load(d, options=TensorRTOptions(verify_hashes=True))
    with pytest.raises(EngineError, match="vae_decoder.plan: TensorRT cannot deserialize this plan"):
        load(d)


def test_cpu_only_with_a_fake_and_cuda_needs_a_gpu(built):
    d, _ = built
    with pytest.raises(InputError, match="runs on a CUDA device"):
        TensorRTStages.from_engines(d, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="torch sees no CUDA GPU"):
            TensorRTStages.from_engines(d)


def test_registered_as_tensorrt():
    assert engine_factory("tensorrt") == TensorRTStages.from_engines


# --------------------------------------------------------------------------- running
def test_runtime_setup_calls(built):
    d, _ = built
    trt = FakeTensorRT(H100.version)
    with load(d, trt) as st:
        assert st.name == "tensorrt" and st.dtype == torch.float16 and st.window == 16
        assert [c[1] for c in trt.events("deserialize_cuda_engine")] == list(STAGE_NAMES)
        assert len(trt.events("Runtime")) == 1
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        assert trt.events("create_execution_context") == [("create_execution_context", s, strategy)
                                                          for s in STAGE_NAMES]
        # one shared activation buffer, as large as the largest engine needs, on every context
        sizes = {c._engine._stage: c._engine._device_memory for c in trt.contexts}
        mem = trt.events("set_device_memory")
        assert [m[1] for m in mem] == list(STAGE_NAMES)
        assert {(m[2], m[3]) for m in mem} == {(st._activations.data_ptr(), max(sizes.values()))}
        assert st._activations.numel() == max(sizes.values()) == sizes["unet"]
        # the text embedding bound once, to the stages that take it; the UNet's outputs too
        bound = [c[1:3] for c in trt.events("set_tensor_address")]
        assert bound == [("appearance_encoder", "text_embedding"), ("controlnet", "text_embedding"),
                         ("unet", "text_embedding"), ("unet", "eps_uncond"), ("unet", "eps_cond")]
        assert trt.events("execute_async_v3") == []


def expected(st, stage, inputs, **axes):
    """What the fake plan computes for ``inputs`` (torch tensors as the caller gives them)."""
    spec = st.manifest.spec(stage)
    arrays = {t.name: inputs[t.name].to(torch.float16 if t.dtype == "float16" else torch.float32).numpy()
              for t in spec.inputs if t.name != "text_embedding"}
    if "text_embedding" in spec.input_names:
        arrays["text_embedding"] = st.text_embedding.numpy()
    shapes = spec.shapes(**axes)
    return fake_outputs(arrays, spec.input_names, [(o.name, shapes[o.name], o.dtype) for o in spec.outputs])


def same(got, want):
    assert len(got) == len(want)
    for a, (name, b) in zip(got, want.items()):
        assert tuple(a.shape) == b.shape, name
        np.testing.assert_allclose(a.float().numpy(), b.astype(np.float32), rtol=2e-3, atol=2e-3, err_msg=name)


def test_every_stage_binds_runs_and_returns_what_the_plan_computes(built):
    d, _ = built
    trt = FakeTensorRT(H100.version)
    g = torch.Generator().manual_seed(0)
    with load(d, trt) as st:
        stream = st.stream.cuda_stream
        image = (torch.rand(1, 64, 64, 3, generator=g) * 255).permute(0, 3, 1, 2)  # float32 view
        r = st.encode_reference(image)
        same([r], expected(st, "vae_encoder", {"images": image}, images=1))
        t = torch.tensor(501)  # int64, shape (): made float32 (1,)
        bank = st.bank(r, t)
        same(bank, expected(st, "appearance_encoder", {"latent": r, "timestep": t.reshape(1)}))

        latents = torch.randn(1, 4, 32, 8, 8, generator=g, dtype=torch.float16)
        frames = latents[0].transpose(0, 1)  # (32, 4, 8, 8), not contiguous
        cond = torch.rand(32, 3, 64, 64, generator=g, dtype=torch.float16)
        n_shape_calls = len(trt.events("set_input_shape"))
        res16 = st.controlnet(frames[:16], t, cond[:16])
        res5 = st.controlnet(frames[16:21], t, cond[16:21])
        res5b = st.controlnet(frames[21:26], t, cond[21:26])
        same(res16, expected(st, "controlnet", {"latents": frames[:16], "timestep": t.reshape(1),
                                                "cond": cond[:16]}, frames=16))
        same(res5b, expected(st, "controlnet", {"latents": frames[21:26], "timestep": t.reshape(1),
                                                "cond": cond[21:26]}, frames=5))
        assert res16[0].data_ptr() != res5[0].data_ptr() and res5[0].shape[0] == 5  # fresh outputs
        # shapes are set when they change: 16 frames, then 5; not again for the second 5
        shape_calls = [c[2:] for c in trt.events("set_input_shape")[n_shape_calls:]]
        assert [c for c in shape_calls if c[0] == "latents"] == [("latents", (16, 4, 8, 8)), ("latents", (5, 4, 8, 8))]
        # more frames than the plan's profile (16): refused (the pipeline's plan never asks)
        with pytest.raises(InputError, match="frames=20 is outside the built range 1..16"):
            st.controlnet(frames[:20], t, cond[:20])

        window = latents[:, :, :16]
        eps_u, eps_c = st.unet_guided(window, t, res16, bank)
        unet_in = {"latents": window, "timestep": t.reshape(1), "mid": res16[-1],
                   **{f"down_{i}": x for i, x in enumerate(res16[:-1])}, **{f"bank_{j}": b for j, b in enumerate(bank)}}
        same([eps_u, eps_c], expected(st, "unet", unet_in))
        ptrs = (eps_u.data_ptr(), eps_c.data_ptr())
        eps_c2 = st.unet_cond(latents[:, :, 16:], t, res16, bank)
        assert eps_c2.data_ptr() == ptrs[1]  # the UNet's output buffers, reused
        assert [c[2] for c in trt.events("set_tensor_address") if c[1] == "unet"].count("eps_cond") == 1

        images = st.decode(frames[:3])
        same([images], expected(st, "vae_decoder", {"latents": frames[:3]}, frames=3))
        # the plan takes 8 at most: declared, and refused beyond (never split behind the plan's back)
        with pytest.raises(InputError, match="frames=11 is outside the built range 1..8"):
            st.decode(frames[:11])
        caps = st.capabilities
        assert (caps.max_windows_per_call, caps.max_decode_frames, caps.max_controlnet_frames,
                caps.max_encode_images, caps.controlnet_in_two_parts) == (1, 8, 16, 4, False)
        # the pipeline plans within them, even when asked for more
        plan = AnimationPipeline(st, options=PipelineOptions(decode_chunk=16, controlnet_chunk=32,
                                                             windows_per_call=4)).plan(64, 64)
        assert (plan.decode_chunk, plan.controlnet_chunk, plan.windows_per_call) == (8, 16, 1)
        assert {c[2] for c in trt.events("execute_async_v3")} == {stream}
    with pytest.raises(EngineError, match="closed"):
        st.decode(frames[:1])


class ReferenceStages(stages_module.Stages):
    """The fake plans' function computed directly, with new output tensors every call."""

    name = "reference"

    def __init__(self, trt_stages):
        self.st = trt_stages
        self.device, self.dtype, self.window = torch.device("cpu"), trt_stages.dtype, 16
        self.text_embedding = trt_stages.text_embedding

    def _call(self, stage, inputs, **axes):
        return [torch.from_numpy(v.copy()) for v in expected(self.st, stage, inputs, **axes).values()]

    def encode_reference(self, image):
        return self._call("vae_encoder", {"images": image}, images=image.shape[0])[0]

    def bank(self, ref_latent, t):
        return self._call("appearance_encoder", {"latent": ref_latent, "timestep": t.reshape(1)})

    def controlnet(self, latents, t, cond):
        return self._call("controlnet", {"latents": latents, "timestep": t.reshape(1), "cond": cond},
                          frames=latents.shape[0])

    def unet_guided(self, latents, t, residuals, bank):
        inputs = {"latents": latents, "timestep": t.reshape(1), "mid": residuals[-1],
                  **{f"down_{i}": x for i, x in enumerate(residuals[:-1])},
                  **{f"bank_{j}": b for j, b in enumerate(bank)}}
        return tuple(self._call("unet", inputs))

    def unet_cond(self, latents, t, residuals, bank):
        return self.unet_guided(latents, t, residuals, bank)[1]

    def decode(self, latents):
        return self._call("vae_decoder", {"latents": latents}, frames=latents.shape[0])[0]


def fake_capture(log):
    def capture(stream, launch):
        log.append(("capture", stream.cuda_stream))
        launch()
        return lambda: (log.append(("replay",)), launch())
    return capture


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_sampling_loop_gets_the_same_result_as_fresh_outputs(built, monkeypatch, cuda_graph):
    # The UNet's outputs are reused buffers: the loop must consume them before the next
    # window (it does, in stream order); 28 frames -> 3 windows that overlap and wrap.
    d, _ = built
    log = []
    monkeypatch.setattr(tbe, "_capture_graph", fake_capture(log))
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    driving = rng.integers(0, 256, (28, 64, 64, 3), dtype=np.uint8)
    results = []
    with load(d, options=TensorRTOptions(cuda_graph=cuda_graph)) as st:
        for stages in (st, ReferenceStages(st)):
            # decode chunks of 16 as the pipeline picks on CUDA: the plan caps them at the profile's 8
            pipe = AnimationPipeline(stages, ddim=st.ddim, options=PipelineOptions(decode_chunk=16))
            results.append(pipe.animate(source, driving, size=64, steps=2, guidance_scale=7.5, seed=1))
    a, b = results
    assert a.latents.shape == (1, 4, 32, 8, 8) and torch.isfinite(a.latents).all()
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-2, atol=1e-2)
    assert set(a.timings) >= {"unet", "controlnet", "appearance_encoder", "vae_decode"}
    if cuda_graph:
        assert log[0] == ("capture", 0) and log.count(("replay",)) == 2 * 3  # steps x windows


def test_cuda_graph_captures_once_and_refuses_another_shape(built, monkeypatch):
    d, _ = built
    log = []
    monkeypatch.setattr(tbe, "_capture_graph", fake_capture(log))
    trt = FakeTensorRT(H100.version)
    with load(d, trt, options=TensorRTOptions(cuda_graph=True)) as st:
        assert log == [("capture", 0)]
        executes_at_load = len(trt.events("execute_async_v3"))
        assert executes_at_load == 2  # one warm-up launch, then the captured one
        t = torch.tensor([41.0])
        bank = st.bank(torch.randn(1, 4, 8, 8, dtype=torch.float16), t)
        res = st.controlnet(torch.randn(16, 4, 8, 8), t, torch.rand(16, 3, 64, 64))
        latents = torch.randn(1, 4, 16, 8, 8)  # float32: the graph's copies convert
        n_addr = len(trt.events("set_tensor_address"))
        eps_u, eps_c = st.unet_guided(latents, t, res, bank)
        unet_in = {"latents": latents, "timestep": t, "mid": res[-1],
                   **{f"down_{i}": x for i, x in enumerate(res[:-1])}, **{f"bank_{j}": b for j, b in enumerate(bank)}}
        same([eps_u, eps_c], expected(st, "unet", unet_in))
        assert [c for c in trt.events("set_tensor_address")[n_addr:] if c[1] == "unet"] == []  # static buffers
        with pytest.raises(EngineError, match=r"latents has shape \(1, 4, 12, 8, 8\), the captured CUDA graph was "
                                              r"built for \(1, 4, 16, 8, 8\)"):
            st.unet_guided(latents[:, :, :12], t, res, bank)
        assert log == [("capture", 0), ("replay",)]


# --------------------------------------------------------------------------- validation
def test_validate_engines_reports_each_output(built):
    d, _ = built

    def reference_like_the_plan(path, feeds, device):
        spec = read_manifest(d).spec(Path(path).stem)
        axes = {a: feeds[next(t.name for t in spec.inputs if a in t.shape)].shape[0] for a in spec.axes}
        shapes = spec.shapes(**axes)
        return list(fake_outputs(feeds, spec.input_names, [(o.name, shapes[o.name], o.dtype)
                                                           for o in spec.outputs]).values())

    with load(d) as st:
        checks = plans.validate_engines(d, stages_backend=st, reference=reference_like_the_plan)
    assert len(checks) == 2 + 10 + 2 * 13 + 2 + 2  # dynamic stages at opt and min
    assert all(c.ok for c in checks), plans.format_validation(checks)
    assert {c.axes for c in checks if c.stage == "controlnet"} == {"frames=16", "frames=1"}

    def off_by_ten_percent(path, feeds, device):
        return [x * 1.1 for x in reference_like_the_plan(path, feeds, device)]

    with load(d) as st:
        checks = plans.validate_engines(d, stages=["unet"], stages_backend=st, reference=off_by_ten_percent)
    table = plans.format_validation(checks)
    assert [c.output for c in checks] == ["eps_uncond", "eps_cond"] and not any(c.ok for c in checks)
    assert table.splitlines()[0].split() == ["stage", "axes", "output", "max", "abs", "err", "rel", "L2", "err", "ok"]
    assert table.count("FAIL") == 2


# --------------------------------------------------------------------------- the real API's names
TRT_PARAMETERS = {"trt", "builder", "network", "parser", "config", "runtime", "engine", "context"}


def tensorrt_names_in_source(path: Path) -> set[str]:
    """Attribute names our code reads on TensorRT objects: ``trt.X.Y`` chains, and
    attributes of values that came from TensorRT (assigned from a call or attribute of
    one, to a local or to ``self.<member>``; parameters named as in TRT_PARAMETERS)."""
    tree = ast.parse(path.read_text())
    local, member = set(TRT_PARAMETERS), set()

    def from_trt(node) -> bool:
        if isinstance(node, ast.Name):
            return node.id in local
        if isinstance(node, ast.Attribute):
            return from_trt(node.value) or node.attr in member
        if isinstance(node, ast.Call):
            return from_trt(node.func)
        if isinstance(node, ast.IfExp):
            return from_trt(node.body) or from_trt(node.orelse)
        return False

    for _ in range(4):  # to a fixpoint
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and from_trt(node.value):
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    if isinstance(target, ast.Name):
                        local.add(target.id)
                    elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                            and target.value.id == "self":
                        member.add(target.attr)
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and from_trt(node.value) and not node.attr.startswith("__")}


def tensorrt_binaries() -> list[Path]:
    """The compiled TensorRT Python modules to check names against: the installed
    ``tensorrt_bindings`` (pip install --no-deps tensorrt-cu12-bindings) or ``tensorrt``
    package, found without importing it (its import needs the CUDA libraries), plus any
    listed in $MAGICANIMATE_RT_TENSORRT_SO (paths separated by os.pathsep)."""
    found = []
    for pkg in ("tensorrt_bindings", "tensorrt"):
        spec = importlib.util.find_spec(pkg)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            found += sorted(Path(loc).glob("tensorrt*.so"))
    found += [Path(p) for p in os.environ.get("MAGICANIMATE_RT_TENSORRT_SO", "").split(os.pathsep) if p]
    return [p for p in found if p.is_file()]


@lru_cache(maxsize=None)
def binary_strings(path: Path) -> tuple[frozenset, tuple]:
    strings = [s.decode() for s in re.findall(rb"[\x20-\x7e]{3,}", path.read_bytes())]
    return frozenset(strings), tuple(strings)


def missing_names(path: Path, names) -> list[str]:
    """Names that are neither a string of the binary nor the tail of one (the linker
    merges a string into a longer one that ends with it: "num_errors" in "get_num_errors")."""
    exact, strings = binary_strings(path)
    return sorted(n for n in names if n not in exact and not any(s.endswith(n) for s in strings))


def test_static_collection_finds_the_calls_we_rely_on():
    names = set().union(*(tensorrt_names_in_source(p) for p in SOURCES))
    assert names >= {"Builder", "OnnxParser", "NetworkDefinitionCreationFlag", "STRONGLY_TYPED", "create_network",
                     "parse_from_file", "num_errors", "get_error", "desc", "set_memory_pool_limit", "MemoryPoolType",
                     "WORKSPACE", "builder_optimization_level", "create_timing_cache", "set_timing_cache",
                     "serialize", "create_optimization_profile", "set_shape", "add_optimization_profile",
                     "build_serialized_network", "ILogger", "Severity", "INTERNAL_ERROR", "ERROR", "WARNING",
                     "Runtime", "deserialize_cuda_engine", "ExecutionContextAllocationStrategy", "USER_MANAGED",
                     "create_execution_context", "device_memory_size_v2", "set_device_memory", "set_input_shape",
                     "set_tensor_address", "execute_async_v3", "get_tensor_shape", "num_io_tensors",
                     "get_tensor_name", "get_tensor_mode", "TensorIOMode", "INPUT", "OUTPUT", "get_tensor_dtype",
                     "DataType", "HALF", "FLOAT"}
    # and nothing of ours (torch streams, our own records) is taken for TensorRT API
    assert not names & {"cuda_stream", "errors", "plans", "data_ptr", "synchronize", "spec", "attach"}


@pytest.mark.skipif(not tensorrt_binaries(), reason="no TensorRT binary to read names from "
                    "(pip install --no-deps tensorrt-cu12-bindings)")
def test_every_tensorrt_name_we_use_exists_in_the_real_module(built):
    # static: every name in our source; dynamic: every name the code read on the fake
    # while building and running (covers values the static pass cannot follow)
    d, build_trt = built
    trt = FakeTensorRT(H100.version)
    with load(d, trt) as st:
        st.decode(torch.zeros(2, 4, 8, 8))
    names = set().union(*(tensorrt_names_in_source(p) for p in SOURCES)) | build_trt.api_names() | trt.api_names()
    for so in tensorrt_binaries():
        assert missing_names(so, names) == [], f"{so}: these TensorRT names are not in the binary"


# --------------------------------------------------------------------------- boundaries
def test_tensorrt_modules_import_no_model_or_export_code():
    # what a deployment machine imports to build, run and validate plans (the static import
    # graph is tests/test_imports.py; this is what really gets loaded)
    code = ("import sys\n"
            "import magicanimate_rt.engines.tensorrt_build, magicanimate_rt.runtime.backends.tensorrt_backend\n"
            "import magicanimate_rt.plans, magicanimate_rt.densepose.tensorrt_stages\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'tensorrt', 'onnx', 'magicanimate_rt.models', "
            "'magicanimate_rt.export', 'magicanimate_rt.densepose.model') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
