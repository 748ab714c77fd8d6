"""TensorRT plans on a GPU machine: build (or bring up to date) an engine directory's plans
from its ONNX graphs — the animation's stages and the DensePose estimator's, whichever the
directory holds — and validate every plan against ONNX Runtime. No model weights needed.

```
python -m magicanimate_rt.plans ENGINE_DIR [--opt-level 3] [--workspace-gib N] [--stages ...] [--force] [--validate]
```

It sits above both halves of the TensorRT support, which never import each other: the plan
builder (:mod:`magicanimate_rt.engines.tensorrt_build`) and the backend that runs plans
(:mod:`magicanimate_rt.runtime.backends.tensorrt_backend`); validation needs both (a
built plan, run by the backend). ``build_engines.py --validate-plans`` calls
:func:`validate_engines` too.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .command_line import OneLineParser, run_command
from .engines.specs import STAGE_NAMES, relative_error, validation_tolerance
from .engines.densepose import DENSEPOSE_STAGES
from .engines.tensorrt_build import (
    PlanBuildSettings, build_densepose_plans, build_plans, has_animation, has_densepose,
)
from .engines.tensorrt_plan import PLAN_TOOL, TIMING_CACHE
from .errors import EngineError


# --------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class PlanCheck:
    """One output of one plan against ONNX Runtime on the same inputs."""

    stage: str
    axes: str  #: e.g. "frames=16" ("-" for a static stage)
    output: str
    max_abs: float
    rel_l2: float
    tolerance: float  #: ``validation_tolerance("plan", precision)``

    @property
    def ok(self) -> bool:
        return math.isfinite(self.rel_l2) and self.rel_l2 <= self.tolerance


def _onnxruntime_reference(path, feeds: Mapping[str, np.ndarray], device) -> list[np.ndarray]:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=providers)
    return session.run(None, dict(feeds))


def validate_engines(engine_dir, device="cuda", stages: Optional[Sequence[str]] = None, seed: int = 0,
                     stages_backend=None,
                     reference: Optional[Callable[..., list[np.ndarray]]] = None) -> list[PlanCheck]:
    """Run every plan and ONNX Runtime (CUDA where onnxruntime-gpu is installed, else CPU:
    SD 1.5's UNet at 512 then needs tens of GB) on the stage's ONNX graph with the same
    random inputs (``StageSpec.sample_inputs``), at each dynamic axis' opt and min value;
    returns one :class:`PlanCheck` per output. ``stages_backend`` (a ``TensorRTStages``)
    and ``reference`` (a function ``(onnx path, feeds, device) -> outputs``) are seams for
    tests."""
    import torch

    from .runtime.backends.tensorrt_backend import TensorRTStages

    own = stages_backend is None
    st = stages_backend or TensorRTStages.from_engines(engine_dir, device=device)
    reference = reference or _onnxruntime_reference
    checks: list[PlanCheck] = []
    try:
        m = st.manifest
        tol = validation_tolerance("plan", m.precision)
        for stage in stages or list(m.stages):
            spec = m.spec(stage)
            settings = [{}] if not spec.axes else [
                {a: getattr(r, which) for a, r in spec.axes.items()} for which in ("opt", "min")]
            for axes in settings:
                feeds = spec.sample_inputs(seed, **axes)
                if "text_embedding" in feeds:  # bound once at load: the reference gets the same constant
                    feeds["text_embedding"] = st.text_embedding.cpu().numpy()
                inputs = {k: torch.from_numpy(v).to(st.device) for k, v in feeds.items() if k != "text_embedding"}
                got = st.run_stage(stage, inputs, axes)
                if st.device.type == "cuda":
                    st.stream.synchronize()
                got = [g.float().cpu().numpy() for g in got]
                want = reference(m.onnx_path(stage), feeds, st.device)
                label = ",".join(f"{a}={v}" for a, v in axes.items()) or "-"
                for o, a, b in zip(spec.outputs, got, want):
                    max_abs, rel = relative_error(a, b)
                    checks.append(PlanCheck(stage, label, o.name, max_abs, rel, tol))
    finally:
        if own:
            st.close()
    return checks


def validate_densepose(engine_dir, device="cuda", seed: int = 0, stages_backend=None,
                       reference: Optional[Callable[..., list[np.ndarray]]] = None) -> list[PlanCheck]:
    """:func:`validate_engines` for the DensePose stages' plans: each plan and ONNX Runtime on
    the stage's graph with the same random input, at the profile's opt and min values.
    ``stages_backend`` (a ``TensorRTDensePoseStages``) and ``reference`` are seams for tests."""
    import torch

    from .densepose.tensorrt_stages import TensorRTDensePoseStages

    st = stages_backend or TensorRTDensePoseStages.from_engines(engine_dir, device)
    reference = reference or _onnxruntime_reference
    m = st.manifest
    tol = validation_tolerance("plan", m.precision)
    checks: list[PlanCheck] = []
    for stage in DENSEPOSE_STAGES:
        spec = m.spec(stage)
        for which in ("opt", "min"):
            axes = {a: getattr(r, which) for a, r in spec.axes.items()}
            feeds = spec.sample_inputs(seed, **axes)
            (x,) = feeds.values()
            got = [g.cpu().numpy() for g in st.run(stage, torch.from_numpy(x))]  # (.cpu() waits for the stream)
            want = reference(m.onnx_path(stage), feeds, st.device)
            label = ",".join(f"{a}={v}" for a, v in axes.items())
            for o, a, b in zip(spec.outputs, got, want):
                max_abs, rel = relative_error(a, b)
                checks.append(PlanCheck(stage, label, o.name, max_abs, rel, tol))
    return checks


def format_validation(checks: Sequence[PlanCheck]) -> str:
    """A table: stage | axes | output | max abs err | rel L2 err | ok."""
    rows = [("stage", "axes", "output", "max abs err", "rel L2 err", "ok")]
    rows += [(c.stage, c.axes, c.output, f"{c.max_abs:.3g}", f"{c.rel_l2:.3g}", "ok" if c.ok else "FAIL")
             for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def validate_and_report(engine_dir, log: Callable[[str], None] = print,
                        validate: Callable[..., list[PlanCheck]] = validate_engines) -> list[PlanCheck]:
    """``validate`` (:func:`validate_engines`, or :func:`validate_densepose`), its table through
    ``log``, and one EngineError when any output is beyond tolerance."""
    checks = validate(engine_dir)
    log(format_validation(checks))
    failed = [c for c in checks if not c.ok]
    if failed:
        raise EngineError(f"{len(failed)} of {len(checks)} TensorRT plan outputs differ from ONNX Runtime beyond "
                          "tolerance (table above)")
    return checks


# --------------------------------------------------------------------------- command line
def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PLAN_TOOL, description="Build (or bring up to date) the TensorRT plans of an engine "
                      "directory on this machine's GPU, from its ONNX graphs; no model weights needed.")
    p.add_argument("engine_dir", type=Path, help="engine directory written by build_engines.py")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
    p.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit in GiB "
                   "(default: TensorRT's, the GPU's memory)")
    p.add_argument("--stages", default=",".join(STAGE_NAMES + DENSEPOSE_STAGES),
                   help="comma-separated stages (default: all the directory holds, the animation's and the "
                   "DensePose estimator's)")
    p.add_argument("--force", action="store_true", help="rebuild every plan, even up-to-date ones")
    p.add_argument("--no-timing-cache", dest="timing_cache", action="store_false",
                   help=f"neither read nor write ENGINE_DIR/{TIMING_CACHE}")
    p.add_argument("--validate", action="store_true", help="then compare every plan with ONNX Runtime "
                   "on the stage's ONNX graph (random inputs) and print the errors")
    p.add_argument("--verbose", action="store_true", help="print TensorRT's warnings")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        settings = PlanBuildSettings(
            optimization_level=args.opt_level,
            workspace_bytes=None if args.workspace_gib is None else int(args.workspace_gib * 2**30),
            timing_cache=args.timing_cache, force=args.force,
            stages=tuple(s for s in args.stages.split(",") if s), verbose=args.verbose)
        animation = has_animation(args.engine_dir) or not has_densepose(args.engine_dir)
        if animation:  # (a directory with neither: build_plans says what is wrong with it)
            build_plans(args.engine_dir, settings)
        if has_densepose(args.engine_dir):
            build_densepose_plans(args.engine_dir, settings)
        if args.validate and animation:
            validate_and_report(args.engine_dir)
        if args.validate and has_densepose(args.engine_dir):
            validate_and_report(args.engine_dir, validate=validate_densepose)
        return 0

    return run_command(PLAN_TOOL, body, interrupted=f"{args.engine_dir} holds the plans finished so far",
                       out_of_memory="lower --workspace-gib", cuda_out_of_memory="lower --workspace-gib")


if __name__ == "__main__":
    sys.exit(main())
