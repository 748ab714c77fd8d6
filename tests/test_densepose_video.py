"""Preparing a driving video (densepose/video.py) with a fake estimator, and the ``densepose`` command's
bad inputs (each one line, exit 2, no output file).

The input videos here are tiny synthetic clips whose frame k is a uniform grey 8 + 6k, so the frame
an estimator was given can be told from its pixels after H.264 coding (crf 18 keeps a flat grey
within +-2 of its value; the frames are 6 apart)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from magicanimate_rt import cli
from magicanimate_rt.densepose.render import BACKGROUND, PART_COLOURS, render_frame
from magicanimate_rt.densepose.result import DensePoseResult
from magicanimate_rt.densepose.video import PrepareSettings, prepare_driving_video, resample
from magicanimate_rt.errors import InputError
from magicanimate_rt.runtime.media import fit_image, read_video, write_video

av = pytest.importorskip("av")
ROOT = Path(__file__).resolve().parents[1]


def grey_clip(path: Path, frames: int, fps, width: int = 64, height: int = 48) -> Path:
    values = 8 + 6 * np.arange(frames)
    write_video(path, np.repeat(values.astype(np.uint8), height * width * 3).reshape(frames, height, width, 3), fps)
    return path


def index_of(frame: np.ndarray) -> int:
    return int(round((float(frame.mean()) - 8) / 6))


class FakeEstimator:
    """Frame k (its grey level): no person when k % 3 == 0, else one detection over the middle of the
    frame whose parts are all label k % 24 + 1 (label 0 in its top row). Records every call."""

    def __init__(self, fail_after: int | None = None):
        self.batches: list[list[int]] = []
        self.shapes = []
        self.fail_after = fail_after

    def predict(self, frames):
        assert frames.ndim == 4 and frames.dtype == np.uint8
        if self.fail_after is not None and sum(map(len, self.batches)) >= self.fail_after:
            raise RuntimeError("estimator failed")
        ks = [index_of(f) for f in frames]
        self.batches.append(ks)
        self.shapes.append(frames.shape[1:3])
        return [self.result(k, *frames.shape[1:3]) for k in ks]

    @staticmethod
    def result(k: int, height: int, width: int) -> DensePoseResult:
        if k % 3 == 0:
            return DensePoseResult(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32))
        x0, y0, x1, y1 = width // 4, height // 4, 3 * width // 4, 3 * height // 4
        labels = np.full((y1 - y0, x1 - x0), k % 24 + 1, np.uint8)
        labels[0] = 0
        uv = np.full((2, y1 - y0, x1 - x0), k / 100, np.float32)
        return DensePoseResult(boxes=np.array([[x0, y0, x1, y1]], np.float32), scores=np.array([0.9], np.float32),
                               labels=[labels], uv=[uv])

    def render(self, result, height, width):
        return render_frame(result, height, width)

    @property
    def seen(self) -> list[int]:
        return [k for b in self.batches for k in b]


def nearest_rule(times, rate, end):
    """An independent statement of the resampling rule: for each t0 + j/rate before ``end``, the index of
    the nearest time (the earlier on a tie)."""
    out, j = [], 0
    while times[0] + Fraction(j) / rate < end:
        target = times[0] + Fraction(j) / rate
        out.append(min(range(len(times)), key=lambda i: (abs(times[i] - target), i)))
        j += 1
    return out


@pytest.mark.parametrize("in_rate, out_rate", [(25, 25), (30, 25), (20, 25), (Fraction(30000, 1001), 25), (50, 12)])
def test_resample_is_nearest_timestamp(in_rate, out_rate):
    times = [Fraction(k) / Fraction(in_rate) for k in range(47)]
    got = list(resample(((k, t) for k, t in enumerate(times)), Fraction(out_rate)))
    assert got == nearest_rule(times, Fraction(out_rate), times[-1] + 1 / Fraction(in_rate))
    if in_rate == out_rate:
        assert got == list(range(47))
    if (in_rate, out_rate) == (30, 25):
        assert len(got) == 40 and 3 not in got and 9 not in got and 4 in got  # every 6th frame (3, 9, ...) dropped


def test_resample_variable_rate():
    times = [Fraction(t, 100) for t in (0, 3, 4, 10, 19, 20, 33, 41)]
    got = list(resample(((k, t) for k, t in enumerate(times)), Fraction(25)))
    assert got == nearest_rule(times, Fraction(25), times[-1] + (times[-1] - times[-2]))


def test_prepare_resamples_batches_and_renders(tmp_path):
    video = grey_clip(tmp_path / "in.mp4", 36, 30)
    est = FakeEstimator()
    out = tmp_path / "out.mp4"
    calls = []
    summary = prepare_driving_video(video, out, est, PrepareSettings(batch=4), progress=lambda *a: calls.append(a))
    assert calls == [(n, 30) for n in range(4, 30, 4)] + [(30, 30)]  # frames done, expected from the duration
    expected = nearest_rule([Fraction(k, 30) for k in range(36)], Fraction(25), Fraction(36, 30))
    assert est.seen == expected and len(expected) == 30
    assert [len(b) for b in est.batches] == [4] * 7 + [2]
    assert summary.frames == 30 and summary.input_frames == 36 and (summary.width, summary.height) == (64, 48)
    assert summary.no_person == sum(k % 3 == 0 for k in expected)
    assert summary.seconds > 0 and summary.frames_per_second > 0 and "30 frames" in summary.describe()
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 25
    frames = read_video(out)
    assert frames.shape == (30, 48, 64, 3)
    for k, frame in zip(expected, frames.astype(int)):
        inside = frame[20:28, 24:40].reshape(-1, 3).mean(0)  # well inside the box, away from its edges
        colour = BACKGROUND if k % 3 == 0 else PART_COLOURS[k % 24 + 1]
        assert np.abs(inside - colour).max() < 6, (k, inside, colour)
        assert np.abs(frame[:4].reshape(-1, 3).mean(0) - BACKGROUND).max() < 6  # outside the box


def test_start_max_frames_and_framing(tmp_path):
    video = grey_clip(tmp_path / "in.mp4", 20, 25)
    for fit in ("crop", "pad", "stretch"):
        est = FakeEstimator()
        out = tmp_path / f"{fit}.mp4"
        s = prepare_driving_video(video, out, est, PrepareSettings(size=(32, 40), fit=fit, start_frame=5,
                                                                    max_frames=7, batch=3))
        assert est.seen == list(range(5, 12)) and [len(b) for b in est.batches] == [3, 3, 1]
        assert set(est.shapes) == {(40, 32)} and (s.width, s.height, s.frames) == (32, 40, 7)
        assert read_video(out).shape == (7, 40, 32, 3)


def test_odd_input_keeps_its_size_less_a_row_and_column(tmp_path):
    """Without a size the output is the input's size (vid2densepose); H.264 needs even sides, so a 63x47
    input is estimated and drawn whole and its picture's last column and row are dropped."""
    video = tmp_path / "odd.mkv"
    with av.open(str(video), "w") as c:  # FFV1 (lossless) takes odd sizes
        stream = c.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 63, 47, "bgr0"
        for k in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((47, 63, 3), 8 + 6 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    est = FakeEstimator()
    s = prepare_driving_video(video, tmp_path / "o.mp4", est)
    assert est.seen == [0, 1, 2] and est.shapes == [(47, 63)] and (s.width, s.height) == (62, 46)
    out = read_video(tmp_path / "o.mp4").astype(int)
    want = render_frame(FakeEstimator.result(1, 47, 63), 47, 63)[:46, :62].astype(int)
    assert out.shape == (3, 46, 62, 3) and np.abs(out[1] - want).mean() < 3


def test_framing_is_fit_image_of_the_input(tmp_path):
    """The estimator gets media.fit_image's frame (the project's crop / pad / stretch)."""
    video = tmp_path / "in.mp4"
    rng = np.random.default_rng(0)
    write_video(video, rng.integers(0, 255, (2, 48, 64, 3), dtype=np.uint8), 25)
    decoded = read_video(video)
    for fit in ("crop", "pad", "stretch"):
        got = []

        class Keep(FakeEstimator):
            def predict(self, frames):
                got.extend(frames)
                return [self.result(0, *frames.shape[1:3])] * len(frames)

        prepare_driving_video(video, tmp_path / "o.mp4", Keep(), PrepareSettings(size=16, fit=fit))
        assert all(np.array_equal(g, fit_image(d, 16, fit)) for g, d in zip(got, decoded))


def test_frames_are_decoded_as_opencv_decodes_them(tmp_path, shared_dir):
    """vid2densepose reads with cv2.VideoCapture (BT.601 whatever the stream's tag); the conformance
    frames are what it read. The person video is tagged BT.709, which PyAV's default follows (measured
    0.97 levels mean, 12 max from OpenCV's frames); the estimator gets OpenCV's frames bit for bit."""
    from magicanimate_rt.runtime.media import iter_video_frames

    person = shared_dir / "samples" / "person" / "input_video.mp4"
    z = np.load(shared_dir / "conformance" / "densepose" / "video_default.npz")
    frames = list(iter_video_frames(person, max_frames=31, opencv_colours=True))
    for f, k in enumerate((0, 10, 20, 30)):
        assert np.array_equal(frames[k], z[f"f{f}_frame"][..., ::-1]), k
    assert not np.array_equal(next(iter_video_frames(person, max_frames=1)), frames[0])  # PyAV's default

    got = []

    class Keep(FakeEstimator):
        def predict(self, batch):
            got.extend(batch)
            return [self.result(0, *batch.shape[1:3])] * len(batch)

    prepare_driving_video(person, tmp_path / "o.mp4", Keep(), PrepareSettings(fps=30, start_frame=10, max_frames=1))
    assert len(got) == 1 and np.array_equal(got[0], z["f1_frame"][..., ::-1])


def test_save_iuv(tmp_path):
    video = grey_clip(tmp_path / "in.mp4", 8, 25)
    est = FakeEstimator()
    prepare_driving_video(video, tmp_path / "o.mp4", est, PrepareSettings(batch=3), save_iuv=tmp_path / "iuv.npz")
    z = np.load(tmp_path / "iuv.npz")
    assert int(z["num_frames"]) == 8 and float(z["fps"]) == 25 and (int(z["width"]), int(z["height"])) == (64, 48)
    for f, k in enumerate(est.seen):
        want = FakeEstimator.result(k, 48, 64)
        assert np.array_equal(z[f"f{f}_boxes"], want.boxes) and np.array_equal(z[f"f{f}_scores"], want.scores)
        for i in range(len(want)):
            assert np.array_equal(z[f"f{f}_i{i}_labels"], want.labels[i])
            assert np.array_equal(z[f"f{f}_i{i}_uv"], want.uv[i])
            assert np.array_equal(z[f"f{f}_i{i}_box_xywh"], want.box_xywh[i])
        assert f"f{f}_i{len(want)}_labels" not in z


def test_failure_leaves_no_output(tmp_path):
    video = grey_clip(tmp_path / "in.mp4", 12, 25)
    out, iuv = tmp_path / "out.mp4", tmp_path / "iuv.npz"
    out.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="estimator failed"):
        prepare_driving_video(video, out, FakeEstimator(fail_after=8), PrepareSettings(batch=4), save_iuv=iuv)
    assert out.read_bytes() == b"previous" and not iuv.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]  # no temporary file left


@pytest.mark.parametrize("bad, words", [
    (dict(fps=0), "fps"), (dict(fps=float("nan")), "fps"), (dict(batch=0), "batch"),
    (dict(max_frames=0), "max_frames"), (dict(start_frame=-1), "start_frame"), (dict(size=33), "size must be an even"),
    (dict(size=(32, 31)), "height"), (dict(fit="zoom"), "fit"),
])
def test_bad_settings(bad, words):
    with pytest.raises(InputError, match=words):
        PrepareSettings(**bad).check()


# --------------------------------------------------------------------------- the command line


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_cli_bad_inputs(tmp_path, capsys):
    video = grey_clip(tmp_path / "in.mp4", 4, 25)
    empty = tmp_path / "empty.mp4"
    # cut right after the mdat box header (write_video puts the index first): a video stream with no
    # frame data (as test_media.py's test_zero_frames)
    data = video.read_bytes()
    empty.write_bytes(data[: data.index(b"mdat") + 4])
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video\n")
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"model": {"conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)}}))
    good = pickle.dumps({"model": {"backbone.bottom_up.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}})
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good[: len(good) // 2])
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"x": np.zeros(1)}, "p": _RunsCode(marker)}, protocol=2))
    out = tmp_path / "out.mp4"
    cases = [
        ((not_video, "--weights", other), "not a video file"),
        ((empty, "--weights", other), "contains no frames"),
        ((tmp_path / "missing.mp4", "--weights", other), "no such file"),
        ((video, "--weights", tmp_path / "missing.pkl"), "missing.pkl: no such file"),
        ((video, "--weights", other), "other.pkl: not a DensePose R-CNN checkpoint"),
        ((video, "--weights", truncated), "truncated.pkl: truncated"),
        ((video, "--weights", evil), "evil.pkl: refused"),
        ((video, "--weights", other, "--fps", "0"), "--fps must be"),
        ((video, "--weights", other, "--fps", "fast"), "--fps"),
        ((video, "--weights", other, "--batch", "0"), "--batch must be"),
        ((video, "--weights", other, "--max-frames", "0"), "--max-frames must be"),
        ((video, "--weights", other, "--start-frame", "-2"), "--start-frame"),
        ((video, "--weights", other, "--size", "33"), "--size must be an even number"),
        ((video, "--weights", other, "--width", "32", "--height", "-4"), "--height must be an even number"),
        ((video, "--weights", other, "--size", "32", "--width", "32", "--height", "32"), "either --size"),
        ((video, "--weights", other, "--width", "32"), "--width and --height"),
        ((video, "--weights", other, "--start-frame", "9"), "nothing from start_frame=9"),
        ((video, "--weights", other, "--output", tmp_path / "o.avi"), ".mp4"),
        ((video, "--weights", other, "--save-iuv", tmp_path / "nodir" / "x.npz"), "does not exist"),
    ]
    for args, words in cases:
        code, _, err = run_cli(capsys, "densepose", *args, "--output", out) if "--output" not in args \
            else run_cli(capsys, "densepose", *args)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, (args, err)
        assert not out.exists() and not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.mp4", "empty.mp4", "notes.mp4", "other.pkl", "truncated.pkl", "evil.pkl"])


def test_check_models_densepose(tmp_path, capsys, densepose_weights):
    code, out, _ = run_cli(capsys, "check-models", "--densepose-weights", densepose_weights)
    assert code == 0 and "DensePose R-CNN R-50 FPN, 335 arrays, 63,927,330 values (float32)" in out
    bad = tmp_path / "lfs.pkl"
    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    code, out, err = run_cli(capsys, "check-models", "--densepose-weights", bad)
    assert code == 2 and "Git LFS pointer" in out and err.count("\n") == 1
    code, _, err = run_cli(capsys, "check-models")
    assert code == 2 and "--densepose-weights" in err


def test_cli_end_to_end_real_estimator(tmp_path, shared_dir, densepose_weights):
    """The real command, defaults (the input's own size), on the conformance weights and the person
    video's first frame: the picture is detectron2's (video_default.npz frame 0) up to the port's float
    differences and H.264. ~55 s on 2 busy cores (the network runs at 1333x750)."""
    out, iuv = tmp_path / "dp.mp4", tmp_path / "dp.npz"
    proc = subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", "densepose",
                           str(shared_dir / "samples" / "person" / "input_video.mp4"), "--weights",
                           str(densepose_weights), "--output", str(out), "--max-frames", "1", "--batch", "1",
                           "--save-iuv", str(iuv)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 frames (0 with no person) at 576x1024" in proc.stdout
    z = np.load(shared_dir / "conformance" / "densepose" / "video_default.npz")
    reference = z["f0_rendered"][..., ::-1]
    saved = np.load(iuv)
    k = len(saved["f0_boxes"])
    assert k == len(z["f0_pred_boxes"]) == 4
    result = DensePoseResult(boxes=saved["f0_boxes"], scores=saved["f0_scores"],
                             labels=[saved[f"f0_i{i}_labels"] for i in range(k)])
    # measured: 2 of 589,824 pixels differ (labels where the bilinear-resampled argmax is near a tie);
    # 0.1% is ~300x that, and a wrong frame, colour or order differs in most pixels
    assert (render_frame(result, 1024, 576) != reference).any(-1).mean() < 1e-3
    video = read_video(out)
    assert video.shape == (1, 1024, 576, 3)
    assert np.median(np.abs(video[0].astype(int) - reference)) <= 3  # H.264 (measured median 2, mean 5.7)
