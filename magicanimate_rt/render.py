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


from .runtime.media import Box, VideoWriter, crop_frames, grid_frames


def animate_to_files(pipe, request, output: Path, grid: Optional[Path] = None,
                     box: Optional[Box] = None, progress: Union[bool, Callable[[int, int], None]] = True,
                     on_frames: Optional[Callable[[int, int], None]] = None,
                     log: Optional[Callable[[str], None]] = None):
    """Animate ``request`` (a :class:`~.runtime.request.AnimationRequest` whose inputs are
    read: :meth:`~.runtime.request.AnimationRequest.read_inputs`) with ``pipe`` and write
    ``output`` (and ``grid``, the original's [source | driving | result] video); returns
    the :class:`~.runtime.pipeline.AnimationResult` (frames None: they went to the files).

    ``box`` (left, top, right, bottom): the mp4 gets only that part of every frame
    (``crop_output``; the request then does not crop itself); the grid shows whole frames.
    ``progress``: as ``AnimationPipeline.run`` (True: a tqdm bar; a callback(step, steps),
    which may raise to stop at that step boundary; the other ranks of a split clip call
    theirs too, at the same boundaries, and show no bar). ``on_frames(done, total)``:
    called after each decoded chunk is written. Under torchrun only rank 0 writes; the
    other ranks do the same work and write nothing."""
    from dataclasses import replace

    request = replace(request, crop_output=False) if box is not None else request
    source, driving = request.source, request.driving
    width, height = request.shape
    if not pipe.writes_outputs:  # another rank of a split clip: the same work (and steps), rank 0 writes
        return pipe.run(request, progress=progress if callable(progress) else False)
    if log is not None:
        ranks = f" on {pipe.world_size} processes" if pipe.world_size > 1 else ""
        how = "" if request.is_exact else f" ({request.mode.describe()})"
        log(f"animating {driving.shape[0]} frames at {width}x{height}, {request.num_steps} steps, guidance "
            f"{request.guidance_scale}, seed {request.seed}{ranks}{how}")
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

        return pipe.run(request, progress=progress, frame_sink=sink)
