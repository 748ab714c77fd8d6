"""TensorRT plans for an engine directory: each stage's ONNX graph -> a serialized engine
(``<stage>.plan``) built on, and for, the GPU it will run on.

``build_engines.py`` calls :func:`build_plans` after exporting the graphs, and
``python -m magicanimate_rt.plans ENGINE_DIR`` (:mod:`magicanimate_rt.plans`) calls it on a
GPU machine without the models. For each stage:

1. parse ``<stage>.onnx`` with ``trt.OnnxParser`` (external weights beside it are found by
   the parser) into a **strongly typed** network: every tensor keeps the dtype the graph
   gives it, so an fp16 graph's float32 islands (normalisation statistics, timestep
   embedding, softmax) stay float32 — no precision flags, no per-layer overrides;
2. check the network's inputs/outputs against the stage's spec (names, dtypes, static
   dimensions; dynamic ones are -1);
3. one optimisation profile holding, for every input with a dynamic axis, the spec's
   (min, opt, max) shapes (``StageSpec.profile()``: vae_encoder images 1/1/4, controlnet
   frames 1/16/16, vae_decoder frames 1/8/8); the appearance encoder and the UNet are static;
4. build with the settings of :class:`PlanBuildSettings` (workspace limit, builder
   optimisation level) and a timing cache shared by every stage, loaded from
   ``ENGINE_DIR/timing.cache`` when present and saved back after each stage, so a rebuild on
   the same GPU and TensorRT skips most tactic timing;
5. write ``<stage>.plan`` beside the graph (atomically) and record it in the manifest:
   ``stages.<stage>.plans`` = {file, onnx_sha256, settings, profile, seconds}, and
   ``tensorrt`` = {version, gpu, compute_capability} (:class:`PlanTarget`).

The DensePose estimator's stages (``build_engines.py --densepose-weights``) get their plans
the same way from :func:`build_densepose_plans` (the same loop, :func:`_build_stages`): their
profiles are their specs' (batch 1/4/8 and the padded image sides for the backbone, RoIs and
instances for the heads), recorded in the manifest's ``"densepose"`` section, which has its
own ``tensorrt`` target.

A plan serves exactly one TensorRT version and one GPU model:
:func:`~.tensorrt_plan.check_plans` (the plan format, shared with the TensorRT backend)
refuses plans built for anything else; :func:`plan_staleness` says which plans a build has
to (re)make, so a new GPU or TensorRT rebuilds only the plans, never the graphs.

This module reads only the manifest, the specs and the directory's files (never the
PyTorch models, the export code or the runtime). The ``tensorrt`` module comes from
:func:`~.tensorrt_plan.import_tensorrt`, or is passed in (``trt=``): the seam the tests use
to run every call sequence against a recording fake on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import EngineError, InputError
from .densepose import DENSEPOSE_STAGES, SECTION, DensePoseManifest, read_densepose, write_densepose
from .manifest import MANIFEST, EngineManifest, FileRecord, load_manifest
from .specs import STAGE_NAMES, StageSpec
from .tensorrt_plan import (
    TIMING_CACHE, PlanTarget, import_tensorrt, log_to_stderr, make_logger, onnx_sha256, plan_file,
    plan_record_problem, trt_dtypes,
)


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class PlanBuildSettings:
    """How plans are built (recorded per plan; a plan built with other settings is rebuilt).

    Fields:
        optimization_level: TensorRT's builder optimisation level, 0..5 (TensorRT's default
            3; higher searches longer for faster tactics).
        workspace_bytes: limit of the builder's scratch memory pool
            (``MemoryPoolType.WORKSPACE``); None leaves TensorRT's default (the GPU's memory).
        timing_cache: load ``timing.cache`` from the engine directory when present and save
            it back after each stage.
        force: rebuild every plan even where it is up to date.
        stages: the stages to build (default: all, the animation's and the DensePose
            estimator's; each builder takes the names that are its own).
        verbose: print TensorRT's warnings (errors are always reported).
    """

    optimization_level: int = 3
    workspace_bytes: Optional[int] = None
    timing_cache: bool = True
    force: bool = False
    stages: tuple[str, ...] = STAGE_NAMES + DENSEPOSE_STAGES
    verbose: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.optimization_level, bool) or self.optimization_level not in range(6):
            raise InputError(f"optimization level must be an integer 0..5, got {self.optimization_level!r}")
        if self.workspace_bytes is not None and (not isinstance(self.workspace_bytes, int)
                                                 or self.workspace_bytes < (1 << 20)):
            raise InputError(f"workspace must be at least 1 MiB, got {self.workspace_bytes!r} bytes")
        known = STAGE_NAMES + DENSEPOSE_STAGES
        unknown = [s for s in self.stages if s not in known]
        if unknown:
            raise InputError(f"unknown stage {unknown[0]!r}; stages are {', '.join(known)}")

    def recorded(self) -> dict[str, Any]:
        """The settings that change a plan (stored in its manifest record)."""
        return {"optimization_level": self.optimization_level, "workspace_bytes": self.workspace_bytes}


# --------------------------------------------------------------------------- staleness and refusal
def plan_staleness(m: EngineManifest, target: PlanTarget,
                   settings: Optional[PlanBuildSettings] = None, stages=STAGE_NAMES) -> dict[str, Optional[str]]:
    """Per stage, why its plan must be (re)built for ``target`` — None where it is up to
    date. ``settings`` given: a plan built with other settings is stale too. ``m`` may be
    the DensePose section too (``stages=DENSEPOSE_STAGES``)."""
    built_for = PlanTarget.from_dict(m.tensorrt)
    out: dict[str, Optional[str]] = {}
    for stage in stages:
        if built_for is not None and built_for != target and m.stages[stage].plans:
            out[stage] = f"built for {built_for.describe()}"
            continue
        problem = plan_record_problem(m, stage)
        if problem is None and settings is not None and m.stages[stage].plans.get("settings") != settings.recorded():
            problem = f"built with other settings ({m.stages[stage].plans.get('settings')})"
        out[stage] = problem
    return out


# --------------------------------------------------------------------------- TensorRT helpers
def _spec_dims(t) -> tuple[int, ...]:
    """The spec shape as TensorRT reports it: -1 for a dynamic axis."""
    return tuple(d if isinstance(d, int) else -1 for d in t.shape)


def _check_network(trt, network, spec: StageSpec, path: Path) -> None:
    """The parsed network's inputs and outputs are exactly the spec's (EngineError naming
    the first difference)."""
    dtypes = trt_dtypes(trt)
    found = {
        "input": {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)},
        "output": {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)},
    }
    for kind, specs in (("input", spec.inputs), ("output", spec.outputs)):
        got = found[kind]
        want = [t.name for t in specs]
        if sorted(got) != sorted(want):
            raise EngineError(f"{path}: the graph's {kind}s are {sorted(got)}, the stage spec says {sorted(want)}; "
                              "the graph does not belong to this manifest (rebuild the directory with --force)")
        for t in specs:
            tensor = got[t.name]
            shape = tuple(tensor.shape)
            if shape != _spec_dims(t) or tensor.dtype != dtypes[t.dtype]:
                raise EngineError(f"{path}: {kind} {t.name} is {shape} {tensor.dtype} in the graph, the stage spec "
                                  f"says {_spec_dims(t)} {t.dtype}; rebuild the directory with --force")


def _parser_errors(parser) -> str:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f" (node {err.node_name()!r}, op {err.node_operator()})" if err.node_name() else ""
        lines.append(f"{err.desc()}{where}")
    return "; ".join(lines[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "") or "no details"


def _write_atomic(path: Path, data) -> int:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    view = memoryview(data)
    with open(tmp, "wb") as f:
        f.write(view)
    os.replace(tmp, path)
    return view.nbytes


class _TimingCache:
    """``timing.cache`` of an engine directory: one ITimingCache shared by every stage's
    builder config, read once (from the directory, else from ``seed``) and written back
    after each stage. A cache TensorRT refuses (another GPU or version) is replaced by a
    new one."""

    def __init__(self, path: Path, seed: Optional[Path], log: Callable[[str], None]):
        self.path = path
        self.source = path if path.is_file() else (seed if seed is not None and seed.is_file() else None)
        self.log = log
        self.cache = None

    def attach(self, config) -> None:
        if self.cache is None:
            blob = self.source.read_bytes() if self.source is not None else b""
            self.cache = config.create_timing_cache(blob)
            if blob:
                if self.cache is not None and config.set_timing_cache(self.cache, False):
                    self.log(f"reusing the timing cache {self.source} ({len(blob)} bytes)")
                    return
                self.log(f"{self.source}: a timing cache of another GPU or TensorRT version; starting a new one")
                self.cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(self.cache, False):
            raise EngineError(f"{self.path}: TensorRT refused a timing cache it created itself")

    def save(self) -> None:
        _write_atomic(self.path, self.cache.serialize())


# --------------------------------------------------------------------------- building
@dataclass
class PlanReport:
    """One stage's build: where the plan went, how big, how long (or why it was skipped)."""

    stage: str
    plan: Optional[str]
    bytes: int = 0
    seconds: float = 0.0
    skipped: Optional[str] = None  #: "up to date", or None when built


def _build_one(trt, builder, logger, m: EngineManifest | DensePoseManifest, stage: str, s: PlanBuildSettings,
               cache: Optional[_TimingCache]) -> tuple[Any, dict]:
    """Parse, check and build one stage; returns (serialized plan, its profile)."""
    spec = m.spec(stage)
    path = m.onnx_path(stage)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        raise EngineError(f"{path}: TensorRT's ONNX parser failed: {_parser_errors(parser)}")
    _check_network(trt, network, spec, path)

    config = builder.create_builder_config()
    config.builder_optimization_level = s.optimization_level
    if s.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_bytes)
    if cache is not None:
        cache.attach(config)
    dynamic = {t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)}
    profile_record = {}
    if dynamic:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.profile().items():
            if name in dynamic:
                profile.set_shape(name, lo, opt, hi)
                profile_record[name] = [list(lo), list(opt), list(hi)]
        config.add_optimization_profile(profile)

    del logger.errors[:]
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = "; ".join(logger.errors[-3:]) or "no error message (run with --verbose)"
        raise EngineError(f"{stage}: TensorRT could not build a plan from {path.name}: {detail}")
    if cache is not None:
        cache.save()
    return plan, profile_record


def build_plans(engine_dir, settings: PlanBuildSettings = PlanBuildSettings(), *, trt=None,
                target: Optional[PlanTarget] = None, timing_cache_seed: Optional[Path] = None,
                log: Callable[[str], None] = log_to_stderr) -> list[PlanReport]:
    """Build the TensorRT plans of ``engine_dir``'s animation stages that are missing or
    stale (all of them with ``settings.force``), in place, and record them in its manifest.

    ``trt``: the tensorrt module (default :func:`import_tensorrt`); ``target``: what the
    plans are for (default :meth:`PlanTarget.current`); ``timing_cache_seed``: a timing
    cache file to start from when the directory has none (e.g. that of the directory a
    ``--force`` rebuild replaces). Each plan is written atomically and the manifest is
    rewritten after each stage, so an interrupted build leaves a consistent directory
    (the unfinished stages simply stay stale). :func:`build_densepose_plans` does the same
    for the DensePose stages.
    """
    def record(m: EngineManifest, stages=None, tensorrt=None) -> EngineManifest:
        m = replace(m, stages=stages or m.stages, tensorrt=tensorrt or m.tensorrt)
        m.write()
        return m

    return _build_stages(load_manifest(engine_dir), STAGE_NAMES, record, settings, trt, target, timing_cache_seed,
                         log)


def build_densepose_plans(engine_dir, settings: PlanBuildSettings = PlanBuildSettings(), *, trt=None,
                          target: Optional[PlanTarget] = None, timing_cache_seed: Optional[Path] = None,
                          log: Callable[[str], None] = log_to_stderr) -> list[PlanReport]:
    """:func:`build_plans` for the DensePose stages (``build_engines.py --densepose-weights``),
    recorded in the manifest's ``"densepose"`` section (its own ``tensorrt`` target). One
    profile per stage from the specs' declared ranges (:func:`~.densepose.densepose_specs`:
    batch 1/4/8 and the padded image sides for the backbone, RoIs and instances for the
    heads); the precision is the graphs' own (a strongly typed network, as for the animation)."""
    directory = Path(engine_dir)

    def record(m: DensePoseManifest, stages=None, tensorrt=None) -> DensePoseManifest:
        m = replace(m, stages=stages or m.stages, tensorrt=tensorrt or m.tensorrt)
        write_densepose(directory, m)
        return m

    return _build_stages(read_densepose(directory), DENSEPOSE_STAGES, record, settings, trt, target,
                         timing_cache_seed, log)


def has_densepose(engine_dir) -> bool:
    """Whether ``engine_dir``'s manifest has a DensePose section (read raw: a directory may
    hold the DensePose stages alone, without the animation's)."""
    return SECTION in _raw_manifest(engine_dir)


def has_animation(engine_dir) -> bool:
    """Whether ``engine_dir``'s manifest has the animation's stages."""
    return "stages" in _raw_manifest(engine_dir)


def _raw_manifest(engine_dir) -> dict:
    try:
        raw = json.loads((Path(engine_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"stages": None}  # let load_manifest give its own error
    return raw if isinstance(raw, dict) else {"stages": None}


def _build_stages(m, names, record, settings: PlanBuildSettings, trt, target: Optional[PlanTarget],
                  timing_cache_seed: Optional[Path], log: Callable[[str], None]) -> list[PlanReport]:
    """The build loop shared by the animation's stages and the DensePose ones: ``m`` is the
    manifest (or section) holding ``names``; ``record(m, stages=, tensorrt=)`` writes a
    changed one and returns it."""
    trt = trt if trt is not None else import_tensorrt()
    target = target or PlanTarget.current(trt)
    stale = plan_staleness(m, target, settings, names)
    wanted = [st for st in names if st in settings.stages]
    todo = [st for st in wanted if settings.force or stale[st] is not None]
    reports = [PlanReport(st, plan_file(st) if m.stages[st].plans else None, skipped="up to date")
               for st in wanted if st not in todo]
    if not todo:
        if wanted:
            log(f"{m.directory}: TensorRT plans of {', '.join(wanted)} up to date ({target.describe()})")
        return reports

    if PlanTarget.from_dict(m.tensorrt) != target:
        # every recorded plan was for another TensorRT/GPU: forget them before building any
        m = record(m, stages={name: replace(rec, plans={}) for name, rec in m.stages.items()},
                   tensorrt=target.to_dict())

    logger = make_logger(trt, settings.verbose, log)
    builder = trt.Builder(logger)
    cache = _TimingCache(m.directory / TIMING_CACHE, timing_cache_seed, log) if settings.timing_cache else None
    log(f"building {len(todo)} TensorRT plan(s) in {m.directory} for {target.describe()}, "
        f"optimisation level {settings.optimization_level}")
    for k, stage in enumerate(todo, 1):
        t0 = time.perf_counter()
        plan, profile = _build_one(trt, builder, logger, m, stage, settings, cache)
        name = plan_file(stage)
        nbytes = _write_atomic(m.directory / name, plan)
        del plan
        seconds = time.perf_counter() - t0
        rec = {"file": FileRecord.of(m.directory, name).to_dict(), "onnx_sha256": onnx_sha256(m, stage),
               "settings": settings.recorded(), "profile": profile, "seconds": round(seconds, 1)}
        m = record(m, stages={**m.stages, stage: replace(m.stages[stage], plans=rec)})
        reports.append(PlanReport(stage, name, nbytes, seconds))
        why = stale[stage] or "forced"
        log(f"[{k}/{len(todo)}] {stage}: {name} built in {seconds:.1f} s ({nbytes / 2**20:.1f} MiB; was: {why})")
    order = {s: i for i, s in enumerate(names)}
    return sorted(reports, key=lambda r: order[r.stage])
