"""Stage timing: the one helper every timing goes through.

On the CPU a stage's time is wall-clock around the call. On CUDA the helper records
events on the current stream and resolves them once, at the end (``totals()``), so timing
never synchronises the host inside the denoising loop. Stages are labelled with the one
vocabulary of ``stage_names.py`` (:data:`LABELS`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from ..stage_names import TIMER_LABELS

#: the labels ``StageTimer.stage`` is called with (tests/test_loop.py checks every call site)
LABELS = TIMER_LABELS


class StageTimer:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._cpu: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, object, object]] = []

    @contextmanager
    def stage(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu[name] += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        """Seconds per stage (synchronises once on CUDA)."""
        out = dict(self._cpu)
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        return out
