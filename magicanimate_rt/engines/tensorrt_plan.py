"""The TensorRT plan format of an engine directory: the facts the plan builder
(:mod:`.tensorrt_build`) and the TensorRT backend
(:mod:`magicanimate_rt.runtime.backends.tensorrt_backend`) both need, in one module they
both import (neither imports the other).

- which TensorRT may be used (:func:`import_tensorrt`, at least :data:`MIN_TENSORRT`) and
  how its errors are kept (:func:`make_logger`);
- how a spec's dtype names map to ``trt.DataType`` (:func:`trt_dtypes`);
- what a plan is built for (:class:`PlanTarget`, the manifest's ``tensorrt`` entry), where it
  lives (:func:`plan_file`, :data:`TIMING_CACHE`) and when a directory's plans may not be
  loaded (:func:`check_plans`, with the command that rebuilds them: :func:`plan_rebuild_hint`).

The ``tensorrt`` module is never imported at module level: it comes from
:func:`import_tensorrt`, or is passed in (``trt=``), the seam the tests use to run against
a recording fake on a machine without a GPU. Like the rest of ``engines/``, this module
reads only the manifest and the directory's files.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from ..errors import EngineError
from .manifest import EngineManifest, FileRecord, build_command
from .specs import STAGE_NAMES

#: the timing cache shared by every stage of a directory (not listed in the manifest: a
#: build aid, never needed to run)
TIMING_CACHE = "timing.cache"
#: the first TensorRT with everything used here (ICudaEngine.device_memory_size_v2 and
#: IExecutionContext.set_device_memory appeared in 10.1)
MIN_TENSORRT = (10, 1)
#: the command that builds (or brings up to date) and validates a directory's plans
PLAN_TOOL = "python -m magicanimate_rt.plans"


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the module
def import_tensorrt():
    """The ``tensorrt`` module, or one EngineError saying why it cannot be used."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the module is there, its CUDA libraries are not
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise EngineError(f"TensorRT is not importable (python module 'tensorrt': {reason}); install it on the "
                          "GPU machine (pip install tensorrt), or build the ONNX graphs only with --onnx-only"
                          ) from None
    if _version_tuple(trt.__version__) < MIN_TENSORRT:
        raise EngineError(f"TensorRT {trt.__version__} is too old: this project needs TensorRT "
                          f"{'.'.join(map(str, MIN_TENSORRT))} or newer")
    return trt


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in str(version).split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


@dataclass(frozen=True)
class PlanTarget:
    """What a plan is built for, recorded as the manifest's ``tensorrt`` entry.

    Fields:
        version: ``tensorrt.__version__`` (plans load only in the exact version that built them).
        gpu: the GPU's name (``torch.cuda.get_device_name``), e.g. "NVIDIA H100 80GB HBM3".
        compute_capability: "major.minor", e.g. "9.0".
    """

    version: str
    gpu: str
    compute_capability: str

    @classmethod
    def current(cls, trt, device: int = 0) -> "PlanTarget":
        """This machine: the given TensorRT module and CUDA device ``device``."""
        import torch  # only for the device's name; no model code

        if not torch.cuda.is_available():
            raise EngineError("TensorRT plans are built and run on a CUDA GPU, and torch sees none here")
        major, minor = torch.cuda.get_device_capability(device)
        return cls(str(trt.__version__), torch.cuda.get_device_name(device), f"{major}.{minor}")

    def to_dict(self) -> dict[str, str]:
        return {"version": self.version, "gpu": self.gpu, "compute_capability": self.compute_capability}

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> Optional["PlanTarget"]:
        if not d:
            return None
        return cls(str(d.get("version", "?")), str(d.get("gpu", "?")), str(d.get("compute_capability", "?")))

    def describe(self) -> str:
        return f"TensorRT {self.version} on {self.gpu} (compute capability {self.compute_capability})"


# --------------------------------------------------------------------------- files and refusal
def plan_file(stage: str) -> str:
    return f"{stage}.plan"


def plan_rebuild_hint(m: EngineManifest) -> str:
    """The commands that rebuild the plans of ``m`` on the machine they are to run on."""
    return (f"rebuild the plans on this machine: {build_command(m.directory, m.source, m.size, m.precision, width=m.width, height=m.height)} "
            f"(the ONNX graphs are kept; without the models: {PLAN_TOOL} {m.directory})")


def onnx_sha256(m: EngineManifest, stage: str) -> str:
    rec = m.stages[stage]
    return next(f.sha256 for f in rec.files if f.name == rec.onnx)


def plan_record_problem(m: EngineManifest, stage: str) -> Optional[str]:
    plans = m.stages[stage].plans
    if not plans or "file" not in plans:
        return "no plan"
    rec = FileRecord.from_dict(plans["file"])
    path = m.directory / rec.name
    if not path.is_file():
        return f"{rec.name} is missing"
    if path.stat().st_size != rec.bytes:
        return f"{rec.name} is {path.stat().st_size} bytes, the manifest says {rec.bytes} (truncated or replaced)"
    if plans.get("onnx_sha256") != onnx_sha256(m, stage):
        return "its ONNX graph changed since the plan was built"
    return None


def check_plans(m, target: PlanTarget, verify_hashes: bool = False, *, stages=STAGE_NAMES,
                hint: Optional[str] = None) -> None:
    """Refuse (EngineError with the rebuild command) an engine directory whose plans are
    missing, damaged, or built for another TensorRT version or GPU than ``target``.

    ``m``: the animation's :class:`EngineManifest` (``stages`` its stages), or any record
    with the same ``directory``, ``tensorrt`` and ``stages`` (the DensePose section, with
    its ``stages`` and ``hint``); ``hint`` defaults to :func:`plan_rebuild_hint`."""
    hint = hint or plan_rebuild_hint(m)
    built_for = PlanTarget.from_dict(m.tensorrt)
    if built_for is None:
        raise EngineError(f"{m.directory}: has no TensorRT plans (built with --onnx-only?); {hint}")
    if built_for.version != target.version:
        raise EngineError(f"{m.directory}: its TensorRT plans were built with TensorRT {built_for.version}, this is "
                          f"TensorRT {target.version} (a plan loads only in the version that built it); {hint}")
    if (built_for.gpu, built_for.compute_capability) != (target.gpu, target.compute_capability):
        raise EngineError(f"{m.directory}: its TensorRT plans were built for {built_for.gpu} (compute capability "
                          f"{built_for.compute_capability}), this GPU is {target.gpu} (compute capability "
                          f"{target.compute_capability}); {hint}")
    for stage in stages:
        problem = plan_record_problem(m, stage)
        if problem is not None:
            raise EngineError(f"{m.directory}: stage {stage}: {problem}; {hint}")
        if verify_hashes:
            rec = FileRecord.from_dict(m.stages[stage].plans["file"])
            if FileRecord.of(m.directory, rec.name).sha256 != rec.sha256:
                raise EngineError(f"{m.directory}: {rec.name} does not match its recorded sha256 (corrupt); {hint}")


# --------------------------------------------------------------------------- TensorRT helpers
def make_logger(trt, verbose: bool = False, log: Callable[[str], None] = log_to_stderr):
    """A ``trt.ILogger`` that keeps errors (to put them into the EngineError a failure
    raises) and prints warnings only when ``verbose``."""
    severity = trt.ILogger.Severity
    errors = (severity.INTERNAL_ERROR, severity.ERROR)

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev, msg):  # called by TensorRT
            if sev in errors:
                self.errors.append(str(msg))
            elif verbose and sev == severity.WARNING:
                log(f"TensorRT: {msg}")

    return _Logger()


def trt_dtypes(trt) -> dict[str, Any]:
    """numpy dtype name -> ``trt.DataType``, for the dtypes stage specs use."""
    return {"float32": trt.DataType.FLOAT, "float16": trt.DataType.HALF, "int64": trt.DataType.INT64,
            "int32": trt.DataType.INT32, "bool": trt.DataType.BOOL}
