"""Helpers shared by several test files (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path


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
