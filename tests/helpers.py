"""Helpers shared by several test files (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of the directory tree ``src`` whose files are symlinks (cheap); replace one
    file with a real one to damage it without touching ``src``."""
    for p in sorted(src.rglob("*")):
        q = dst / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
        else:
            q.parent.mkdir(parents=True, exist_ok=True)
            q.symlink_to(p.resolve())
    return dst


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` (a symlink into shared data, or a file) with ``data``."""
    path.unlink()
    path.write_bytes(data)


def record_writes(mp) -> dict[Path, list[np.ndarray]]:
    """The frames every VideoWriter is given, by output path (``mp``: a pytest
    MonkeyPatch). x264 does not always encode
    the same frames to the same bytes (its threads: a mean difference of ~0.5/255 on the
    noise-like frames of the random tiny set), so "the same video" is checked on the frames
    given to the writer, and on the decoded files within that noise."""
    from magicanimate_rt.runtime.media import VideoWriter

    given: dict[Path, list[np.ndarray]] = {}
    write = VideoWriter.write

    def recording(self, frames):
        given.setdefault(self.path.resolve(), []).append(np.array(frames))
        return write(self, frames)

    mp.setattr(VideoWriter, "write", recording)
    return given
