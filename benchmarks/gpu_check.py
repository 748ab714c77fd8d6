#!/usr/bin/env python3
"""One command for a GPU machine: is every GPU backend right, and how fast is it?

    python benchmarks/gpu_check.py --out DIR [--quick] [--dry-run] [--shared DIR] [--cache DIR]
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

``--quick``: 16 frames only. ``--dry-run``: the whole script on the CPU in float32, tiny
set at 128 px, 2 steps, 16 and 32 frames (what CI runs; no GPU needed). Exit code 0, or 1
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

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

    if args.dry_run:
        case_c_check(c, "torch cpu fp32", torch_pipe("cpu", torch.float32), case, TOLERANCE["cpu-fp32"])
        c.skip("TensorRT and ONNX Runtime CUDA correctness", "dry run: CPU only")
        return
    case_c_check(c, "torch cuda fp16", torch_pipe("cuda", torch.float16), case, TOLERANCE["fp16"])
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
             shape: Optional[tuple[int, int]] = None) -> Optional[dict]:
    """One timed animation (after a 1-step warm-up when ``warm``); its per-stage seconds
    and peak memory. ``shape``: (width, height) instead of the setup's square size."""
    import torch

    source, driving = inputs
    cuda = setup.device == "cuda"
    width, height = shape or (setup.size, setup.size)
    size = dict(width=width, height=height)
    if warm:
        pipe.animate(source, driving[:16], steps=1, **size)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    result = pipe.animate(source, driving[:frames], steps=setup.steps, **size)
    row = {"config": label, "frames": frames, "steps": setup.steps, "size": setup.size, "width": width,
           "height": height, "timings": {k: round(v, 4) for k, v in result.timings.items()}}
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


def timings(c: Check, args, shared: Path, cache: Path, budget: Budget) -> None:
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
    del models


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
    if c.skipped:
        lines += ["", "## Skipped", ""] + [f"- {s['what']}: {s['why']}" for s in c.skipped]
    if c.errors:
        lines += ["", "## Errors", ""]
        for e in c.errors:
            lines += [f"- **{e['part']}**: {e['error']}", "", "```", *e["traceback"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s if args.budget_s is not None else (45.0 if args.dry_run else 450.0))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: error: torch sees no CUDA GPU here (use --dry-run to check the script on a CPU)",
              file=sys.stderr)
        return 2
    from magicanimate_rt import demo

    shared = args.shared or ROOT.parent / "shared"
    cache = args.cache or demo.cache_dir() / "gpu-check"
    cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(environment("cpu" if args.dry_run else "cuda"), [], [], [], [], [])
    c.environment.update(dry_run=args.dry_run, quick=args.quick, budget_s=budget.seconds, shared=str(shared),
                         cache=str(cache))
    log(f"gpu_check: {c.environment.get('gpu', 'CPU dry run')}, budget {budget.seconds:.0f} s")
    with c.part("correctness"):
        correctness(c, args, shared, cache)
    with c.part("timings"):
        timings(c, args, shared, cache, budget)

    report = {"environment": c.environment, "correctness": c.correctness, "tensorrt_validation": c.validation,
              "timings": c.timings, "speedups": speedups(c.timings), "skipped": c.skipped, "errors": c.errors,
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
