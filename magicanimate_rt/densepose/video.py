"""An ordinary video of a person -> the DensePose driving video MagicAnimate animates with.

:func:`prepare_driving_video` streams any video PyAV reads through an estimator (an object with
``predict(frames) -> results`` and ``render(result, height, width) -> picture``, i.e. a
:class:`~magicanimate_rt.densepose.estimator.DensePoseEstimator`) into an mp4 written by the same
:class:`~magicanimate_rt.runtime.media.VideoWriter` as ``animate``'s output, in bounded memory (one
batch of frames at a time). What it does, in order:

1. decode the input from ``start_frame`` on (decode order, as ``animate --start-frame``), converted
   to RGB as OpenCV's ``VideoCapture`` converts it (BT.601), which is how vid2densepose reads it;
2. resample to ``fps`` by nearest timestamp: output frame j shows the input frame whose presentation
   time is nearest to ``t0 + j / fps`` (t0: the first used frame's time; a tie goes to the earlier
   frame), for every ``t0 + j / fps`` before the end of the last frame (its time plus one frame
   period at the stream's average rate). A 25 fps input at 25 fps is every frame as it is; 30 fps
   drops every 6th frame; 20 fps repeats every 4th;
3. frame each picked frame to the output shape when one is asked for (``size``), with the project's
   :func:`~magicanimate_rt.runtime.media.fit_image` (crop: the centre; pad: edge values; stretch;
   then PIL bicubic), before estimation, so the picture is drawn at the output's size in exact
   palette colours (no resampling of the picture). Without ``size`` the output has the input's own
   size, as vid2densepose (a last odd row or column is dropped from the picture: H.264's yuv420p
   needs even sides);
4. estimate ``batch`` frames per ``predict`` call and render each (a frame with no person is
   vid2densepose's background frame, VIRIDIS(0) everywhere). Steps 1-3 for the next ``prefetch``
   batches, and the estimator's host preprocessing (``estimator.prepare`` where it has one: the
   resize to the network's size, into pinned memory on CUDA), run on a background reader thread
   while this batch is estimated, rendered and written (:class:`_Reader`; ``prefetch=0``: all on
   the caller's thread, the same frames and bytes);
5. write the mp4 (and with ``save_iuv`` an ``.npz`` of every frame's detections), each to a
   temporary file renamed into place only when complete.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
import time
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from magicanimate_rt.errors import InputError
from magicanimate_rt.runtime.media import MAX_FRAME_SIDE, VideoWriter, _check_fit, _shape, fit_image, \
    iter_video_frames

#: the original's driving clips are 25 fps, and so is ``animate``'s output
DEFAULT_FPS = 25
DEFAULT_BATCH = 4
DEFAULT_FIT = "crop"
#: batches the background reader keeps ready (decoded, framed, preprocessed) ahead of the estimator
DEFAULT_PREFETCH = 2


@dataclass(frozen=True)
class PrepareSettings:
    """What :func:`prepare_driving_video` is asked to do; :meth:`check` is where every value is
    validated (the CLI's flags and the Python API alike), with the flag's name in the message.

    ``size``: None (the input's own size), a square's side, or (width, height), each even;
    ``fit``: crop, pad or stretch (used only with ``size``); ``fps``: output frames per second;
    ``start_frame``: input frames skipped (decode order); ``max_frames``: at most this many output
    frames; ``batch``: frames per ``predict`` call; ``prefetch``: batches decoded and preprocessed
    ahead on a background thread (0: none, everything on the caller's thread; the output is the
    same either way)."""

    size: int | tuple[int, int] | None = None
    fit: str = DEFAULT_FIT
    fps: float = DEFAULT_FPS
    start_frame: int = 0
    max_frames: int | None = None
    batch: int = DEFAULT_BATCH
    prefetch: int = DEFAULT_PREFETCH

    def check(self, flags: bool = False) -> "PrepareSettings":
        """Self, or InputError naming the setting (``flags``: as the CLI's flag, ``--max-frames``)."""
        def name(field: str) -> str:
            return "--" + field.replace("_", "-") if flags else field

        if self.size is not None:
            pair = isinstance(self.size, tuple) and len(self.size) == 2
            sides = (("width", self.size[0]), ("height", self.size[1])) if pair else (("size", self.size),)
            for side_name, side in sides:
                if isinstance(side, bool) or not isinstance(side, int) or side < 2 or side % 2 \
                        or side > MAX_FRAME_SIDE:
                    raise InputError(f"{name(side_name)} must be an even number of pixels (H.264's yuv420p) in "
                                     f"2..{MAX_FRAME_SIDE}, got {side!r}")
        _check_fit(self.fit)
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float, Fraction)) \
                or not math.isfinite(self.fps) or not 0 < self.fps <= 1000:
            raise InputError(f"{name('fps')} must be a number in (0, 1000], got {self.fps!r}")
        for field, value, least in (("start_frame", self.start_frame, 0), ("batch", self.batch, 1),
                                    ("prefetch", self.prefetch, 0),
                                    ("max_frames", 1 if self.max_frames is None else self.max_frames, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name(field)} must be an integer >= {least}, got {value!r}")
        return self

    @property
    def rate(self) -> Fraction:
        """``fps`` as the exact fraction the writer and the resampling use (29.97 -> 2997/100)."""
        return Fraction(self.fps).limit_denominator(1001)


@dataclass(frozen=True)
class PrepareSummary:
    """What a run did: output frames, those with no person, wall seconds, the output's shape."""

    frames: int
    no_person: int
    seconds: float
    width: int
    height: int
    input_frames: int

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")

    def describe(self) -> str:
        return (f"{self.frames} frames ({self.no_person} with no person) at {self.width}x{self.height} from "
                f"{self.input_frames} input frames in {self.seconds:.1f} s ({self.frames_per_second:.2f} frames/s)")


def resample(frames, rate: Fraction):
    """``(frame, seconds)`` pairs (presentation order, as decoded) -> the frames at ``rate`` frames per
    second, by nearest timestamp (see the module docstring); a generator, holding two frames."""
    period = 1 / Fraction(rate)
    prev = None  # (frame, time) of the latest input frame
    t0 = None
    j = 0  # the next output frame, at t0 + j * period
    last_gap = None
    for frame, t in frames:
        t = Fraction(t)
        if prev is None:
            t0 = t
        else:
            if t <= prev[1]:  # a repeated or out-of-order timestamp: keep the stream moving
                t = prev[1] + (last_gap or period)
            last_gap = t - prev[1]
            while t0 + j * period < t:
                target = t0 + j * period
                yield prev[0] if target - prev[1] <= t - target else frame
                j += 1
        prev = (frame, t)
    if prev is None:
        return
    end = prev[1] + (last_gap or period)  # the last frame lasts one frame period
    while t0 + j * period < end:
        yield prev[0]
        j += 1


def _batches(frames, n: int):
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _Reader:
    """Runs the iterator ``items`` on a thread, ``depth`` items ahead of the caller, in a bounded
    queue (memory: ``depth`` + 1 batches in flight, plus the one being estimated). An exception
    the iterator raises is raised again in the caller, as it was (InputError's one line stays one
    line). :meth:`close` (the caller done, failed or cancelled) stops the thread at its next item
    and waits for it; ``on_exit`` runs on the thread when it stops (the PyAV decoder must be closed
    by the thread that runs it)."""

    _END = object()

    def __init__(self, items, depth: int, on_exit: Callable[[], None]):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items, on_exit), name="densepose-reader",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items, on_exit) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
            self._put((True, self._END))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
            self._put((False, e))
        finally:
            on_exit()

    def __iter__(self):
        while True:
            ok, item = self._queue.get()
            if not ok:
                raise item
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # make room, so a put that is waiting sees the flag
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


class _IuvWriter:
    """Each frame's detections into an ``.npz`` (deflated), entry by entry, so memory stays one frame:
    ``num_frames``, ``fps``, ``width``, ``height``; per frame F ``f{F}_boxes`` (K, 4) float32 XYXY,
    ``f{F}_scores`` (K,), and per detection I ``f{F}_i{I}_labels`` (h, w) uint8 and ``f{F}_i{I}_uv``
    (2, h, w) float32 over the integer box ``f{F}_i{I}_box_xywh`` (the extractor's). Written to a
    temporary file beside ``path``, renamed by :meth:`commit`."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        self._zip = zipfile.ZipFile(self.tmp_path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)

    def _put(self, name: str, array) -> None:
        with self._zip.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

    def add(self, index: int, result) -> None:
        self._put(f"f{index}_boxes", np.asarray(result.boxes, np.float32))
        self._put(f"f{index}_scores", np.asarray(result.scores, np.float32))
        xywh = result.box_xywh
        for i in range(len(result)):
            self._put(f"f{index}_i{i}_box_xywh", xywh[i])
            self._put(f"f{index}_i{i}_labels", np.asarray(result.labels[i], np.uint8))
            if i < len(result.uv):
                self._put(f"f{index}_i{i}_uv", np.asarray(result.uv[i], np.float32))

    def commit(self, frames: int, fps: Fraction, width: int, height: int) -> None:
        for name, value in (("num_frames", frames), ("fps", float(fps)), ("width", width), ("height", height)):
            self._put(name, np.array(value))
        self._zip.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        try:
            self._zip.close()
        except (OSError, ValueError):
            pass  # the file is thrown away
        self.tmp_path.unlink(missing_ok=True)


def _expected_frames(path: Path, settings: PrepareSettings) -> int | None:
    """About how many frames the output will have (for the progress bar), or None if unknown."""
    try:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            seconds = float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
            rate = float(stream.average_rate or 0)
    except Exception:  # noqa: BLE001 - only the progress bar's total; the decoding reports real problems
        return None
    total = max(0, round((seconds - settings.start_frame / rate if rate else seconds) * float(settings.rate)))
    return total if settings.max_frames is None else min(total, settings.max_frames)


def prepare_driving_video(
    video: str | os.PathLike,
    output: str | os.PathLike,
    estimator,
    settings: PrepareSettings = PrepareSettings(),
    save_iuv: str | os.PathLike | None = None,
    progress: bool | Callable[[int, int | None], None] = False,
) -> PrepareSummary:
    """Write the DensePose driving video of ``video`` to ``output`` (an mp4), see the module docstring.

    ``estimator``: ``predict((N, H, W, 3) uint8 RGB) -> N results`` and ``render(result, H, W) ->
    (H, W, 3) uint8 RGB``. ``progress``: True for a tqdm bar, or a callback(frames done, expected
    total or None). Raises InputError for a bad setting or input (nothing is written then)."""
    settings = settings.check()
    video, output = Path(video), Path(output)
    save_iuv = None if save_iuv is None else Path(save_iuv)
    if save_iuv is not None and not save_iuv.parent.is_dir():
        raise InputError(f"save_iuv '{save_iuv}': directory '{save_iuv.parent}' does not exist")
    rate = settings.rate
    t_start = time.perf_counter()
    writer = VideoWriter(output, fps=rate)  # checks the output path; opens the file on the first frame
    decoded = iter_video_frames(video, start_frame=settings.start_frame, timestamps=True, opencv_colours=True)
    counted = {"input": 0}

    def counting(pairs):
        for pair in pairs:
            counted["input"] += 1
            yield pair

    frames = itertools.islice(resample(counting(decoded), rate), settings.max_frames)
    shape = None if settings.size is None else _shape(settings.size)
    total = _expected_frames(video, settings) if progress else None
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="densepose", unit="frame")
    written = no_person = 0
    first_shape = []
    prepare = getattr(estimator, "prepare", None)

    def ready_batches():
        """(frames (N, H, W, 3), what ``predict`` takes for them) per batch: steps 1-3 and ``prepare``."""
        for batch in _batches(frames, settings.batch):
            if shape is not None:
                batch = [fit_image(f, shape, settings.fit) for f in batch]
            if not first_shape:
                first_shape.append(batch[0].shape)
            for f in batch:
                if f.shape != first_shape[0]:
                    raise InputError(f"video '{video}': a frame is {f.shape[1]}x{f.shape[0]}, earlier frames are "
                                     f"{first_shape[0][1]}x{first_shape[0][0]}; give a size to frame them all alike")
            stacked = np.stack(batch)
            yield stacked, (stacked if prepare is None else prepare(stacked))

    reader = _Reader(ready_batches(), settings.prefetch, decoded.close) if settings.prefetch else None
    iuv = None
    try:
        iuv = _IuvWriter(save_iuv) if save_iuv is not None else None
        for batch, prepared in (reader if reader is not None else ready_batches()):
            results = estimator.predict(prepared)
            if len(results) != len(batch):
                raise RuntimeError(f"the estimator gave {len(results)} results for {len(batch)} frames")
            height, width = batch.shape[1:3]
            pictures = []
            for result in results:
                if iuv is not None:
                    iuv.add(written + len(pictures), result)
                no_person += len(result) == 0
                picture = estimator.render(result, height, width)
                pictures.append(picture[: height - height % 2, : width - width % 2])
            writer.write(np.stack(pictures))
            written += len(pictures)
            if bar is not None:
                bar.update(len(pictures))
            elif callable(progress):
                progress(written, total)
        if reader is not None:
            reader.close()
        decoded.close()
        if written == 0:
            raise InputError(f"video '{video}': no frames to estimate")
        out_shape = first_shape[0]
        writer.close()
        if iuv is not None:
            iuv.commit(written, rate, out_shape[1] - out_shape[1] % 2, out_shape[0] - out_shape[0] % 2)
    except BaseException:
        if reader is not None:
            reader.close()  # the thread stopped (and the decoder closed by it) before anything else
        writer.abort()
        if iuv is not None:
            iuv.abort()
        decoded.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    h, w = out_shape[:2]
    return PrepareSummary(frames=written, no_person=int(no_person), seconds=time.perf_counter() - t_start,
                          width=w - w % 2, height=h - h % 2, input_frames=counted["input"])
