"""The DensePose estimator's three networks to ONNX (``build_engines.py --densepose-weights FILE``).

Each network of ``DensePoseRCNN.networks()`` is traced with the TorchScript exporter (as the
animation's stages, onnx_export.py), declared and checked against its spec
(engines/densepose.py), and validated with ONNX Runtime (CPU) against the PyTorch network at
another batch and image size than it was traced at (which proves those axes dynamic). fp16
graphs are the fp32 export rewritten by onnx_export's float16 pass (every node float16, see
:func:`_all_float16`) and validated against the float32 PyTorch network at the fp16 tolerance. The graphs
are written into the engine directory beside the animation's (or alone) and recorded in the
manifest's ``"densepose"`` section; a rebuild replaces only that section's files.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ..engines.densepose import (
    DENSEPOSE_STAGES, DensePoseManifest, densepose_specs, weights_record, write_densepose,
)
from ..engines.manifest import MANIFEST
from ..engines.specs import StageSpec, float_dtype
from ..errors import EngineError
from . import onnx_export as ox

#: axis values each graph is traced at, and validated at (different ones: dynamic axes stay dynamic;
#: image sides are multiples of 32, as the padded network input)
TRACE_AXES = {"densepose_backbone": {"batch": 2, "height": 128, "width": 192},
              "densepose_box_head": {"rois": 6}, "densepose_head": {"instances": 3}}
CHECK_AXES = {"densepose_backbone": {"batch": 1, "height": 96, "width": 160},
              "densepose_box_head": {"rois": 5}, "densepose_head": {"instances": 2}}


def validate_graph(path: Path, module: torch.nn.Module, spec: StageSpec, seed: int = 1) -> ox.Comparison:
    """ONNX Runtime (CPU) on the graph against the torch network, on random inputs at
    :data:`CHECK_AXES`."""
    inputs = ox.sample_inputs_fp16_exact(spec, seed, **CHECK_AXES[spec.name])
    ref = ox.run_torch(module, inputs)
    got = ox.ort_session(path).run(None, {n: a.astype(spec.tensors[n].np_dtype) for n, a in inputs.items()})
    return ox.Comparison.of(got, ref)


def _all_float16(node) -> bool:
    """The fp16 graphs' float32 rule: no node stays float32. The animation keeps normalisation
    statistics, the timestep embedding and softmax in float32 (onnx_export.py); these networks
    have none of them: FrozenBatchNorm is folded into the convolutions at load time, and what is
    sensitive (objectness and class softmax, box decoding, NMS, RoIAlign sample positions, the
    extractor's argmax) runs in the runtime in float32 on the graphs' outputs. Inputs are the
    mean-subtracted pixels (|x| <= 152: fp16 keeps them to 0.06) and pooled features.
    Measured on the conformance weights (CPU, ONNX Runtime): relative L2 <= 1.3e-3 against the
    float32 graphs, 23x under the fp16 graph tolerance."""
    return False


def build_densepose(out: Path, weights: Path, precision: str = "fp32", min_size: int = 800, max_size: int = 1333,
                    validate: bool = True, log: Callable[[str], None] = print) -> list[tuple[str, int, float, dict]]:
    """Export the three networks of ``weights`` into the (existing or new) directory ``out`` and
    record them in its manifest. Returns (stage, bytes, seconds, validation) per stage."""
    float_dtype(precision)  # InputError naming the precision unless fp32 or fp16
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EngineError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise EngineError(f"{out}: exists and is not an engine directory; refusing to write into it "
                          "(remove it or choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    # graphs are written beside the directory's files and moved in once all three are checked, so an
    # interrupted build leaves the directory as it was
    tmp = out / f".densepose-building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = _export_into(tmp, out, weights, precision, min_size, max_size, validate, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _export_into(tmp: Path, out: Path, weights: Path, precision: str, min_size: int, max_size: int,
                 validate: bool, log: Callable[[str], None]):
    from ..densepose.config import DensePoseConfig
    from ..densepose.model import DensePoseRCNN
    from ..densepose.weights import read_checkpoint

    t0 = time.perf_counter()
    cfg = DensePoseConfig(min_size=min_size, max_size=max_size)
    model = DensePoseRCNN.from_state_dict(read_checkpoint(weights), weights, cfg)
    # NCHW for tracing: the graph's layout is ONNX's, not the eager model's memory format
    model = model.to(memory_format=torch.contiguous_format)
    log(f"loaded {weights} in {time.perf_counter() - t0:.1f} s; exporting {len(DENSEPOSE_STAGES)} DensePose stages")
    specs, fp32_specs = densepose_specs(precision, min_size, max_size), densepose_specs("fp32", min_size, max_size)
    nets = model.networks()
    records, report = {}, []
    for k, name in enumerate(DENSEPOSE_STAGES, 1):
        t0 = time.perf_counter()
        spec, module = specs[name], nets[name].eval()
        path = tmp / f"{name}.onnx"
        if precision == "fp32":
            ox.export_onnx(module, spec, path, "torchscript", axes=TRACE_AXES[name])
        else:
            fp32_path = tmp / f".{name}.fp32.onnx"
            ox.export_onnx(module, fp32_specs[name], fp32_path, "torchscript", axes=TRACE_AXES[name])
            ox.convert_file_to_fp16(fp32_path, path, _all_float16, keep_fp32_io=())
            ox.remove_files(ox.onnx_files(fp32_path))
        ox.check_onnx(path, spec)
        validation = {}
        if validate:
            validation = ox.checked_validation(validate_graph(path, module, spec), name, precision)
        records[name] = ox.stage_record(tmp, name, path, spec, validation)
        files = records[name].files
        seconds = time.perf_counter() - t0
        size = sum(f.bytes for f in files)
        report.append((name, size, seconds, validation))
        checked = f"rel L2 {validation['rel_l2']:.2g} vs torch" if validation else "not validated"
        log(f"[{k}/{len(DENSEPOSE_STAGES)}] {name}: exported, {checked}, {size / 2**20:.1f} MB, {seconds:.1f} s")
    for rec in records.values():
        for f in rec.files:
            os.replace(tmp / f.name, out / f.name)
    write_densepose(out, DensePoseManifest(out, weights_record(weights), model.blocks, min_size, max_size, precision,
                                           records))
    return report

