"""What ``magicanimate-rt serve`` is told: models, devices, limits, storage and the key.

Checked here once, before the server binds a port: every problem is one line naming the
flag (``InputError``), and the command exits 2.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..engines.specs import MAX_SIZE
from ..errors import InputError


@dataclass(frozen=True)
class ServeSettings:
    """Fields:
        models / engines: one of them: a model directory (real layout) or an engine directory.
        backend: the stage backend (default torch with ``models``, onnxruntime with ``engines``).
        devices: one worker per entry ("cpu", "cuda:0", ...), each with its own warm pipeline.
        dtype: the stages' dtype (``models`` only).
        gpu_memory_gb: device memory each worker's requests may use, weights included
            (``--gpu-memory-gb``, ``runtime/residency.py``; None: what the device has).
        data_dir: uploads, the SQLite job store and the results.
        max_queue: jobs that may wait (running ones not counted); more get 429.
        max_upload_bytes: the largest request body; more get 413.
        max_frames: driving frames a job may animate.
        max_steps / max_side: the largest ``steps`` and output side a job may ask for (422).
        keep_hours: finished jobs, their results and unused references older than this are deleted.
        api_key: when set, every request but ``/healthz`` and the page's static files needs
            ``Authorization: Bearer <key>``.
        shutdown_grace_s: on SIGTERM, how long running jobs may go on before they are
            cancelled at their next step boundary (0: at once).
        examples_dir: extra example images and videos the page offers (besides the built-in one).
    """

    models: Optional[Path] = None
    engines: Optional[Path] = None
    backend: Optional[str] = None
    devices: tuple[str, ...] = ("cpu",)
    dtype: str = "float32"
    gpu_memory_gb: Optional[float] = None
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("magicanimate-data")
    max_queue: int = 16
    max_upload_bytes: int = 200 * 2**20
    max_frames: int = 1024
    max_steps: int = 100
    max_side: int = 1024
    keep_hours: float = 24.0
    api_key: Optional[str] = field(default=None, repr=False)
    shutdown_grace_s: float = 0.0
    examples_dir: Optional[Path] = None

    @property
    def backend_name(self) -> str:
        return self.backend or ("torch" if self.models is not None else "onnxruntime")

    def check(self) -> "ServeSettings":
        """Raise InputError naming the first bad flag."""
        if (self.models is None) == (self.engines is None):
            raise InputError("give exactly one of --models DIR or --engines DIR")
        where = self.models if self.models is not None else self.engines
        flag = "--models" if self.models is not None else "--engines"
        if not Path(where).is_dir():
            raise InputError(f"{flag} {where}: directory not found")
        if not self.devices:
            raise InputError("--devices: give at least one device")
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            raise InputError(f"--gpu-memory-gb must be a number of GiB > 0, got {self.gpu_memory_gb!r}")
        for d in self.devices:
            if d != "cpu" and not (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
                raise InputError(f"--devices: {d!r} is not cpu, cuda or cuda:N")
        if not 1 <= self.port <= 65535:
            raise InputError(f"--port must be in 1..65535, got {self.port}")
        for name, value, low in (("--max-queue", self.max_queue, 0), ("--max-frames", self.max_frames, 1),
                                 ("--max-steps", self.max_steps, 1), ("--max-side", self.max_side, 64)):
            if value < low:
                raise InputError(f"{name} must be >= {low}, got {value}")
        if self.max_side > MAX_SIZE:
            raise InputError(f"--max-side must be <= {MAX_SIZE}, got {self.max_side}")
        if not self.max_upload_bytes > 0:
            raise InputError(f"--max-upload-mb must be > 0, got {self.max_upload_bytes / 2**20:g}")
        if not self.keep_hours > 0:
            raise InputError(f"--keep-hours must be > 0, got {self.keep_hours:g}")
        if self.shutdown_grace_s < 0:
            raise InputError(f"--shutdown-grace must be >= 0, got {self.shutdown_grace_s:g}")
        if not is_loopback(self.host) and self.api_key is None:
            raise InputError(f"--host {self.host} is not a loopback address: give --api-key-file, so that "
                             "requests from the network need a key")
        if self.examples_dir is not None and not Path(self.examples_dir).is_dir():
            raise InputError(f"--examples-dir {self.examples_dir}: directory not found")
        data = Path(self.data_dir)
        if data.exists() and not data.is_dir():
            raise InputError(f"--data-dir {data}: exists and is not a directory")
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--data-dir {data}: cannot create it ({e.strerror or e})") from None
        if not os.access(data, os.W_OK):
            raise InputError(f"--data-dir {data}: not writable")
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: Path) -> str:
    """The key in ``path`` (its first line, stripped); InputError if unreadable, empty or short."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"--api-key-file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InputError(f"--api-key-file {path}: not UTF-8 text") from None
    lines = text.strip().splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < 16:
        raise InputError(f"--api-key-file {path}: the key must be at least 16 characters on the first line")
    return key
