"""One benchmark process: loads one model set and measures requests on it.

Run by :mod:`benchmarks.runtime_bench` in a fresh subprocess per job, so that each job's memory is
its own: ``python -m benchmarks.bench_worker SPEC.json OUT.json``. Jobs:

- "timing": every variant of the spec on one loaded model set (the torch variants share
  the weights). Warm-up: one request per variant, through
  :class:`~benchmarks.flop_count.CountingStages` (its FLOPs and calls per stage). Then
  ``repeats`` rounds, each running every variant once in the same order (ABAB...), each
  request timed per stage and end to end, with its peak memory.
- "memory": one variant, one request: its peak memory in a process that holds nothing
  else (frame-count sweeps).
- "profile": one request of each variant under torch.profiler (benchmarks/op_profile.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from magicanimate_rt import AnimationPipeline
from magicanimate_rt.demo import driving_clip, source_image
from magicanimate_rt.models import load_model_set
from magicanimate_rt.runtime.backends.torch_backend import TorchStages
from magicanimate_rt.runtime.dtypes import float_torch_dtype

from . import peak_memory as memory
from .flop_count import CountingStages
from .bench_report import spec_shape
from .bench_variants import BY_KEY, Variant, onnxruntime_variant, torch_options_on


def inputs(spec):
    """The request every run makes: a generated photo and DensePose-like clip at the
    spec's output shape (content does not change the work)."""
    width, height = spec_shape(spec)
    return source_image(width, height), driving_clip(spec["frames"], width, height)


def make_pipeline(v: Variant, models, device, dtype, engine_dir=None) -> AnimationPipeline:
    if v.backend == "onnxruntime":
        return AnimationPipeline.from_engines(engine_dir, backend="onnxruntime", device=str(device),
                                              options=v.pipeline)
    return AnimationPipeline(TorchStages(models, device, dtype, torch_options_on(v, device.type)),
                             options=v.pipeline)


def variants_of(spec) -> list[Variant]:
    out = [BY_KEY[k] for k in spec["variants"] if k in BY_KEY]
    if spec.get("engine_dir"):
        out.append(onnxruntime_variant(spec["engine_dir"]))
    return out


def request(pipe, spec, src, drv):
    width, height = spec_shape(spec)
    return pipe.animate(src, drv, width=width, height=height, steps=spec["steps"], guidance_scale=spec["guidance"],
                        seed=spec["seed"])


def timed(pipe, spec, src, drv, device) -> tuple[dict, object]:
    load_before = os.getloadavg()[0]
    with memory.measure(device) as m:
        t0 = time.perf_counter()
        result = request(pipe, spec, src, drv)
        wall = time.perf_counter() - t0
    return {"timings": result.timings, "wall_s": wall, "memory": m.as_dict(),
            "load_before": load_before, "load_after": os.getloadavg()[0]}, result


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def run_timing(spec) -> dict:
    device, dtype = torch.device(spec["device"]), float_torch_dtype(spec["dtype"])
    t0 = time.perf_counter()
    models = load_model_set(spec["models_dir"], device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    src, drv = inputs(spec)
    out = {"load_s": load_s, "variants": {}, "skipped": {}}
    pipes, chosen = {}, []
    for v in variants_of(spec):
        try:
            pipes[v.key] = make_pipeline(v, models, device, dtype, spec.get("engine_dir"))
            chosen.append(v)
        except Exception as e:  # an optional backend that cannot load here is reported, not fatal
            out["skipped"][v.key] = f"{type(e).__name__}: {e}".splitlines()[0]
    reference_latents = None
    for v in chosen:  # warm-up, counting FLOPs and calls
        pipe = pipes[v.key]
        if v.warm_reference:
            request(pipe, spec, src, drv)  # prime the cache (untimed)
        inner = pipe.stages
        pipe.stages = counting = CountingStages(inner)
        try:
            t0 = time.perf_counter()
            result = request(pipe, spec, src, drv)
            warm_s = time.perf_counter() - t0
        finally:
            pipe.stages = inner
        if reference_latents is None:
            reference_latents = result.latents
        out["variants"][v.key] = {
            "label": v.label, "note": v.note, "backend": v.backend, "warm_reference": v.warm_reference,
            "plan": None if result.plan is None else vars(result.plan.loop),
            "flops": dict(counting.flops) if v.backend == "torch" else None,
            "calls": dict(counting.calls), "warmup_s": warm_s,
            "rel_l2_vs_reference": rel_l2(result.latents, reference_latents), "runs": [],
        }
        print(f"[{spec['config']}] warm-up {v.key}: {warm_s:.1f} s", file=sys.stderr, flush=True)
    for r in range(spec["repeats"]):
        for v in chosen:
            pipe = pipes[v.key]
            if not v.warm_reference:
                pipe.reference_cache.clear()
            record, _ = timed(pipe, spec, src, drv, device)
            out["variants"][v.key]["runs"].append(record)
            print(f"[{spec['config']}] round {r + 1}/{spec['repeats']} {v.key}: {record['timings']['total']:.1f} s "
                  f"(load {record['load_before']:.2f})", file=sys.stderr, flush=True)
    for p in pipes.values():
        p.close()
    return out


def run_memory(spec) -> dict:
    device, dtype = torch.device(spec["device"]), float_torch_dtype(spec["dtype"])
    models = load_model_set(spec["models_dir"], device=device, dtype=dtype)
    v = variants_of(spec)[0]
    pipe = make_pipeline(v, models, device, dtype, spec.get("engine_dir"))
    src, drv = inputs(spec)
    if v.warm_reference:
        request(pipe, spec, src, drv)
    else:
        pipe.reference_cache.clear()
    record, result = timed(pipe, spec, src, drv, device)
    record["plan"] = None if result.plan is None else vars(result.plan.loop)
    record["weights_bytes"] = sum(p.numel() * p.element_size() for m in (
        models.vae, models.appearance_encoder, models.controlnet, models.unet) for p in m.parameters())
    return record


def run_profile(spec) -> dict:
    from .op_profile import profile_request

    device, dtype = torch.device(spec["device"]), float_torch_dtype(spec["dtype"])
    models = load_model_set(spec["models_dir"], device=device, dtype=dtype)
    src, drv = inputs(spec)
    out = {}
    for v in variants_of(spec):
        pipe = make_pipeline(v, models, device, dtype)
        request(pipe, spec, src, drv)  # warm-up
        pipe.reference_cache.clear()
        out[v.key] = profile_request(pipe, lambda: request(pipe, spec, src, drv))
    return out


JOBS = {"timing": run_timing, "memory": run_memory, "profile": run_profile}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    torch.manual_seed(0)
    np.random.seed(0)
    with torch.inference_mode():
        result = JOBS[spec["job"]](spec)
    result = {"spec": spec, "threads": torch.get_num_threads(), **result}
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
