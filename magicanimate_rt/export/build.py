"""What ``build_engines.py`` does: a model set -> checked ONNX graphs -> an engine directory.

Steps (each stage: export, fp16 pass, graph checks, validation against the torch stage):

1. Without ``onnx_only``, TensorRT must be importable (checked before anything is exported).
2. The model set's fingerprint; if ``out`` already holds this very build its graphs are up
   to date and only missing or stale TensorRT plans are built (none with ``onnx_only``).
   A different build (or a damaged one) is replaced only with ``force``, and a directory
   that is not an engine directory never.
3. Everything is written into a temporary directory beside ``out`` and renamed into place
   when complete, so an interrupted build leaves ``out`` as it was.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..engines.tensorrt_build import PlanBuildSettings
from ..engines.tensorrt_plan import TIMING_CACHE
from ..engines.manifest import (
    FORMAT_VERSION, MANIFEST, TEXT_EMBEDDING, EngineManifest, FileRecord, StageRecord, check_files,
    describe_shape, load_manifest, model_set_fingerprint, read_manifest,
)
from ..command_line import OneLineParser, run_command
from ..errors import EngineError, InputError
from ..engines.specs import PRECISIONS, BatchRanges, output_shape, stage_specs


@dataclass(frozen=True)
class BuildSettings:
    """What to build.

    Fields:
        models: the model directory (the real layout, README 'Weights').
        out: the engine directory to write.
        size: output side S of a square build (a multiple of 64 for SD 1.5's UNet).
        width, height: the output shape of a non-square build, both or neither (they take
            the place of ``size``; :func:`~magicanimate_rt.engines.specs.output_shape`).
        precision: "fp16" or "fp32" (graph and I/O precision; see onnx_export).
        onnx_only: stop after the ONNX graphs (no TensorRT plans).
        force: replace an existing different or damaged build.
        validate: run each graph with ONNX Runtime (CPU) against the torch stage.
        exporter: "auto", "torchscript" or "dynamo" (see onnx_export).
        batches: profiles of the dynamic batch axes.
        fp32_graphs: for an fp16 build, an fp32 engine directory of the same model set and
            size whose graphs are converted instead of tracing the stages again.
        plans: how TensorRT plans are built (optimisation level, workspace).
        validate_plans: compare every TensorRT plan with ONNX Runtime and print the errors.
    """

    models: Path
    out: Path
    size: int = 512
    precision: str = "fp16"
    onnx_only: bool = False
    force: bool = False
    validate: bool = True
    exporter: str = "auto"
    batches: BatchRanges = BatchRanges()
    fp32_graphs: Optional[Path] = None
    plans: PlanBuildSettings = PlanBuildSettings()
    validate_plans: bool = False
    width: Optional[int] = None
    height: Optional[int] = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        output_shape(self.size, self.width, self.height, names=("--size", "--width", "--height"))
        if self.fp32_graphs is not None and self.precision != "fp16":
            raise InputError("--from-fp32 only serves fp16 builds (--precision fp16)")

    @property
    def shape(self) -> tuple[int, int]:
        """(width, height) of the build."""
        return output_shape(self.size, self.width, self.height)


@dataclass
class StageReport:
    name: str
    bytes: int
    seconds: float
    max_abs: Optional[float] = None
    rel_l2: Optional[float] = None


@dataclass
class BuildReport:
    out: Path
    up_to_date: bool
    stages: list[StageReport] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        """stage | max abs error | relative L2 error | file size | seconds."""
        rows = [("stage", "max abs err", "rel L2 err", "size", "seconds")]
        for s in self.stages:
            err = (f"{s.max_abs:.3g}", f"{s.rel_l2:.3g}") if s.rel_l2 is not None else ("-", "-")
            rows.append((s.name, *err, _human(s.bytes), f"{s.seconds:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "magicanimate-rt"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = "not installed"
    return out


def existing_build_difference(out: Path, size: Optional[int], precision: str, fingerprint: str,
                              width: Optional[int] = None, height: Optional[int] = None) -> Optional[str]:
    """None when ``out`` holds exactly this build (``size``, or ``width`` x ``height``),
    intact; else what differs."""
    try:
        m = read_manifest(out)
        check_files(m)
    except EngineError as e:
        return str(e).split("; ")[0]
    if m.fingerprint != fingerprint:
        return "built from another model set"
    if m.shape != output_shape(size, width, height):
        return f"built for {describe_shape(*m.shape)}"
    if m.precision != precision:
        return f"built for precision {m.precision}"
    return None


def _looks_like_engine_dir(path: Path) -> bool:
    return (path / MANIFEST).exists() or any(path.glob("*.onnx")) or not any(path.iterdir())


def _log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_engines(s: BuildSettings, log: Callable[[str], None] = _log_to_stderr) -> BuildReport:
    """Build (or confirm up to date) the engine directory ``s.out``; see the module docstring."""
    t_start = time.perf_counter()
    out = Path(s.out)
    if not s.onnx_only and not tensorrt_available():
        raise EngineError("TensorRT is not installed (python module 'tensorrt'); "
                          "build the ONNX graphs only with --onnx-only")
    fingerprint = model_set_fingerprint(s.models)
    if out.exists():
        if not out.is_dir():
            raise EngineError(f"{out}: exists and is not a directory")
        diff = existing_build_difference(out, s.size, s.precision, fingerprint, s.width, s.height)
        if diff is None:
            log(f"{out}: ONNX graphs up to date ({describe_shape(*s.shape)}, {s.precision}, same model set)")
            if not s.onnx_only:
                build_plans(out, s, log)  # only the missing or stale plans, in place
            return BuildReport(out, up_to_date=True, seconds=time.perf_counter() - t_start)
        if not s.force:
            raise EngineError(f"{out}: holds a different build ({diff}); pass --force to replace it")
        if not _looks_like_engine_dir(out):
            raise EngineError(f"{out}: exists and is not an engine directory; refusing to replace it "
                              "(remove it or choose another --out)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = _build_into(tmp, s, fingerprint, log)
        if not s.onnx_only:
            build_plans(tmp, s, log, timing_cache_seed=out / TIMING_CACHE)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.out = out
    report.seconds = time.perf_counter() - t_start
    return report


def build_plans(engine_dir: Path, s: BuildSettings, log: Callable[[str], None],
                timing_cache_seed: Optional[Path] = None) -> None:
    """The TensorRT plans of ``engine_dir``'s graphs that are missing or stale, recorded in
    its manifest (:mod:`magicanimate_rt.engines.tensorrt_build`)."""
    from ..engines.tensorrt_build import build_plans as build_tensorrt_plans

    seed = timing_cache_seed if timing_cache_seed is not None and timing_cache_seed.is_file() else None
    build_tensorrt_plans(engine_dir, s.plans, timing_cache_seed=seed, log=log)
    if s.validate_plans:
        from ..plans import validate_and_report

        validate_and_report(engine_dir, log)


def _replace_dir(new: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _build_into(d: Path, s: BuildSettings, fingerprint: str, log: Callable[[str], None]) -> BuildReport:
    # heavy imports only once a build is really going to happen
    from ..models import load_model_set
    from ..runtime.ddim import DDIMSettings
    from . import onnx_export as ox

    exporter = ox.resolve_exporter(s.exporter)
    source = None
    if s.fp32_graphs is not None:
        width, height = s.shape
        source = load_manifest(s.fp32_graphs, width=width, height=height, precision="fp32", model_set=fingerprint)
        exporter = source.exporter or exporter
    t0 = time.perf_counter()
    models = load_model_set(s.models)
    dims = ox.model_dims(models)
    width, height = s.shape
    specs = stage_specs(dims, None, s.precision, s.batches, width=width, height=height)
    how = f"converting the fp32 graphs of {source.directory}" if source else f"with the {exporter} exporter"
    log(f"loaded {s.models} in {time.perf_counter() - t0:.1f} s; building {len(specs)} stages at "
        f"{describe_shape(width, height)}, {s.precision}, {how}")

    np.save(d / TEXT_EMBEDDING, models.text_embedding.float().numpy())
    stages: dict[str, StageRecord] = {}
    report = BuildReport(d, up_to_date=False)
    for k, (name, spec) in enumerate(specs.items(), 1):
        t0 = time.perf_counter()
        module = ox.STAGE_MODULES[name](models)
        path = d / f"{name}.onnx"
        traced = None
        if s.precision == "fp32":
            traced = ox.export_onnx(module, spec, path, exporter)
        elif source is not None:
            ox.convert_file_to_fp16(source.onnx_path(name), path, ox.fp32_node_rule(module, exporter))
        else:
            fp32_path = d / f".{name}.fp32.onnx"
            traced = ox.export_onnx(module, spec, fp32_path, exporter)
            ox.convert_file_to_fp16(fp32_path, path, ox.fp32_node_rule(module, exporter))
            ox.remove_files(ox.onnx_files(fp32_path))
        ox.check_onnx(path, spec)
        t_export = time.perf_counter() - t0
        validation = {}
        if s.validate:
            cmp, _ = ox.compare_with_torch(path, module, spec, traced=traced)
            validation = ox.checked_validation(cmp, name, s.precision)
        stages[name] = ox.stage_record(d, name, path, spec, validation)
        files = stages[name].files
        seconds = time.perf_counter() - t0
        size = sum(f.bytes for f in files)
        report.stages.append(StageReport(name, size, seconds, validation.get("max_abs"), validation.get("rel_l2")))
        checked = (f"rel L2 {validation['rel_l2']:.2g} vs torch" if validation else "not validated")
        log(f"[{k}/{len(specs)}] {name}: exported and checked in {t_export:.1f} s, {checked}, "
            f"{_human(size)}, {seconds:.1f} s")

    manifest = EngineManifest(
        directory=d,
        format_version=FORMAT_VERSION,
        fingerprint=fingerprint,
        source=str(Path(s.models).resolve()),
        size=None,
        width=width,
        height=height,
        window=dims.window,
        precision=s.precision,
        dims=dims,
        batches=s.batches,
        stages=stages,
        text_embedding_file=FileRecord.of(d, TEXT_EMBEDDING),
        ddim=DDIMSettings().to_dict(),
        versions=library_versions(),
        tensorrt=None,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        exporter=exporter,
    )
    manifest.write()
    return report


# --------------------------------------------------------------------------- command line
PROG = "build_engines.py"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Export every MagicAnimate stage of a model set to ONNX, check each graph "
                "against its PyTorch stage, and write an engine directory (then TensorRT plans).")
    p.add_argument("--models", type=Path, default=None,
                   help="model directory in the real layout (README 'Weights'); with --densepose-weights, or alone")
    p.add_argument("--densepose-weights", type=Path, default=None, metavar="FILE",
                   help="also export the DensePose estimator's networks of this checkpoint (model_final_162be9.pkl) "
                        "into --out (ONNX graphs; without --models, into a new or existing engine directory)")
    p.add_argument("--densepose-precision", choices=PRECISIONS, default="fp32",
                   help="precision of the DensePose graphs (default fp32; fp16 for the GPU)")
    p.add_argument("--densepose-min-size", type=int, default=800,
                   help="the estimator's INPUT.MIN_SIZE_TEST the DensePose stages run at (default 800)")
    p.add_argument("--densepose-max-size", type=int, default=1333,
                   help="the estimator's INPUT.MAX_SIZE_TEST (default 1333)")
    p.add_argument("--out", type=Path, required=True, help="engine directory to write")
    p.add_argument("--size", type=int, default=512,
                   help="output side of a square build in pixels, a multiple of 64 up to 2048 (default 512)")
    p.add_argument("--width", type=int, default=None,
                   help="output width of a non-square build (with --height; instead of --size)")
    p.add_argument("--height", type=int, default=None, help="output height (with --width)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16", help="graph precision (default fp16)")
    p.add_argument("--onnx-only", action="store_true", help="write the ONNX graphs only, no TensorRT plans")
    p.add_argument("--force", action="store_true", help="replace an existing different or damaged build")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip running each graph with ONNX Runtime against the PyTorch stage (large sizes on a "
                        "small CPU)")
    p.add_argument("--from-fp32", dest="fp32_graphs", type=Path, default=None, metavar="DIR",
                   help="fp16 build: convert the graphs of this fp32 engine directory (same model set and size) "
                        "instead of exporting again")
    p.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
                   help="torch.onnx exporter (default auto: torchscript where torch has it)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0..5 (default 3)")
    p.add_argument("--workspace-gib", type=float, default=None,
                   help="TensorRT builder workspace limit in GiB (default: TensorRT's)")
    p.add_argument("--validate-plans", action="store_true",
                   help="compare every TensorRT plan with ONNX Runtime on random inputs and print the errors")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.models is None and args.densepose_weights is None:
            raise InputError("give --models DIR, --densepose-weights FILE, or both")
        if args.densepose_weights is not None:
            _check_densepose_args(args)
        if args.models is not None:
            _build_animation(args)
        if args.densepose_weights is not None:
            from .densepose_export import build_densepose

            t0 = time.perf_counter()
            rows = build_densepose(args.out, args.densepose_weights, args.densepose_precision,
                                   min_size=args.densepose_min_size,
                                   max_size=args.densepose_max_size, validate=args.validate, log=_log_to_stderr)
            report = BuildReport(args.out, up_to_date=False, seconds=time.perf_counter() - t0,
                                 stages=[StageReport(n, b, sec, v.get("max_abs"), v.get("rel_l2"))
                                         for n, b, sec, v in rows])
            print(report.table())
            print(f"wrote the DensePose stages into {args.out} in {report.seconds:.1f} s")
        return 0

    return run_command(PROG, body, interrupted=f"{args.out} left as it was",
                       out_of_memory="build on a machine with more memory, or pass --no-validate",
                       cuda_out_of_memory="lower --workspace-gib, or build the plans on a larger GPU")


def _check_densepose_args(args) -> None:
    """The DensePose inputs, before anything is built: a readable file, sizes ``DensePoseConfig`` takes."""
    if not args.densepose_weights.is_file():
        raise InputError(f"--densepose-weights {args.densepose_weights}: file not found")
    lo, hi = args.densepose_min_size, args.densepose_max_size
    if not 32 <= lo <= hi <= 4096:
        raise InputError(f"--densepose-min-size/--densepose-max-size: need 32 <= min <= max <= 4096, got {lo}/{hi}")


def _build_animation(args) -> None:
    settings = BuildSettings(models=args.models, out=args.out, size=args.size, width=args.width,
                             height=args.height, precision=args.precision,
                             onnx_only=args.onnx_only, force=args.force, validate=args.validate,
                             exporter=args.exporter, fp32_graphs=args.fp32_graphs,
                             plans=PlanBuildSettings(optimization_level=args.opt_level,
                                                     workspace_bytes=None if args.workspace_gib is None
                                                     else int(args.workspace_gib * 2**30)),
                             validate_plans=args.validate_plans)
    report = build_engines(settings)
    if not report.up_to_date:
        print(report.table())
        print(f"wrote {report.out} in {report.seconds:.1f} s")
