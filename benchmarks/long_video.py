"""Memory of long clips: peak RSS of the CLI's ``animate`` for several frame counts.

    python -m benchmarks.long_video --frames 32,320 [--models DIR] [--size 128] [--steps 1]

Each frame count runs ``magicanimate-rt animate`` (read the driving mp4, denoise, write the
mp4 chunk by chunk) in a fresh process whose peak resident set (``VmHWM``) is the
figure: weights, imports and code are the same in every run, so the difference between
two frame counts is what the extra frames cost. docs/PERFORMANCE.md ("Long videos") gives
the formula this should match; tests/test_long_video.py checks 32 vs 320 frames on the
tiny model set at 128 px against the 1 MB/frame bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from .peak_memory import _status_kib

#: the bound docs/PERFORMANCE.md states for the tiny model set at 128 px
MIB_PER_FRAME_BOUND = 1.0


def write_inputs(directory: Path, frames: int, size: int) -> tuple[Path, Path]:
    """A source png and a ``frames``-long DensePose-like driving mp4 in ``directory``."""
    from PIL import Image

    from magicanimate_rt.demo import driving_clip, source_image
    from magicanimate_rt.runtime.media import VideoWriter

    src = directory / "source.png"
    Image.fromarray(source_image(size)).save(src)
    drv = directory / "driving.mp4"
    with VideoWriter(drv) as w:
        for i in range(0, frames, 32):  # written in chunks: the generator needs no long array
            w.write(driving_clip(min(32, frames - i), size))
    return src, drv


def child(argv: list[str]) -> None:
    """Run the CLI in this process, then print its peak RSS (bytes) as the last line."""
    from magicanimate_rt.cli import main

    rc = main(argv)
    # VmHWM: this process image's own high-water mark. Not ru_maxrss: Linux carries the
    # parent's peak into a forked child across exec (a test runner's 2 GB would mask ours).
    hwm = _status_kib("VmHWM")
    peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rc": rc, "peak_rss_bytes": peak}))


def measure(models: Path, frame_counts: list[int], size: int = 128, steps: int = 1,
            workdir: Path | None = None) -> dict:
    """Peak RSS of ``animate`` for each frame count (fresh process each), and the slope
    between the smallest and the largest count in MiB per frame."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        src, drv = write_inputs(tmp, max(frame_counts), size)
        runs = {}
        for n in frame_counts:
            out = tmp / f"out-{n}.mp4"
            argv = ["animate", "--models", str(models), "--source", str(src), "--driving", str(drv),
                    "--output", str(out), "--size", str(size), "--steps", str(steps), "--max-frames", str(n)]
            proc = subprocess.run([sys.executable, "-m", "benchmarks.long_video", "--child", *argv],
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                raise RuntimeError(f"animate with {n} frames failed: {proc.stderr.strip().splitlines()[-1:]}")
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            if record["rc"] != 0 or not out.is_file():
                raise RuntimeError(f"animate with {n} frames exited {record['rc']}: {proc.stderr.strip()}")
            runs[n] = record["peak_rss_bytes"]
    lo, hi = min(frame_counts), max(frame_counts)
    slope = (runs[hi] - runs[lo]) / (hi - lo) / 2**20 if hi > lo else 0.0
    return {"size": size, "steps": steps, "peak_rss_bytes": runs, "mib_per_frame": slope}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_video", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", default="32,320", help="comma list of frame counts (default 32,320)")
    p.add_argument("--models", type=Path, default=None, help="model set (default: the demo's tiny set)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.models is None:
        from magicanimate_rt.demo import demo_models

        args.models = demo_models()
    counts = sorted({int(x) for x in args.frames.split(",") if x})
    result = measure(args.models, counts, args.size, args.steps)
    print(f"animate at {args.size} px, {args.steps} step(s): peak RSS")
    for n, b in result["peak_rss_bytes"].items():
        print(f"  {n:5d} frames: {b / 2**20:8.1f} MiB")
    print(f"  per extra frame: {result['mib_per_frame']:.3f} MiB (bound at 128 px, tiny: {MIB_PER_FRAME_BOUND} MiB)")
    if args.out is not None:  # atomically: a temporary file renamed when complete
        tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
