"""The background reader of densepose/video.py (``PrepareSettings.prefetch``): the same output bytes
with and without it on the real estimator, errors raised in the caller as they were, cancel stops the
thread. Tiny: 4 frames of the person video at a 160-pixel network input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from magicanimate_rt.densepose.video import PrepareSettings, prepare_driving_video
from magicanimate_rt.errors import InputError

av = pytest.importorskip("av")


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "densepose-reader"]


@pytest.fixture(scope="module")
def small_estimator(densepose_weights):
    from magicanimate_rt.densepose.estimator import DensePoseEstimator

    return DensePoseEstimator.from_checkpoint(densepose_weights, min_size=320, max_size=576)


def test_reader_output_is_identical(tmp_path, shared_dir, small_estimator):
    video = shared_dir / "samples" / "person" / "input_video.mp4"
    outs = {}
    for prefetch in (0, 2):
        out, iuv = tmp_path / f"p{prefetch}.mp4", tmp_path / f"p{prefetch}.npz"
        s = prepare_driving_video(video, out, small_estimator,
                                  PrepareSettings(size=(144, 256), max_frames=4, batch=2, prefetch=prefetch),
                                  save_iuv=iuv)
        assert s.frames == 4
        z = np.load(iuv)
        outs[prefetch] = (out.read_bytes(), {k: z[k].tobytes() for k in z.files})
    assert outs[0][0] == outs[2][0]  # the mp4's bytes: the same pictures, coded the same
    assert outs[0][1] == outs[2][1]  # every detection's box, score, labels and U/V, bit for bit
    assert not reader_threads()


class Grey:
    """A fake estimator (no person anywhere) that records the thread ``prepare`` runs on."""

    def __init__(self):
        self.prepared_on = set()

    def prepare(self, frames):
        self.prepared_on.add(threading.current_thread().name)
        return frames

    def predict(self, frames):
        from magicanimate_rt.densepose.result import DensePoseResult

        return [DensePoseResult(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32))
                for _ in frames]

    def render(self, result, height, width):
        return np.zeros((height, width, 3), np.uint8)


def test_prepare_runs_on_the_reader(tmp_path, shared_dir):
    video = shared_dir / "samples" / "person" / "input_video.mp4"
    est = Grey()
    prepare_driving_video(video, tmp_path / "o.mp4", est, PrepareSettings(size=64, max_frames=4, batch=2))
    assert est.prepared_on == {"densepose-reader"}
    est = Grey()
    prepare_driving_video(video, tmp_path / "o.mp4", est, PrepareSettings(size=64, max_frames=4, batch=2, prefetch=0))
    assert est.prepared_on == {threading.current_thread().name}


def test_reader_error_is_the_callers_one_line(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    for prefetch in (0, 2):
        with pytest.raises(InputError) as e:
            prepare_driving_video(bad, tmp_path / "o.mp4", Grey(), PrepareSettings(prefetch=prefetch))
        assert "bad.mp4" in str(e.value) and "\n" not in str(e.value)
    assert not reader_threads() and not (tmp_path / "o.mp4").exists()


def test_cancel_stops_the_reader(tmp_path, shared_dir):
    video = shared_dir / "samples" / "person" / "input_video.mp4"

    def cancel(done, total):
        raise KeyboardInterrupt  # as a cancelled job's progress callback raises

    with pytest.raises(KeyboardInterrupt):
        prepare_driving_video(video, tmp_path / "o.mp4", Grey(), PrepareSettings(size=64, batch=1, prefetch=2),
                              progress=cancel)
    assert not reader_threads() and not (tmp_path / "o.mp4").exists()


def test_prefetch_is_checked():
    with pytest.raises(InputError, match="prefetch"):
        PrepareSettings(prefetch=-1).check()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA: pinned memory and a "
                    "non_blocking copy are the GPU half of the reader's overlap")
def test_prepare_pins_on_cuda(densepose_weights, shared_dir):
    import torch

    from magicanimate_rt.densepose.estimator import DensePoseEstimator
    from magicanimate_rt.runtime.media import fit_image, iter_video_frames

    frames = np.stack([fit_image(f, (144, 256), "crop")
                       for f in iter_video_frames(shared_dir / "samples" / "person" / "input_video.mp4", max_frames=2)])
    cpu = DensePoseEstimator.from_checkpoint(densepose_weights, min_size=320, max_size=576)
    gpu = DensePoseEstimator.from_checkpoint(densepose_weights, device="cuda", min_size=320, max_size=576)
    prepared = gpu.prepare(frames)
    assert prepared.resized.is_pinned() and not cpu.prepare(frames).resized.is_pinned()
    got, want = gpu.predict(prepared), cpu.predict(frames)
    assert [len(r) for r in got] == [len(r) for r in want]
    for g, w in zip(got, want):  # float32 on both; cuDNN's sums differ from the CPU's in the last bits
        assert np.abs(g.boxes - w.boxes).max(initial=0) < 0.1
    torch.cuda.synchronize()
