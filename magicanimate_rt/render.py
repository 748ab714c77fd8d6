"""Animate into files: the one way this project turns a request into an mp4 (and its grid).

Used by every surface that writes videos: ``magicanimate-rt animate`` and ``demo``
(``cli.py``), config runs (``config_run.py``) and the HTTP service (``serve/``). Frames are
written chunk by chunk as they are decoded, so the decoded video is never in memory whole;
both files go to temporary paths and are renamed when complete (``VideoWriter``), so an
error, Ctrl-C or a cancelled job leaves neither.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .runtime.media import Box, VideoWriter, crop_frames, grid_frames


def animate_to_files(pipe, source: np.ndarray, driving: np.ndarray, size: Union[int, tuple[int, int]], steps: int,
                     guidance: float, seed: int, output: Path, grid: Optional[Path] = None,
                     box: Optional[Box] = None, progress: Union[bool, Callable[[int, int], None]] = True,
                     on_frames: Optional[Callable[[int, int], None]] = None,
                     log: Optional[Callable[[str], None]] = None, mode=None):
    """Animate with ``pipe`` and write ``output`` (and ``grid``, the original's [source |
    driving | result] video); returns the :class:`~.runtime.pipeline.AnimationResult`
    (frames None: they went to the files).

    ``size``: the output side, or (width, height); ``source`` and ``driving`` are already
    that shape. ``box`` (left, top, right, bottom): the mp4 gets only that part of every
    frame (``--crop-output``); the grid shows whole frames. ``progress``: as
    ``AnimationPipeline.animate`` (True: a tqdm bar; a callback(step, steps), which may
    raise to stop at that step boundary; the other ranks of a split clip call theirs too,
    at the same boundaries, and show no bar). ``on_frames(done, total)``: called after each
    decoded chunk is written. ``mode``: the sampling mode (``runtime/modes.py``; None: exact).
    Under torchrun only rank 0 writes; the other ranks do the same work and write nothing."""
    width, height = (size, size) if isinstance(size, int) else size
    shape = dict(width=width, height=height)
    if not pipe.writes_outputs:  # another rank of a split clip: the same work (and steps), rank 0 writes
        return pipe.animate(source, driving, steps=steps, guidance_scale=guidance, seed=seed, mode=mode,
                            progress=progress if callable(progress) else False, **shape)
    if log is not None:
        ranks = f" on {pipe.world_size} processes" if pipe.world_size > 1 else ""
        how = "" if mode is None or getattr(mode, "is_exact", True) else f" ({mode.describe()})"
        log(f"animating {driving.shape[0]} frames at {width}x{height}, {steps} steps, guidance {guidance}, "
            f"seed {seed}{ranks}{how}")
    total = driving.shape[0]
    with contextlib.ExitStack() as writers:
        video = writers.enter_context(VideoWriter(output))
        side = writers.enter_context(VideoWriter(grid)) if grid is not None else None

        def sink(first: int, frames) -> None:
            video.write(frames if box is None else crop_frames(frames, box))
            if side is not None:
                side.write(grid_frames(source, driving[first : first + frames.shape[0]], frames))
            if on_frames is not None:
                on_frames(first + frames.shape[0], total)

        return pipe.animate(source, driving, steps=steps, guidance_scale=guidance, seed=seed, progress=progress,
                            frame_sink=sink, mode=mode, **shape)
