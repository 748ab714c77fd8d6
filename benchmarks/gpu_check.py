#!/usr/bin/env python3
"""One command for a GPU machine: is every GPU backend right, and how fast is it?

    python -m benchmarks.gpu_check --out DIR [--quick] [--dry-run] [--shared DIR] [--cache DIR]
                                   [--budget-s S] [--sd15-engines DIR | --build-sd15-engines]

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (also printed). Needs torch, numpy
and this project (with its dependencies) only; TensorRT and onnxruntime-gpu are used where
installed and reported as skipped where not. Within ``--budget-s`` (default 450 s: under
8 minutes on an H100, with a margin) it does:

(a) correctness: ``case_c.npz`` of the conformance data (the original implementation's
    CPU float32 result: tiny model set, 128 px, 24 frames, 3 steps) through the torch
    backend on CUDA (fp16 with our schedule and with the original's, fp32), then — after
    building the tiny set's fp16 engine directory at 128 px with the project's build code
    (ONNX export, then TensorRT plans, cached in ``--cache``) — TensorRT (plain and with the
    UNet's CUDA graph; each plan first compared with ONNX Runtime, ``validate_engines``)
    and ONNX Runtime on CUDA; each judged by the latents' relative L2 error;
(b) timings at SD 1.5 size: a random SD 1.5 model set (``sd15-configs`` of the shared
    conformance data, else the ``sd15`` preset) written once in fp16 into ``--cache``; at
    512x512, 16 and 64 frames, 25 steps: the original's schedule in fp16
    (``TorchOptions.original()`` + ``PipelineOptions.original()``) against ours (defaults,
    reference cache off: every timing is a first request) and TensorRT (engines given with
    ``--sd15-engines``, or built with ``--build-sd15-engines``, which takes far longer than
    the budget); per stage and end to end (the pipeline's ``result.timings``), with peak
    GPU memory. A run whose estimate (from the 16-frame run) does not fit the time left is
    skipped, and the report says so.

(c) issue 17, most wanted first, each skipped (and said so) when the budget is spent: the
    cold and warm start of a compiled pipeline (process start to first step, each in a
    fresh process with its own empty inductor cache: only the project's compile artifacts
    make the second warm); ours compiled (``reduce-overhead``: inductor + CUDA graphs) at
    16 and 64 frames beside eager and the original schedule; ``--memory-gb`` 8 and 12
    (enforced with ``set_per_process_memory_fraction``) at 16, 64 and 256 frames (256 at
    5 steps) with the uncapped default and the original schedule at 256 beside them; each
    call's measured peak and the memory factors it implies; device time by kernel class;
    and each SDPA backend on the UNet's three attention shapes. Correctness against
    case_c also covers the compiled stages and the leanest plan.

(d) issues 27/28: the DensePose estimator (PyTorch) on frames of the person video
    (``samples/person/input_video.mp4`` of the shared data) at the video's size: float16 at
    batch 8 and float32 at batch 8 on CUDA, frames/s (median of timed batches after a
    warm-up), peak memory, and float16's deviation from float32 on the same frames (boxes,
    part labels, rendered frames). Weights: ``--densepose-weights`` (detectron2's
    ``model_final_162be9.pkl``), else the random ones in the real layout that
    ``conformance/densepose/make_weights.py`` writes (256 MB, written once into ``--cache``
    on the machine itself: only the script and the video travel).

``--quick``: 16 frames only. ``--dry-run``: the whole script on the CPU in float32, tiny
set at 128 px, 2 steps, 16 and 32 frames, DensePose in bfloat16 against float32 at batch
1 and the network's small size (256 px, as ``stages_small.npz``) (what CI runs; no GPU needed). Exit code 0, or 1
when a correctness check failed, 2 when a part of the check itself failed (its error is in
the report).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, Python puts benchmarks/ first on sys.path, where a module of ours would shadow an
# installed package of the same name (issue 25: diffusers imports `kernels`). Put the checkout there
# instead: only `benchmarks.<name>` reaches our modules, as under `python -m benchmarks.<script>`.
if __package__ in (None, ""):
    sys.path[0] = str(ROOT)

#: relative L2 error of the final latents against case_c.npz that passes (fp16: 1e-2, the
#: ONNX Runtime fp16 engines' bound on the CPU; fp32 on CUDA: TF32 convolutions)
TOLERANCE = {"cpu-fp32": 1e-4, "cuda-fp32": 5e-3, "fp16": 1e-2}
SD15_STEPS = 25
SD15_SIZE = 512


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="run everything on the CPU in float32 on the tiny set at "
                   "128 px with 2 steps (no GPU needed)")
    p.add_argument("--quick", action="store_true", help="time 16 frames only (skip the 64-frame runs)")
    p.add_argument("--shared", type=Path, default=None, help="the shared/ directory (default: beside the checkout)")
    p.add_argument("--cache", type=Path, default=None, help="where model sets and engines are written once "
                   "(default: $MAGICANIMATE_RT_CACHE or ~/.cache/magicanimate-rt, then gpu-check/)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (default 450; 45 with "
                   "--dry-run)")
    p.add_argument("--sd15-engines", type=Path, default=None, help="an SD 1.5 fp16 engine directory at 512 with "
                   "TensorRT plans for this GPU, to time TensorRT at SD 1.5 size")
    p.add_argument("--densepose-weights", type=Path, default=None, help="detectron2 DensePose weights (.pkl) to "
                   "time (default: random weights in the real layout from make_weights.py of the shared data)")
    p.add_argument("--build-sd15-engines", action="store_true", help="build that directory from the random SD 1.5 "
                   "set first (export + TensorRT: about half an hour, outside the budget)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- bookkeeping
class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class Check:
    """Everything the report holds."""

    environment: dict
    correctness: list
    validation: list
    timings: list
    skipped: list
    errors: list
    starts: list = field(default_factory=list)  #: cold and warm process starts, compiled
    memory: list = field(default_factory=list)  #: measured per-call peaks and implied factors
    profile: list = field(default_factory=list)  #: device time by kernel class
    sdpa: list = field(default_factory=list)  #: SDPA backends per attention shape
    densepose: list = field(default_factory=list)  #: the DensePose estimator's rows (issues 27, 28)
    densepose_deviation: list = field(default_factory=list)  #: its low precision against float32

    def skip(self, what: str, why: str) -> None:
        self.skipped.append({"what": what, "why": why})
        log(f"skipped {what}: {why}")

    @contextmanager
    def part(self, name: str):
        """A part of the check: its failure is reported and the check goes on."""
        t0 = time.perf_counter()
        log(f"== {name}")
        try:
            yield
        except Exception as e:  # noqa: BLE001 - the report must say what failed and go on
            tail = traceback.format_exc().strip().splitlines()[-12:]
            self.errors.append({"part": name, "error": f"{type(e).__name__}: {e}", "traceback": tail})
            log(f"!! {name} failed: {type(e).__name__}: {e}")
        finally:
            log(f"   {name}: {time.perf_counter() - t0:.1f} s")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def environment(device: str) -> dict:
    import numpy as np
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "device": device, "cuda": torch.version.cuda, "platform": platform.platform()}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env.update(gpu=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}",
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except (ImportError, OSError) as e:
        env["tensorrt"] = f"not importable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    try:
        import onnxruntime as ort

        env["onnxruntime"] = f"{ort.__version__} ({', '.join(ort.get_available_providers())})"
    except ImportError:
        env["onnxruntime"] = "not installed"
    return env


def rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- (a) correctness
def case_c_check(c: Check, label: str, make_pipe: Callable, case: dict, tol: float) -> None:
    """Animate case_c with ``make_pipe()`` and compare with the original's latents."""
    import numpy as np
    import torch

    with c.part(f"correctness: {label}"):
        t0 = time.perf_counter()
        with make_pipe() as pipe:
            result = pipe.animate(case["source"], case["control"], size=int(case["size"]), steps=int(case["steps"]),
                                  guidance_scale=float(case["guidance"]), seed=int(case["seed"]))
        err = rel_l2(result.latents, torch.from_numpy(case["latents"]))
        frames = float(np.abs(result.frames.astype(np.float32) - case["video"] * 255).max())
        row = {"backend": label, "rel_l2": err, "tolerance": tol, "frames_max_abs": frames,
               "seconds": round(time.perf_counter() - t0, 2), "ok": bool(err <= tol)}
        c.correctness.append(row)
        log(f"   rel L2 {err:.3g} (tolerance {tol:g}), frames max abs {frames:.1f}: {'ok' if row['ok'] else 'FAIL'}")


def correctness(c: Check, args, shared: Path, cache: Path) -> None:
    import numpy as np
    import torch

    from magicanimate_rt import AnimationPipeline
    from magicanimate_rt.models import load_model_set
    from magicanimate_rt.runtime.backends.torch_backend import TorchOptions, TorchStages
    from magicanimate_rt.runtime.pipeline import PipelineOptions

    case_path = shared / "conformance" / "case_c.npz"
    tiny = shared / "conformance" / "tiny-models"
    if not case_path.is_file() or not tiny.is_dir():
        c.skip("correctness", f"no conformance data at {shared / 'conformance'} (pass --shared)")
        return
    case = dict(np.load(case_path))

    def torch_pipe(device, dtype, options=TorchOptions(), popts=PipelineOptions()):
        def make():
            models = load_model_set(tiny, device=device, dtype=dtype)
            return AnimationPipeline(TorchStages(models, torch.device(device), dtype, options), options=popts)
        return make

    # issue 17's configurations: compiled stages, and the leanest plan (the CFG halves one
    # after the other, chunked feed-forwards, 4-frame ControlNet calls per window)
    lean = (TorchOptions(), PipelineOptions(windows_per_call=1, controlnet_residuals="per_window", controlnet_chunk=4,
                                            decode_chunk=1, cfg_sequential=True, ff_chunk=64))
    if args.dry_run:
        case_c_check(c, "torch cpu fp32", torch_pipe("cpu", torch.float32), case, TOLERANCE["cpu-fp32"])
        case_c_check(c, "torch cpu fp32, lean plan", torch_pipe("cpu", torch.float32, *lean), case,
                     TOLERANCE["cpu-fp32"])
        compiled = TorchOptions(**DRY_RUN_COMPILE, compile_cache_dir=str(cache / "compile-correctness"))
        case_c_check(c, "torch cpu fp32, compiled (aot_eager)", torch_pipe("cpu", torch.float32, compiled), case,
                     TOLERANCE["cpu-fp32"])
        c.skip("TensorRT and ONNX Runtime CUDA correctness", "dry run: CPU only")
        return
    case_c_check(c, "torch cuda fp16", torch_pipe("cuda", torch.float16), case, TOLERANCE["fp16"])
    case_c_check(c, "torch cuda fp16, lean plan", torch_pipe("cuda", torch.float16, *lean), case, TOLERANCE["fp16"])
    compiled = TorchOptions(compile_mode=GPU_COMPILE_MODE, compile_cache_dir=str(cache / "compile-correctness"))
    case_c_check(c, f"torch cuda fp16, compiled ({GPU_COMPILE_MODE})", torch_pipe("cuda", torch.float16, compiled),
                 case, TOLERANCE["fp16"])
    case_c_check(c, "torch cuda fp16, original schedule",
                 torch_pipe("cuda", torch.float16, TorchOptions.original("cuda"), PipelineOptions.original()), case,
                 TOLERANCE["fp16"])
    case_c_check(c, "torch cuda fp32", torch_pipe("cuda", torch.float32), case, TOLERANCE["cuda-fp32"])

    engines = cache / "engines-tiny-128-fp16"
    has_trt = not c.environment["tensorrt"].startswith("not")
    has_ort_cuda = "CUDAExecutionProvider" in c.environment["onnxruntime"]
    if not (has_trt or has_ort_cuda):
        c.skip("engine correctness", "neither TensorRT nor onnxruntime-gpu is installed")
        return
    with c.part("build the tiny fp16 engine directory (128 px)"):
        build_engine_dir(tiny, engines, 128, with_plans=has_trt)
    if not (engines / "manifest.json").is_file():
        return
    if has_trt:
        from magicanimate_rt.plans import format_validation, validate_engines
        from magicanimate_rt.runtime.backends.tensorrt_backend import TensorRTOptions

        with c.part("validate the tiny TensorRT plans against ONNX Runtime"):
            checks = validate_engines(engines)
            c.validation.extend(asdict(x) | {"ok": x.ok} for x in checks)
            log(format_validation(checks))
        for graph in (False, True):
            label = "tensorrt fp16" + (" + CUDA graph" if graph else "")
            case_c_check(c, label, lambda g=graph: AnimationPipeline.from_engines(
                engines, backend="tensorrt", device="cuda", backend_options=TensorRTOptions(cuda_graph=g)),
                case, TOLERANCE["fp16"])
    else:
        c.skip("TensorRT correctness", f"TensorRT {c.environment['tensorrt']}")
    if has_ort_cuda:
        case_c_check(c, "onnxruntime cuda fp16", lambda: AnimationPipeline.from_engines(
            engines, backend="onnxruntime", device="cuda"), case, TOLERANCE["fp16"])
    else:
        c.skip("ONNX Runtime CUDA correctness", "onnxruntime-gpu is not installed")


def build_engine_dir(models: Path, out: Path, size: int, with_plans: bool) -> None:
    """The fp16 engine directory of ``models`` at ``size`` (ONNX, then TensorRT plans),
    through the project's build code; each step is skipped when already up to date."""
    from magicanimate_rt.export.build import BuildSettings, build_engines

    build_engines(BuildSettings(models=models, out=out, size=size, precision="fp16", onnx_only=True, validate=False),
                  log=log)
    if with_plans:
        from magicanimate_rt.engines.tensorrt_build import build_plans

        build_plans(out, log=log)


# --------------------------------------------------------------------------- (b) timings
@dataclass(frozen=True)
class Setup:
    """What the timing part runs: the dry run's tiny CPU setup or SD 1.5 on the GPU."""

    device: str
    dtype: str
    size: int
    steps: int
    frames: tuple
    preset: str


def sd15_model_set(shared: Path, cache: Path, preset: str) -> Path:
    """A random model set in fp16 written once into the cache (SD 1.5's configs from the
    shared conformance data where present)."""
    import torch

    from magicanimate_rt.models.presets import preset_configs
    from magicanimate_rt.models.writer import write_random_model_set

    configs_dir = shared / "conformance" / "sd15-configs"
    use_files = preset == "sd15" and configs_dir.is_dir()
    path = cache / (f"{preset}-random-fp16" + ("-shared-configs" if use_files else ""))
    if not (path / "MagicAnimate" / "temporal_attention" / "temporal_attention.ckpt").is_file():
        t0 = time.perf_counter()
        write_random_model_set(configs_dir if use_files else preset_configs(preset), path, seed=0,
                               dtype=torch.float16, overwrite=True)
        log(f"   wrote the random {preset} model set to {path} in {time.perf_counter() - t0:.0f} s")
    return path


def time_one(c: Check, label: str, pipe, frames: int, setup: Setup, inputs, warm: bool,
             shape: Optional[tuple[int, int]] = None, steps: Optional[int] = None, warm_frames: int = 16,
             memory_cap_gib: Optional[float] = None) -> Optional[dict]:
    """One timed animation (after a 1-step warm-up of ``warm_frames`` frames when
    ``warm``: compiled stages compile at the shapes of that request's plan); its per-stage
    seconds and peak memory. ``shape``: (width, height) instead of the setup's square size;
    ``steps``: instead of the setup's; ``memory_cap_gib``: recorded with the row."""
    import torch

    source, driving = inputs
    cuda = setup.device == "cuda"
    width, height = shape or (setup.size, setup.size)
    size = dict(width=width, height=height)
    steps = steps or setup.steps
    if warm:
        pipe.animate(source, driving[:warm_frames], steps=1, **size)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    result = pipe.animate(source, driving[:frames], steps=steps, **size)
    row = {"config": label, "frames": frames, "steps": steps, "size": setup.size, "width": width,
           "height": height, "timings": {k: round(v, 4) for k, v in result.timings.items()},
           "memory_cap_gib": memory_cap_gib}
    if result.plan is not None:  # as planned (stepped_down's first), before any step-down
        planned = result.stepped_down[0] if result.stepped_down is not None else result.plan
        row["plan"] = planned.describe().removeprefix("plan: ")
    if result.stepped_down is not None:
        row["stepped_down"] = result.stepped_down[1].describe()
    if cuda:
        free, total = torch.cuda.mem_get_info()
        row.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                   peak_above_load_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 3),
                   device_used_gib=round((total - free) / 2**30, 3))
    c.timings.append(row)
    log(f"   {label}, {frames} frames: {result.timings['total']:.2f} s (unet {result.timings.get('unet', 0):.2f} s)"
        + (f", peak {row['peak_allocated_gib']:.2f} GiB" if cuda else ""))
    return row


def estimate(row16: dict, frames: int) -> float:
    """Seconds for ``frames`` from a 16-frame run: the UNet scales with the windows, the
    rest with the frames."""
    from magicanimate_rt.runtime.windows import context_windows

    t = row16["timings"]
    windows = len(context_windows(frames, 16, 4))
    return t.get("unet", 0.0) * windows + (t["total"] - t.get("unet", 0.0)) * frames / 16


def timings(c: Check, args, shared: Path, cache: Path, budget: Budget) -> dict:
    """The eager rows; returns what the later parts reuse (setup, model set, inputs)."""
    import torch

    from magicanimate_rt import AnimationPipeline, demo
    from magicanimate_rt.models import load_model_set
    from magicanimate_rt.runtime.backends.torch_backend import TorchOptions, TorchStages
    from magicanimate_rt.runtime.pipeline import PipelineOptions

    if args.dry_run:
        setup = Setup("cpu", "float32", 128, 2, (16,) if args.quick else (16, 32), "tiny")
    else:
        setup = Setup("cuda", "float16", SD15_SIZE, SD15_STEPS, (16,) if args.quick else (16, 64), "sd15")
    dtype = torch.float16 if setup.dtype == "float16" else torch.float32
    c.environment["timing_setup"] = asdict(setup) | {"frames": list(setup.frames)}

    t0 = time.perf_counter()
    models_dir = sd15_model_set(shared, cache, setup.preset)
    models = load_model_set(models_dir, device=setup.device, dtype=dtype)
    log(f"   model set ready in {time.perf_counter() - t0:.0f} s")
    inputs = (demo.source_image(setup.size), demo.driving_clip(max(setup.frames), setup.size))

    # the reference cache off: the warm-up must not hand the timed run its VAE encode and
    # banks (each timing is a first request with its source)
    cold = PipelineOptions(reference_cache_entries=0)
    configs: list[tuple[str, Callable[[], Any]]] = [
        ("original schedule", lambda: AnimationPipeline(
            TorchStages(models, torch.device(setup.device), dtype, TorchOptions.original(setup.device)),
            options=PipelineOptions.original())),
        ("ours (torch)", lambda: AnimationPipeline(TorchStages(models, torch.device(setup.device), dtype),
                                                   options=cold)),
    ]
    trt_dir = sd15_engines(c, args, models_dir, cache, setup)
    if trt_dir is not None:
        from magicanimate_rt.runtime.backends.tensorrt_backend import TensorRTOptions

        configs.append(("tensorrt + CUDA graph", lambda: AnimationPipeline.from_engines(
            trt_dir, backend="tensorrt", device="cuda", backend_options=TensorRTOptions(cuda_graph=True),
            options=cold)))

    first: dict[str, dict] = {}
    for frames in setup.frames:
        # the original last at 64 frames: the slowest, the first to drop out of the budget
        order = configs if frames == 16 else [cf for cf in configs if cf[0] != "original schedule"] + configs[:1]
        for label, make in order:
            what = f"timing {label}, {frames} frames"
            if frames != 16:
                if label not in first:
                    c.skip(what, "no 16-frame run to estimate it from")
                    continue
                est = estimate(first[label], frames)
                if est > budget.left():
                    c.skip(what, f"estimated {est:.0f} s, {max(budget.left(), 0):.0f} s left of the budget")
                    continue
            elif budget.left() <= 0:
                c.skip(what, "budget spent")
                continue
            with c.part(what):
                with make() as pipe:
                    row = time_one(c, label, pipe, frames, setup, inputs, warm=setup.device == "cuda" and frames == 16)
                if frames == 16:
                    first[label] = row
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    # portrait (issue 16): SD 1.5 at 512 x 768 (the dry run: 128 x 192), 16 frames, ours;
    # 1.5x the tokens of the square, so about 1.5x its time
    portrait = (setup.size, setup.size * 3 // 2)
    what = f"timing ours (torch), portrait {portrait[0]}x{portrait[1]}, 16 frames"
    square = first.get("ours (torch)")
    if square is None:
        c.skip(what, "no square 16-frame run to estimate it from")
    elif 1.6 * square["timings"]["total"] > budget.left():
        c.skip(what, f"estimated {1.6 * square['timings']['total']:.0f} s, {max(budget.left(), 0):.0f} s left")
    else:
        with c.part(what):
            with configs[1][1]() as pipe:
                row = time_one(c, f"ours (torch), portrait {portrait[0]}x{portrait[1]}", pipe, 16, setup,
                               (demo.source_image(portrait[0], portrait[1]),
                                demo.driving_clip(16, portrait[0], portrait[1])),
                               warm=setup.device == "cuda", shape=portrait)
            row["vs_square"] = round(row["timings"]["total"] / square["timings"]["total"], 3)
            log(f"   portrait / square: {row['vs_square']:.2f}x (tokens 1.5x)")
    return {"setup": setup, "models": models, "models_dir": models_dir, "inputs": inputs}


def sd15_engines(c: Check, args, models_dir: Path, cache: Path, setup: Setup) -> Optional[Path]:
    if setup.device != "cuda":
        c.skip("TensorRT timings", "dry run: CPU only")
        return None
    if c.environment["tensorrt"].startswith("not"):
        c.skip("TensorRT timings", f"TensorRT {c.environment['tensorrt']}")
        return None
    if args.sd15_engines is not None:
        return args.sd15_engines
    if not args.build_sd15_engines:
        c.skip("TensorRT timings at SD 1.5 size", "no engines: building them (export + plans) takes far longer than "
               "this check's budget; pass --sd15-engines DIR (built by build_engines.py for this GPU, 512, fp16) "
               "or --build-sd15-engines")
        return None
    out = cache / f"engines-sd15-{setup.size}-fp16"
    with c.part("build the SD 1.5 fp16 engine directory"):
        build_engine_dir(models_dir, out, setup.size, with_plans=True)
        return out
    return None


# --------------------------------------------------------------------------- (c) issue 17
#: the compile mode of the compiled rows on a GPU ("max-autotune" would spend minutes of the
#: budget autotuning: "reduce-overhead" is inductor's kernels plus CUDA graphs)
GPU_COMPILE_MODE = "reduce-overhead"
#: --memory-gb caps of the memory rows, and their frame counts (256 frames at fewer
#: steps: the loop's memory does not grow with the steps, and the budget would not fit 25)
MEMORY_CAPS_GIB = (8.0, 12.0)
LONG_FRAMES, LONG_STEPS = 256, 5


#: what the CPU dry run compiles: it checks the script, not the compiler, on a 2-core CI
#: machine ("aot_eager": the same tracing and cache path, no C++ kernels; two small stages)
DRY_RUN_COMPILE = dict(compile_mode="default", compile_backend="aot_eager",
                       compile_stages=("controlnet_embed", "vae_decode"))


def compile_options(setup: Setup, cache: Path):
    """TorchOptions of the compiled rows: inductor (every stage) on the GPU; on the CPU
    dry run :data:`DRY_RUN_COMPILE`."""
    from magicanimate_rt.runtime.backends.torch_backend import TorchOptions

    if setup.device == "cuda":
        return TorchOptions(compile_mode=GPU_COMPILE_MODE, compile_cache_dir=str(cache / "compile"))
    return TorchOptions(**DRY_RUN_COMPILE, compile_cache_dir=str(cache / "compile"))


START_PROBE = r"""
import json, os, sys, time
t0 = float(os.environ["GPU_CHECK_T0"])
import torch
from magicanimate_rt import AnimationPipeline, demo
from magicanimate_rt.runtime.backends.torch_backend import TorchOptions
from magicanimate_rt.runtime.pipeline import PipelineOptions
spec = json.loads(sys.argv[1])
spec["options"]["compile_stages"] = tuple(spec["options"]["compile_stages"])
pipe = AnimationPipeline.from_pretrained(spec["models"], device=spec["device"], dtype=spec["dtype"],
                                         backend_options=TorchOptions(**spec["options"]),
                                         options=PipelineOptions(reference_cache_entries=0))
loaded = time.time() - t0
first = []
def on_step(i, n):
    if not first:
        if spec["device"] == "cuda":
            torch.cuda.synchronize()
        first.append(time.time() - t0)
size = spec["size"]
pipe.animate(demo.source_image(size), demo.driving_clip(16, size), size=size, steps=2, progress=on_step)
print(json.dumps({"loaded_s": round(loaded, 2), "first_step_s": round(first[0], 2)}))
"""


def start_times(c: Check, setup: Setup, models_dir: Path, cache: Path, budget: Budget) -> None:
    """Process start to the first denoising step of a compiled pipeline, in a fresh process
    with an empty compile cache (cold) and then in another with the cache the first left
    (warm); each process gets its own empty inductor cache directory, so only the project's
    on-disk artifacts can make the second warm."""
    import os
    import subprocess
    import tempfile

    opts = compile_options(setup, cache)
    store = Path(tempfile.mkdtemp(prefix="compile-", dir=cache))
    spec = {"models": str(models_dir), "device": setup.device, "dtype": setup.dtype, "size": setup.size,
            "options": {"compile_mode": opts.compile_mode, "compile_backend": opts.compile_backend,
                        "compile_stages": list(opts.compile_stages), "compile_cache_dir": str(store)}}
    for label in ("cold", "warm"):
        what = f"start {label}: process start to first step, compiled"
        if budget.left() < 30:  # each start says so (the warm one too, when the cold one was skipped)
            c.skip(what, f"{max(budget.left(), 0):.0f} s left of the budget")
            continue
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-", dir=cache),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env["GPU_CHECK_T0"] = repr(time.time())  # the probe's clock starts as it is spawned
        with c.part(what):
            proc = subprocess.run([sys.executable, "-c", START_PROBE, json.dumps(spec)], capture_output=True,
                                  text=True, env=env, timeout=max(budget.left(), 30))
            if proc.returncode != 0:
                raise RuntimeError(f"the probe failed: {proc.stderr.strip().splitlines()[-1:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(start=label, compile_mode=opts.compile_mode, compile_backend=opts.compile_backend,
                       cache_files=sorted(p.name for p in store.iterdir()))
            c.starts.append(row)
            log(f"   {label}: loaded after {row['loaded_s']:.1f} s, first step after {row['first_step_s']:.1f} s")


def find(c: Check, config: str, frames: int) -> Optional[dict]:
    """The timing row of ``config`` at ``frames`` (uncapped), or None."""
    return next((r for r in c.timings if r["config"] == config and r["frames"] == frames
                 and r.get("memory_cap_gib") is None), None)


def compiled_rows(c: Check, setup: Setup, models, inputs, cache: Path, budget: Budget) -> None:
    """Ours compiled at each frame count (warm-up at the same frames: the compiled shapes
    follow the plan), beside the eager rows of the timing part."""
    import torch

    from magicanimate_rt import AnimationPipeline
    from magicanimate_rt.runtime.backends.torch_backend import TorchStages
    from magicanimate_rt.runtime.pipeline import PipelineOptions

    label = "ours (torch, compiled)"
    for frames in setup.frames:
        what = f"timing {label}, {frames} frames"
        eager = find(c, "ours (torch)", frames)
        est = 3 * eager["timings"]["total"] if eager else 60.0
        if est > budget.left():
            c.skip(what, f"estimated {est:.0f} s with its warm-up, {max(budget.left(), 0):.0f} s left")
            continue
        with c.part(what):
            stages = TorchStages(models, torch.device(setup.device), models.unet.conv_in.weight.dtype,
                                 compile_options(setup, cache))
            with AnimationPipeline(stages, options=PipelineOptions(reference_cache_entries=0)) as pipe:
                row = time_one(c, label, pipe, frames, setup, inputs, warm=True, warm_frames=frames)
            if eager:
                row["vs_eager"] = round(eager["timings"]["total"] / row["timings"]["total"], 3)
    # the cross-frame GroupNorm as one F.group_norm kernel (eager, 16 frames): whether it
    # should be the CUDA default (it is 3-7x faster than the explicit one on the CPU)
    from magicanimate_rt.runtime.backends.torch_backend import TorchOptions

    label, eager = "ours (torch), fused GroupNorm", find(c, "ours (torch)", 16)
    if eager is None or 2 * eager["timings"]["total"] > budget.left():
        c.skip(f"timing {label}, 16 frames", "no eager 16-frame row, or no budget left")
        return
    with c.part(f"timing {label}, 16 frames"):
        stages = TorchStages(models, torch.device(setup.device), models.unet.conv_in.weight.dtype,
                             TorchOptions(group_norm="fused"))
        with AnimationPipeline(stages, options=PipelineOptions(reference_cache_entries=0)) as pipe:
            row = time_one(c, label, pipe, 16, setup, inputs, warm=setup.device == "cuda")
        row["vs_eager"] = round(eager["timings"]["total"] / row["timings"]["total"], 3)


def memory_rows(c: Check, setup: Setup, models, inputs, budget: Budget) -> None:
    """``--memory-gb`` caps (on CUDA emulated by ``set_per_process_memory_fraction``, so
    an allocation beyond the cap fails as on a smaller card) at 16, 64 and 256 frames, with
    the uncapped default and the original schedule at 256 frames beside them; on the CPU
    dry run caps of a few tens of MiB on the tiny set (the plan's choices, no allocator)."""
    import torch

    from magicanimate_rt import AnimationPipeline
    from magicanimate_rt.runtime.backends.torch_backend import TorchOptions, TorchStages
    from magicanimate_rt.runtime.pipeline import PipelineOptions
    from magicanimate_rt.runtime.planner import ALL_STAGES

    cuda = setup.device == "cuda"
    dtype = models.unet.conv_in.weight.dtype
    caps = MEMORY_CAPS_GIB if cuda else (0.12, 0.2)
    frames_list = (16, 64, LONG_FRAMES) if cuda else tuple(setup.frames)
    long_steps = LONG_STEPS if cuda else setup.steps
    total = torch.cuda.get_device_properties(0).total_memory if cuda else None

    def run(label, frames, cap, options=PipelineOptions(reference_cache_entries=0), torch_options=TorchOptions()):
        steps = long_steps if frames == LONG_FRAMES else setup.steps
        what = f"memory {label}, {frames} frames"
        ref = find(c, "ours (torch)", 16)
        est = (estimate(ref, frames) * steps / setup.steps * 1.5) if ref else 60.0
        if est > budget.left():
            c.skip(what, f"estimated {est:.0f} s, {max(budget.left(), 0):.0f} s left of the budget")
            return
        with c.part(what):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else min(cap * 2**30 / total, 1.0))
            stages = TorchStages(models, torch.device(setup.device), dtype, torch_options)
            pipe = AnimationPipeline(stages, options=options)
            try:
                time_one(c, label, pipe, frames, setup, inputs, warm=False, steps=steps, memory_cap_gib=cap)
            finally:
                # the shared model set's weights back on the GPU (the plan may have left stages in
                # host memory) before the stages close, and the whole device for the next part
                stages.set_resident(ALL_STAGES)
                pipe.close()
                if cuda:
                    torch.cuda.set_per_process_memory_fraction(1.0)

    if LONG_FRAMES in frames_list:
        run("ours (torch), uncapped", LONG_FRAMES, None)
        run("original schedule, uncapped", LONG_FRAMES, None, PipelineOptions.original(),
            TorchOptions.original(setup.device))
    for cap in caps:
        for frames in frames_list:
            run(f"ours (torch), --memory-gb {cap:g}", frames, cap,
                PipelineOptions(reference_cache_entries=0, memory_gb=cap))


def memory_factors(c: Check, setup: Setup, models) -> None:
    """Each call's measured peak working memory at the setup's size, and the factor of
    ``torch_backend.MEMORY_FACTORS`` it implies (what the plan assumes for CUDA)."""
    import torch

    from magicanimate_rt.runtime.backends.torch_backend import MEMORY_FACTORS, TorchStages
    from magicanimate_rt.runtime.planner import LoopPlan, RequestPlan

    if setup.device != "cuda":
        c.skip("memory factors", "dry run: CUDA allocator statistics only")
        return
    dtype = models.unet.conv_in.weight.dtype
    st = TorchStages(models, torch.device("cuda"), dtype)
    size, f = setup.size, st.window
    mm = st.memory_model(size)
    h = size // 8
    g = torch.Generator(device="cuda").manual_seed(0)
    lat = torch.randn((1, 4, f, h, h), device="cuda", dtype=dtype, generator=g)
    t = torch.tensor([500.0], device="cuda")
    cond = torch.rand((f, 3, size, size), device="cuda", dtype=dtype, generator=g)

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base
        del out
        return used

    with torch.inference_mode():
        bank = st.bank(st.encode_reference(torch.rand((1, 3, size, size), device="cuda", dtype=dtype) * 255), t)
        residuals = st.controlnet(lat[0].transpose(0, 1), t, cond)
        cn = peak(lambda: st.controlnet(lat[0].transpose(0, 1), t, cond))
        unet = peak(lambda: st.unet_guided(lat, t, residuals, bank))
        st.follow_plan(RequestPlan(LoopPlan(cfg_sequential=True)))
        seq = peak(lambda: st.unet_guided(lat, t, residuals, bank))
        st.follow_plan(RequestPlan(LoopPlan(cfg_sequential=True, ff_chunk=1024)))
        lean = peak(lambda: st.unet_guided(lat, t, residuals, bank))
        st.end_request()
        dec = peak(lambda: st.decode(lat[0, :, :4].transpose(0, 1).contiguous()))
    cuda = MEMORY_FACTORS["cuda"]
    row = {
        "size": size, "dtype": str(dtype),
        "unet_window_mib": round(unet / 2**20), "unet_sequential_mib": round(seq / 2**20),
        "unet_lean_mib": round(lean / 2**20), "controlnet_16_frames_mib": round(cn / 2**20),
        "decode_4_frames_mib": round(dec / 2**20),
        "predicted_unet_window_mib": round(mm.unet_per_window / 2**20),
        "predicted_controlnet_16_mib": round(16 * mm.controlnet_per_frame / 2**20),
        "predicted_decode_4_mib": round(4 * mm.decode_per_frame / 2**20),
        "implied_factors": {
            "unet_window": round(unet / (f * mm.residuals_per_frame), 2),
            "controlnet_frame": round(cn / (f * mm.residuals_per_frame), 2),
            "decode_frame": round(dec / 4 / (mm.decode_per_frame / cuda["decode_frame"]), 2),
            "unet_sequential_share": round(seq / unet, 3),
        },
        "committed_factors": dict(cuda),
    }
    c.memory.append(row)
    log(f"   implied factors {row['implied_factors']} (committed {cuda})")


def kernel_profile(c: Check, setup: Setup, models, inputs) -> None:
    """Where a 1-step 16-frame request's device time goes, by kernel class
    (``benchmarks/attention_kernels.py``: GEMM/conv, attention, norm, elementwise, copies)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.attention_kernels import profile_classes
    from magicanimate_rt import AnimationPipeline
    from magicanimate_rt.runtime.backends.torch_backend import TorchStages
    from magicanimate_rt.runtime.pipeline import PipelineOptions

    dtype = models.unet.conv_in.weight.dtype
    source, driving = inputs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device == "cuda" else [])
    with AnimationPipeline(TorchStages(models, torch.device(setup.device), dtype),
                           options=PipelineOptions(reference_cache_entries=0)) as pipe:
        pipe.animate(source, driving[:16], size=setup.size, steps=1)  # warm-up
        with profile(activities=activities) as prof:
            pipe.animate(source, driving[:16], size=setup.size, steps=1)
    classes = profile_classes(prof.key_averages())
    total = sum(classes.values()) or 1.0
    c.profile.extend({"class": k, "ms": round(v, 2), "share": round(v / total, 4)} for k, v in classes.items())
    log("   " + ", ".join(f"{k} {v / total:.0%}" for k, v in classes.items()))


def sdpa_backends(c: Check, setup: Setup, models) -> None:
    """Each SDPA backend on the UNet's three attention shapes at the setup's size (spatial
    self-attention with the reference bank, cross-attention to the text, temporal), its
    time and error against the math backend, and the fastest exact one."""
    import torch

    from benchmarks.attention_kernels import attention_shapes, pick_fastest_exact, time_sdpa_backends

    dtype = models.unet.conv_in.weight.dtype
    for shape in attention_shapes(models.unet.config, setup.size, setup.size):
        rows = time_sdpa_backends(shape, torch.device(setup.device), dtype)
        best = pick_fastest_exact(rows, 2e-3 if dtype == torch.float16 else 1e-5)
        c.sdpa.append({"shape": [str(x) for x in shape], "rows": rows, "fastest_exact": best})
        log(f"   {shape}: fastest exact {best}")


# --------------------------------------------------------------------------- (d) DensePose
@dataclass(frozen=True)
class DensePoseSetup:
    """What the DensePose part runs: the dry run's small CPU version or the GPU's."""

    device: str
    dtype: str  #: the low precision, measured against float32
    batch: int
    batches: int  #: timed batches of ``dtype`` after one warm-up batch (float32: up to 2)
    min_size: int  #: INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST: the network's input size
    max_size: int

    @classmethod
    def of(cls, dry_run: bool) -> "DensePoseSetup":
        # the CPU has no float16 convolutions worth timing: bfloat16 takes float16's place
        return cls("cpu", "bfloat16", 1, 1, 256, 427) if dry_run else cls("cuda", "float16", 8, 5, 800, 1333)


def densepose_weights(args, shared: Path, cache: Path) -> Optional[Path]:
    """``--densepose-weights``, else make_weights.py's random weights (seed 0, the conformance
    data's), written once into the cache; None when neither is at hand."""
    import subprocess

    if args.densepose_weights is not None:
        return args.densepose_weights
    script = shared / "conformance" / "densepose" / "make_weights.py"
    out = cache / "densepose_seed0.pkl"
    if not out.is_file() and script.is_file():
        partial = cache / "densepose_seed0.partial.pkl"
        subprocess.run([sys.executable, str(script), str(partial), "--seed", "0"], check=True, capture_output=True)
        partial.replace(out)
    return out if out.is_file() else None


def part_labels(frame):
    """(H, W) part label 0..24 of each pixel of a rendered DensePose frame (its colour's index
    in the palette, whose 25 colours are distinct)."""
    import numpy as np

    from magicanimate_rt.densepose.render import PART_COLOURS

    def packed(rgb):
        rgb = rgb.astype(np.int64)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]

    keys = packed(PART_COLOURS)
    order = np.argsort(keys)
    return order[np.searchsorted(keys[order], packed(frame))].astype(np.uint8)


def densepose_deviation(low: list, ref: list, render: Callable, height: int, width: int) -> dict:
    """How far the low-precision results are from float32 on the same frames: frames with
    another number of detections, the largest distance in pixels from a box to its nearest
    box of the other (both ways), the share of pixels with the same part label where either
    has a person, and the share of equal pixels of the rendered frames."""
    import numpy as np

    box_err, counts, same_label, person, same_pixel = 0.0, 0, 0, 0, 0
    for a, b in zip(low, ref, strict=True):
        counts += len(a) != len(b)
        if len(a) and len(b):
            d = np.abs(a.boxes[:, None, :].astype(np.float64) - b.boxes[None]).max(-1)
            box_err = max(box_err, float(d.min(1).max()), float(d.min(0).max()))
        fa, fb = render(a, height, width), render(b, height, width)
        la, lb = part_labels(fa), part_labels(fb)
        mask = (la > 0) | (lb > 0)
        same_label += int((la == lb)[mask].sum())
        person += int(mask.sum())
        same_pixel += int((fa == fb).all(-1).sum())
    n = len(ref)
    return {"frames": n, "frames_other_detection_count": counts, "boxes_max_abs_px": round(box_err, 3),
            "label_agreement_pct": round(100 * same_label / max(person, 1), 3),
            "pixel_agreement_pct": round(100 * same_pixel / (n * height * width), 3)}


def densepose(c: Check, args, shared: Path, cache: Path, budget: Budget) -> None:
    """Issue 27/28's rows: the PyTorch estimator in the setup's low precision and in float32,
    batched, on the person video's frames at the video's size, and the deviation between them."""
    import statistics

    import torch

    from benchmarks.densepose import read_frames
    from magicanimate_rt.densepose import DensePoseEstimator
    from magicanimate_rt.densepose.render import render_frame
    from magicanimate_rt.densepose.weights import read_checkpoint

    setup = DensePoseSetup.of(args.dry_run)
    video = shared / "samples" / "person" / "input_video.mp4"
    weights = densepose_weights(args, shared, cache)
    if not video.is_file() or weights is None:
        c.skip("DensePose", f"no {video} or no weights (--densepose-weights, or make_weights.py in "
               f"{shared / 'conformance' / 'densepose'}; pass --shared)")
        return
    c.environment["densepose_setup"] = asdict(setup) | {"weights": str(weights)}
    frames = read_frames(video, setup.batch * (setup.batches + 1))
    height, width = frames.shape[1:3]
    batches = [frames[i:i + setup.batch] for i in range(0, len(frames), setup.batch)]
    cuda = setup.device == "cuda"
    results: dict[str, list] = {}
    state = read_checkpoint(weights)  # read once for both precisions
    for dtype, n in ((setup.dtype, setup.batches), ("float32", min(2, setup.batches))):
        what = f"DensePose {dtype} batch {setup.batch}"
        if budget.left() < 20:
            c.skip(what, f"{max(budget.left(), 0):.0f} s left of the budget")
            continue
        with c.part(what):
            base = torch.cuda.memory_allocated() if cuda else 0
            est = DensePoseEstimator.from_state_dict(state, weights, device=setup.device, dtype=dtype,
                                                     min_size=setup.min_size, max_size=setup.max_size)
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            est.predict(batches[0])  # warm-up: allocator, cuDNN/oneDNN kernel choice
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds, out = [], []
            for b in batches[1:n + 1]:
                t0 = time.perf_counter()
                out += est.predict(b)  # results come back to the host: the batch is done
                sync()
                seconds.append(time.perf_counter() - t0)
            results[dtype] = out
            row = {"dtype": dtype, "device": setup.device, "batch": setup.batch, "timed_batches": n,
                   "width": int(width), "height": int(height), "min_size": setup.min_size,
                   "batch_s_median": round(statistics.median(seconds), 4),
                   "frames_per_s": round(setup.batch / statistics.median(seconds), 2),
                   "detections_per_frame": round(sum(len(r) for r in out) / len(out), 2)}
            if cuda:
                # weights included; ``base``: what was allocated before the estimator loaded
                row["peak_allocated_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
            c.densepose.append(row)
            log(f"   {row['frames_per_s']} frames/s ({row['batch_s_median']} s per batch of {setup.batch})"
                + (f", peak {row['peak_allocated_gib']} GiB" if cuda else ""))
            del est
            if cuda:
                torch.cuda.empty_cache()
    if len(results) == 2:
        ref = results["float32"]
        dev = densepose_deviation(results[setup.dtype][:len(ref)], ref, render_frame, int(height),
                                  int(width))
        c.densepose_deviation.append({"dtype": setup.dtype, "against": "float32"} | dev)
        log(f"   {setup.dtype} against float32: {dev}")


# --------------------------------------------------------------------------- the report
def speedups(rows: list) -> list:
    out = []
    by = {(r["config"], r["frames"]): r for r in rows}
    for (config, frames), r in by.items():
        base = by.get(("original schedule", frames))
        if base is None or config == "original schedule" or "portrait" in config:  # (its ratio: vs_square)
            continue
        entry = {"config": config, "frames": frames,
                 "total": round(base["timings"]["total"] / r["timings"]["total"], 2)}
        if r["timings"].get("unet"):
            entry["unet"] = round(base["timings"]["unet"] / r["timings"]["unet"], 2)
        if "peak_allocated_gib" in r and r["peak_allocated_gib"]:
            # memory the other way round: ours over the original's (below 1: less memory)
            entry["peak_memory"] = round(r["peak_allocated_gib"] / base["peak_allocated_gib"], 2)
        out.append(entry)
    return out


STAGES = ("vae_encode", "appearance_encoder", "controlnet", "unet", "scheduler", "vae_decode", "total")


def markdown(c: Check, report: dict) -> str:
    env = c.environment
    lines = ["# gpu_check", "", f"{env.get('gpu', 'CPU (dry run)')}; torch {env['torch']} (CUDA {env['cuda']}); "
             f"TensorRT {env['tensorrt']}; onnxruntime {env['onnxruntime']}; {report['seconds']:.0f} s", ""]
    lines += ["## Correctness (case_c.npz: the original's CPU float32 latents)", "",
              "| backend | rel L2 | tolerance | frames max abs (0..255) | s | |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['rel_l2']:.3g} | {r['tolerance']:g} | {r['frames_max_abs']:.1f} | "
              f"{r['seconds']:.1f} | {'ok' if r['ok'] else '**FAIL**'} |" for r in c.correctness]
    if c.validation:
        lines += ["", "## TensorRT plans against ONNX Runtime (random inputs)", "",
                  "| stage | axes | output | max abs | rel L2 | |", "|---|---|---|---|---|---|"]
        lines += [f"| {v['stage']} | {v['axes']} | {v['output']} | {v['max_abs']:.3g} | {v['rel_l2']:.3g} | "
                  f"{'ok' if v['ok'] else '**FAIL**'} |" for v in c.validation]
    if c.timings:
        s = c.environment["timing_setup"]
        lines += ["", f"## Timings ({s['preset']} model set, {s['size']} px, {s['steps']} steps, {s['dtype']} on "
                  f"{s['device']}; seconds)", "",
                  "| config | frames | " + " | ".join(STAGES) + " | peak GiB |",
                  "|---|---|" + "---|" * (len(STAGES) + 1)]
        for r in c.timings:
            t = r["timings"]
            lines.append(f"| {r['config']} | {r['frames']} | " + " | ".join(
                f"{t[k]:.2f}" if k in t else "-" for k in STAGES) + f" | {r.get('peak_allocated_gib', '-')} |")
        if report["speedups"]:
            lines += ["", "| vs the original schedule | frames | speed-up, total | speed-up, unet | "
                      "peak memory, ours / original |", "|---|---|---|---|---|"]
            lines += [f"| {x['config']} | {x['frames']} | " + " | ".join(
                f"{x[k]}x" if k in x else "-" for k in ("total", "unet", "peak_memory")) + " |"
                for x in report["speedups"]]
        lines += ["", "Peak GiB: torch.cuda.max_memory_allocated over the run (weights included); TensorRT's engine "
                  "weights are not torch allocations (see device_used_gib in the JSON)."]
    lines += markdown_issue17(c)
    lines += markdown_densepose(c)
    if c.skipped:
        lines += ["", "## Skipped", ""] + [f"- {s['what']}: {s['why']}" for s in c.skipped]
    if c.errors:
        lines += ["", "## Errors", ""]
        for e in c.errors:
            lines += [f"- **{e['part']}**: {e['error']}", "", "```", *e["traceback"], "```"]
    return "\n".join(lines) + "\n"


def markdown_issue17(c: Check) -> list[str]:
    """The report's sections of issue 17: starts, compiled rows, memory caps, factors,
    kernel classes and SDPA backends."""
    lines: list[str] = []
    if c.starts:
        lines += ["", "## Process start to first step, compiled (a fresh process each)", "",
                  "| start | compile | loaded s | first step s | cache files |", "|---|---|---|---|---|"]
        lines += [f"| {r['start']} | {r['compile_mode']} ({r['compile_backend']}) | {r['loaded_s']:.1f} | "
                  f"{r['first_step_s']:.1f} | {len(r['cache_files'])} |" for r in c.starts]
    compiled = [r for r in c.timings if "compiled" in r["config"]]
    if compiled:
        lines += ["", "## Compiled against eager (compile excluded: warmed at the same frames)", "",
                  "| frames | eager s | compiled s | compiled vs eager | vs the original schedule |",
                  "|---|---|---|---|---|"]
        for r in compiled:
            eager, orig = find(c, "ours (torch)", r["frames"]), find(c, "original schedule", r["frames"])
            t = r["timings"]["total"]
            lines.append(f"| {r['frames']} | {eager['timings']['total'] if eager else '-'} | {t:.2f} | "
                         f"{r.get('vs_eager', '-')}x | "
                         f"{round(orig['timings']['total'] / t, 2) if orig else '-'}x |")
    capped = [r for r in c.timings if r["config"].startswith("memory") or "--memory-gb" in r["config"]
              or "uncapped" in r["config"]]
    if capped:
        lines += ["", "## Memory caps (--memory-gb; on CUDA the cap is enforced on the allocator)", "",
                  "| config | frames | steps | cap GiB | total s | peak allocated GiB | plan |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['frames']} | {r['steps']} | {r.get('memory_cap_gib') or '-'} | "
                  f"{r['timings']['total']:.2f} | {r.get('peak_allocated_gib', '-')} | "
                  f"{r.get('plan', '-')}{' (stepped down: ' + r['stepped_down'] + ')' if 'stepped_down' in r else ''} |"
                  for r in capped]
    if c.memory:
        lines += ["", "## Measured call peaks and the memory factors they imply", "", "```",
                  json.dumps(c.memory, indent=1), "```"]
    if c.profile:
        lines += ["", "## Device time by kernel class (1 step, 16 frames, eager)", "", "| class | ms | share |",
                  "|---|---|---|"]
        lines += [f"| {r['class']} | {r['ms']:.1f} | {r['share']:.1%} |" for r in c.profile]
    if c.sdpa:
        lines += ["", "## SDPA backends per attention shape (kind, batch x heads, queries, keys, heads, head dim)", "",
                  "| shape | backend | ms | max abs vs math | |", "|---|---|---|---|---|"]
        for entry in c.sdpa:
            for r in entry["rows"]:
                mark = "fastest exact" if r["backend"] == entry["fastest_exact"] else ""
                ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
                err = r["error"] if r["error"] is not None else f"{r['max_abs_err']:.2g}"
                lines.append(f"| {' '.join(entry['shape'])} | {r['backend']} | {ms} | {err} | {mark} |")
    return lines


def markdown_densepose(c: Check) -> list[str]:
    if not c.densepose:
        return []
    s = c.environment["densepose_setup"]
    lines = ["", f"## DensePose estimator, PyTorch (person video, network min size {s['min_size']}, "
             f"{s['device']})", "", "| dtype | batch | frames | frames/s | s per batch | detections/frame | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['batch']} | {r['width']}x{r['height']} | {r['frames_per_s']} | "
              f"{r['batch_s_median']} | {r['detections_per_frame']} | {r.get('peak_allocated_gib', '-')} |"
              for r in c.densepose]
    for d in c.densepose_deviation:
        lines += ["", f"{d['dtype']} against {d['against']} on {d['frames']} frames: boxes max abs "
                  f"{d['boxes_max_abs_px']} px, part labels agree on {d['label_agreement_pct']}% of the person's "
                  f"pixels, rendered frames on {d['pixel_agreement_pct']}% of pixels; "
                  f"{d['frames_other_detection_count']} frame(s) with another number of detections."]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s if args.budget_s is not None else (45.0 if args.dry_run else 450.0))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: error: torch sees no CUDA GPU here (use --dry-run to check the script on a CPU)",
              file=sys.stderr)
        return 2
    from magicanimate_rt.layout import cache_dir

    shared = args.shared or ROOT.parent / "shared"
    cache = args.cache or cache_dir() / "gpu-check"
    cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(environment("cpu" if args.dry_run else "cuda"), [], [], [], [], [])
    c.environment.update(dry_run=args.dry_run, quick=args.quick, budget_s=budget.seconds, shared=str(shared),
                         cache=str(cache))
    log(f"gpu_check: {c.environment.get('gpu', 'CPU dry run')}, budget {budget.seconds:.0f} s")
    with c.part("correctness"):
        correctness(c, args, shared, cache)
    with c.part("DensePose"):  # before the timings: nothing else of ours holds GPU memory then
        densepose(c, args, shared, cache, budget)
    ctx: dict = {}
    with c.part("timings"):
        ctx = timings(c, args, shared, cache, budget)
    if ctx:  # issue 17's parts, most wanted first; each skips itself when the budget is spent
        setup, models, inputs = ctx["setup"], ctx["models"], ctx["inputs"]
        with c.part("start times"):
            start_times(c, setup, ctx["models_dir"], cache, budget)
        with c.part("compiled"):
            compiled_rows(c, setup, models, inputs, cache, budget)
        with c.part("memory caps"):
            memory_rows(c, setup, models, inputs, budget)
        for name, fn in (("memory factors", memory_factors), ("kernel profile", kernel_profile),
                         ("SDPA backends", sdpa_backends)):
            if budget.left() < 15:
                c.skip(name, f"{max(budget.left(), 0):.0f} s left of the budget")
                continue
            with c.part(name):
                fn(c, setup, models, *((inputs,) if fn is kernel_profile else ()))
        del models, ctx

    report = {"environment": c.environment, "correctness": c.correctness, "tensorrt_validation": c.validation,
              "timings": c.timings, "speedups": speedups(c.timings), "starts": c.starts, "memory": c.memory,
              "profile": c.profile, "sdpa": c.sdpa, "densepose": c.densepose,
              "densepose_deviation": c.densepose_deviation, "skipped": c.skipped, "errors": c.errors,
              "seconds": round(budget.elapsed(), 1)}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(c, report)
    (args.out / "gpu_check.md").write_text(md)
    print(md)
    log(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} in {budget.elapsed():.0f} s")
    if c.errors:
        return 2
    return 0 if all(r["ok"] for r in c.correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
