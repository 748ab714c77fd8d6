"""A service worker's DensePose estimator stays loaded between person jobs
(densepose/prepare.py ``EstimatorCache``, passed by serve/jobs.py): the second clip made with the
same weights, device and dtype reuses the first's estimator; another weights file (or the same
file rewritten) loads again; ``clear`` frees it. The estimation itself is a stand-in (the real one is
tested in test_densepose_video.py)."""

from __future__ import annotations

import shutil

import pytest

from magicanimate_rt.densepose import prepare
from magicanimate_rt.densepose.prepare import EstimatorCache, cached_driving_video

pytest.importorskip("av")


def test_a_worker_keeps_its_estimator(tmp_path, shared_dir, densepose_weights, monkeypatch):
    used, lines = [], []

    def stand_in(video, clip, estimator, settings, progress=False):
        used.append(estimator)
        clip.write_bytes(b"clip")

        class Summary:
            def describe(self):
                return "stand-in"
        return Summary()

    monkeypatch.setattr(prepare, "prepare_driving_video", stand_in)
    video = shared_dir / "samples" / "person" / "input_video.mp4"
    cache = EstimatorCache()
    for max_frames in (1, 2):  # two clips (different keys), one load
        cached_driving_video(video, densepose_weights, prepare.person_video_settings(0, max_frames),
                             cache_dir=tmp_path / "clips", log=lines.append, estimators=cache)
    assert len(used) == 2 and used[0] is used[1] and len(cache) == 1
    assert sum("loaded DensePose R-CNN" in line for line in lines) == 1
    other = tmp_path / "copy.pkl"
    shutil.copyfile(densepose_weights, other)  # other weights: loaded, and the first one let go (size 1)
    cached_driving_video(video, other, prepare.person_video_settings(0, 3), cache_dir=tmp_path / "clips",
                         log=lines.append, estimators=cache)
    assert used[2] is not used[0] and len(cache) == 1
    assert sum("loaded DensePose R-CNN" in line for line in lines) == 2
    cache.clear()
    assert len(cache) == 0


def test_cache_keeps_at_most_its_size():
    cache, loads = EstimatorCache(size=2), []
    for key in ("a", "b", "a", "c", "b"):
        cache.get((key,), lambda key=key: loads.append(key) or key)
    assert loads == ["a", "b", "c", "b"]  # "a" reused; "c" pushed out "b" (the least recently used)
