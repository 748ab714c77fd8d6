"""Context windows: against the original's recorded schedules."""

import numpy as np
import pytest

from magicanimate_rt.errors import InputError
from magicanimate_rt.runtime.windows import context_windows, padded_length

RECORDED = (16, 32, 48, 64, 80, 112)


@pytest.mark.parametrize("num_frames", RECORDED)
def test_matches_original(shared_dir, num_frames):
    recorded = np.load(shared_dir / "conformance" / "stages.npz")[f"windows_{num_frames}"]
    assert context_windows(num_frames) == recorded.tolist()


@pytest.mark.parametrize("num_frames", [1, 5, 16, 17, 28, 32, 33, 100, 112, 500])
def test_every_frame_is_covered(num_frames):
    windows = context_windows(num_frames)
    assert set().union(*windows) == set(range(num_frames))
    assert all(len(w) == min(num_frames, 16) for w in windows)


def test_last_window_wraps_around():
    assert context_windows(32) == [
        list(range(0, 16)),
        list(range(12, 28)),
        list(range(24, 32)) + list(range(0, 8)),
    ]


def test_short_video_is_one_window():
    assert context_windows(10) == [list(range(10))]


def test_other_window_and_overlap():
    assert context_windows(10, window=4, overlap=0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert context_windows(5, window=4, overlap=3)[-1] == [4, 0, 1, 2]


@pytest.mark.parametrize("num_frames, expected", [(1, 16), (16, 16), (17, 32), (24, 32), (112, 112)])
def test_padded_length(num_frames, expected):
    assert padded_length(num_frames) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_frames": 0},
        {"num_frames": -1},
        {"num_frames": 2.0},
        {"num_frames": 32, "overlap": 16},
        {"num_frames": 32, "overlap": 20},
        {"num_frames": 32, "overlap": -1},
        {"num_frames": 32, "window": 0},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(InputError):
        context_windows(**kwargs)


def test_padded_length_bad_arguments():
    with pytest.raises(InputError):
        padded_length(0)
