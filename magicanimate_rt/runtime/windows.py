"""Context windows: which frames the temporal UNet sees together (REFERENCE.md section 4).

The temporal UNet is trained on 16-frame clips, so a longer video is denoised in
overlapping 16-frame windows whose predictions are averaged per frame. This is the
original's "uniform" context schedule with ``context_stride=1`` and ``closed_loop=True``, at
the step where its shifting offset is 0, which is the only case MagicAnimate uses.
"""

from __future__ import annotations

from magicanimate_rt.errors import InputError


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def context_windows(num_frames: int, window: int = 16, overlap: int = 4) -> list[list[int]]:
    """Frame indices of every context window, in the order the original visits them.

    Args:
        num_frames: number of (padded) frames N, >= 1.
        window: frames per window, >= 1.
        overlap: frames shared by consecutive windows, 0 <= overlap < window.

    Returns:
        A list of windows, each a list of frame indices in 0..N-1. If N <= window there is
        one window of all N frames (shorter than ``window``). Otherwise windows start at
        j = 0, window - overlap, 2 (window - overlap), ... while j < N, and window j is
        [(j + k) mod N for k in 0..window-1]: the schedule is a closed loop, so the last
        window wraps around to the first frames and every frame is covered.
        N = 32, window 16, overlap 4 gives windows starting at 0, 12, 24 (the last one is
        frames 24..31 then 0..7).
    """
    _check_positive_int("num_frames", num_frames)
    _check_positive_int("window", window)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < window:
        raise InputError(f"overlap must be an integer in 0..{window - 1} (window={window}), got {overlap!r}")

    if num_frames <= window:
        return [list(range(num_frames))]
    stride = window - overlap
    return [[(j + k) % num_frames for k in range(window)] for j in range(0, num_frames, stride)]


def padded_length(num_frames: int, window: int = 16) -> int:
    """``num_frames`` rounded up to a multiple of ``window`` (the original pads the driving
    video to a multiple of 16 frames by repeating its last frame)."""
    _check_positive_int("num_frames", num_frames)
    _check_positive_int("window", window)
    return -(-num_frames // window) * window
