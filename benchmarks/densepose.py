"""Frames/s of the DensePose estimator on the person video at batch sizes 1/4/8.

``python -m benchmarks.densepose [--weights model_final_162be9.pkl] [--batches 1,4,8] ...``
``python -m benchmarks.densepose --engines DIR [--backend onnxruntime]``: an engine directory's graphs.

Without ``--weights`` it times detectron2-format random weights written by
``../shared/conformance/densepose/make_weights.py`` (the conformance data's, seed 0): the work is
the same as with the real weights except the DensePose head, which runs once per detection (the
random weights keep 4-5 boxes per frame of this video, real ones about 1), so the table reports
detections per frame too. Writes JSON and Markdown to ``benchmarks/results/<date>-<machine>-densepose/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.densepose", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="detectron2 .pkl (default: random weights, seed 0)")
    p.add_argument("--video", type=Path, default=SHARED / "samples" / "person" / "input_video.mp4")
    p.add_argument("--frames", type=int, default=8, help="frames timed per batch size (default 8)")
    p.add_argument("--batches", default="1,4,8", help="comma list of batch sizes (default 1,4,8)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the frames per batch size")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--engines", type=Path, default=None, metavar="DIR",
                   help="time an engine directory's DensePose stages instead (build_engines.py --densepose-weights)")
    p.add_argument("--backend", default="onnxruntime", help="with --engines: onnxruntime (default) or torch")
    p.add_argument("--min-size", type=int, default=800, help="INPUT.MIN_SIZE_TEST of the PyTorch estimator "
                   "(default 800; an engine directory has its own)")
    p.add_argument("--max-size", type=int, default=1333, help="INPUT.MAX_SIZE_TEST (default 1333)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def read_frames(path: Path, n: int):
    """The first ``n`` frames of a video as (n, H, W, 3) uint8 RGB (PyAV)."""
    import av
    import numpy as np

    frames = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
            if len(frames) == n:
                break
    return np.stack(frames)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from magicanimate_rt.densepose import DensePoseEstimator

    from .runtime_bench import machine_name

    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    frames = read_frames(a.video, a.frames)
    with tempfile.TemporaryDirectory() as tmp:
        weights = a.weights
        if a.engines is not None:
            est = DensePoseEstimator.from_engines(a.engines, backend=a.backend, device=a.device)
        else:
            if weights is None:
                weights = Path(tmp) / "densepose_seed0.pkl"
                subprocess.run([sys.executable, str(SHARED / "conformance" / "densepose" / "make_weights.py"),
                                str(weights), "--seed", "0"], check=True, capture_output=True)
            est = DensePoseEstimator.from_checkpoint(weights, device=a.device, dtype=a.dtype, min_size=a.min_size,
                                                     max_size=a.max_size)
    backend = f"{a.backend} ({a.engines})" if a.engines is not None else "torch"
    config = f"{est.cfg.min_size}/{est.cfg.max_size}"
    sync = torch.cuda.synchronize if est.device.type == "cuda" else (lambda: None)
    rows = []
    for b in batches:
        est.predict(frames[:b])  # warm-up (allocator, oneDNN/cuDNN kernel choice)
        sync()
        times, cpu, detections = [], [], []
        for _ in range(a.repeats):
            load = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            for s in range(0, len(frames), b):
                results = est.predict(frames[s:s + b])
                detections += [len(r) for r in results]
            sync()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        med = statistics.median(times)
        rows.append({"batch": b, "frames": len(frames), "times_s": times, "median_s": med, "fps": len(frames) / med,
                     "cpu_s_per_frame": statistics.median(cpu) / len(frames),
                     "detections_per_frame": statistics.mean(detections), "load_before": load})
        print(f"batch {b}: {len(frames) / med:.3f} frames/s ({med:.1f} s for {len(frames)} frames, load {load:.1f})",
              flush=True)
    machine = machine_name(a.device)
    h, w = frames.shape[1:3]
    meta = {"machine": machine, "date": _dt.date.today().isoformat(), "video": a.video.name, "frame_hw": [h, w],
            "weights": f"the engine directory {a.engines}" if a.engines else str(a.weights) if a.weights
            else "random (make_weights.py --seed 0)", "device": a.device,
            "dtype": str(est.dtype).removeprefix("torch."), "threads": a.threads, "torch": torch.__version__,
            "backend": backend, "config": config,
            "command": "python -m benchmarks.densepose " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = a.out or ROOT / "benchmarks" / "results" / f"{meta['date']}-{machine}-densepose"
    out.mkdir(parents=True, exist_ok=True)
    (out / "densepose.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# DensePose estimator: {a.video.name} ({w}x{h}), {meta['dtype']} on {a.device}, {backend}", "",
             f"Machine: {machine}; torch {meta['torch']}, {a.threads} threads (ONNX Runtime: its own default pool); "
             f"weights: {meta['weights']}; config {config}. Command: `{meta['command']}`.", "",
             "CPU s / frame is the process's CPU time (all threads): the work, which other processes on the "
             "machine (load) do not inflate as they inflate the wall time.", "",
             "| batch | frames | s (median) | frames/s | CPU s / frame | detections / frame | load before |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['frames']} | {r['median_s']:.1f} | **{r['fps']:.3f}** | "
                     f"{r['cpu_s_per_frame']:.2f} | {r['detections_per_frame']:.1f} | {r['load_before']:.1f} |")
    (out / "densepose.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
