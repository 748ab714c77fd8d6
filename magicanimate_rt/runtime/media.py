"""Image and video input/output (REFERENCE.md section 2).

Every array here is ``uint8`` RGB in (..., H, W, 3) layout, the layout PIL and PyAV use.

- :func:`load_source_image`: the source image, RGB, made ``W x H``.
- :func:`iter_video_frames` / :func:`read_video`: the driving video's RGB frames, decoded
  with PyAV as the original does, each made ``W x H`` when it is not already;
  :func:`resize_frames` does the same to frames already in memory.
- :func:`fit_image`, :func:`content_box`, :func:`crop_frames`: how an input of another
  aspect ratio becomes ``W x H`` (``fit``: "stretch", "crop" or "pad") and where its
  content lies in the output.
- :class:`VideoWriter` / :func:`write_video`: H.264 mp4 output, written atomically.
- :func:`grid_frames`: the [source | driving | result] comparison frames.

``size`` is the output shape: an int for a square (``size x size``, the original's only
shape) or a ``(width, height)`` pair. Resizing always goes through
``PIL.Image.resize((width, height))`` with its default resampling (bicubic for RGB),
because that is what the original does (for a non-square request too) and what the
conformance data was made with. ``fit="stretch"`` (the default, the original) resizes
whatever the aspect ratio; "crop" and "pad" first cut or pad the input to the output's
aspect ratio (:func:`fit_image`).

Every problem with a user's file is raised as :class:`InputError` with a one-line message
naming the file and what is wrong.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from magicanimate_rt.errors import InputError

# Largest accepted video frame side, in pixels. A frame this big is almost certainly not a
# DensePose rendering, and decoding thousands of them would exhaust memory before anything
# useful happened. Read at call time, so it can be changed for a run (or a test).
MAX_FRAME_SIDE = 8192

# PIL modes that hold 16-bit (or wider) grey levels; PIL's own convert("RGB") clips them
# at 255 instead of scaling, so they are scaled here.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

PathLike = str | os.PathLike

try:
    import av
except ImportError:  # video files need PyAV; images and arrays do not (e.g. a GPU box without it)
    av = None


def _require_av(what: str) -> None:
    if av is None:
        raise InputError(f"{what}: reading or writing video needs PyAV, which is not installed (pip install av)")


#: how an input whose aspect ratio differs from the output's becomes W x H
FITS = ("stretch", "crop", "pad")

#: an output shape: a square's side, or (width, height)
Size = int | tuple[int, int]

#: (left, top, right, bottom) pixel box of an output frame, right/bottom exclusive
Box = tuple[int, int, int, int]


def _check_size(size: object, what: str = "size") -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"{what} must be a positive integer, got {size!r}")


def _shape(size: Size) -> tuple[int, int]:
    """(width, height) of ``size`` (an int: a square), each a positive integer."""
    if isinstance(size, tuple) and len(size) == 2:
        _check_size(size[0], "width")
        _check_size(size[1], "height")
        return size
    _check_size(size)
    return size, size


def _check_fit(fit: object) -> str:
    if fit not in FITS:
        raise InputError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    return fit


def _to_aspect(in_width: int, in_height: int, width: int, height: int, grow: bool) -> tuple[int, int]:
    """(w, h) of the input cut down (``grow`` False) or padded out (True) along one axis
    to the output's aspect ratio, rounded to whole pixels."""
    wider = in_width * height > in_height * width
    if wider == grow:  # a new height: padding a wider input, or cutting a taller one
        return in_width, max(1, (2 * in_width * height + width) // (2 * width))
    return max(1, (2 * in_height * width + height) // (2 * height)), in_height


def fit_image(rgb: np.ndarray, size: Size, fit: str = "stretch") -> np.ndarray:
    """(H0, W0, 3) uint8 -> (H, W, 3) uint8, the output shape ``size``.

    ``fit``: "stretch" resizes it as it is (the original; the aspect ratio changes if it
    differs); "crop" first cuts the centre of the output's aspect ratio out of it; "pad"
    first pads it to that aspect ratio, centred, with its edge values (``np.pad``
    ``mode="edge"``, the workaround the original's users share). Then
    ``PIL.Image.resize((W, H))`` (bicubic), unless it is already ``W x H`` (then it is
    returned as it is, not copied)."""
    width, height = _shape(size)
    _check_fit(fit)
    h0, w0 = rgb.shape[:2]
    if fit != "stretch" and w0 * height != h0 * width:
        if fit == "crop":
            cw, ch = _to_aspect(w0, h0, width, height, grow=False)
            left, top = (w0 - cw) // 2, (h0 - ch) // 2
            rgb = rgb[top : top + ch, left : left + cw]
        else:
            pw, ph = _to_aspect(w0, h0, width, height, grow=True)
            left, top = (pw - w0) // 2, (ph - h0) // 2
            rgb = np.pad(rgb, ((top, ph - h0 - top), (left, pw - w0 - left), (0, 0)), mode="edge")
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    return np.array(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height)))


def content_box(in_width: int, in_height: int, size: Size, fit: str = "stretch") -> Box:
    """Where an ``in_width x in_height`` input's own content lies in the output frame that
    :func:`fit_image` makes of it: the whole frame for "stretch" and "crop"; for "pad" the
    part that is not padding, shrunk to even coordinates (so its width and height are even,
    as H.264's yuv420p needs), at least 2 x 2. (left, top, right, bottom), right and bottom
    exclusive."""
    width, height = _shape(size)
    _check_fit(fit)
    _check_size(in_width, "input width")
    _check_size(in_height, "input height")
    if fit != "pad" or in_width * height == in_height * width:
        return 0, 0, width, height
    pw, ph = _to_aspect(in_width, in_height, width, height, grow=True)

    def span(offset: int, extent: int, padded: int, out: int) -> tuple[int, int]:
        lo = 2 * -(-offset * out // (2 * padded))  # rounded up to even
        hi = 2 * ((offset + extent) * out // (2 * padded))  # rounded down to even
        hi = min(out, max(hi, lo + 2))
        return min(lo, hi - 2), hi

    left, right = span((pw - in_width) // 2, in_width, pw, width)
    top, bottom = span((ph - in_height) // 2, in_height, ph, height)
    return left, top, right, bottom


def crop_frames(frames: np.ndarray, box: Box) -> np.ndarray:
    """(..., H, W, 3) -> the ``box`` (left, top, right, bottom) of every frame (a view)."""
    left, top, right, bottom = box
    return frames[..., top:bottom, left:right, :]


def resize_frames(frames: np.ndarray, size: Size, fit: str = "stretch") -> np.ndarray:
    """Driving frames given as an array, made ``W x H`` as :func:`read_video` does.

    Args:
        frames: (F, H0, W0, 3) uint8 RGB, F >= 1.
        size: the output shape, a square's side or (width, height).
        fit: how frames of another aspect ratio are made ``W x H`` (:func:`fit_image`).

    Returns:
        (F, H, W, 3) uint8, a new array; each frame that is not already ``W x H`` is
        fitted and resized with ``PIL.Image.resize`` (bicubic).
    """
    width, height = _shape(size)
    _check_fit(fit)
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
            or frames.shape[-1] != 3 or 0 in frames.shape:
        raise InputError(
            f"driving frames must be a non-empty (F, H, W, 3) uint8 array, got "
            f"{getattr(frames, 'shape', None)} {getattr(frames, 'dtype', type(frames).__name__)}"
        )
    if frames.shape[1:3] == (height, width):
        return frames.copy()
    return np.stack([fit_image(frame, (width, height), fit) for frame in frames])


# --------------------------------------------------------------------------- images


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 RGB, alpha dropped (not composited)."""
    mode = image.mode
    if mode in _WIDE_GREY_MODES:
        # 16-bit grey: map 0..65535 onto 0..255 with rounding (v * 255 / 65535). Mode "I"
        # (32-bit) is what older Pillows open 16-bit PNGs as; values outside 16 bits clip.
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        # Going through RGBA avoids PIL's warning about palette transparency; the alpha
        # channel is then dropped like any other.
        image = image.convert("RGBA")
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as error:
        raise InputError(f"source image {name}: cannot convert mode {mode!r} to RGB ({error})") from None
    return np.array(rgb)


def _open_image_file(path: Path) -> Image.Image:
    """Open and fully decode an image file, turning every failure into InputError."""
    if not path.exists():
        raise InputError(f"source image '{path}': no such file")
    if not path.is_file():
        raise InputError(f"source image '{path}': not a regular file")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat both as fatal
            # so an oversized image never gets decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                # A copy is detached from the file, which the with-block then closes.
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"source image '{path}': too large, more than the {limit} pixel limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS)"
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"source image '{path}': not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as error:
        # Truncated or corrupt files fail in load() with OSError (or SyntaxError for some
        # plugins); the message says which.
        raise InputError(f"source image '{path}': unreadable ({error})") from None


def load_source_image(source: PathLike | Image.Image | np.ndarray, size: Size, fit: str = "stretch") -> np.ndarray:
    """The source image as the model sees it: RGB, ``W x H``.

    Args:
        source: a file path (str or path-like), a ``PIL.Image.Image``, or a uint8 array of
            shape (H, W, 3) (RGB) or (H, W, 4) (RGBA).
        size: the output shape, a square's side (the original's default is 512) or
            (width, height).
        fit: how an image of another aspect ratio is made ``W x H`` (:func:`fit_image`).

    Returns:
        (H, W, 3) uint8 RGB. Alpha is dropped, grey is replicated to three channels,
        16-bit grey is scaled to 8 bits (16-bit colour PNGs are reduced to 8 bits by PIL,
        which keeps the high byte). The image is resized with
        ``PIL.Image.resize((W, H))`` (bicubic) only when it is not already that size.
        EXIF orientation is not applied.

    Raises:
        InputError: missing file, not an image, unreadable, larger than PIL's
            decompression-bomb limit, or an array of the wrong shape or dtype.
    """
    _shape(size)
    _check_fit(fit)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] not in (3, 4):
            raise InputError(
                f"source image array must be (H, W, 3) or (H, W, 4) uint8, "
                f"got shape {source.shape} dtype {source.dtype}"
            )
        if source.shape[0] == 0 or source.shape[1] == 0:
            raise InputError(f"source image array is empty, shape {source.shape}")
        # A copy, so the result never aliases the caller's array.
        rgb = np.array(source[:, :, :3])
    elif isinstance(source, Image.Image):
        try:
            source.load()
        except OSError as error:
            raise InputError(f"source image (PIL image): unreadable ({error})") from None
        rgb = _pil_to_rgb(source, "(PIL image)")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        rgb = _pil_to_rgb(_open_image_file(path), f"'{path}'")
    else:
        raise InputError(
            f"source image must be a path, a PIL image or a uint8 array, got {type(source).__name__}"
        )
    return fit_image(rgb, size, fit)


# --------------------------------------------------------------------------- reading video


def _check_frame_side(path: Path, width: int, height: int, where: str) -> None:
    limit = MAX_FRAME_SIDE
    if width > limit or height > limit:
        raise InputError(
            f"driving video '{path}': {where} is {width}x{height}, larger than the "
            f"{limit} px per side limit"
        )


def iter_video_frames(
    path: PathLike,
    size: Size | None = None,
    start_frame: int = 0,
    max_frames: int | None = None,
    fit: str = "stretch",
    timestamps: bool = False,
    opencv_colours: bool = False,
) -> Iterator[np.ndarray]:
    """Decode a video's frames one at a time, so long videos can be streamed.

    Args:
        path: the video file (any container and codec PyAV's FFmpeg can decode).
        size: when given (a square's side or (width, height)), every frame that is not
            ``W x H`` is made so by :func:`fit_image` (``fit``; "stretch": resized with
            ``PIL.Image.resize``, bicubic). The original tests only the first frame's
            height; testing each frame's height and width gives the same result on every
            video the original can use, and ``W x H`` frames on the rest.
        start_frame: index (0-based, in decode order of the first video stream) of the
            first frame to yield; earlier frames are decoded and dropped, because seeking
            lands on keyframes and would not give exact frames.
        max_frames: yield at most this many frames (None: until the end).
        timestamps: yield ``(frame, seconds)`` pairs instead, ``seconds`` a Fraction: the frame's
            presentation time (pts x the stream's time base), or, for a frame without a pts, its
            index over the stream's average rate.
        opencv_colours: convert YUV to RGB with the BT.601 matrix whatever the stream's colour tag,
            as OpenCV's ``cv2.VideoCapture`` does (what vid2densepose and detectron2's tools read
            with): the person video's frames then equal OpenCV's bit for bit. PyAV otherwise follows
            the tag (BT.709 on most HD video), ~1 level off on average and up to ~12.

    Returns:
        An iterator of (H, W, 3) uint8 RGB frames (``frame.to_ndarray(format="rgb24")``, as
        the original), of the shape ``size`` when it is given. The file is opened here, so
        a missing file, a non-video or a video without a video stream fails at once; the
        file is closed when the iteration ends or the iterator is closed or collected.

    Raises:
        InputError: bad arguments, missing file, not a video, no video stream, a stream
            larger than MAX_FRAME_SIDE (at once); while iterating: a frame larger than
            MAX_FRAME_SIDE, a stream that turns out corrupt part way (the message says
            after how many frames), or no frame to yield (empty stream, or start_frame
            past the end).
    """
    if size is not None:
        _shape(size)
    _check_fit(fit)
    if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
        raise InputError(f"start_frame must be a non-negative integer, got {start_frame!r}")
    if max_frames is not None:
        _check_size(max_frames, "max_frames")
    path = Path(path)
    if not path.exists():
        raise InputError(f"driving video '{path}': no such file")
    if not path.is_file():
        raise InputError(f"driving video '{path}': not a regular file")
    _require_av(f"driving video '{path}'")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError) as error:
        raise InputError(f"driving video '{path}': not a video file FFmpeg can read ({error})") from None
    try:
        if not container.streams.video:
            raise InputError(f"driving video '{path}': has no video stream")
        stream = container.streams.video[0]
        _check_frame_side(path, stream.codec_context.width, stream.codec_context.height, "the stream")
    except BaseException:
        container.close()
        raise
    # PyAV's default (slice) threading, as the original: frame threading would save about
    # 0.3 ms a frame at 512x512, but holds frames in flight, so a corrupt packet would be
    # reported frames before the last good one.
    return _decode_frames(path, container, stream, size, start_frame, max_frames, fit, timestamps, opencv_colours)


def _frame_seconds(frame, stream, index: int) -> Fraction:
    if frame.pts is not None and stream.time_base is not None:
        return frame.pts * stream.time_base
    rate = stream.average_rate or stream.guessed_rate or 25
    return Fraction(index) / Fraction(rate)


def _decode_frames(path, container, stream, size, start_frame, max_frames, fit, timestamps=False,
                   opencv_colours=False) -> Iterator[np.ndarray]:
    """The generator behind :func:`iter_video_frames`; owns and closes ``container``."""
    try:
        decoded = 0  # frames decoded so far, including skipped ones
        yielded = 0
        frames = container.decode(stream)
        while max_frames is None or yielded < max_frames:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.FFmpegError as error:
                raise InputError(
                    f"driving video '{path}': corrupt stream after {decoded} decoded frames ({error})"
                ) from None
            _check_frame_side(path, frame.width, frame.height, f"frame {decoded}")
            decoded += 1
            if decoded <= start_frame:
                continue
            if opencv_colours:
                rgb = frame.reformat(format="rgb24", src_colorspace="ITU601").to_ndarray()
            else:
                rgb = frame.to_ndarray(format="rgb24")
            rgb = rgb if size is None else fit_image(rgb, size, fit)
            yield (rgb, _frame_seconds(frame, stream, decoded - 1)) if timestamps else rgb
            yielded += 1

        if yielded == 0:
            if decoded == 0:
                raise InputError(f"driving video '{path}': contains no frames")
            raise InputError(
                f"driving video '{path}': has {decoded} frames, nothing from start_frame={start_frame}"
            )
    finally:
        container.close()


def read_video(
    path: PathLike,
    size: Size | None = None,
    start_frame: int = 0,
    max_frames: int | None = None,
    fit: str = "stretch",
) -> np.ndarray:
    """All requested frames of a video in memory: (F, H, W, 3) uint8 RGB.

    Same arguments, resizing and errors as :func:`iter_video_frames`, which it consumes.
    Without ``size``, frames of different sizes within one video are an InputError.
    """
    frames = list(iter_video_frames(path, size=size, start_frame=start_frame, max_frames=max_frames, fit=fit))
    first = frames[0].shape
    for index, frame in enumerate(frames):
        if frame.shape != first:
            raise InputError(
                f"driving video '{path}': frame {start_frame + index} is {frame.shape[1]}x{frame.shape[0]}, "
                f"earlier frames are {first[1]}x{first[0]}; pass size= to resize them"
            )
    return np.stack(frames)


def driving_frames(
    driving: PathLike | np.ndarray,
    size: Size,
    start_frame: int = 0,
    max_frames: int | None = None,
    fit: str = "stretch",
) -> tuple[np.ndarray, Box]:
    """The driving frames of a request, made ``W x H``, and where their own content lies in
    that frame (:func:`content_box`; the whole frame unless ``fit="pad"`` padded them).

    ``driving``: a video path (read by :func:`read_video`) or an (F, H0, W0, 3) uint8 array
    (:func:`resize_frames`), of which frames ``start_frame`` .. ``start_frame + max_frames``
    are used."""
    width, height = _shape(size)
    if isinstance(driving, (str, os.PathLike)):
        frames = read_video(driving, size=size, start_frame=start_frame, max_frames=max_frames, fit=fit)
        if fit != "pad":
            return frames, (0, 0, width, height)
        first = next(iter_video_frames(driving, start_frame=start_frame, max_frames=1))  # at its own size
        return frames, content_box(first.shape[1], first.shape[0], size, fit)
    arr = np.asarray(driving)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError(f"driving frames must be an (F, H, W, 3) uint8 array, got {arr.shape} {arr.dtype}")
    arr = arr[start_frame:]
    if max_frames is not None:
        arr = arr[:max_frames]
    if arr.shape[0] == 0:
        raise InputError("driving video has no frames")
    return resize_frames(arr, size, fit), content_box(arr.shape[2], arr.shape[1], size, fit)


# --------------------------------------------------------------------------- writing video


def _video_codec() -> str:
    """libx264 (H.264), which PyAV's wheels bundle. Only an FFmpeg built without it (some
    distribution builds drop GPL encoders) falls back to MPEG-4 part 2, still in mp4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class VideoWriter:
    """Writes an mp4 (H.264, yuv420p) frame by frame or chunk by chunk, atomically.

    The video goes to a hidden temporary file beside ``path`` (``.NAME.tmp-PID.mp4``),
    renamed onto ``path`` only by a successful :meth:`close`. An exception inside the
    ``with`` block, or :meth:`abort`, deletes the temporary file: ``path`` is then left as
    it was (absent, or the previous complete video).

    Args:
        path: output file; its directory must exist. An existing file is replaced.
        fps: frames per second (the original writes 25).
        crf: libx264 constant rate factor, 0 (lossless) .. 51 (worst); 18 is visually
            near-lossless at a modest size. Ignored by the mpeg4 fallback.
        threads: encoder threads; 1 (default: equal frames far more often give equal files),
            0 lets libx264 choose (faster on many cores).

    Usage::

        with VideoWriter("out.mp4") as writer:
            for chunk in chunks:          # (N, H, W, 3) or (H, W, 3) uint8 RGB
                writer.write(chunk)

    The frame size is fixed by the first frame; width and height must be even (yuv420p
    stores colour at half resolution).
    """

    def __init__(self, path: PathLike, fps: int | float | Fraction = 25, crf: int = 18, threads: int = 1) -> None:
        self.path = Path(path)
        if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not 0 < fps <= 1000:
            raise InputError(f"fps must be a number in (0, 1000], got {fps!r}")
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
            raise InputError(f"crf must be an integer in 0..51, got {crf!r}")
        if not self.path.parent.is_dir():
            raise InputError(f"output video '{self.path}': directory '{self.path.parent}' does not exist")
        if self.path.is_dir():
            raise InputError(f"output video '{self.path}': is a directory")
        # A float rate like 29.97 becomes 2997/100, not a 52-bit binary fraction.
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise InputError(f"threads must be an integer >= 0 (0: the encoder's automatic count), got {threads!r}")
        self.threads = threads
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}.mp4")
        self.frames_written = 0
        self._container = None  # opened on the first frame, when the size is known
        self._stream = None
        self._finished = False

    # -- lifecycle

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_finished", True) or getattr(self, "_container", None) is None:
            return
        warnings.warn(
            f"VideoWriter for '{self.path}' was never closed; its partial output is deleted",
            ResourceWarning,
            stacklevel=2,
        )
        self.abort()

    def _open(self, height: int, width: int) -> None:
        _require_av(f"video '{self.path}'")
        codec = _video_codec()
        # faststart puts the index at the front, so the file plays while it downloads.
        self._container = av.open(str(self.tmp_path), mode="w", format="mp4", options={"movflags": "+faststart"})
        options = {"crf": str(self.crf)} if codec == "libx264" else {}
        stream = self._container.add_stream(codec, rate=self.fps, options=options)
        # One encoder thread by default: with libx264's automatic threads the same 12 frames gave
        # one of two files (up to 11 levels apart decoded) in ~1 of 5 encodes on a loaded 2-core
        # machine (issue 25); with one thread 60 encodes in fresh processes gave one file, though
        # a full test run still saw two, so equal bytes are likely, not guaranteed (tests compare
        # decoded frames within H.264's tolerance, or the frames given to the writer). Encoding is
        # a small part of a request; threads=0 gives libx264's automatic count for speed.
        stream.codec_context.thread_count = self.threads
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        if codec != "libx264":
            # mpeg4 has no crf; a generous bit rate keeps DensePose edges readable.
            stream.bit_rate = int(width * height * float(self.fps) * 0.5)
        stream.codec_context.time_base = 1 / self.fps
        self._stream = stream

    def write(self, frames: np.ndarray) -> None:
        """Append one frame (H, W, 3) or a chunk (N, H, W, 3) of uint8 RGB frames."""
        if self._finished:
            raise RuntimeError(f"VideoWriter for '{self.path}' is already closed")
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim not in (3, 4) \
                or frames.shape[-1] != 3:
            raise InputError(
                f"output video '{self.path}': frames must be (H, W, 3) or (N, H, W, 3) uint8, got "
                f"{getattr(frames, 'shape', None)} {getattr(frames, 'dtype', type(frames).__name__)}"
            )
        chunk = frames[None] if frames.ndim == 3 else frames
        height, width = chunk.shape[1:3]
        if self._stream is None:
            if height < 2 or width < 2 or height % 2 or width % 2:
                raise InputError(
                    f"output video '{self.path}': frame size {width}x{height} must be even "
                    f"(yuv420p halves the colour resolution)"
                )
            self._open(height, width)
        elif (height, width) != (self._stream.height, self._stream.width):
            raise InputError(
                f"output video '{self.path}': frame size {width}x{height} differs from the "
                f"first frame's {self._stream.width}x{self._stream.height}"
            )
        for rgb in chunk:
            # rgb24 -> yuv420p said in full (BT.601, limited range, bilinear chroma: what the
            # encoder's implicit conversion does), so the file does not hang on PyAV's defaults
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
                format="yuv420p", src_colorspace="ITU601", dst_colorspace="ITU601", interpolation="BILINEAR",
                dst_color_range="MPEG")
            frame.pts = self.frames_written
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder, finish the file and rename it onto ``path``.

        Raises InputError if no frame was written (there is nothing to save); the
        temporary file is deleted in that case and on any error here.
        """
        if self._finished:
            return
        if self.frames_written == 0:
            self.abort()
            raise InputError(f"output video '{self.path}': no frames were written")
        try:
            for packet in self._stream.encode():  # flush: the encoder holds frames back
                self._container.mux(packet)
            self._container.close()
            self._container = None
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._finished = True

    def abort(self) -> None:
        """Stop writing and delete the temporary file; ``path`` is not touched."""
        self._finished = True
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except (av.error.FFmpegError, OSError):
                pass  # the file is being thrown away; a failure to finish it is moot
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass


def write_video(path: PathLike, frames: np.ndarray, fps: int | float | Fraction = 25) -> None:
    """Write (N, H, W, 3) uint8 RGB frames to an mp4 at ``path`` (see :class:`VideoWriter`)."""
    with VideoWriter(path, fps=fps) as writer:
        writer.write(frames)


# --------------------------------------------------------------------------- grid


def grid_frames(source: np.ndarray, driving: np.ndarray, result: np.ndarray, padding: int = 2) -> np.ndarray:
    """Side-by-side comparison frames [source | driving | result], laid out as the
    original's ``torchvision.utils.make_grid(nrow=6, padding=2)`` lays out its three panels:
    a ``padding``-pixel black border around and between them.

    Args:
        source: (H, W, 3) uint8, repeated on every frame.
        driving: (F, H, W, 3) uint8, the (resized) driving frames.
        result: (F, H, W, 3) uint8, the animation.

    Returns:
        (F, H + 2p, 3W + 4p, 3) uint8 (p = padding; even for even H and W, as yuv420p
        needs: every output shape, a multiple of 64, is). Works on any chunk of frames (F
        may be a slice of the video).
    """
    for name, array, ndim in (("source", source, 3), ("driving", driving, 4), ("result", result, 4)):
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != ndim \
                or array.shape[-1] != 3:
            raise InputError(
                f"grid_frames: {name} must be a uint8 array of {ndim} dims ending in 3 channels, got "
                f"{getattr(array, 'shape', None)} {getattr(array, 'dtype', type(array).__name__)}"
            )
    if driving.shape != result.shape or driving.shape[1:] != source.shape:
        raise InputError(
            f"grid_frames: shapes do not match: source {source.shape}, driving {driving.shape}, "
            f"result {result.shape} (expected (H, W, 3), (F, H, W, 3), (F, H, W, 3))"
        )
    frames, height, width = driving.shape[:3]
    p = padding
    grid = np.zeros((frames, height + 2 * p, 3 * width + 4 * p, 3), dtype=np.uint8)
    for k, panel in enumerate((source, driving, result)):
        x = p + k * (width + p)
        grid[:, p : p + height, x : x + width] = panel  # source broadcasts over frames
    return grid
