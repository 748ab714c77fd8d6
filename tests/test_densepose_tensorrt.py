"""The DensePose stages' TensorRT plans (``python -m magicanimate_rt.plans DIR``) and their backend
(``DensePoseEstimator.from_engines(DIR, backend="tensorrt")``), run on the CPU against the fake
``tensorrt`` module (tests/fake_tensorrt.py).

The fake parses the directory's real ONNX graphs (their inputs and outputs, dynamic dimensions -1 as
TensorRT reports them), keeps the optimisation profile the builder gave, refuses input shapes outside
it as ``set_input_shape`` does, infers output shapes from the graph once every input shape is set, and
executes a plan by running its graph with ONNX Runtime on the bound host addresses. So predict()
through the TensorRT backend computes with the same graphs as the ONNX Runtime estimator: what this
checks is the backend's plumbing (profiles, shapes, binding, dtypes, output allocation from the
engine's shape inference) and the glue around it; they agree within the ORT parity tolerances of
test_densepose_engines.py (FLOAT_TOL 5e-4, LABEL_FRACTION 0.1%; both run ONNX Runtime's float32 CPU
kernels on the same inputs, so only thread-count rounding can differ, measured 0 here). What TensorRT
itself computes needs a GPU: test_real_tensorrt_plans_on_a_gpu.

The directory is built once, at the conformance file's small input config (256/427), as in
test_densepose_engines.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from fake_tensorrt import FakeTensorRT
from test_densepose_engines import engine_dir, small_input, conformance  # noqa: F401 (module-scoped fixtures)
from test_densepose_model import FLOAT_TOL, LABEL_FRACTION, SMALL, _check_result, err
from test_tensorrt import missing_names, tensorrt_binaries

from magicanimate_rt import plans
from magicanimate_rt.densepose import DensePoseEstimator
from magicanimate_rt.densepose.tensorrt_stages import TensorRTDensePoseStages
from magicanimate_rt.engines import tensorrt_build
from magicanimate_rt.engines.densepose import DENSEPOSE_STAGES, read_densepose
from magicanimate_rt.engines.tensorrt_build import PlanBuildSettings, build_densepose_plans
from magicanimate_rt.engines.tensorrt_plan import PlanTarget
from magicanimate_rt.errors import EngineError, InputError

H100 = PlanTarget("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def built(engine_dir):  # noqa: F811
    """The module's directory with its DensePose plans, built through ``python -m
    magicanimate_rt.plans DIR`` with the fake as the tensorrt module; (dir, that fake)."""
    trt = FakeTensorRT(H100.version)
    hash_before = read_densepose(engine_dir).content_hash()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
        mp.setattr(PlanTarget, "current", classmethod(lambda cls, trt, device=0: H100))
        assert plans.main([str(engine_dir)]) == 0
    # building plans changes no graph: clips cached under the section's hash stay valid
    assert read_densepose(engine_dir).content_hash() == hash_before
    return engine_dir, trt


def load(d, trt=None):
    return TensorRTDensePoseStages.from_engines(d, "cpu", trt=trt or FakeTensorRT(H100.version), target=H100)


def test_plans_build_from_the_densepose_stages_with_their_profiles(built):
    d, trt = built
    m = read_densepose(d)
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    # a DensePose-only directory: only its three graphs, each a strongly typed network (fp32 graphs
    # give fp32 plans, fp16 graphs fp16 ones, with no precision flag)
    assert [c[1].rsplit("/", 1)[1] for c in trt.events("parse_from_file")] == [f"{s}.onnx" for s in DENSEPOSE_STAGES]
    assert [(b[1], b[2], b[3]) for b in trt.events("build_serialized_network")] == [
        (s, strongly_typed, 3) for s in DENSEPOSE_STAGES]
    # one profile per stage: the specs' declared ranges (batch 1/4/8; sides 32, 256, 448 = 427 padded;
    # RoIs 1/1000/8000; instances 1/4/800)
    assert trt.events("set_shape") == [
        ("set_shape", "images", (1, 3, 32, 32), (4, 3, 256, 256), (8, 3, 448, 448)),
        ("set_shape", "pooled", (1, 256, 7, 7), (1000, 256, 7, 7), (8000, 256, 7, 7)),
        ("set_shape", "pooled", (1, 256, 28, 28), (4, 256, 28, 28), (800, 256, 28, 28))]
    assert m.tensorrt == H100.to_dict()
    for s in DENSEPOSE_STAGES:
        rec = m.stages[s].plans
        assert rec["file"]["name"] == f"{s}.plan" and (d / f"{s}.plan").stat().st_size == rec["file"]["bytes"]
        assert rec["onnx_sha256"] == m.stages[s].files[0].sha256
        assert rec["profile"] == {n: [list(x) for x in shapes] for n, shapes in m.spec(s).profile().items()}
    # the animation's manifest entries stay absent; a second run is up to date and calls nothing
    assert set(json.loads((d / "manifest.json").read_text())) == {"format_version", "densepose"}
    again = FakeTensorRT(H100.version)
    reports = build_densepose_plans(d, trt=again, target=H100, log=quiet)
    assert {r.skipped for r in reports} == {"up to date"} and again.calls == []
    # --stages picks among them; another GPU rebuilds them all
    a100 = PlanTarget(H100.version, "NVIDIA A100-SXM4-80GB", "8.0")
    other = FakeTensorRT(H100.version)
    reports = build_densepose_plans(d, PlanBuildSettings(stages=("densepose_head",)), trt=other, target=a100,
                                    log=quiet)
    assert [(r.stage, r.skipped) for r in reports] == [("densepose_head", None)]
    with pytest.raises(EngineError, match=r"stage densepose_backbone: no plan; build them on this machine: "
                                          r"python -m magicanimate_rt.plans "):
        TensorRTDensePoseStages.from_engines(d, "cpu", trt=other, target=a100)
    build_densepose_plans(d, trt=FakeTensorRT(H100.version), target=H100, log=quiet)  # back, for the other tests


def test_predict_through_the_plans_equals_onnx_runtime(built, small_input, conformance):  # noqa: F811
    d, _ = built
    trt = FakeTensorRT(H100.version)
    stages = load(d, trt)
    est = DensePoseEstimator(stages, cfg=SMALL)
    ort = DensePoseEstimator.from_engines(d, backend="onnxruntime")
    frames = np.ascontiguousarray(small_input[0][..., ::-1])
    results, ref_results = est.predict(frames), ort.predict(frames)
    assert [len(r) for r in results] == [len(r) for r in ref_results] == [1, 1]
    for f, (r, ref) in enumerate(zip(results, ref_results)):
        _check_result(r, conformance, f, 4)
        assert err(r.boxes, ref.boxes) < FLOAT_TOL and err(r.scores, ref.scores) < FLOAT_TOL
        assert all(int((a != b).sum()) <= LABEL_FRACTION * a.size for a, b in zip(r.labels, ref.labels))

    # the calls: one context per plan, all sharing one activation buffer of the largest size
    memory = trt.events("set_device_memory")
    assert [c[1] for c in memory] == list(DENSEPOSE_STAGES) and len({(c[2], c[3]) for c in memory}) == 1
    assert memory[0][3] == max(c.device_memory_size_v2 for c in [ctx._engine for ctx in trt.contexts])
    # input shapes: the padded batch of two frames, every proposal of both (1000 each), the detections
    _, x, _ = small_input
    shapes = [(c[1], c[3]) for c in trt.events("set_input_shape")]
    assert shapes == [("densepose_backbone", tuple(x.shape)), ("densepose_box_head", (2000, 256, 7, 7)),
                      ("densepose_head", (2, 256, 28, 28))]
    assert [c[1] for c in trt.events("execute_async_v3")] == list(DENSEPOSE_STAGES)
    # the backbone's outputs were allocated from the engine's own shape inference (levels and anchors
    # follow from the padded size), in the plan's dtype, and bound before it ran
    out = stages.backbone(x)
    h, w = x.shape[2:]
    assert [tuple(f.shape) for f in out.features] == [(2, 256, -(-h // s), -(-w // s)) for s in (4, 8, 16, 32, 64)]
    assert tuple(out.objectness[0].shape) == (2, (h // 4) * (w // 4) * 3) and out.objectness[0].dtype == torch.float32
    # a second call of the same shape sets no shape again
    n = len(trt.events("set_input_shape"))
    stages.backbone(x)
    assert len(trt.events("set_input_shape")) == n


def test_out_of_profile_inputs_are_refused(built):
    stages = load(built[0])
    with pytest.raises(EngineError, match=r"densepose_backbone: width=480 is outside the plan's profile 32..448"):
        stages.backbone(torch.zeros(1, 3, 256, 480))
    with pytest.raises(EngineError, match=r"densepose_head: instances=801 is outside the plan's profile 1..800"):
        stages.densepose_head(torch.zeros(801, 256, 28, 28))


def test_refusals_are_one_line(built, shared_dir, tmp_path):  # noqa: F811
    d, _ = built
    # a CPU device without the fake, through the estimator and through the command line
    with pytest.raises(InputError, match=r"the tensorrt backend runs on a CUDA device, not cpu \(give --device cuda\)"):
        DensePoseEstimator.from_engines(d, backend="tensorrt", device="cpu")
    video, out = shared_dir / "samples" / "person" / "input_video.mp4", tmp_path / "dp.mp4"
    proc = subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", "densepose", str(video), "--engines", str(d),
                           "--backend", "tensorrt", "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "magicanimate-rt: error: the tensorrt backend runs on a CUDA device, not cpu (give --device cuda)"]
    assert not out.exists()
    # a directory whose DensePose stages have no plans: the command that builds them
    raw = json.loads((d / "manifest.json").read_text())
    raw["densepose"]["tensorrt"] = None
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in d.iterdir():
        if f.suffix != ".plan":
            (bare / f.name).symlink_to(f)
    (bare / "manifest.json").unlink()
    (bare / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match=re.escape(f"{bare}: no TensorRT plans of the DensePose stages; build them on "
                                                    f"this machine: python -m magicanimate_rt.plans {bare}")):
        load(bare)


@pytest.mark.skipif(not tensorrt_binaries(), reason="no TensorRT binary to read names from "
                    "(pip install --no-deps tensorrt-cu12-bindings)")
def test_every_tensorrt_name_the_densepose_path_reads_exists_in_the_real_module(built):
    # the names read on the fakes while building (the fixture) and running the DensePose plans
    # (tensorrt_stages.py's source is in test_tensorrt.py's static check)
    d, build_trt = built
    trt = FakeTensorRT(H100.version)
    load(d, trt).densepose_head(torch.zeros(1, 256, 28, 28))
    names = build_trt.api_names() | trt.api_names()
    assert {"get_tensor_shape", "set_input_shape", "execute_async_v3", "set_shape"} <= names
    for so in tensorrt_binaries():
        assert missing_names(so, names) == [], f"{so}: these TensorRT names are not in the binary"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real TensorRT plans need a CUDA GPU and tensorrt")
def test_real_tensorrt_plans_on_a_gpu(engine_dir, small_input, tmp_path):  # noqa: F811
    """On a GPU machine with tensorrt: plans built for real, predict() against ONNX Runtime. TensorRT's
    float32 kernels (TF32 is off in a strongly typed network unless the graph asks) round differently
    from ONNX Runtime's: same detections, scores and boxes within 1e-2 relative, labels within 1%."""
    pytest.importorskip("tensorrt")
    import shutil

    d = tmp_path / "gpu"
    shutil.copytree(engine_dir, d)
    for p in d.glob("*.plan"):
        p.unlink()
    raw = json.loads((d / "manifest.json").read_text())
    raw["densepose"]["tensorrt"] = None
    for s in raw["densepose"]["stages"].values():
        s["plans"] = {}
    (d / "manifest.json").write_text(json.dumps(raw))
    assert plans.main([str(d)]) == 0
    est = DensePoseEstimator.from_engines(d, backend="tensorrt", device="cuda")
    ort = DensePoseEstimator.from_engines(d, backend="onnxruntime")
    frames = np.ascontiguousarray(small_input[0][..., ::-1])
    for r, ref in zip(est.predict(frames), ort.predict(frames), strict=True):
        assert len(r) == len(ref)
        assert err(r.scores, ref.scores) < 1e-2 and err(r.boxes, ref.boxes) < 1e-2
        assert all(int((a != b).sum()) <= 0.01 * a.size for a, b in zip(r.labels, ref.labels))


def test_float16_graphs_give_float16_plans(densepose_weights, tmp_path):
    """fp16 graphs (``--densepose-precision fp16``) parse into networks whose tensors are HALF (the
    strongly typed network keeps the graph's dtypes: no precision flag), and the backend feeds them
    float16: each plan's outputs equal ONNX Runtime's on the same fp16 graph and input (the fake runs
    that graph; float32 bytes read as float16 would give garbage, not a 1e-3 difference)."""
    import onnxruntime

    from magicanimate_rt.export.build import main as build_main

    out = tmp_path / "fp16"
    assert build_main(["--densepose-weights", str(densepose_weights), "--out", str(out), "--densepose-precision",
                       "fp16", "--densepose-min-size", "256", "--densepose-max-size", "427"]) == 0
    trt = FakeTensorRT(H100.version)
    build_densepose_plans(out, trt=trt, target=H100, log=quiet)
    plan = json.loads((out / "densepose_head.plan").read_text())
    assert {t["dtype"] for t in plan["spec"]["inputs"] + plan["spec"]["outputs"]} == {"float16"}
    stages = load(out)
    assert stages.dtype == torch.float16
    m = read_densepose(out)
    rng = np.random.default_rng(0)
    for stage, run, x in (("densepose_backbone", stages.backbone, rng.standard_normal((1, 3, 64, 96))),
                          ("densepose_box_head", stages.box_head, rng.standard_normal((5, 256, 7, 7))),
                          ("densepose_head", stages.densepose_head, rng.standard_normal((3, 256, 28, 28)))):
        got = run(torch.from_numpy(x.astype(np.float32)))
        got = [*got.features, got.densepose_features, *got.objectness, *got.anchor_deltas] if stage == \
            "densepose_backbone" else list(got)
        session = onnxruntime.InferenceSession(str(m.onnx_path(stage)), providers=["CPUExecutionProvider"])
        want = session.run(None, {m.spec(stage).inputs[0].name: x.astype(np.float16)})
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == torch.float32 and tuple(g.shape) == w.shape
            # the same float16 graph on the same float16 input: equal up to ORT's thread-count rounding
            assert err(g, w.astype(np.float32)) < 1e-3, stage


def test_validate_compares_each_plan_with_onnx_runtime(built):
    """``plans --validate`` on the DensePose plans: one row per output at the profile's opt and min
    values. The fake runs the graph itself, so the plan equals the reference (ORT on the same graph
    and input: error 0 up to thread-count rounding); a reference 10% off fails every row."""
    d, _ = built
    stages = load(d)
    seen = []

    def reference(path, feeds, device):  # ONNX Runtime's outputs, kept for the second run
        seen.append(plans._onnxruntime_reference(path, feeds, device))
        return seen[-1]

    checks = plans.validate_densepose(d, stages_backend=stages, reference=reference)
    m = read_densepose(d)
    assert [(c.stage, c.output) for c in checks] == [
        (s, o.name) for s in DENSEPOSE_STAGES for _ in range(2) for o in m.spec(s).outputs]
    assert {c.axes for c in checks if c.stage == "densepose_head"} == {"instances=4", "instances=1"}
    assert {c.axes for c in checks if c.stage == "densepose_backbone"} == {"batch=4,height=256,width=256",
                                                                          "batch=1,height=32,width=32"}
    assert all(c.ok and c.rel_l2 < 1e-6 for c in checks), plans.format_validation(checks)

    kept = iter(seen)

    def off_by_ten_percent(path, feeds, device):
        return [o * 1.1 for o in next(kept)]

    with pytest.raises(EngineError, match=r"^44 of 44 TensorRT plan outputs differ from ONNX Runtime"):
        plans.validate_and_report(d, log=quiet, validate=lambda d: plans.validate_densepose(
            d, stages_backend=stages, reference=off_by_ten_percent))
