"""Stage specs, ONNX export and the fp16 pass: every exported graph against its PyTorch
stage and against the original's outputs (stages.npz), on the tiny random model set.

The graphs come from the session's engine directories (conftest.py: exported once)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from equality import FP32_GRAPH_TOL
from onnx import TensorProto, helper

from magicanimate_rt.errors import EngineError, InputError, ModelLoadError
from magicanimate_rt.export import onnx_export as ox
from magicanimate_rt.engines.specs import (
    STAGE_NAMES, AxisRange, BatchRanges, ModelDims, StageSpec, stage_specs,
)

FP32_TOL = 1e-4  # relative L2 against the original's recorded outputs (issue 4)
# a float32 graph against its float32 torch stage: equality.FP32_GRAPH_TOL (3e-4, >= 150x
# the measured <= 2e-6; both are ~1e-6 from the float64 function at any size)
FP16_TOL = 3e-2  # an fp16 graph against the float32 torch stage: fp16 rounding (measured <= 1.5e-3)
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.lru_cache(maxsize=None)
def session(path):
    return ox.ort_session(path)


def run_graph(path, inputs):
    return session(path).run(None, inputs)


def graph(engine_dir, stage):
    return engine_dir / f"{stage}.onnx"


def spec_of(engine_dir, stage) -> StageSpec:
    m = json.loads((engine_dir / "manifest.json").read_text())
    return StageSpec.from_dict(m["stages"][stage]["signature"])


# --------------------------------------------------------------------------- specs
def read_configs(root):
    def cfg(rel):
        return json.loads((root / rel / "config.json").read_text())

    return dict(unet=cfg("stable-diffusion-v1-5/unet"), vae=cfg("sd-vae-ft-mse"),
                controlnet=cfg("MagicAnimate/densepose_controlnet"),
                appearance_encoder=cfg("MagicAnimate/appearance_encoder"))


def test_specs_import_without_torch():
    code = ("import sys, magicanimate_rt.engines.specs, magicanimate_rt.engines.manifest; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnx', 'magicanimate_rt.models') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sd15_shapes_follow_from_configs(shared_dir):
    dims = ModelDims.from_configs(**read_configs(shared_dir / "conformance" / "sd15-configs"))
    specs = stage_specs(dims, 512, "fp16")
    unet = specs["unet"]
    shapes = unet.shapes()
    # REFERENCE 3.3: mid 8x8 tokens x 1280, up1 3x 16x16 x 1280, up2 3x 32x32 x 640, up3 3x 64x64 x 320
    assert [shapes[f"bank_{j}"] for j in range(10)] == (
        [(1, 64, 1280)] + [(1, 256, 1280)] * 3 + [(1, 1024, 640)] * 3 + [(1, 4096, 320)] * 3)
    assert len([n for n in unet.input_names if n.startswith("down_")]) == 12
    assert shapes["down_0"] == (16, 320, 64, 64) and shapes["down_11"] == (16, 1280, 8, 8)
    assert shapes["mid"] == (16, 1280, 8, 8)
    assert shapes["latents"] == shapes["eps_cond"] == (1, 4, 16, 64, 64)
    assert shapes["text_embedding"] == (1, 77, 768)
    assert unet.tensors["timestep"].dtype == "float32" and unet.tensors["latents"].dtype == "float16"
    cn = specs["controlnet"]
    assert cn.profile()["cond"] == ((1, 3, 512, 512), (16, 3, 512, 512), (16, 3, 512, 512))
    assert cn.shapes(frames=5)["down_3"] == (5, 320, 32, 32)
    assert cn.dynamic_axes()["latents"] == {0: "frames"}
    assert specs["vae_decoder"].max_shapes()["images"] == (8, 3, 512, 512)
    assert specs["vae_encoder"].shapes()["latents"] == (1, 4, 64, 64)


def test_tiny_shapes_match_the_original(shared_dir, tiny_model_set):
    stages = np.load(shared_dir / "conformance" / "stages.npz")
    dims = ox.model_dims(tiny_model_set)
    assert dims == ModelDims.from_configs(**read_configs(shared_dir / "conformance" / "tiny-models"))
    shapes = stage_specs(dims, 128, "fp32")["unet"].shapes()
    for j in range(int(stages["bank_count"])):
        assert shapes[f"bank_{j}"] == stages[f"bank_{j}"].shape
    for i in range(12):
        assert shapes[f"down_{i}"] == stages[f"cn_down_{i}"].shape
    assert shapes["mid"] == stages["cn_mid"].shape


def test_spec_round_trip_and_samples():
    dims = ModelDims((32, 64), 1, (False, True), 77, 32)
    spec = stage_specs(dims, 64, "fp16", BatchRanges(controlnet=AxisRange(1, 4, 8)))["controlnet"]
    assert StageSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert ModelDims.from_dict(json.loads(json.dumps(dims.to_dict()))) == dims
    x = spec.sample_inputs(3, frames=2)
    assert x["latents"].shape == (2, 4, 8, 8) and x["latents"].dtype == np.float16
    assert x["timestep"].dtype == np.float32 and 1 <= x["timestep"][0] < 1000
    assert 0 <= x["cond"].min() and x["cond"].max() <= 1
    assert np.array_equal(spec.sample_inputs(3, frames=2)["cond"], x["cond"])
    with pytest.raises(InputError, match="outside"):
        spec.check_axes(frames=9)


def test_bad_sizes_and_configs(shared_dir):
    cfgs = read_configs(shared_dir / "conformance" / "sd15-configs")
    dims = ModelDims.from_configs(**cfgs)
    for size in (96, 0, 500):
        with pytest.raises(InputError, match="multiple of 64"):
            stage_specs(dims, size, "fp32")
    with pytest.raises(InputError, match="precision"):
        stage_specs(dims, 512, "int8")
    bad = dict(cfgs, controlnet={**cfgs["controlnet"], "block_out_channels": [320, 640, 1280, 640]})
    with pytest.raises(ModelLoadError, match="ControlNet"):
        ModelDims.from_configs(**bad)


# --------------------------------------------------------------------------- fp32 graphs
_REFERENCES: dict = {}


def torch_reference(stage: str, model_set, frames: int = 0):
    """Random inputs of a stage (fp16-representable, so the fp32 and fp16 graphs see the
    same values; dynamic axes at their opt value, or ``frames``) and the torch stage's
    float32 outputs, computed once per session."""
    if (stage, frames) not in _REFERENCES:
        spec = stage_specs(ox.model_dims(model_set), 128, "fp16")[stage]
        inputs = spec.sample_inputs(11, **({a: frames for a in spec.axes} if frames else {}))
        _REFERENCES[stage, frames] = inputs, ox.run_torch(ox.STAGE_MODULES[stage](model_set), inputs)
    return _REFERENCES[stage, frames]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_fp32_graph_matches_torch_stage(engines_fp32, tiny_model_set, stage):
    d, _ = engines_fp32
    spec = spec_of(d, stage)
    # opt axes, and the smallest where the axis is dynamic
    for frames in [0] + [r.min for r in spec.axes.values() if r.min != r.opt]:
        inputs, ref = torch_reference(stage, tiny_model_set, frames)
        got = run_graph(graph(d, stage), {k: v.astype(np.float32) for k, v in inputs.items()})
        axes = {a: frames for a in spec.axes} if frames else {}
        assert [g.shape for g in got] == [r.shape for r in ref] == [spec.shapes(**axes)[n] for n in spec.output_names]
        for name, g, r in zip(spec.output_names, got, ref):
            assert rel_l2(g, r) < FP32_GRAPH_TOL, (stage, frames, name, rel_l2(g, r))


@pytest.fixture(scope="module")
def recorded(shared_dir):
    return np.load(shared_dir / "conformance" / "stages.npz")


def test_fp32_graphs_reproduce_the_original(engines_fp32, recorded):
    d, _ = engines_fp32
    s = recorded
    t = np.array([501.0], np.float32)
    e = s["text_embedding"]

    (lat,) = run_graph(graph(d, "vae_encoder"), {"images": s["vae_in_uint8"].transpose(0, 3, 1, 2).astype(np.float32)})
    assert rel_l2(lat, s["vae_latent"]) < FP32_TOL

    (img,) = run_graph(graph(d, "vae_decoder"), {"latents": s["vae_decode_in"]})
    assert rel_l2(img, np.clip(s["vae_decode_out"] / 2 + 0.5, 0, 1)) < FP32_TOL

    bank = run_graph(graph(d, "appearance_encoder"), {"latent": s["vae_latent"], "timestep": t, "text_embedding": e})
    assert len(bank) == int(s["bank_count"])
    for j, b in enumerate(bank):
        assert rel_l2(b, s[f"bank_{j}"]) < FP32_TOL, j

    frames = np.ascontiguousarray(s["cn_latents"][0].transpose(1, 0, 2, 3))
    res = run_graph(graph(d, "controlnet"), {"latents": frames, "timestep": t, "text_embedding": e,
                                             "cond": s["cn_cond"]})
    ref = [s[f"cn_down_{i}"] for i in range(12)] + [s["cn_mid"]]
    for i, (r, want) in enumerate(zip(res, ref)):
        assert rel_l2(r, want) < FP32_TOL, i

    feeds = {"latents": s["unet_latents"], "timestep": t, "text_embedding": e, "mid": s["cn_mid"],
             **{f"down_{i}": s[f"cn_down_{i}"] for i in range(12)}, **{f"bank_{j}": s[f"bank_{j}"] for j in range(10)}}
    eps_u, eps_c = run_graph(graph(d, "unet"), feeds)
    assert rel_l2(eps_u, s["unet_eps_uncond"]) < FP32_TOL
    assert rel_l2(eps_c, s["unet_eps_cond"]) < FP32_TOL


def test_graph_signatures_are_the_specs(engines_fp32, engines_fp16):
    for d in (engines_fp32[0], engines_fp16):
        for stage in STAGE_NAMES:
            spec = spec_of(d, stage)
            ox.check_onnx(graph(d, stage), spec)  # checker, strict shape inference, I/O == spec
            sig = ox.graph_signature(graph(d, stage))
            assert [n for n, _, _ in sig["inputs"]] == spec.input_names


def test_large_graphs_use_one_external_data_file(engines_fp32, tmp_path):
    d, _ = engines_fp32
    spec = spec_of(d, "vae_decoder")
    files = ox.save_onnx(onnx.load(str(graph(d, "vae_decoder"))), tmp_path / "vae_decoder.onnx", threshold=0)
    assert [p.name for p in files] == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    assert files[0].stat().st_size < files[1].stat().st_size / 10
    ox.check_onnx(files[0], spec)
    inputs = spec.sample_inputs(2)
    for a, b in zip(ox.ort_session(files[0]).run(None, inputs), run_graph(graph(d, "vae_decoder"), inputs)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- fp16 graphs
def value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def compute_type(node, types) -> int:
    """The float type a node computes in: that of its first float data input."""
    for name in node.input:
        if types.get(name) in (F32, F16):
            return types[name]
    return 0


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_fp16_graph_keeps_statistics_softmax_and_timestep_in_fp32(engines_fp16, stage):
    model = onnx.load(str(graph(engines_fp16, stage)))
    types = value_types(model)
    g = model.graph
    io = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output)}
    assert io == {n: (F32 if n == "timestep" else F16) for n in io}

    by_op: dict[str, list] = {}
    for n in g.node:
        by_op.setdefault(n.op_type, []).append(n)
    for op in ("Softmax", "LayerNormalization", "InstanceNormalization", "ReduceMean", "Sin", "Cos", "Exp"):
        for n in by_op.get(op, []):
            assert compute_type(n, types) == F32, (op, n.name)
    for n in by_op.get("Conv", []):
        assert compute_type(n, types) == F16, n.name
    heavy = by_op.get("MatMul", []) + by_op.get("Gemm", [])
    fp32_heavy = {n.name for n in heavy if compute_type(n, types) == F32}
    # only the timestep embedding's MLP (one row) stays fp32 among the matmuls
    assert all("/time_embedding/" in name for name in fp32_heavy), fp32_heavy
    if stage in ("unet", "controlnet", "appearance_encoder"):
        assert fp32_heavy and len(fp32_heavy) <= 2
        assert by_op.get("Sin") and by_op.get("LayerNormalization") and by_op.get("Softmax")
    # every cross-frame GroupNorm's statistics (ReduceMean over (group, F, H, W)) in fp32
    if stage == "unet":
        assert len(by_op["ReduceMean"]) >= 2 * sum(1 for n in by_op["ReduceMean"] if "norm1" in n.name)
    # one cast per region boundary: no float value round-trips through another float type
    producer = {o: n for n in g.node for o in n.output}
    for n in by_op.get("Cast", []):
        p = producer.get(n.input[0])
        if types.get(n.output[0]) in (F32, F16) and p is not None and p.op_type == "Cast":
            assert types.get(p.input[0]) not in (F32, F16), n.name
    assert ox.check_fp16_regions(model) == []


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_fp16_graph_matches_fp32_torch_stage(engines_fp16, tiny_model_set, stage):
    # ONNX Runtime's CPU provider runs every op of these graphs; where it has no fp16
    # kernel it computes in fp32 between fp16 tensors, so this checks the graph's
    # structure and rounding, not a GPU's fp16 arithmetic.
    spec = spec_of(engines_fp16, stage)
    inputs, ref = torch_reference(stage, tiny_model_set)
    got = run_graph(graph(engines_fp16, stage), inputs)
    for name, a, b in zip(spec.output_names, got, ref):
        assert a.dtype == np.float16
        assert np.isfinite(a).all()
        assert rel_l2(a, b) < FP16_TOL, (stage, name, rel_l2(a, b))


def test_fp16_pass_casts_only_at_region_boundaries():
    # x -> [ReduceMean -> Sub -> Mul -> ReduceMean] fp32 (a variance) -> Add (fp16) -> y
    x = helper.make_tensor_value_info("x", F32, [2, 8])
    y = helper.make_tensor_value_info("y", F32, [2, 1])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], name="/norm/ReduceMean", axes=[1]),
        helper.make_node("Sub", ["x", "m"], ["c"], name="/norm/Sub"),
        helper.make_node("Mul", ["c", "c"], ["sq"], name="/norm/Mul"),
        helper.make_node("ReduceMean", ["sq"], ["v"], name="/norm/ReduceMean_1", axes=[1]),
        helper.make_node("Add", ["v", "b"], ["y"], name="/proj/Add"),
    ]
    b = onnx.numpy_helper.from_array(np.full((1,), 0.5, np.float32), "b")
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [b]),
                              opset_imports=[helper.make_opsetid("", 17)])
    # the Sub's output feeds two blocked inputs: onnxconverter-common alone leaves a float16
    # round trip there (its pair clean-up misses values with several consumers)
    out = ox.to_float16(model, keep_fp32_nodes=[n.name for n in nodes if "/norm/" in n.name], keep_fp32_io=())
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    producer = {o: n.name for n in out.graph.node for o in n.output}
    assert sorted((producer.get(n.input[0], n.input[0]), n.attribute[0].i) for n in casts) == [
        ("/norm/ReduceMean_1", F16), ("x", F32)]
    assert {t.name: t.data_type for t in out.graph.initializer} == {"b": F16}
    onnx.checker.check_model(out)
    import onnxruntime as ort

    xs = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float16) * 300  # squares overflow fp16
    (got,) = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xs})
    want = xs.astype(np.float64).var(axis=1, keepdims=True) + 0.5
    assert np.isfinite(got).all() and rel_l2(got, want) < 1e-3


def test_fp32_node_rule_refuses_ambiguous_scope_names():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Sequential()
            self.a.add_module("proj", torch.nn.GroupNorm(2, 4))
            self.b = torch.nn.Sequential()
            self.b.add_module("proj", torch.nn.Linear(4, 4))

    with pytest.raises(EngineError, match="proj"):
        ox.fp32_node_rule(Holder(), "torchscript")


def test_dynamo_exporter_where_onnxscript_is_installed(tiny_model_set, tmp_path):
    pytest.importorskip("onnxscript")
    stage = "vae_decoder"
    module = ox.STAGE_MODULES[stage](tiny_model_set)
    dims = ox.model_dims(tiny_model_set)
    spec32, spec16 = (stage_specs(dims, 128, p)[stage] for p in ("fp32", "fp16"))
    ox.export_onnx(module, spec32, tmp_path / "d.onnx", exporter="dynamo")
    ox.check_onnx(tmp_path / "d.onnx", spec32)
    cmp, _ = ox.compare_with_torch(tmp_path / "d.onnx", module, spec32)  # at a batch other than the traced one
    assert cmp.rel_l2 < FP32_GRAPH_TOL
    ox.convert_file_to_fp16(tmp_path / "d.onnx", tmp_path / "h.onnx", ox.fp32_node_rule(module, "dynamo"))
    ox.check_onnx(tmp_path / "h.onnx", spec16)
    assert ox.compare_with_torch(tmp_path / "h.onnx", module, spec16)[0].rel_l2 < FP16_TOL
