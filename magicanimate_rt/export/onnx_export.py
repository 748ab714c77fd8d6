"""Each stage to ONNX: export (fp32), the fp16 pass, structural checks, ONNX Runtime runs.

Exporter. ``torch.onnx.export`` in torch 2.13 defaults to the dynamo exporter
(``torch.export`` + onnxscript). On this project's graphs it is slow on a CPU (the tiny
temporal UNet: about 140 s on 2 cores, against 25 s for the TorchScript exporter), emits
opset 18+ and a NaN-guarded softmax (Equal/Where/ReduceMax around every Softmax) that
TensorRT gains nothing from. So the default is the TorchScript exporter (``dynamo=False``,
opset 17: every TensorRT since 8.6 parses it, and it needs no onnxscript);
``exporter="dynamo"`` is kept (tested where onnxscript is installed), and is chosen
automatically if a future torch drops the TorchScript exporter.

Large graphs. A graph over 2 GB cannot live in one protobuf: the exporter then writes one
file per tensor; we always export into a scratch directory and re-save the graph as
``<stage>.onnx`` plus, above :data:`EXTERNAL_DATA_THRESHOLD`, one ``<stage>.onnx.data``.
Checks (``onnx.checker``, shape inference) are path-based, which works at any size.

fp16. :func:`to_float16` rewrites an fp32 graph so that the heavy ops (convolutions,
matmuls, elementwise work) run in float16 while numerically sensitive nodes stay float32:
every node inside a normalisation module (GroupNorm, our cross-frame ``FrameGroupNorm``,
LayerNorm: statistics and affine), inside the timestep embedding (``Timesteps`` sinusoid
and ``TimestepEmbedding`` MLP; t up to 999 times a frequency is not representable in
fp16), and every Softmax. It is onnxconverter-common's ``convert_float_to_float16`` with
those nodes on its block lists, plus the repairs its docstring lists, so that a float32
value never round-trips through float16 between two float32 nodes (a decomposed GroupNorm:
mean, x - mean, square, mean, + eps, sqrt, div) and one Cast sits at each region boundary.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import onnx
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from ..errors import EngineError
from ..models import ModelSet
from ..models.vae import VAEDecoder, VAEEncoder
from ..engines.specs import ModelDims, StageSpec, relative_error, validation_tolerance

OPSET = 17
#: graphs whose weights exceed this are saved with one external data file (protobuf's
#: hard limit is 2 GiB; leave room for the graph itself)
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
EXPORTERS = ("torchscript", "dynamo")

#: modules whose every node stays float32 in fp16 graphs (nn.GroupNorm covers FrameGroupNorm)
FP32_MODULES: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, Timesteps, TimestepEmbedding)
#: op types that stay float32 in fp16 graphs wherever they are
FP32_OPS = frozenset({"Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization"})
#: ops that only move or select data: they run in whatever float type their input has
_DATA_MOVEMENT = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Expand", "Transpose", "Slice", "Gather", "Identity",
                            "Flatten", "Concat", "Split", "Tile"})


# --------------------------------------------------------------------------- stage modules
class AppearanceEncoderStage(nn.Module):
    """The appearance encoder with a flat output: the bank as a tuple."""

    def __init__(self, models: ModelSet):
        super().__init__()
        self.encoder = models.appearance_encoder

    def forward(self, latent: Tensor, timestep: Tensor, text_embedding: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.encoder(latent, timestep, text_embedding))


class UNetGuidedStage(nn.Module):
    """``TemporalUNet.guided`` for one window with a flat signature:
    (latents, timestep, text_embedding, down_0.., mid, bank_0..) -> (eps_uncond, eps_cond)."""

    def __init__(self, models: ModelSet):
        super().__init__()
        self.unet = models.unet
        self.num_down = models.unet.config.num_down_residuals

    def forward(self, latents: Tensor, timestep: Tensor, text_embedding: Tensor, *rest: Tensor):
        down, mid, bank = rest[: self.num_down], rest[self.num_down], rest[self.num_down + 1:]
        return self.unet.guided(latents, timestep, text_embedding, down, mid, bank)


#: stage name -> the torch module computing exactly the spec's function
STAGE_MODULES: dict[str, Callable[[ModelSet], nn.Module]] = {
    "vae_encoder": lambda ms: VAEEncoder(ms.vae),
    "appearance_encoder": AppearanceEncoderStage,
    "controlnet": lambda ms: ms.controlnet,
    "unet": UNetGuidedStage,
    "vae_decoder": lambda ms: VAEDecoder(ms.vae),
}


def model_dims(models: ModelSet, window: int = 16) -> ModelDims:
    """The sizes the specs need, from a loaded model set's configs."""
    u = models.unet.config
    unet = {"block_out_channels": u.block_out_channels, "layers_per_block": u.layers_per_block,
            "up_block_types": u.up_block_types, "cross_attention_dim": u.cross_attention_dim,
            "in_channels": u.in_channels}
    a = models.appearance_encoder.config
    appearance = {"block_out_channels": a.block_out_channels, "layers_per_block": a.layers_per_block,
                  "up_block_types": a.up_block_types}
    return ModelDims.from_configs(
        unet=unet,
        vae=dict(models.vae.vae.config),
        controlnet=dict(models.controlnet.net.config),
        appearance_encoder=appearance,
        text_tokens=int(models.text_embedding.shape[1]),
        window=window,
    )


def trace_axes(spec: StageSpec) -> dict[str, int]:
    """Axis values to trace at: 2 where the profile allows (1 could let a broadcast
    specialise the graph), so validation can then run at another value."""
    return {a: min(max(2, r.min), r.max) for a, r in spec.axes.items()}


def check_axes(spec: StageSpec) -> dict[str, int]:
    """Axis values to validate at: different from the traced ones where the profile
    allows, which proves the dynamic axes are dynamic."""
    traced = trace_axes(spec)
    return {a: (traced[a] + 1 if traced[a] < r.max else r.min) for a, r in spec.axes.items()}


# --------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet_export():
    """Tracer warnings (shape asserts in diffusers turned constant), the TorchScript
    exporter's deprecation notice and the dynamo exporter's progress log say nothing about
    these graphs."""
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.export")
        try:
            yield
        finally:
            torch_onnx_log.setLevel(level)


def torchscript_exporter_available() -> bool:
    try:
        from torch.onnx._internal.torchscript_exporter import utils  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_exporter(exporter: str) -> str:
    """"auto" -> "torchscript" where torch still has it, else "dynamo"."""
    if exporter == "auto":
        return "torchscript" if torchscript_exporter_available() else "dynamo"
    if exporter not in EXPORTERS:
        raise EngineError(f"exporter must be one of auto, {', '.join(EXPORTERS)}; got {exporter!r}")
    return exporter


@dataclass(frozen=True)
class Traced:
    """The inputs a stage was traced with and the torch stage's outputs for them (float32
    arrays): a free reference for validating the graph at the traced shapes."""

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]


def sample_inputs_fp16_exact(spec: StageSpec, seed: int, **axes: int) -> dict[str, np.ndarray]:
    """``spec.sample_inputs`` as float32 arrays whose values float16 represents exactly,
    so the same inputs (and torch outputs) serve the fp32 and the fp16 graph."""
    return {name: a.astype(np.float16).astype(np.float32) for name, a in spec.sample_inputs(seed, **axes).items()}


def export_onnx(module: nn.Module, spec: StageSpec, path: Path, exporter: str = "auto", seed: int = 0,
                axes: Optional[Mapping[str, int]] = None) -> Traced:
    """Export ``module`` (computing ``spec``'s function) to ``path`` in float32.

    The graph is written to a scratch directory first and re-saved at ``path`` (plus
    ``path.data`` when large, see :func:`save_onnx`). Inputs for tracing come from the
    spec (float32, fp16-exact values, axes from :func:`trace_axes`); the torch outputs of
    that traced run are observed with a forward hook and returned, so validating a static
    stage costs no second forward. ``axes`` replace :func:`trace_axes` where an axis needs
    other values (the DensePose image axes: multiples of 32).
    """
    exporter = resolve_exporter(exporter)
    path = Path(path)
    inputs = sample_inputs_fp16_exact(spec, seed, **(trace_axes(spec) if axes is None else axes))
    args = tuple(torch.from_numpy(a) for a in inputs.values())
    module = module.eval()
    seen: list = []
    hook = module.register_forward_hook(lambda mod, args_, out: seen.append(out))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.name}-export-") as scratch:
        raw = Path(scratch) / f"{spec.name}.onnx"
        with torch.no_grad(), _quiet_export(), contextlib.ExitStack() as stack:
            stack.callback(hook.remove)
            if exporter == "torchscript":
                torch.onnx.export(module, args, str(raw), input_names=spec.input_names,
                                  output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                                  opset_version=OPSET, dynamo=False, do_constant_folding=True)
            else:
                # one Dim per axis name, shared by the inputs that carry it; the range is the
                # graph's (kept above 2 so a profile of max 1 cannot specialise the trace)
                axes = {a: torch.export.Dim(a, min=r.min, max=max(r.max, 3)) for a, r in spec.axes.items()}
                dynamic = tuple({i: axes[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None
                                for t in spec.inputs)
                program = torch.onnx.export(module, args, input_names=spec.input_names,
                                            output_names=spec.output_names, dynamic_shapes=dynamic,
                                            dynamo=True, optimize=True, verbose=False)
                program.save(str(raw))
        model = onnx.load(str(raw))  # with its external data, if the exporter split it
        declare_signature(model, spec)
        save_onnx(model, path)
    # the TorchScript tracer runs the module on the real inputs; torch.export does not
    out = seen[0] if exporter == "torchscript" and seen else run_torch_tensors(module, args)
    out = (out,) if isinstance(out, Tensor) else out
    return Traced(inputs, [o.detach().float().numpy().copy() for o in out])


def declare_signature(model: onnx.ModelProto, spec: StageSpec) -> None:
    """Declare the graph's input/output shapes as the spec states them. The tracer leaves
    some output dims symbolic where a shape passes through arithmetic (the VAE encoder's
    ``moments[:, :C // 2]``); the spec is the contract, strict shape inference then checks
    the graph agrees with it, and validation runs check the values."""
    tensors = spec.tensors
    for v in (*model.graph.input, *model.graph.output):
        if v.name not in tensors:
            continue
        dims = v.type.tensor_type.shape.dim
        want = tensors[v.name].shape
        if len(dims) != len(want):
            raise EngineError(f"{spec.name}: graph tensor {v.name} has rank {len(dims)}, the spec {len(want)}")
        for d, w in zip(dims, want):
            d.Clear()
            if isinstance(w, str):
                d.dim_param = w
            else:
                d.dim_value = w


def save_onnx(model: onnx.ModelProto, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Save ``model`` as ``path``, with its weights in one ``path.data`` file when they
    exceed ``threshold`` bytes. Returns the files written."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights > threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


def onnx_files(path: Path) -> list[Path]:
    """The graph file and its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


# --------------------------------------------------------------------------- checks
_ONNX_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64"}


def graph_signature(path: Path) -> dict[str, list[tuple[str, tuple, str]]]:
    """{"inputs"/"outputs": [(name, shape with dim_param names, dtype)]} of a saved graph."""
    model = onnx.load(str(path), load_external_data=False)

    def sig(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
            out.append((v.name, shape, _ONNX_DTYPES.get(t.elem_type, str(t.elem_type))))
        return out

    return {"inputs": sig(model.graph.input), "outputs": sig(model.graph.output)}


def check_onnx(path: Path, spec: StageSpec) -> None:
    """``onnx.checker`` and strict shape inference on the file (path-based, so any size),
    inferred shapes written back into it; then the graph's inputs and outputs must be
    exactly the spec's (names, order, shapes with the same dynamic axes, dtypes)."""
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=False)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise EngineError(f"{path}: the exported graph is invalid: {str(e).splitlines()[0]}") from None
    sig = graph_signature(path)
    want = {"inputs": [(t.name, tuple(t.shape), t.dtype) for t in spec.inputs],
            "outputs": [(t.name, tuple(t.shape), t.dtype) for t in spec.outputs]}
    for kind in ("inputs", "outputs"):
        if sig[kind] != want[kind]:
            got = {n: (s, d) for n, s, d in sig[kind]}
            diff = [f"{n}: graph {got.get(n)} vs spec {(s, d)}" for n, s, d in want[kind] if got.get(n) != (s, d)]
            extra = [n for n in got if n not in {w[0] for w in want[kind]}]
            raise EngineError(f"{path}: graph {kind} differ from the {spec.name} spec: "
                              f"{'; '.join(diff[:3]) or 'order'}{'; extra ' + str(extra) if extra else ''}")


# --------------------------------------------------------------------------- fp16
_UNIQUE_SUFFIX = re.compile(r"_\d+$")


def _unqualified(name: str) -> str:
    """A module's scope name in TorchScript-exported node names: its attribute path from
    the first non-numeric atom on ("down_blocks.0.resnets.1.norm1" -> "norm1",
    "...norms.0" -> "norms.0"), as torch.onnx names them."""
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return name


def fp32_node_rule(module: nn.Module, exporter: str = "auto") -> Callable[[onnx.NodeProto], bool]:
    """A predicate telling which nodes of ``module``'s exported graph stay float32.

    TorchScript graphs name nodes by the scopes of the modules they ran in
    (``/attentions.0/transformer_blocks.0/norm1/LayerNormalization``); scopes start at the
    nearest module that was *called*, so names are matched as unqualified attribute names,
    and a scope name used again gets a ``_<n>`` suffix (``norm1_3``), which is stripped.
    That is only sound if no other module shares such a name; if one does the rule
    refuses (EngineError) rather than guess. Dynamo graphs carry full module paths in
    ``pkg.torch.onnx.name_scopes`` metadata. :func:`check_fp16_regions` then verifies the
    result independently of any naming.
    """
    exporter = resolve_exporter(exporter)
    named = dict(module.named_modules())
    roots = {n for n, m in named.items() if n and isinstance(m, FP32_MODULES)}

    def inside(n: str) -> bool:
        return any(n == r or n.startswith(r + ".") for r in roots)

    if exporter == "dynamo":
        def is_fp32(node: onnx.NodeProto) -> bool:
            if node.op_type in FP32_OPS:
                return True
            meta = {p.key: p.value for p in node.metadata_props}
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
            return any(s in roots for s in scopes)

        return is_fp32

    fp32_names = {_unqualified(n) for n in roots}
    others = {_unqualified(n) for n in named if n and not inside(n)}
    clash = fp32_names & (others | {_UNIQUE_SUFFIX.sub("", n) for n in others})
    if clash:
        raise EngineError(f"cannot place fp16/fp32 regions: module names {sorted(clash)} belong to normalisation or "
                          "timestep modules and to others; export with exporter='dynamo'")

    def is_fp32_ts(node: onnx.NodeProto) -> bool:
        if node.op_type in FP32_OPS:
            return True
        return any(_UNIQUE_SUFFIX.sub("", part) in fp32_names for part in node.name.split("/")[1:-1])

    return is_fp32_ts


def value_types(model: onnx.ModelProto, keep_value_info: bool = False) -> dict[str, int]:
    """The element type of every value of a graph, by strict shape inference on a copy
    without the weights (so a model over protobuf's 2 GB limit works too; small
    initializers, which shape inference may read, are kept). ``keep_value_info``: store
    the inferred value_info in ``model``."""
    big = [t for t in model.graph.initializer if t.HasField("raw_data") and int(np.prod(t.dims)) > 4096]
    stash = [t.raw_data for t in big]  # set aside, not copied: the weights may be gigabytes
    try:
        for t in big:
            t.ClearField("raw_data")
        g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    finally:
        for t, data in zip(big, stash):
            t.raw_data = data
    if keep_value_info:
        model.graph.ClearField("value_info")
        model.graph.value_info.extend(g.value_info)
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def to_float16(model: onnx.ModelProto, keep_fp32_ops: Iterable[str] = FP32_OPS, keep_fp32_nodes: Iterable[str] = (),
               keep_fp32_io: Iterable[str] = ("timestep",)) -> onnx.ModelProto:
    """An fp32 graph (loaded with its weights) as the fp16 graph of the module docstring, by
    onnxconverter-common's ``convert_float_to_float16``: nodes of ``keep_fp32_ops`` types and
    those named in ``keep_fp32_nodes`` compute in float32, graph inputs/outputs become float16
    except ``keep_fp32_io``. Data movement (Reshape, Expand, ...) and Cast-to-float of a float32
    value follow their input into float32 rather than cast it (the timestep's reshape feeding
    the fp32 sinusoid). Rewrites ``model`` in place and returns it, without value_info.

    Around the library, four repairs, each for something it gets wrong (1.16.0):
    - it types the output of an existing ``Cast(to=float)`` (an integer shape cast to float,
      as in attention's scale) float16 but leaves ``to=float``: the graph does not load, so
      those outside the blocked nodes are turned into ``Cast(to=float16)`` first;
    - ``keep_io_types`` is all or nothing: ``keep_fp32_io`` inputs are put back to float32
      afterwards and the library's Cast to float32 behind them removed;
    - it converts Resize's ``roi``/``scales`` Constants, which ONNX requires in float32, unless
      Resize is blocked (its default, which computes the upsampling itself in float32 between
      two Casts): they are put back to float32 instead;
    - it casts every blocked node's output to float16 and casts it back in front of the next
      blocked node, and its clean-up of these pairs misses casts whose value has several
      consumers (it compares the Cast's ``to`` with 16 and 32, not the ONNX type numbers)
      and casts of Constants: a GroupNorm's statistics would round-trip through float16
      between its ops. :func:`_collapse_round_trips` removes every such pair and merges the
      library's one-Cast-per-consumer into one Cast per value.

    Shape inference is ours (on a copy without the weights, so graphs over protobuf's 2 GB
    work): the library's own serialises the whole model. Cost: the library's topological
    sort is quadratic in the nodes (each of its Casts sits at the end of the node list until
    sorted): the UNet's graph (~7,800 nodes, as many at SD 1.5 size) took 30 s here (196 s
    with the 2 cores shared), against 1.4 s for the hand-written pass this replaced.
    """
    from onnxconverter_common.float16 import convert_float_to_float16

    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise EngineError("fp16 conversion: graphs with subgraphs (If/Loop) are not supported")
    types = value_types(model, keep_value_info=True)
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    ops, nodes, keep_io = frozenset(keep_fp32_ops), set(keep_fp32_nodes), set(keep_fp32_io)
    for i, n in enumerate(g.node):  # the library blocks nodes by name
        n.name = n.name or f"__node_{i}"
    inits = {t.name for t in g.initializer}
    fp32 = {v.name for v in g.input if v.name in keep_io}  # float32 values so far
    block = []
    for n in g.node:
        float_in = [x for x in n.input if types.get(x) == F32 and x not in inits]
        cast_to = next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
        follows = bool(float_in) and all(x in fp32 for x in float_in) and (n.op_type in _DATA_MOVEMENT or cast_to == F32)
        if n.op_type in ops or n.name in nodes or follows:
            block.append(n.name)
            fp32.update(o for o in n.output if types.get(o) == F32)
        elif cast_to == F32:
            next(a for a in n.attribute if a.name == "to").i = F16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every weight with values beyond float16's range
        convert_float_to_float16(model, min_positive_val=0.0, max_finite_val=float(np.finfo(np.float16).max),
                                 keep_io_types=False, disable_shape_infer=True, op_block_list=sorted(ops),
                                 node_block_list=block, check_fp16_ready=False)
    consumers = _consumers(g)
    for v in g.input:
        if v.name in keep_io and v.type.tensor_type.elem_type == F16:
            v.type.tensor_type.elem_type = F32
            to16 = None
            for n, i in consumers.get(v.name, []):
                if n.op_type == "Cast" and n.attribute[0].i == F32:  # the library's cast back, now an identity
                    for m, j in consumers.get(n.output[0], []):
                        m.input[j] = v.name
                    continue
                if to16 is None:
                    to16 = helper.make_node("Cast", [v.name], [f"{v.name}__fp16"], to=F16, name=f"{v.name}__cast")
                    g.node.insert(0, to16)
                n.input[i] = to16.output[0]
    producer = {o: n for n in g.node for o in n.output}
    initializers = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Resize":
            for x in n.input[1:3]:
                p = producer.get(x)
                t = p.attribute[0].t if p is not None and p.op_type == "Constant" else initializers.get(x)
                if t is not None and t.data_type == F16:
                    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    _collapse_round_trips(g)
    g.ClearField("value_info")
    return model


def _consumers(g: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list] = {}
    for n in g.node:
        for i, x in enumerate(n.input):
            out.setdefault(x, []).append((n, i))
    return out


def _collapse_round_trips(g: onnx.GraphProto) -> None:
    """After :func:`to_float16`'s library call: float32 -> Cast(float16) -> Cast(float32)
    chains read the float32 value directly, one Cast per (value, type), unused Casts go."""
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    types.update({n.output[0]: n.attribute[0].t.data_type for n in g.node if n.op_type == "Constant"
                  and n.attribute[0].name == "value"})
    producer = {o: n for n in g.node for o in n.output}
    consumers = _consumers(g)
    outputs = {v.name for v in g.output}

    def bypass(cast: onnx.NodeProto, value: str) -> None:
        for m, j in consumers.pop(cast.output[0], []):
            m.input[j] = value
            consumers.setdefault(value, []).append((m, j))
        consumers[cast.input[0]] = [(m, j) for m, j in consumers[cast.input[0]] if m is not cast]

    seen: dict[tuple[str, int], str] = {}
    for n in g.node:
        if n.op_type != "Cast" or n.output[0] in outputs:
            continue
        first = producer.get(n.input[0])
        if (n.attribute[0].i == F32 and first is not None and first.op_type == "Cast"
                and first.attribute[0].i == F16 and types.get(first.input[0]) == F32):
            bypass(n, first.input[0])
        elif (n.input[0], n.attribute[0].i) in seen:
            bypass(n, seen[n.input[0], n.attribute[0].i])
        else:
            seen[n.input[0], n.attribute[0].i] = n.output[0]
    live = [n for n in g.node if n.op_type != "Cast" or n.output[0] in outputs or consumers.get(n.output[0])]
    g.ClearField("node")
    g.node.extend(live)


#: ops that must compute in float32 in every fp16 graph (statistics, softmax, sinusoid)
MUST_BE_FP32 = frozenset({"Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
                          "ReduceMean", "Sin", "Cos"})


def check_fp16_regions(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of an fp16 graph that break the precision rule: a
    :data:`MUST_BE_FP32` op computing in float16, a Conv computing in float32, or a Cast of
    a Cast (a float32 value that round-trips through float16). Empty when all is well."""
    types = value_types(model)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    bad = []
    for n in g.node:
        t = next((types[x] for x in n.input if types.get(x) in (TensorProto.FLOAT, TensorProto.FLOAT16)), None)
        if n.op_type in MUST_BE_FP32 and t == TensorProto.FLOAT16:
            bad.append(f"{n.op_type} {n.name} in float16")
        elif n.op_type == "Conv" and t == TensorProto.FLOAT:
            bad.append(f"Conv {n.name} in float32")
        elif n.op_type == "Cast" and types.get(n.output[0]) in floats:
            p = producer.get(n.input[0])
            if p is not None and p.op_type == "Cast" and types.get(p.input[0]) in floats:
                bad.append(f"Cast {n.name} of a Cast (a float value round-trips)")
    return bad


def convert_file_to_fp16(src: Path, dst: Path, is_fp32: Callable[[onnx.NodeProto], bool],
                         keep_fp32_io: Iterable[str] = ("timestep",)) -> list[Path]:
    """:func:`to_float16` from file to file (weights loaded from external data), the nodes
    ``is_fp32`` picks kept float32, refusing (EngineError) a result that
    :func:`check_fp16_regions` finds wrong."""
    model = onnx.load(str(src))
    model = to_float16(model, FP32_OPS, [n.name for n in model.graph.node if is_fp32(n)], keep_fp32_io)
    bad = check_fp16_regions(model)
    if bad:
        raise EngineError(f"{src}: fp16 conversion left {len(bad)} node(s) in the wrong precision, e.g. {bad[0]}")
    return save_onnx(model, Path(dst))


# --------------------------------------------------------------------------- running
def ort_session(path: Path, providers: Sequence = ("CPUExecutionProvider",)):
    """An ONNX Runtime session with all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=list(providers))


def run_torch_tensors(module: nn.Module, args: Sequence[Tensor]):
    with torch.no_grad():
        return module.eval()(*args)


def run_torch(module: nn.Module, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The torch stage on float32 copies of ``inputs``: its outputs as float32 arrays."""
    out = run_torch_tensors(module, [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in inputs.values()])
    out = (out,) if isinstance(out, Tensor) else out
    return [o.float().numpy() for o in out]


@dataclass(frozen=True)
class Comparison:
    max_abs: float  #: largest absolute difference over all outputs
    rel_l2: float  #: largest ||a - b|| / ||b|| over the outputs

    @classmethod
    def of(cls, got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> "Comparison":
        max_abs, rel = 0.0, 0.0
        for a, b in zip(got, ref, strict=True):
            if np.shape(a) != np.shape(b):
                raise EngineError(f"output shape {np.shape(a)} differs from the torch stage's {np.shape(b)}")
            m, r = relative_error(a, b)
            max_abs, rel = max(max_abs, m), max(rel, r)
        return cls(max_abs, rel)


def compare_with_torch(path: Path, module: nn.Module, spec: StageSpec, seed: int = 1,
                       traced: Optional[Traced] = None) -> tuple[Comparison, float]:
    """Run the graph with ONNX Runtime (CPU) and the torch stage on the same random inputs
    (axes from :func:`check_axes`, so a dynamic axis is checked at a value it was not
    traced at); returns the comparison and the ORT seconds. A static stage with
    ``traced`` is checked at the traced inputs against the traced outputs instead."""
    if traced is not None and not spec.axes:
        inputs, ref = traced.inputs, traced.outputs
    else:
        inputs = sample_inputs_fp16_exact(spec, seed, **check_axes(spec))
        ref = run_torch(module, inputs)
    feeds = {name: a.astype(spec.tensors[name].np_dtype) for name, a in inputs.items()}
    session = ort_session(path)
    t0 = time.perf_counter()
    got = session.run(None, feeds)
    seconds = time.perf_counter() - t0
    del session
    return Comparison.of(got, ref), seconds


def checked_validation(cmp: Comparison, name: str, precision: str) -> dict[str, float]:
    """The manifest's ``validation`` record of a graph compared with its torch stage, or
    EngineError when its relative L2 error exceeds the precision's tolerance."""
    tolerance = validation_tolerance("graph", precision)
    if not cmp.rel_l2 <= tolerance:
        raise EngineError(f"{name}: the {precision} ONNX graph differs from the torch stage: relative L2 "
                          f"error {cmp.rel_l2:.3g} > {tolerance:g}")
    return {"max_abs": cmp.max_abs, "rel_l2": cmp.rel_l2}


def stage_record(directory: Path, name: str, path: Path, spec: StageSpec, validation: Mapping[str, float]):
    """The manifest record of the graph ``path`` (and its external data) in ``directory``."""
    from ..engines.manifest import FileRecord, StageRecord

    files = tuple(FileRecord.of(directory, p.name) for p in onnx_files(path))
    return StageRecord(name=name, onnx=path.name, files=files, spec=spec, validation=dict(validation))


def remove_files(paths: Iterable[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


__all__ = [
    "STAGE_MODULES", "Comparison", "check_onnx", "compare_with_torch", "convert_file_to_fp16",
    "export_onnx", "fp32_node_rule", "graph_signature", "model_dims", "onnx_files", "ort_session", "run_torch",
    "save_onnx", "to_float16",
]
