"""Prometheus metrics of the service, on a registry of its own (``GET /metrics``).

- ``magicanimate_queue_depth``: jobs waiting;
- ``magicanimate_jobs{status}``: jobs in the store by status (read at scrape time);
- ``magicanimate_job_seconds{phase}``: histograms of queue wait, run time and (person videos) the
  DensePose clip's time within the run;
- ``magicanimate_step_seconds``: histogram of denoising step time;
- ``magicanimate_worker_memory_bytes{worker,kind}``: the process's resident memory, and
  each CUDA worker's allocated and peak device memory;
- ``magicanimate_http_requests_total{method,route,code}``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: seconds: from a tiny CPU job (~1 s) to SD 1.5 clips on the CPU (hours)
JOB_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def resident_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``; 0 where there is none)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Collector:
    """Values read at scrape time: the queue, the store's counts, the memory."""

    def __init__(self, queue_depth: Callable[[], int], counts: Callable[[], dict[str, int]],
                 devices: Callable[[], list[tuple[str, str]]]):
        self.queue_depth, self.counts, self.devices = queue_depth, counts, devices

    def collect(self):
        q = GaugeMetricFamily("magicanimate_queue_depth", "Jobs waiting for a worker")
        q.add_metric([], self.queue_depth())
        yield q
        jobs = GaugeMetricFamily("magicanimate_jobs", "Jobs in the store by status", labels=["status"])
        for status, n in self.counts().items():
            jobs.add_metric([status], n)
        yield jobs
        mem = GaugeMetricFamily("magicanimate_worker_memory_bytes",
                                "Resident memory of the server process (kind=rss, worker=all) and device memory "
                                "of each CUDA worker (allocated, peak)", labels=["worker", "kind"])
        mem.add_metric(["all", "rss"], resident_bytes())
        for name, device in self.devices():
            if device.startswith("cuda"):
                import torch

                mem.add_metric([name, "allocated"], torch.cuda.memory_allocated(device))
                mem.add_metric([name, "peak"], torch.cuda.max_memory_allocated(device))
        yield mem


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], counts: Callable[[], dict[str, int]],
                 devices: Callable[[], list[tuple[str, str]]]):
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(queue_depth, counts, devices))
        self.job_seconds = Histogram("magicanimate_job_seconds", "Queue wait and run time of jobs (and the DensePose "
                                     "clip of a person video, within the run)", ["phase"],
                                     buckets=JOB_BUCKETS, registry=self.registry)
        self.step_seconds = Histogram("magicanimate_step_seconds", "Time of one denoising step",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.requests = Counter("magicanimate_http_requests", "HTTP requests answered", ["method", "route", "code"],
                                registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
