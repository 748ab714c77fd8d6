"""Strong scaling of one clip across processes (the torch.distributed window split), and a
cost model for GPUs.

    python -m benchmarks.window_scaling --config mid --frames 64 --steps 2 --processes 1,2 [--threads 1]

Each process count runs the same request in fresh processes with one thread each (an
env:// rendezvous on 127.0.0.1, gloo), after one warm-up request in the same processes;
rank 0 reports its stage timings. Seconds per step = the loop's stages (appearance encoder,
ControlNet, UNet, the gather of predictions and latents, scheduler) / steps;
communication share = gather / loop. The report goes to
``benchmarks/results/<date>-<machine>-scaling/`` (scaling.json, scaling.md, scaling.png).

:func:`predict` is the cost model of docs/PERFORMANCE.md ("Several GPUs"): per-window and
per-frame times from a measured single-GPU report plus the bytes exchanged per step.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .modelsets import DEFAULT_SIZES, model_set

ROOT = Path(__file__).resolve().parents[1]
LOOP_STAGES = ("appearance_encoder", "controlnet", "unet", "gather", "scheduler")


# --------------------------------------------------------------------------- one rank
def worker(a) -> None:
    """Run the request twice (warm-up, timed) on this rank; rank 0 prints the timings."""
    import numpy as np
    import torch

    from magicanimate_rt import AnimationPipeline
    from magicanimate_rt.runtime.pipeline import PipelineOptions
    from magicanimate_rt.runtime.windows import context_windows

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)
    driving = rng.integers(0, 256, (a.frames, a.size, a.size, 3), dtype=np.uint8)
    options = PipelineOptions(reference_cache_entries=0)  # every request pays its VAE encode and banks
    with AnimationPipeline.from_pretrained(a.models, options=options) as pipe:
        pipe.animate(source, driving, size=a.size, steps=1, seed=1)  # warm-up
        t0 = time.perf_counter()
        result = pipe.animate(source, driving, size=a.size, steps=a.steps, seed=1)
        wall = time.perf_counter() - t0
        if pipe.rank == 0:
            windows = len(context_windows(result.latents.shape[2], pipe.stages.window, pipe.options.overlap))
            print(json.dumps({"timings": result.timings, "wall_s": wall, "world": pipe.world_size,
                              "windows": windows}))


# --------------------------------------------------------------------------- the launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(n: int, models: Path, size: int, frames: int, steps: int, threads: int,
                  timeout_s: float = 3600) -> dict:
    """``n`` ranks of :func:`worker` on this machine; rank 0's report."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    args = [sys.executable, "-m", "benchmarks.window_scaling", "--worker", "--models", str(models), "--size", str(size),
            "--frames", str(frames), "--steps", str(steps), "--threads", str(threads)]
    procs = []
    for r in range(n):
        env = base | {"OMP_NUM_THREADS": str(threads), "MAGICANIMATE_RT_DIST_TIMEOUT": "1800"}
        if n > 1:
            env |= {"WORLD_SIZE": str(n), "RANK": str(r), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port}
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout_s))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"a rank of the {n}-process run failed: {err.strip().splitlines()[-1:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def summarise(report: dict, steps: int) -> dict:
    t = report["timings"]
    loop = sum(t.get(s, 0.0) for s in LOOP_STAGES)
    return {"world": report["world"], "windows": report["windows"], "total_s": t["total"],
            "loop_s": loop, "s_per_step": loop / steps, "gather_s": t.get("gather", 0.0),
            "comm_share": t.get("gather", 0.0) / loop if loop else 0.0, "decode_s": t.get("vae_decode", 0.0),
            "timings": t}


# --------------------------------------------------------------------------- the cost model
#: per-call times measured on one H200 (benchmarks/results/2026-11-26-h200-sd15, SD 1.5 size,
#: 512 px, fp16, default runtime: UNet 1.57 s / 10 steps for one window, ControlNet 0.19 s /
#: 10 steps for 16 frames, appearance encoder 0.13 s / 10 steps, decode 0.21 s / 16 frames)
H200_SD15 = {"window_s": 0.157, "controlnet_16_s": 0.019, "appearance_s": 0.013, "decode_frame_s": 0.21 / 16,
             "latent": (4, 64, 64), "frame_bytes": 512 * 512 * 3, "pred_item_bytes": 2}


def windows_of(frames: int, window: int = 16, stride: int = 12) -> int:
    n = math.ceil(frames / window) * window
    return 1 if n <= window else len(range(0, n, stride))


def predict(frames: int, gpus: int, steps: int = 25, link_gb_s: float = 100.0, c: dict = H200_SD15) -> dict:
    """Seconds for one clip of ``frames`` frames on ``gpus`` GPUs: every rank runs at most
    ceil(W / G) windows a step, the ControlNet on the frames its windows read, the
    appearance encoder (every rank: not split), then the all-gather of every window's two
    predictions and the broadcast of the latents over a link of ``link_gb_s``; the decode
    is split by frames and the uint8 frames reach rank 0 over the same link."""
    w = windows_of(frames)
    per_rank = math.ceil(w / gpus)
    frames_read = min(frames, per_rank * 16)
    ch, h, wd = c["latent"]
    pred_bytes = w * 2 * ch * 16 * h * wd * c["pred_item_bytes"]
    latent_bytes = ch * math.ceil(frames / 16) * 16 * h * wd * 4
    comm = 0.0 if gpus == 1 else ((gpus - 1) / gpus * pred_bytes + latent_bytes) / (link_gb_s * 1e9)
    step = per_rank * c["window_s"] + frames_read / 16 * c["controlnet_16_s"] + c["appearance_s"] + comm
    decode = math.ceil(frames / gpus) * c["decode_frame_s"]
    gather_frames = 0.0 if gpus == 1 else frames * (gpus - 1) / gpus * c["frame_bytes"] / (link_gb_s * 1e9)
    total = steps * step + decode + gather_frames
    return {"frames": frames, "gpus": gpus, "windows": w, "windows_per_rank": per_rank, "step_s": step,
            "comm_s_per_step": comm, "decode_s": decode + gather_frames, "total_s": total}


def prediction_table(frame_counts=(64, 256), gpu_counts=(1, 2, 4, 8), steps: int = 25) -> str:
    lines = ["| frames | GPUs | windows (per rank) | s per step | comm ms per step | decode s | total s | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for f in frame_counts:
        one = predict(f, 1, steps)["total_s"]
        for g in gpu_counts:
            p = predict(f, g, steps)
            lines.append(f"| {f} | {g} | {p['windows']} ({p['windows_per_rank']}) | {p['step_s']:.3f} | "
                         f"{p['comm_s_per_step'] * 1e3:.2f} | {p['decode_s']:.2f} | {p['total_s']:.1f} | "
                         f"{one / p['total_s']:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report
def write_report(out: Path, rows: list[dict], meta: dict) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=".scaling-", dir=out.parent))
    try:
        (tmp / "scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        base = rows[0]
        lines = [f"# Strong scaling: {meta['config']}, {meta['frames']} frames, {meta['steps']} steps, "
                 f"{meta['size']} px", "",
                 f"Machine: {meta['machine']}; {meta['threads']} thread(s) per process; torch {meta['torch']}; "
                 f"gloo over loopback. Command: `{meta['command']}`.", "",
                 "| processes | windows | s per step | speed-up (loop) | gather s | communication share | "
                 "decode s | total s | speed-up (total) |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['world']} | {r['windows']} | {r['s_per_step']:.2f} | "
                         f"{base['s_per_step'] / r['s_per_step']:.2f}x | {r['gather_s']:.3f} | "
                         f"{100 * r['comm_share']:.1f}% | {r['decode_s']:.2f} | {r['total_s']:.2f} | "
                         f"{base['total_s'] / r['total_s']:.2f}x |")
        lines += ["", "Cost model for SD 1.5 at 512 px, 25 steps, fp16, from the H200 report "
                  "(docs/PERFORMANCE.md, \"Several GPUs\"):", "", prediction_table()]
        (tmp / "scaling.md").write_text("\n".join(lines) + "\n")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 3.2))
            n = [r["world"] for r in rows]
            ax.plot(n, [base["s_per_step"] / r["s_per_step"] for r in rows], "o-", label="measured (loop)")
            ax.plot(n, n, "--", color="grey", label="ideal")
            ax.set_xlabel("processes (1 thread each)")
            ax.set_ylabel("speed-up per step")
            ax.set_xticks(n)
            ax.legend()
            ax.set_title(f"{meta['config']}, {meta['frames']} frames, {meta['size']} px")
            fig.tight_layout()
            fig.savefig(tmp / "scaling.png", dpi=120)
            plt.close(fig)
        except ImportError:
            pass
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.window_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--models", type=Path, default=None, help="model directory (default: the config's random set)")
    p.add_argument("--config", default="mid")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--processes", default="1,2")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--predict", action="store_true", help="print the cost model's table and exit")
    a = p.parse_args(argv)
    if a.predict:
        print(prediction_table())
        return 0
    a.size = a.size or DEFAULT_SIZES["cpu"][a.config]
    if a.worker:
        worker(a)
        return 0
    import torch

    from .runtime_bench import machine_name

    models = a.models or model_set(a.config)
    rows = []
    for n in (int(x) for x in a.processes.split(",")):
        print(f"{n} process(es) ...", file=sys.stderr, flush=True)
        rows.append(summarise(run_processes(n, models, a.size, a.frames, a.steps, a.threads), a.steps))
        print(f"  {rows[-1]['s_per_step']:.2f} s per step, total {rows[-1]['total_s']:.1f} s", file=sys.stderr)
    machine = machine_name("cpu")
    out = a.out or ROOT / "benchmarks" / "results" / f"{_dt.date.today().isoformat()}-{machine}-scaling"
    meta = {"config": a.config, "size": a.size, "frames": a.frames, "steps": a.steps, "threads": a.threads,
            "machine": machine, "torch": torch.__version__,
            "command": "python -m benchmarks.window_scaling " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(write_report(out, rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
