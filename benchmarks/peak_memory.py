"""Peak memory of one request, measured in the process that runs it.

CPU: the kernel's resident-set high-water mark ``VmHWM`` (``/proc/self/status``), reset
just before the request (``/proc/self/clear_refs`` <- "5", after ``malloc_trim`` hands
freed heap back to the system), read just after: the peak RSS of that request alone, with
the weights and everything already loaded counted in its baseline. Where that is not
possible (not Linux), a thread samples RSS every 5 ms instead.
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from contextlib import contextmanager

import torch

_STATUS = "/proc/self/status"


def _status_kib(field: str):
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Result of :func:`measure`: bytes before the request and at its peak."""

    def __init__(self):
        self.method = ""
        self.baseline = 0
        self.peak = 0

    @property
    def working(self) -> int:
        """Peak above what was resident before the request."""
        return max(0, self.peak - self.baseline)

    def as_dict(self) -> dict:
        return {"method": self.method, "baseline_bytes": self.baseline, "peak_bytes": self.peak,
                "working_bytes": self.working}


@contextmanager
def measure(device: torch.device):
    """``with measure(device) as m: ...`` then ``m.peak``, ``m.baseline``, ``m.working``."""
    m = PeakMemory()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        m.method = "cuda max_memory_allocated"
        m.baseline = torch.cuda.memory_allocated(device)
        yield m
        torch.cuda.synchronize(device)
        m.peak = torch.cuda.max_memory_allocated(device)
        return
    _trim()
    if _reset_hwm():
        m.method = "VmHWM reset per request"
        m.baseline = rss_bytes()
        yield m
        m.peak = _status_kib("VmHWM") * 1024
        return
    m.method = "RSS sampled every 5 ms"
    m.baseline = rss_bytes()
    stop = threading.Event()
    peak = [m.baseline]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield m
    finally:
        stop.set()
        th.join()
        m.peak = max(peak[0], rss_bytes())
