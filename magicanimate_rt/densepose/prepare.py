"""One step from a person video to a driving video: :func:`cached_driving_video` prepares the
DensePose clip of an ordinary video (:func:`~.video.prepare_driving_video`) once and keeps it in the
cache directory, keyed by content, so that ``animate --densepose-weights`` (and
``AnimationPipeline.animate(..., densepose_weights=)``) rerun on the same video skip estimation.

The key is the sha256 of: a format tag (:data:`CACHE_VERSION`, bumped when the estimator's output
changes), the input video's bytes, the weights file's bytes, the settings that change the clip
(size, fit, fps, start frame, max frames; not the batch, which changes no pixel) and the estimator's
device type and dtype (float16 on CUDA draws a few boundary pixels differently from float32). The
clip is ``cache_dir()/densepose/<key>.mp4``, written to a temporary file and renamed when complete
(the video writer's own atomic write), so a stopped run leaves no entry and two runs at once each
write a whole file.

Hashing a 256 MB checkpoint costs about a second on every run, so the weights' digest is itself
remembered in ``cache_dir()/densepose/weights-digests.json`` by (resolved path, size, mtime in ns):
a file replaced in place gets a new mtime and is hashed again. The video is hashed every run (it is
what the user changes).

From an engine directory (``engines=``, ``animate --person-video --engines DIR``) the weights' digest
is replaced by the content hash of the directory's DensePose section (it records every graph's
sha256) and the key names the backend that runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from magicanimate_rt.errors import InputError

from .video import PrepareSettings, prepare_driving_video

#: part of every key: bump it when the estimator's or the renderer's output changes
CACHE_VERSION = "densepose-clip-1"
_CHUNK = 1 << 20


def densepose_cache_dir(root: Optional[os.PathLike] = None) -> Path:
    """Where the clips and the weights' digests live: ``root`` or ``cache_dir()/densepose``."""
    if root is not None:
        return Path(root)
    from magicanimate_rt.layout import cache_dir

    return cache_dir() / "densepose"


def file_digest(path: Path, what: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks; InputError naming ``what`` if unreadable."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except IsADirectoryError:
        raise InputError(f"{what} '{path}': is a directory") from None
    except FileNotFoundError:
        raise InputError(f"{what} '{path}': file not found") from None
    except OSError as e:
        raise InputError(f"{what} '{path}': cannot be read ({e.strerror or e})") from None
    return h.hexdigest()


def weights_digest(path: Path, directory: Path) -> str:
    """The weights file's sha256, remembered by (resolved path, size, mtime_ns) in
    ``directory/weights-digests.json`` so a 256 MB checkpoint is hashed once, not every run."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return file_digest(path, "densepose weights")  # raises the one line
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = directory / "weights-digests.json"
    try:
        memo = json.loads(memo_path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(ident), str):
        return memo[ident]
    digest = file_digest(path, "densepose weights")
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{path.resolve()}|")}
    memo[ident] = digest
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f".{memo_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
        os.replace(tmp, memo_path)
    except OSError:
        pass  # only a memo: the next run hashes again
    return digest


def clip_key(video_digest: str, weights_sha: str, settings: PrepareSettings, device: str, dtype: str,
             backend: Optional[str] = None) -> str:
    """The cache key of a clip (see the module docstring); ``settings`` checked, batch left out.
    From an engine directory, ``weights_sha`` is its DensePose stages' content hash and ``backend``
    what runs them (ONNX Runtime and PyTorch draw a few boundary pixels differently)."""
    import torch

    from .estimator import parse_dtype

    described = {
        "version": CACHE_VERSION, "video": video_digest, "weights": weights_sha,
        "size": list(settings.size) if isinstance(settings.size, tuple) else settings.size,
        "fit": settings.fit if settings.size is not None else None,  # fit changes nothing without a size
        "fps": str(settings.rate), "start_frame": settings.start_frame, "max_frames": settings.max_frames,
        "device": torch.device(device).type, "dtype": str(parse_dtype(dtype)).removeprefix("torch."),
    }
    if backend is not None:
        described["backend"] = backend
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class EstimatorCache:
    """Loaded estimators kept warm between clips: a service worker's (``serve/jobs.py``), so a
    person job after the first skips reading and building the 256 MB checkpoint (2-4 s). Keyed by
    what the estimator is made of (the weights file's resolved path, size and mtime, or the engine
    directory's DensePose content hash and backend) and its device and dtype; holds at most ``size``
    of them (the least recently used goes). :meth:`clear` frees them (the worker closing)."""

    def __init__(self, size: int = 1):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, load: Callable[[], object]):
        """The estimator under ``key``, made by ``load()`` (and kept) when there is none."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        estimator = load()
        with self._lock:
            self._items[key] = estimator
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return estimator

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def cached_driving_video(
    video: str | os.PathLike,
    weights: str | os.PathLike | None,
    settings: PrepareSettings = PrepareSettings(),
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Optional[str | os.PathLike] = None,
    progress: bool | Callable[[int, int | None], None] = False,
    log: Optional[Callable[[str], None]] = None,
    engines: Optional[str | os.PathLike] = None,
    backend: str = "onnxruntime",
    estimators: Optional[EstimatorCache] = None,
) -> Path:
    """The DensePose driving clip of the person video ``video`` (a path in the cache): the cached
    one when this video, weights file, settings and precision were prepared before ("cached" in the
    log line), else estimated now (weights read safely and checked first) and stored. With
    ``engines`` instead of ``weights``: the engine directory's DensePose stages run by ``backend``
    (``DensePoseEstimator.from_engines``), keyed by their content hash (``dtype``: their float32).
    ``estimators``: where a loaded estimator is kept for the next call (a service worker's cache).

    Bad input raises InputError (one line: the video unreadable or without frames, the weights
    missing, truncated, unsafe or of another model); nothing is written to the cache then."""
    from .estimator import parse_dtype

    if (weights is None) == (engines is None):
        raise InputError("a person video needs the DensePose weights or an engine directory with the DensePose "
                         "stages (one of them)")
    settings = settings.check()
    try:
        parse_dtype(dtype)
    except ValueError as e:
        raise InputError(str(e)) from None
    say = log or (lambda msg: None)
    video = Path(video)
    directory = densepose_cache_dir(cache_dir)
    if engines is not None:
        from magicanimate_rt.engines.densepose import read_densepose

        dtype = "float32"
        model_sha, backend_key = "engines:" + read_densepose(engines).content_hash(), backend
    else:
        weights = Path(weights)
        model_sha, backend_key = weights_digest(weights, directory), None
    key = clip_key(file_digest(video, "video"), model_sha, settings, device, dtype, backend_key)
    clip = directory / f"{key}.mp4"
    if clip.is_file():
        say(f"densepose: cached clip {clip} for {video}")
        return clip
    from magicanimate_rt.runtime.media import iter_video_frames

    frames = iter_video_frames(video, start_frame=settings.start_frame, max_frames=1)
    try:
        next(frames)  # not a video, or no frame from start_frame on: one line, before the weights load
    except StopIteration:
        raise InputError(f"video '{video}': no frames to estimate") from None
    finally:
        frames.close()
    from .estimator import DensePoseEstimator

    def load():
        t0 = time.perf_counter()
        if engines is not None:
            estimator = DensePoseEstimator.from_engines(engines, backend=backend, device=device)
            say(f"densepose: loaded the DensePose stages of {engines} ({backend}) in "
                f"{time.perf_counter() - t0:.1f} s")
            return estimator
        from .model import resnet_depth, validate_state_dict
        from .weights import read_checkpoint

        state = read_checkpoint(weights)
        depth = resnet_depth(validate_state_dict(state, weights)[1])
        estimator = DensePoseEstimator.from_state_dict(state, weights, device=device, dtype=dtype)
        del state
        say(f"densepose: loaded DensePose R-CNN {depth} FPN from {weights} in {time.perf_counter() - t0:.1f} s")
        return estimator

    if estimators is None:
        estimator = load()
    else:
        if engines is not None:
            made_of = ("engines", str(Path(engines).resolve()), model_sha, backend)
        else:
            st = weights.stat()
            made_of = ("weights", str(weights.resolve()), st.st_size, st.st_mtime_ns)
        estimator = estimators.get((*made_of, str(device), str(dtype)), load)
    directory.mkdir(parents=True, exist_ok=True)
    summary = prepare_driving_video(video, clip, estimator, settings, progress=progress)
    say(f"densepose: prepared {clip} from {video}: {summary.describe()}")
    return clip


def person_video_settings(start_frame: int = 0, max_frames: Optional[int] = None) -> PrepareSettings:
    """What ``animate --densepose-weights`` prepares: the input's own size (as vid2densepose; the
    animation's own fit and size then frame the clip as they frame any driving video), 25 fps,
    from ``start_frame`` (input frames) for at most ``max_frames`` frames (the animation's own)."""
    return replace(PrepareSettings(), start_frame=start_frame, max_frames=max_frames)
