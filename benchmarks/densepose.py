"""Frames/s of the DensePose estimator on the person video at batch sizes 1/4/8, beside detectron2's.

``python -m benchmarks.densepose [--weights model_final_162be9.pkl] [--batches 1,4,8] ...``
``python -m benchmarks.densepose --engines DIR [--backend onnxruntime]``: an engine directory's graphs too.

With detectron2 built by ``../shared/tools/detectron2-cpu/setup.sh`` (its exports ``DETECTRON2_PY`` and
``DETECTRON2_SRC`` set, or ``--detectron2-python/--detectron2-src``), each round also times detectron2's
``DefaultPredictor`` on the same frames in its own process (``benchmarks/detectron2_worker.py``), the same
threads, alternating with ours.

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
    p.add_argument("--repeats", type=int, default=2, help="rounds: timed passes over the frames per estimator and batch")
    p.add_argument("--detectron2-python", default=None,
                   help="detectron2's venv python (default $DETECTRON2_PY; without it no detectron2 row)")
    p.add_argument("--detectron2-src", type=Path, default=None, help="its checkout (default $DETECTRON2_SRC)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--engines", type=Path, default=None, metavar="DIR",
                   help="also time an engine directory's DensePose stages (build_engines.py --densepose-weights, "
                   "from the same weights) beside the PyTorch estimator")
    p.add_argument("--backend", default="onnxruntime", help="with --engines: onnxruntime (default) or torch")
    p.add_argument("--min-size", type=int, default=800, help="INPUT.MIN_SIZE_TEST of the PyTorch estimator and "
                   "detectron2 (default 800; an engine directory has its own)")
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


class Detectron2:
    """detectron2's ``DefaultPredictor`` in its own venv (``benchmarks/detectron2_worker.py``), loaded
    once and asked for one timed pass over the frames at a time."""

    def __init__(self, python: str, src: Path, weights: Path, frames_bgr: Path, threads: int, sizes: tuple[int, int]):
        self.proc = subprocess.Popen(
            [python, "-P", str(ROOT / "benchmarks" / "detectron2_worker.py"), "--src", str(src), "--weights", str(weights),
             "--frames", str(frames_bgr), "--threads", str(threads), "--min-size", str(sizes[0]),
             "--max-size", str(sizes[1])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp")
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"detectron2 did not start under {python} (run ../shared/tools/detectron2-cpu/setup.sh)")

    def time_pass(self) -> dict:
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def our_pass(est, frames, batch: int, sync) -> dict:
    """One timed pass of ours over ``frames`` at ``batch`` frames per forward."""
    detections = []
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(frames), batch):
        detections += [len(r) for r in est.predict(frames[s:s + batch])]
    sync()
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "detections": detections}


def summarize(name: str, batch, passes: list[dict], n: int) -> dict:
    wall = statistics.median(p["wall_s"] for p in passes)
    return {"name": name, "batch": batch, "frames": n, "times_s": [p["wall_s"] for p in passes], "median_s": wall,
            "fps": n / wall, "cpu_s_per_frame": statistics.median(p["cpu_s"] for p in passes) / n,
            "detections_per_frame": statistics.mean(d for p in passes for d in p["detections"]),
            "loads": [p["load"] for p in passes]}


def main(argv=None) -> int:
    a = parse_args(argv)
    import numpy as np
    import torch

    from magicanimate_rt.densepose import DensePoseEstimator

    from .runtime_bench import machine_name

    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    frames = read_frames(a.video, a.frames)
    d2_python = a.detectron2_python or os.environ.get("DETECTRON2_PY")
    d2_src = a.detectron2_src or (Path(os.environ["DETECTRON2_SRC"]) if "DETECTRON2_SRC" in os.environ else None)
    with tempfile.TemporaryDirectory() as tmp:
        weights = a.weights
        if weights is None:
            weights = Path(tmp) / "densepose_seed0.pkl"
            subprocess.run([sys.executable, str(SHARED / "conformance" / "densepose" / "make_weights.py"), str(weights),
                            "--seed", "0"], check=True, capture_output=True)
        ours = {"torch": DensePoseEstimator.from_checkpoint(weights, device=a.device, dtype=a.dtype,
                                                            min_size=a.min_size, max_size=a.max_size)}
        if a.engines is not None:
            ours[a.backend] = DensePoseEstimator.from_engines(a.engines, backend=a.backend, device=a.device)
        sync = torch.cuda.synchronize if ours["torch"].device.type == "cuda" else (lambda: None)
        d2 = None
        if d2_python and d2_src:
            np.save(Path(tmp) / "frames_bgr.npy", np.ascontiguousarray(frames[..., ::-1]))  # cv2's order
            d2 = Detectron2(d2_python, d2_src, weights, Path(tmp) / "frames_bgr.npy", a.threads,
                            (a.min_size, a.max_size))
        for est in ours.values():
            for b in batches:
                est.predict(frames[:b])  # warm-up (allocator, oneDNN/cuDNN kernel choice)
        sync()
        # rounds alternate detectron2 and ours at each batch size, so that the machine's load
        # (other processes) falls on all of them alike; the medians over rounds are compared
        passes: dict = {("detectron2", 1): []} if d2 else {}
        passes.update({(name, b): [] for name in ours for b in batches})
        for r in range(a.repeats):
            for name, b in passes:
                load = os.getloadavg()[0]
                p = d2.time_pass() if name == "detectron2" else our_pass(ours[name], frames, b, sync)
                passes[(name, b)].append({**p, "load": load})
                print(f"round {r + 1}: {name} batch {b}: {len(frames) / p['wall_s']:.3f} frames/s "
                      f"({p['cpu_s'] / len(frames):.2f} CPU s/frame, load {load:.1f})", flush=True)
        if d2:
            d2.close()
    rows = [summarize(name, b, ps, len(frames)) for (name, b), ps in passes.items()]
    base = rows[0] if d2 else None
    for row in rows:
        row["vs_detectron2"] = None if base is None else row["fps"] / base["fps"]
        row["cpu_vs_detectron2"] = None if base is None else base["cpu_s_per_frame"] / row["cpu_s_per_frame"]
    configs = {name: f"{est.cfg.min_size}/{est.cfg.max_size}" for name, est in ours.items()}
    write_report(a, argv, machine_name(a.device), frames, rows, torch.__version__, configs)
    return 0


def write_report(a, argv, machine: str, frames, rows: list[dict], torch_version: str, configs: dict) -> None:
    h, w = frames.shape[1:3]
    meta = {"machine": machine, "date": _dt.date.today().isoformat(), "video": a.video.name, "frame_hw": [h, w],
            "weights": str(a.weights) if a.weights else "random (make_weights.py --seed 0)", "device": a.device,
            "dtype": a.dtype, "threads": a.threads, "torch": torch_version, "rounds": a.repeats, "configs": configs,
            "engines": str(a.engines) if a.engines else None,
            "command": "python -m benchmarks.densepose " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = a.out or ROOT / "benchmarks" / "results" / f"{meta['date']}-{machine}-densepose"
    out.mkdir(parents=True, exist_ok=True)
    (out / "densepose.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# DensePose estimator: {a.video.name} ({w}x{h}), {a.dtype} on {a.device}", "",
             f"Machine: {machine}; torch {meta['torch']}, {a.threads} threads in every process; weights: "
             f"{meta['weights']}; config (min/max size) {configs}. ONNX Runtime rows: its own default thread pool. "
             f"Command: `{meta['command']}`.", "",
             f"{a.repeats} rounds; each round times detectron2's `DefaultPredictor` + `DensePoseResultExtractor` "
             "(one frame per call, as vid2densepose) and ours (`DensePoseEstimator.predict`, boxes + labels + UV; "
             "`torch`: from the checkpoint, or an engine directory's graphs by their backend) "
             "at each batch size, one after the other on the same frames; medians over the rounds. CPU s / frame "
             "is the process's CPU time (all threads): the work, which other processes on the machine (load) "
             "inflate less than the wall time.", "",
             "| estimator | batch | frames | s (median) | frames/s | vs detectron2 | CPU s / frame | "
             "vs detectron2 (CPU) | detections / frame | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(x):
        return "—" if x is None else f"{x:.2f}x"

    for r in rows:
        lines.append(f"| {r['name']} | {r['batch']} | {r['frames']} | {r['median_s']:.1f} | **{r['fps']:.3f}** | "
                     f"{ratio(r['vs_detectron2'])} | {r['cpu_s_per_frame']:.2f} | {ratio(r['cpu_vs_detectron2'])} | "
                     f"{r['detections_per_frame']:.1f} | {statistics.median(r['loads']):.1f} |")
    (out / "densepose.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
