"""One rank of a multi-process animation, for tests/test_distributed.py: the public API
under torchrun (or plain processes with RANK/WORLD_SIZE/MASTER_* set), as a user's script
would call it. Saves this rank's latents (and rank 0's frames) to OUT/rank<R>.npz.

    python tests/dist_worker.py MODELS OUT --size 64 --frames 28 --steps 2
        [--kill-rank R --kill-step S] [--other-seed-rank R] [--bad-input-rank R]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("models")
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=28)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=1)
    p.add_argument("--other-seed-rank", type=int, default=-1)
    p.add_argument("--bad-input-rank", type=int, default=-1)
    p.add_argument("--stall-rank", type=int, default=-1, help="this rank sleeps 120 s at --kill-step")
    p.add_argument("--output", type=Path, default=None, help="rank 0 also streams the frames into this mp4")
    a = p.parse_args()

    from magicanimate_rt import AnimationPipeline
    from magicanimate_rt.command_line import run_command
    from magicanimate_rt.runtime.media import VideoWriter

    rank = int(os.environ.get("RANK", "0"))
    rng = np.random.default_rng(7)
    source = rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)
    driving = rng.integers(0, 256, (a.frames, a.size, a.size, 3), dtype=np.uint8)

    def body() -> int:
        with AnimationPipeline.from_pretrained(a.models, dtype=a.dtype) as pipe:
            def on_step(step: int, steps: int) -> None:
                if rank == a.kill_rank and step == a.kill_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if rank == a.stall_rank and step == a.kill_step:
                    time.sleep(120)

            drive = a.out / "missing.mp4" if rank == a.bad_input_rank else driving
            seed = 4 if rank == a.other_seed_rank else 3
            with contextlib.ExitStack() as stack:
                sink = None
                if a.output is not None and pipe.writes_outputs:
                    video = stack.enter_context(VideoWriter(a.output))
                    sink = lambda first, frames: video.write(frames)  # noqa: E731
                result = pipe.animate(source, drive, size=a.size, steps=a.steps, seed=seed, progress=on_step,
                                      frame_sink=sink)
            arrays = {"latents": result.latents.double().numpy(), "world": np.array(pipe.world_size)}
            if result.frames is not None:
                arrays["frames"] = result.frames
            np.savez(a.out / f"rank{rank}.npz", **arrays)
        return 0

    return run_command("dist_worker", body)


if __name__ == "__main__":
    sys.exit(main())
