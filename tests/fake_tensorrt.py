"""A recording stand-in for the ``tensorrt`` module, for running the TensorRT builder and
backend on a machine without a GPU or TensorRT.

What it models, and nothing more:

- "ONNX files" are JSON stage specs (``StageSpec.to_dict()``, dynamic axes named) that
  :class:`OnnxParser` reads into a network; a file with ``"parser_errors"`` fails parsing;
  a real ONNX file (the DensePose stages') is read with ``onnx`` (its inputs and outputs,
  dynamic dimensions -1 as TensorRT reports them), and its plan **runs the graph** with
  ONNX Runtime on the CPU, so the output shapes TensorRT would infer
  (``get_tensor_shape``, once every input shape is set) and the values are the graph's;
- a "plan" is JSON describing the network, the profile, the flags and the builder settings;
  :class:`Runtime` deserializes it (anything else gives None, as TensorRT does);
- an execution context checks that shapes, addresses and device memory are set, then its
  ``execute_async_v3`` reads the inputs at their bound **host** addresses and writes
  :func:`fake_outputs` into the bound outputs (so the backend can run on ``device="cpu"``).

Every call is appended to ``FakeTensorRT.calls`` as a tuple; every public attribute read on
a fake object is added to ``FakeTensorRT.accessed`` (checked against the real module's names).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Mapping, Optional

import numpy as np


# --------------------------------------------------------------------------- the fake function
def fake_outputs(inputs: Mapping[str, np.ndarray], input_order, outputs) -> dict[str, np.ndarray]:
    """The function every fake plan computes. ``inputs``: name -> array; ``input_order``:
    the spec's input names; ``outputs``: [(name, shape, dtype)].

    Each output depends on every input: an output of the first input's shape is
    ``first * 0.5 + (k + 1) * 0.01 * c``; any other output's rows follow the first input's
    rows when their leading dimension agrees (frames stay frames), plus the checksum ``c``
    of the other inputs (sum over inputs of (position + 1) * mean)."""
    first = np.asarray(inputs[input_order[0]], dtype=np.float64)
    c = sum((i + 1) * float(np.mean(np.asarray(inputs[n], dtype=np.float64))) for i, n in enumerate(input_order[1:]))
    out = {}
    for k, (name, shape, dtype) in enumerate(outputs):
        shape = tuple(shape)
        if shape == first.shape:
            v = first * 0.5 + (k + 1) * 0.01 * c
        else:
            base = np.full(shape, 0.01 * c + 0.1 * k)
            if shape[0] == first.shape[0] and shape[0] > 1:
                rows = first.reshape(first.shape[0], -1).mean(axis=1)
                base = base + rows.reshape((-1,) + (1,) * (len(shape) - 1))
            v = base
        out[name] = v.astype(dtype)
    return out


# --------------------------------------------------------------------------- enums
class _Member:
    def __init__(self, enum: str, name: str, value: int):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    def __eq__(self, other):
        return isinstance(other, _Member) and (self.enum, self.name) == (other.enum, other.name)

    def __hash__(self):
        return hash((self.enum, self.name))

    def __repr__(self):
        return f"{self.enum}.{self.name}"


def _record(obj, name: str) -> None:
    object.__getattribute__(object.__getattribute__(obj, "_fake"), "accessed").add(name)


class _Tracked:
    """Records public attribute reads (and writes) into the owning fake's ``accessed``."""

    def __getattribute__(self, name):
        if not name.startswith("_"):
            _record(self, name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            _record(self, name)
        object.__setattr__(self, name, value)


class _Enum(_Tracked):
    def __init__(self, fake, name: str, members):
        object.__setattr__(self, "_fake", fake)
        for i, m in enumerate(members):
            object.__setattr__(self, m, _Member(name, m, i))


# --------------------------------------------------------------------------- builder side
class _Tensor(_Tracked):
    def __init__(self, fake, name, shape, dtype):
        self._fake = fake
        self._shape = tuple(shape)
        self._dtype = dtype
        self._name = name

    @property
    def name(self):
        return self._name

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._dtype


class _Network(_Tracked):
    def __init__(self, fake, flags):
        self._fake = fake
        self._flags = flags
        self._inputs: list[_Tensor] = []
        self._outputs: list[_Tensor] = []
        self._spec: Optional[dict] = None

    @property
    def num_inputs(self):
        return len(self._inputs)

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_input(self, i):
        return self._inputs[i]

    def get_output(self, i):
        return self._outputs[i]


class _ParserError(_Tracked):
    def __init__(self, fake, desc, node_name="", node_operator=""):
        self._fake, self._desc, self._node_name, self._op = fake, desc, node_name, node_operator

    def desc(self):
        return self._desc

    def node_name(self):
        return self._node_name

    def node_operator(self):
        return self._op


class _OnnxParser(_Tracked):
    def __init__(self, fake, network, logger):
        self._fake, self._network, self._errors = fake, network, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, i):
        return self._errors[i]

    def parse_from_file(self, path):
        fake = self._fake
        fake.calls.append(("parse_from_file", str(path)))
        try:
            spec = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            spec = _onnx_spec(Path(path))
        if spec is None:
            self._errors.append(_ParserError(fake, "Failed to parse ONNX model: not a protobuf", "", ""))
            return False
        for e in spec.get("parser_errors", []):
            self._errors.append(_ParserError(fake, e["desc"], e.get("node", ""), e.get("op", "")))
        if self._errors:
            return False
        dt = fake.dtype_of
        net = self._network
        net._spec = spec
        net._inputs = [_Tensor(fake, t["name"], [d if isinstance(d, int) else -1 for d in t["shape"]], dt(t["dtype"]))
                       for t in spec["inputs"]]
        net._outputs = [_Tensor(fake, t["name"], [d if isinstance(d, int) else -1 for d in t["shape"]],
                                dt(t["dtype"])) for t in spec["outputs"]]
        return True


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool"}


def _onnx_spec(path: Path) -> Optional[dict]:
    """A real ONNX file's stage-spec-like description (name: the file's stem; dynamic
    dimensions by their ``dim_param``), with ``"onnx"`` its path; None when it is not ONNX."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (any unreadable file is "not a protobuf" to the parser)
        return None

    def tensor(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": _ONNX_DTYPES[t.elem_type],
                "shape": [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]}

    return {"name": path.stem, "onnx": str(path), "inputs": [tensor(v) for v in model.graph.input],
            "outputs": [tensor(v) for v in model.graph.output]}


class _Profile(_Tracked):
    def __init__(self, fake):
        self._fake, self._shapes = fake, {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 (TensorRT's argument names)
        self._fake.calls.append(("set_shape", name, tuple(min), tuple(opt), tuple(max)))
        self._shapes[name] = [list(min), list(opt), list(max)]


class _TimingCache(_Tracked):
    def __init__(self, fake, blob: bytes):
        self._fake = fake
        self._blob = bytes(blob)
        self._entries = json.loads(blob.decode())["entries"] if blob.startswith(b"{") else []

    def serialize(self):
        self._fake.calls.append(("serialize_timing_cache", len(self._entries)))
        return json.dumps({"entries": self._entries}).encode()


class _Config(_Tracked):
    def __init__(self, fake):
        self._fake = fake
        self._pools: dict = {}
        self._profiles: list[_Profile] = []
        self._cache: Optional[_TimingCache] = None
        object.__setattr__(self, "builder_optimization_level", 3)

    def set_memory_pool_limit(self, pool, size):
        self._fake.calls.append(("set_memory_pool_limit", pool, size))
        self._pools[pool] = size

    def add_optimization_profile(self, profile):
        self._fake.calls.append(("add_optimization_profile", dict(profile._shapes)))
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, blob):
        self._fake.calls.append(("create_timing_cache", bytes(blob)))
        return _TimingCache(self._fake, blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        ok = not cache._blob.startswith(b"other-gpu")
        self._fake.calls.append(("set_timing_cache", ok, ignore_mismatch))
        if ok:
            self._cache = cache
        return ok


class _Builder(_Tracked):
    def __init__(self, fake, logger):
        self._fake, self._logger = fake, logger
        fake.calls.append(("Builder",))

    def create_network(self, flags):
        self._fake.calls.append(("create_network", flags))
        return _Network(self._fake, flags)

    def create_builder_config(self):
        return _Config(self._fake)

    def create_optimization_profile(self):
        return _Profile(self._fake)

    def build_serialized_network(self, network, config):
        fake = self._fake
        spec = network._spec
        fake.calls.append(("build_serialized_network", spec["name"], network._flags,
                           config.builder_optimization_level, dict(config._pools)))
        if spec["name"] in fake.fail_build:
            self._logger.log(fake.ILogger.Severity.ERROR, f"no implementation for a layer of {spec['name']}")
            return None
        if config._cache is not None:
            config._cache._entries.append(spec["name"])
        plan = {"spec": spec, "flags": network._flags, "profile": config._profiles[0]._shapes if config._profiles
                else {}, "device_memory": 1024 * (len(spec["inputs"]) + len(spec["outputs"]))}
        return json.dumps(plan).encode()


# --------------------------------------------------------------------------- runtime side
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def _host_array(ptr: int, shape, dtype) -> np.ndarray:
    """A writable numpy view of host memory at ``ptr`` (the fake runs on CPU tensors)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    buf = (ctypes.c_char * n).from_address(ptr)
    return np.frombuffer(buf, dtype=dt).reshape(shape)


class _Context(_Tracked):
    def __init__(self, fake, engine, strategy):
        self._fake, self._engine, self._strategy = fake, engine, strategy
        self._shapes: dict = {}
        self._addresses: dict = {}
        self._memory: Optional[tuple] = None

    def set_device_memory(self, memory, size):
        self._fake.calls.append(("set_device_memory", self._engine._stage, memory, size))
        self._memory = (memory, size)

    def set_input_shape(self, name, shape):
        shape = tuple(shape)
        self._fake.calls.append(("set_input_shape", self._engine._stage, name, shape))
        static = tuple(d for d in self._engine._tensor(name)["shape"])
        lo, _, hi = self._engine._profile.get(name, [static, static, static])
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)) or len(shape) != len(lo):
            return False
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name, ptr):
        self._fake.calls.append(("set_tensor_address", self._engine._stage, name, ptr))
        self._addresses[name] = ptr

    def _axes(self) -> dict:
        axes = {}
        for t in self._engine._spec["inputs"]:
            shape = self._shapes.get(t["name"], t["shape"])
            for d, v in zip(t["shape"], shape):
                if isinstance(d, str):
                    axes[d] = v
        return axes

    def get_tensor_shape(self, name):
        axes = self._axes()
        t = self._engine._tensor(name)
        shape = tuple(axes.get(d, -1) if isinstance(d, str) else d for d in t["shape"])
        if -1 in shape and self._engine._onnx is not None and all(
                n["name"] in self._shapes for n in self._engine._spec["inputs"]):
            # TensorRT's shape inference: here the graph's own output shapes on these input shapes
            inputs = tuple(self._shapes[n["name"]] for n in self._engine._spec["inputs"])
            shape = self._engine._output_shapes(inputs)[name]
        return shape

    def execute_async_v3(self, stream_handle):
        fake, eng = self._fake, self._engine
        fake.calls.append(("execute_async_v3", eng._stage, stream_handle))
        assert self._memory is not None and self._memory[1] >= eng._device_memory, "device memory not set"
        spec = eng._spec
        inputs = {}
        for t in spec["inputs"]:
            assert t["name"] in self._addresses, f"{eng._stage}: input {t['name']} not bound"
            shape = self._shapes.get(t["name"]) if any(isinstance(d, str) for d in t["shape"]) else tuple(t["shape"])
            assert shape is not None, f"{eng._stage}: shape of {t['name']} not set"
            inputs[t["name"]] = _host_array(self._addresses[t["name"]], shape, t["dtype"]).copy()
        outs = [(t["name"], self.get_tensor_shape(t["name"]), t["dtype"]) for t in spec["outputs"]]
        if eng._onnx is not None:
            values = dict(zip([t["name"] for t in spec["outputs"]], eng._session().run(None, inputs)))
            for name, shape, dtype in outs:
                assert values[name].shape == shape and values[name].dtype == np.dtype(dtype), (name, shape, dtype)
        else:
            values = fake_outputs(inputs, [t["name"] for t in spec["inputs"]], outs)
        for name, shape, dtype in outs:
            assert name in self._addresses, f"{eng._stage}: output {name} not bound"
            _host_array(self._addresses[name], shape, dtype)[...] = values[name]
        return True


class _Engine(_Tracked):
    def __init__(self, fake, plan: dict):
        self._fake = fake
        self._spec = plan["spec"]
        self._stage = self._spec["name"]
        self._profile = plan["profile"]
        self._device_memory = plan["device_memory"]
        self._names = [t["name"] for t in self._spec["inputs"]] + [t["name"] for t in self._spec["outputs"]]
        self._onnx = self._spec.get("onnx")
        self._ort = None
        self._inferred: dict = {}

    def _session(self):
        if self._ort is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            self._ort = ort.InferenceSession(self._onnx, so, providers=["CPUExecutionProvider"])
        return self._ort

    def _output_shapes(self, input_shapes: tuple) -> dict:
        """The graph's output shapes for these input shapes (run once on zeros, then kept)."""
        if input_shapes not in self._inferred:
            feeds = {t["name"]: np.zeros(shape, _NP[t["dtype"]])
                     for t, shape in zip(self._spec["inputs"], input_shapes)}
            outs = self._session().run(None, feeds)
            self._inferred[input_shapes] = {t["name"]: o.shape for t, o in zip(self._spec["outputs"], outs)}
        return self._inferred[input_shapes]

    def _tensor(self, name):
        return next(t for t in self._spec["inputs"] + self._spec["outputs"] if t["name"] == name)

    @property
    def num_io_tensors(self):
        return len(self._names)

    @property
    def device_memory_size_v2(self):
        return self._device_memory

    def get_tensor_name(self, i):
        return self._names[i]

    def get_tensor_mode(self, name):
        inputs = {t["name"] for t in self._spec["inputs"]}
        return self._fake.TensorIOMode.INPUT if name in inputs else self._fake.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._fake.dtype_of(self._tensor(name)["dtype"])

    def create_execution_context(self, strategy):
        self._fake.calls.append(("create_execution_context", self._stage, strategy))
        ctx = _Context(self._fake, self, strategy)
        self._fake.contexts.append(ctx)
        return ctx


class _Runtime(_Tracked):
    def __init__(self, fake, logger):
        self._fake = fake
        fake.calls.append(("Runtime",))

    def deserialize_cuda_engine(self, data):
        try:
            plan = json.loads(bytes(data).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._fake.calls.append(("deserialize_cuda_engine", None))
            return None
        self._fake.calls.append(("deserialize_cuda_engine", plan["spec"]["name"]))
        return _Engine(self._fake, plan)


# --------------------------------------------------------------------------- the module
class FakeTensorRT(_Tracked):
    """``trt`` for tests: ``FakeTensorRT(version)``; see the module docstring."""

    def __init__(self, version: str = "10.8.0.43"):
        object.__setattr__(self, "accessed", set())
        self._fake = self
        object.__setattr__(self, "__version__", version)
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "contexts", [])
        object.__setattr__(self, "fail_build", set())
        fake = self

        class ILogger:
            Severity = _Enum(fake, "Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])

            def __init__(self):
                pass

        object.__setattr__(self, "ILogger", ILogger)
        for name, members in {
            "NetworkDefinitionCreationFlag": ["STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"],
            "MemoryPoolType": ["WORKSPACE", "DLA_MANAGED_SRAM"],
            "DataType": ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "INT64", "BF16"],
            "TensorIOMode": ["NONE", "INPUT", "OUTPUT"],
            "ExecutionContextAllocationStrategy": ["STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"],
        }.items():
            object.__setattr__(self, name, _Enum(self, name, members))

    def dtype_of(self, name: str):
        dt = object.__getattribute__(self, "DataType")
        return {"float32": dt.FLOAT, "float16": dt.HALF, "int64": dt.INT64, "int32": dt.INT32, "bool": dt.BOOL}[name]

    # the classes TensorRT exposes
    def Builder(self, logger):  # noqa: N802 (TensorRT's names)
        return _Builder(self, logger)

    def OnnxParser(self, network, logger):  # noqa: N802
        return _OnnxParser(self, network, logger)

    def Runtime(self, logger):  # noqa: N802
        return _Runtime(self, logger)

    def events(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]

    #: names the tests read on the fake itself (not TensorRT API)
    OWN = frozenset({"calls", "accessed", "contexts", "fail_build", "dtype_of", "events", "OWN", "api_names"})

    def api_names(self) -> set[str]:
        """Public names our code read on any fake object (TensorRT API names)."""
        return set(object.__getattribute__(self, "accessed")) - self.OWN


# --------------------------------------------------------------------------- engine directories
def write_fake_engine_dir(d: Path, precision: str = "fp16", size: int = 64, seed: int = 0,
                          width: int | None = None, height: int | None = None) -> Path:
    """An engine directory for the tiny model sizes whose "ONNX files" are the stage specs
    as JSON (what :class:`_OnnxParser` reads), with a real manifest and text embedding;
    built for ``size`` x ``size``, or ``width`` x ``height`` when both are given."""
    from magicanimate_rt.engines.manifest import (
        FORMAT_VERSION, TEXT_EMBEDDING, EngineManifest, FileRecord, StageRecord,
    )
    from magicanimate_rt.engines.specs import BatchRanges, ModelDims, stage_specs
    from magicanimate_rt.runtime.ddim import DDIMSettings

    dims = ModelDims(block_out_channels=(32, 64, 64, 64), layers_per_block=2,
                     up_attention=(False, True, True, True), text_tokens=77, text_dim=32)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / TEXT_EMBEDDING, np.random.default_rng(seed).standard_normal((1, 77, 32)).astype(np.float32))
    stages = {}
    for name, spec in stage_specs(dims, size, precision, width=width, height=height).items():
        (d / f"{name}.onnx").write_text(json.dumps(spec.to_dict()))
        stages[name] = StageRecord(name=name, onnx=f"{name}.onnx", files=(FileRecord.of(d, f"{name}.onnx"),),
                                   spec=spec)
    EngineManifest(directory=d, format_version=FORMAT_VERSION, fingerprint="0" * 64, source="/models/tiny",
                   size=size, width=width, height=height, window=dims.window, precision=precision, dims=dims,
                   batches=BatchRanges(),
                   stages=stages, text_embedding_file=FileRecord.of(d, TEXT_EMBEDDING),
                   ddim=DDIMSettings().to_dict(), versions={}, tensorrt=None, created="",
                   exporter="torchscript").write()
    return d
