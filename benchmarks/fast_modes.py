"""Opt-in fast sampling, side by side with the exact default (README "Faster, approximately").

    python -m benchmarks.fast_modes [--config mid] [--frames 32] [--steps 25] [--rounds 1]

One process, one loaded model set (random weights, ``benchmarks/modelsets.py``), the same
request (a generated photo and DensePose-like motion, seed 0) under: the exact default
(DDIM, ``--steps``), each knob alone (DPM-Solver++(2M) at 15 steps; deep-feature reuse
every 3rd step at depth 1; guidance for the first half), and the "fast" preset. Each row
runs once untimed at 1 step (warm-up), then ``--rounds`` timed rounds in the same order
(ABAB), medians reported, the reference cache emptied before every request. Deviations
from the exact frames: PSNR and SSIM per frame (scikit-image, ``compare.py``), latent
relative L2, and the mean absolute frame-to-frame difference of each video (flicker) as a
ratio to the exact one's.

Random weights: the deviations say how far each mode moves *these* networks' outputs and
only bound loosely what it does to real ones; ``magicanimate-rt compare`` measures that
on your own weights. Report (fast_modes.json, fast_modes.md, fast_modes.png) in
``benchmarks/results/<date>-<machine>-fast/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rows_to_run(steps: int):
    from magicanimate_rt.runtime.modes import PRESETS, SamplingMode

    return [
        ("exact (DDIM)", SamplingMode(), steps),
        ("dpmpp-2m, 15 steps", SamplingMode(sampler="dpmpp-2m"), 15),
        ("reuse every 3rd step, depth 1", SamplingMode(cache_interval=3, cache_depth=1), steps),
        ("guidance for the first half", SamplingMode(guidance_until=0.5), steps),
        ("preset fast", PRESETS["fast"], None),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fast_modes", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mid")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    import numpy as np
    import torch

    from magicanimate_rt import AnimationPipeline, demo
    from magicanimate_rt.compare import frame_metrics, latent_rel_l2, temporal_difference
    from magicanimate_rt.runtime.pipeline import PipelineOptions

    from .modelsets import DEFAULT_SIZES, model_set
    from .runtime_bench import machine_name

    size = a.size or DEFAULT_SIZES["cpu"][a.config]
    source, driving = demo.source_image(size), demo.driving_clip(a.frames, size)
    rows = rows_to_run(a.steps)
    times: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    results = {}
    with AnimationPipeline.from_pretrained(model_set(a.config),
                                           options=PipelineOptions(reference_cache_entries=0)) as pipe:
        for label, mode, steps in rows:  # warm-up
            pipe.animate(source, driving[:16], size=size, steps=1 if mode.cache_interval == 1 else mode.cache_interval,
                         mode=mode)
        for r in range(a.rounds):
            for label, mode, steps in rows:
                t0 = time.perf_counter()
                res = pipe.animate(source, driving, size=size, steps=steps, seed=0, mode=mode)
                times[label].append(time.perf_counter() - t0)
                results[label] = res
                print(f"round {r + 1}: {label}: {times[label][-1]:.1f} s", flush=True)
    exact = results[rows[0][0]]
    flicker0 = temporal_difference(exact.frames)
    table = []
    for label, mode, steps in rows:
        res = results[label]
        psnr, ssim = frame_metrics(exact.frames, res.frames)
        finite = [x for x in psnr if np.isfinite(x)]
        table.append({
            "row": label, "mode": mode.describe(), "steps": mode.request_steps(steps),
            "median_s": statistics.median(times[label]), "times_s": times[label],
            "ratio": statistics.median(times[label]) / statistics.median(times[rows[0][0]]),
            "unet_s": res.timings.get("unet"), "controlnet_s": res.timings.get("controlnet"),
            "psnr_mean": float(np.mean(finite)) if finite else float("inf"),
            "psnr_min": float(min(psnr)), "ssim_mean": float(np.mean(ssim)), "ssim_min": float(min(ssim)),
            "latent_rel_l2": latent_rel_l2(exact.latents, res.latents),
            "flicker_ratio": temporal_difference(res.frames) / flicker0 if flicker0 else None,
        })
    machine = machine_name("cpu")
    meta = {"machine": machine, "date": _dt.date.today().isoformat(), "config": a.config, "size": size,
            "frames": a.frames, "steps": a.steps, "rounds": a.rounds, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "command": "python -m benchmarks.fast_modes " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = a.out or ROOT / "benchmarks" / "results" / f"{meta['date']}-{machine}-fast"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fast_modes.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=2) + "\n")
    lines = [f"# Fast sampling modes: {a.config}, {a.frames} frames, {size} px", "",
             f"Machine: {machine}; torch {meta['torch']}, {meta['threads']} threads; {a.rounds} timed round(s) after a "
             f"warm-up. Command: `{meta['command']}`. Random weights: the deviations bound real weights only loosely; "
             "`magicanimate-rt compare` measures them on yours.", "",
             "| mode | steps | s | ratio to exact | UNet s | PSNR mean / min dB | SSIM mean / min | latent rel L2 | "
             "flicker vs exact |", "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['row']} | {t['steps']} | {t['median_s']:.1f} | **{t['ratio']:.3f}** | {t['unet_s']:.1f} | "
                     f"{t['psnr_mean']:.1f} / {t['psnr_min']:.1f} | {t['ssim_mean']:.3f} / {t['ssim_min']:.3f} | "
                     f"{t['latent_rel_l2']:.3g} | {t['flicker_ratio']:.2f} |")
    (out / "fast_modes.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
        names = [t["row"] for t in table]
        ax1.barh(names, [t["ratio"] for t in table])
        ax1.axvline(0.4, color="grey", ls="--", lw=1)
        ax1.set_xlabel("time / exact")
        ax1.invert_yaxis()
        ax2.barh(names, [min(t["psnr_mean"], 60) for t in table])
        ax2.set_xlabel("PSNR vs exact, dB (capped at 60)")
        ax2.invert_yaxis()
        ax2.set_yticklabels([])
        fig.suptitle(f"{a.config}, {a.frames} frames, {size} px (random weights)")
        fig.tight_layout()
        fig.savefig(out / "fast_modes.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    print("\n".join(lines))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
