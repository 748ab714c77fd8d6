"""The job queue and its workers: one thread per device, each holding one warm pipeline.

A job is a row in the store (``store.py``) plus, while it waits or runs, a :class:`Live`
record in memory (its progress, a cancel flag). Jobs wait in one FIFO queue; each worker
takes the oldest, reads its uploaded files, and animates into ``results/<id>/`` through
``render.animate_to_files``, the CLI's own writer (temporary files renamed when complete,
so a failed or cancelled job leaves nothing). A job whose driving file is a person video
(``driving_kind`` person, on a server with ``--densepose-weights``) first has its DensePose
clip made (``densepose/prepare.py``, cached by content in ``densepose/`` under the data
directory): its "densepose" stage. Cancellation is a flag the progress callback checks
after every batch of DensePose frames, every denoising step and every decoded chunk: a
running job stops at the next boundary.

Restart: jobs the previous process left running are marked failed ("interrupted by a
restart"), queued ones are queued again in their order. Finished jobs, their results and
unused references older than ``keep_hours`` are deleted every few minutes.

Changes reach the event streams through :class:`Notifier`, which wakes asyncio waiters
from the worker threads.

Where a job runs is the manager's *executor*: :class:`LocalExecutor` (the default) gives
each worker thread a pipeline of its own in this process; ``ray_app.RayExecutor`` gives
each one a slot on a Ray Serve worker deployment and relays the job there. Either way the
queue, the store, cancellation and the results stay here, so clients see one service.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import os
import secrets
import shutil
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import MagicAnimateError, user_message
from ..runtime.request import AnimationRequest
from .errors import ServiceError
from .metrics import Metrics
from .settings import ServeSettings
from .store import FINAL, JobRow, Store
from .uploads import replace_path

log = logging.getLogger("magicanimate_rt.serve")

#: job and reference ids: 16 hex digits (checked before any id touches a path)
ID_CHARS = frozenset("0123456789abcdef")


def new_id() -> str:
    return secrets.token_hex(8)


def valid_id(text: str) -> bool:
    return len(text) == 16 and set(text) <= ID_CHARS


class JobCancelled(Exception):
    """Raised from the progress callback at a step boundary to stop a cancelled job."""


class JobFailed(Exception):
    """A job failed with a message that is already the client's line (an executor that ran
    it elsewhere made it there, with the client's file names in it)."""


@dataclass
class Live:
    """What a waiting or running job has in memory."""

    progress: dict[str, Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled by the client"
    last_tick: float = 0.0
    step_times: list[float] = field(default_factory=list)


#: a job's settings the status always shows; the request's others (SETTINGS) when they are set
SHOWN = ("width", "height", "steps", "guidance", "seed", "start_frame", "max_frames", "fit", "grid")
SETTINGS = tuple(AnimationRequest().settings()) + ("driving_kind",)  # (recorded for a person video only)


@dataclass
class Worker:
    name: str
    device: str
    pipe: Any = None
    estimators: Any = None  #: its DensePose estimator, loaded by its first person job, kept warm
    thread: Optional[threading.Thread] = None
    job: Optional[str] = None  #: the job it runs now
    error: Optional[str] = None  #: why its models did not load


@dataclass(frozen=True)
class JobFiles:
    """What an executor gets for one job: its request (its source and driving: the job's
    input files), where its results go, and what the client called the files."""

    id: str
    request: AnimationRequest
    out: Path  #: results go to ``out/video.mp4`` (and ``out/grid.mp4`` with ``request.grid``)
    source_name: str = "source"
    driving_name: str = "driving"
    #: with a person video (driving_kind person): the server's DensePose checkpoint, and where
    #: the clips made from person videos are kept (by content: ``densepose/prepare.py``)
    densepose_weights: Optional[Path] = None
    densepose_cache: Optional[Path] = None

    @property
    def source(self) -> Path:
        return Path(self.request.source)

    @property
    def driving(self) -> Path:
        return Path(self.request.driving)

    @property
    def grid(self) -> bool:
        return self.request.grid

    @property
    def names(self) -> tuple[tuple[Path, str], ...]:
        """(server path, the client's name) of each input, to keep server paths out of messages."""
        return ((self.source, self.source_name), (self.driving, self.driving_name))


def load_pipeline(settings: ServeSettings, device: str, ranks="auto"):
    """One warm pipeline on ``device`` from ``settings``' models or engines (``ranks``: a
    joined process group when the pipeline is one rank of a clip split, as in
    ``AnimationPipeline.from_pretrained``)."""
    from ..runtime.pipeline import AnimationPipeline

    s = settings
    options = s.pipeline_options()
    if s.models is not None:
        return AnimationPipeline.from_pretrained(s.models, backend=s.backend_name, device=device, dtype=s.dtype,
                                                 options=options, ranks=ranks)
    return AnimationPipeline.from_engines(s.engines, backend=s.backend_name, device=device, options=options,
                                          ranks=ranks)


def render_job(pipe, job: JobFiles, progress: "Progress", estimators=None) -> dict[str, float]:
    """Read the job's files and animate them into ``job.out`` through the CLI's writer; returns
    the stage timings. What every worker does with a job, in this process or on a Ray
    replica. ``progress`` hears of the DensePose frames made from a person video, the frame
    count, every step and every decoded chunk; any of them may raise JobCancelled to stop at
    that boundary (no partial file stays, in the results or the clip cache). ``estimators``: the
    worker's ``densepose.prepare.EstimatorCache`` (the DensePose model stays loaded between jobs)."""
    from ..render import animate_to_files

    request, timings = job.request, {}
    if job.densepose_weights is not None:
        t0 = time.perf_counter()
        request = densepose_driving(pipe, job, progress, estimators)
        timings["densepose"] = time.perf_counter() - t0
    request, box = request.read_inputs_and_box()
    progress.started(int(request.driving.shape[0]))
    job.out.mkdir(parents=True, exist_ok=True)
    result = animate_to_files(pipe, request, job.out / "video.mp4", job.out / "grid.mp4" if job.grid else None,
                              box=request.crop_box(box), progress=progress.step, on_frames=progress.frames)
    return {k: round(v, 4) for k, v in {**timings, **result.timings}.items()}


def densepose_driving(pipe, job: JobFiles, progress: "Progress", estimators=None) -> AnimationRequest:
    """The job's request driven by the DensePose clip of its person video, made as ``animate
    --densepose-weights`` makes it (``densepose/prepare.py``: from ``start_frame`` for
    ``max_frames`` frames, which the clip then holds whole; on the pipeline's device and dtype)
    or found in ``job.densepose_cache``. ``progress.densepose`` hears of every batch of frames."""
    from ..densepose.prepare import cached_driving_video, person_video_settings

    r = job.request
    progress.densepose(0, None)
    clip = cached_driving_video(job.driving, job.densepose_weights, person_video_settings(r.start_frame, r.max_frames),
                                device=str(pipe.stages.device), dtype=pipe.stages.dtype,
                                cache_dir=job.densepose_cache, progress=progress.densepose,
                                log=lambda line: log.info("job %s: %s", job.id, line), estimators=estimators)
    os.utime(clip)  # used now: the janitor keeps it for keep_hours more
    return replace(r, driving=clip, start_frame=0, max_frames=None)


def failure_line(e: BaseException, job: JobFiles) -> str:
    """The client's line for a job that raised ``e`` (server paths replaced by the client's
    file names); the traceback of an internal error goes to the log."""
    error = one_line(e)
    for path, name in job.names:
        error = replace_path(error, path, name)
    if not isinstance(e, MagicAnimateError):
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
    return error


class Progress:
    """A running job's reports (the pipeline's callbacks, or the events relayed from a Ray
    replica) turned into its live progress, metrics and event-stream wake-ups. Each report
    checks the cancel flag and raises JobCancelled once it is set."""

    def __init__(self, manager: "JobManager", job_id: str, live: Live):
        self.manager, self.job_id, self.live = manager, job_id, live

    def _changed(self) -> None:
        self.manager.notifier.notify(self.job_id)

    def check_cancel(self) -> None:
        if self.live.cancel.is_set():
            raise JobCancelled()

    def densepose(self, done: int, total: Optional[int]) -> None:
        """The person video's DensePose clip: ``done`` of about ``total`` (None: unknown) frames made."""
        self.live.progress.update(stage="densepose", densepose={"frames_done": done, "frames": total})
        self._changed()
        self.check_cancel()

    def started(self, frames: int) -> None:
        """The inputs are read: ``frames`` frames to animate; denoising begins."""
        self.live.progress.update(stage="denoising", frames=frames)
        self.live.last_tick = time.perf_counter()
        self.check_cancel()
        self._changed()

    def step(self, step: int, steps: int) -> None:
        live = self.live
        now = time.perf_counter()
        dt = now - live.last_tick
        live.last_tick = now
        live.step_times.append(dt)
        self.manager.metrics.step_seconds.observe(dt)
        recent = live.step_times[1:] or live.step_times  # the first step also pays the reference encode
        eta = (steps - step) * sum(recent) / len(recent)
        live.progress.update(step=step, steps=steps, eta_s=round(eta, 2),
                             stage="decoding" if step == steps else "denoising")
        self._changed()
        self.check_cancel()

    def frames(self, done: int, total: int) -> None:
        self.live.progress.update(stage="decoding", frames_done=done, frames=total)
        self._changed()
        self.check_cancel()

    def ran_on(self, worker: str) -> None:
        """The job runs on ``worker`` (a Ray replica's id): the status's ``worker`` field."""
        self.manager.store.set_worker(self.job_id, worker)
        self._changed()

    def restarted(self, attempt: int, why: str) -> None:
        """The job starts again from its first step (its replica died): attempt ``attempt``."""
        self.live.step_times.clear()
        self.live.progress = {"stage": "reading", "step": 0, "steps": self.live.progress.get("steps"),
                              "frames_done": 0, "frames": None, "eta_s": None, "attempt": attempt, "retried": why}
        self._changed()


class LocalExecutor:
    """Jobs run in this process: one worker per ``settings.devices`` entry, each holding one
    warm pipeline built by ``load(device)``. The manager calls ``open`` (in the worker's
    thread, once), ``run`` per job and ``close`` at the end."""

    def __init__(self, settings: ServeSettings, load: Optional[Callable[[str], Any]] = None):
        self.settings = settings
        self.load = load or (lambda device: load_pipeline(settings, device))

    def workers(self) -> list["Worker"]:
        return [Worker(f"worker-{i}", d) for i, d in enumerate(self.settings.devices)]

    def open(self, worker: "Worker") -> None:
        from ..densepose.prepare import EstimatorCache

        worker.pipe = self.load(worker.device)
        worker.estimators = EstimatorCache()

    def run(self, worker: "Worker", job: JobFiles, progress: Progress) -> dict[str, float]:
        return render_job(worker.pipe, job, progress, worker.estimators)

    def close(self, worker: "Worker") -> None:
        if worker.estimators is not None:
            worker.estimators.clear()
        worker.pipe.close()


def iso(t: Optional[float]) -> Optional[str]:
    return None if t is None else _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds")


def one_line(e: BaseException) -> str:
    """The message a client sees for a failed job: the CLI's line for the errors a user can
    cause, a short note for the rest (whose traceback goes to the server log)."""
    message = user_message(e, "lower the size or max_frames", "lower the size or max_frames")
    return message or f"internal error ({type(e).__name__}); the server log has the details"


class Notifier:
    """Wakes asyncio tasks waiting on a job when a worker thread changes it."""

    def __init__(self):
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._waiters: dict[str, set[asyncio.Future]] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def version(self, job_id: str) -> int:
        with self._lock:
            return self._versions.get(job_id, 0)

    def notify(self, job_id: str) -> None:
        with self._lock:
            self._versions[job_id] = self._versions.get(job_id, 0) + 1
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._wake, job_id)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _wake(self, job_id: str) -> None:
        for fut in self._waiters.pop(job_id, set()):
            if not fut.done():
                fut.set_result(None)

    async def wait(self, job_id: str, seen: int, timeout: float) -> None:
        """Return when the job's version passes ``seen`` or after ``timeout`` seconds."""
        if self.version(job_id) != seen:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(fut)
        if self.version(job_id) != seen:  # changed between the check and the registration
            return
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.get(job_id, set()).discard(fut)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._versions.pop(job_id, None)


class JobManager:
    """The queue, the workers and every job's state. ``load_pipeline(device)`` builds one
    warm pipeline (default: from ``settings``' models or engines); ``executor`` replaces the
    in-process workers altogether (``ray_app.RayExecutor``)."""

    def __init__(self, settings: ServeSettings, load_pipeline: Optional[Callable[[str], Any]] = None,
                 executor: Any = None):
        self.settings = settings
        self.data = Path(settings.data_dir)
        for sub in ("uploads", "references", "results", ".incoming"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        # uploads of requests that never completed (a crash mid-upload)
        for leftover in (self.data / ".incoming").iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        self.store = Store(self.data / "jobs.sqlite3")
        self.executor = executor if executor is not None else LocalExecutor(settings, load_pipeline)
        self.densepose_cache = self.data / "densepose"  #: clips made from person videos, by content
        self.notifier = Notifier()
        self.metrics = Metrics(lambda: len(self._queue), self.store.counts,
                               lambda: [(w.name, w.device) for w in self.workers])
        self.workers = self.executor.workers()
        self._queue: deque[str] = deque()
        self._live: dict[str, Live] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self.draining = False
        self.fatal: Optional[str] = None  #: set when a worker's models cannot load
        self.on_fatal: Optional[Callable[[str], None]] = None
        self._loaded = 0
        self._run_times: deque[float] = deque(maxlen=20)
        self._janitor: Optional[threading.Thread] = None
        self._janitor_stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Recover the store, start the workers (they load their models) and the janitor."""
        for job_id in self.store.interrupted():
            log.warning("job %s was running when the server stopped: marked failed", job_id)
            self._remove_files(job_id, uploads=True)
        for row in self.store.with_status("queued"):
            missing = [p for p in (row.source, row.driving) if p is not None and not (self.data / p).is_file()]
            if missing or (row.reference_id is not None and self.store.reference(row.reference_id) is None):
                self.store.finish(row.id, "failed", "its uploaded files were lost while the server was down")
                continue
            self._live[row.id] = Live(progress=self._queued_progress(row))
            self._queue.append(row.id)
        self.expire()
        for w in self.workers:
            w.thread = threading.Thread(target=self._work, args=(w,), name=w.name, daemon=True)
            w.thread.start()
        self._janitor = threading.Thread(target=self._janitor_loop, name="janitor", daemon=True)
        self._janitor.start()

    @property
    def ready(self) -> bool:
        return self._loaded == len(self.workers) and self.fatal is None

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop taking jobs; let running jobs go on for ``grace`` seconds, then cancel them at
        their next step boundary; wait for the workers and close their pipelines. Queued jobs
        stay queued in the store (the next start runs them)."""
        self.draining = True
        with self._cond:  # no worker takes another job; idle ones end now
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + grace
        while grace > 0 and time.monotonic() < deadline and any(w.job for w in self.workers):
            time.sleep(0.05)
        with self._cond:
            for w in self.workers:
                if w.job is not None and w.job in self._live:
                    live = self._live[w.job]
                    live.cancel_reason = "cancelled: the server shut down"
                    live.cancel.set()
            self._cond.notify_all()
        for w in self.workers:
            if w.thread is not None:
                w.thread.join()
        self._janitor_stop.set()
        if self._janitor is not None:
            self._janitor.join()
        self.store.close()

    # ------------------------------------------------------------------ requests
    def submit(self, job_id: str, params: dict, source: Optional[str], reference_id: Optional[str], driving: str,
               grid: bool) -> int:
        """Queue a job whose files are already under ``uploads/<job_id>/``; returns its
        queue position (1: next). ServiceError 429 when the queue is full, 503 while
        loading or draining."""
        self._check_accepting()
        with self._cond:
            if len(self._queue) >= self.settings.max_queue:
                raise ServiceError(429, f"the queue is full ({self.settings.max_queue} jobs waiting); retry later",
                                   headers={"Retry-After": str(self.retry_after())})
            self.store.add_job(job_id, params, source, reference_id, driving, grid)
            row = self.store.get(job_id)
            self._live[job_id] = Live(progress=self._queued_progress(row))
            self._queue.append(job_id)
            position = len(self._queue)
            self._cond.notify()
        self.notifier.notify(job_id)
        return position

    def _check_accepting(self) -> None:
        if self.draining:
            raise ServiceError(503, "the server is shutting down", headers={"Retry-After": "30"})
        if self.fatal is not None:
            raise ServiceError(503, f"the models failed to load: {self.fatal}")
        if not self.ready:
            raise ServiceError(503, "the models are still loading; retry shortly", headers={"Retry-After": "5"})

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean recent run time per worker."""
        mean = sum(self._run_times) / len(self._run_times) if self._run_times else 10.0
        return max(1, round(mean / len(self.workers)))

    def cancel(self, job_id: str) -> Optional[str]:
        """Cancel a job: a queued one leaves the queue at once, a running one stops at its
        next step boundary. Returns its status afterwards (None: unknown id)."""
        with self._cond:
            row = self.store.get(job_id)
            if row is None:
                return None
            if row.status == "queued" and job_id in self._queue:
                self._queue.remove(job_id)
                self.store.finish(job_id, "cancelled", "cancelled by the client")
                self._live.pop(job_id, None)
                self._remove_files(job_id, uploads=True)
                status = "cancelled"
            elif row.status == "running" and job_id in self._live:
                self._live[job_id].cancel.set()
                status = "running"  # until the worker reaches the next step boundary
            else:
                status = row.status
        self.notifier.notify(job_id)
        return status

    def status(self, job_id: str, row: Optional[JobRow] = None) -> Optional[dict]:
        """The job's status object (the API's ``GET /v1/animations/{id}``), or None."""
        row = row or self.store.get(job_id)
        if row is None:
            return None
        live = self._live.get(job_id)
        if live is not None and row.status not in FINAL:
            progress = dict(live.progress)
            if live.cancel.is_set():
                progress["cancelling"] = True
        else:
            progress = row.progress or dict(self._queued_progress(row),
                                            stage="finished" if row.status in FINAL else "queued")
        position = None
        if row.status == "queued":
            with self._cond:
                position = self._queue.index(job_id) + 1 if job_id in self._queue else None
        p = row.params
        done = row.status == "succeeded"
        return {
            "id": row.id, "status": row.status, "progress": progress, "queue_position": position,
            "error": {"message": row.error} if row.error and row.status in ("failed", "cancelled") else None,
            "timings": row.timings, "created": iso(row.created), "started": iso(row.started),
            "finished": iso(row.finished),
            "settings": {k: v for k, v in p.items() if k in SHOWN or (k in SETTINGS and v not in (None, False))},
            "source": p.get("source_name"), "driving": p.get("driving_name"), "reference_id": row.reference_id,
            "frames": p.get("frames"), "worker": row.worker,
            "video_url": f"/v1/animations/{row.id}/video" if done else None,
            "grid_url": f"/v1/animations/{row.id}/grid" if done and row.grid else None,
        }

    def recent(self, limit: int) -> list[dict]:
        return [self.status(r.id, r) for r in self.store.recent(limit)]

    def result_path(self, job_id: str, kind: str) -> Path:
        return self.data / "results" / job_id / f"{kind}.mp4"

    # ------------------------------------------------------------------ the workers
    def _work(self, worker: Worker) -> None:
        t0 = time.perf_counter()
        try:
            self.executor.open(worker)
        except BaseException as e:  # noqa: BLE001 - reported, and it stops the server
            worker.error = one_line(e) if not isinstance(e, MagicAnimateError) else str(e)
            if not isinstance(e, MagicAnimateError):
                log.error("%s could not load its models:\n%s", worker.name, traceback.format_exc())
            self.fatal = f"{worker.name} ({worker.device}): {worker.error}"
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)
            return
        with self._cond:
            self._loaded += 1
        log.info("%s loaded its models on %s in %.1f s", worker.name, worker.device, time.perf_counter() - t0)
        try:
            while True:
                job_id = self._next(worker)
                if job_id is None:
                    break
                try:
                    self._run(worker, job_id)
                finally:
                    worker.job = None
        finally:
            self.executor.close(worker)

    def _next(self, worker: Worker) -> Optional[str]:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._queue:
                    job_id = self._queue.popleft()
                    if self.store.start(job_id, worker.name):
                        worker.job = job_id
                        return job_id
                    continue
                self._cond.wait()

    def _run(self, worker: Worker, job_id: str) -> None:
        row = self.store.get(job_id)
        live = self._live[job_id]
        p = row.params
        started = time.time()
        self.metrics.job_seconds.labels("queue_wait").observe(started - row.created)
        live.progress = {"stage": "reading", "step": 0, "steps": p["steps"], "frames_done": 0, "frames": None,
                         "eta_s": None}
        self.notifier.notify(job_id)
        source = self.data / row.source if row.source else self.data / self.store.reference(row.reference_id)
        request = AnimationRequest.from_settings(p, source=source, driving=self.data / row.driving)
        person = p.get("driving_kind") == "person"
        job = JobFiles(job_id, request, self.data / "results" / job_id, p.get("source_name") or "source",
                       p.get("driving_name") or "driving", self.settings.densepose_weights if person else None,
                       self.densepose_cache if person else None)
        t_run = time.perf_counter()
        status, error, timings = "failed", None, None
        try:
            if person and self.settings.densepose_weights is None:  # queued, then the server restarted without
                raise JobFailed("its driving video is a video of a person, and the server now runs without "
                                "--densepose-weights")
            timings = self.executor.run(worker, job, Progress(self, job_id, live))
            status = "succeeded"
        except JobCancelled:
            status, error = "cancelled", live.cancel_reason
        except JobFailed as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's one line
            error = failure_line(e, job)
        run_s = time.perf_counter() - t_run
        if status != "succeeded":
            shutil.rmtree(job.out, ignore_errors=True)
        else:
            timings["queue_wait"] = round(started - row.created, 4)
            if "densepose" in timings:
                self.metrics.job_seconds.labels("densepose").observe(timings["densepose"])
            timings["run"] = round(run_s, 4)
            self._run_times.append(run_s)
        self.metrics.job_seconds.labels("run").observe(run_s)
        progress = dict(live.progress, stage="finished", eta_s=0 if status == "succeeded" else None)
        self.store.finish(job_id, status, error, timings, progress)
        self._remove_files(job_id, uploads=True)
        self._live.pop(job_id, None)
        self.notifier.notify(job_id)
        log.info("job %s %s in %.2f s%s", job_id, status, run_s, f": {error}" if error else "")

    @staticmethod
    def _queued_progress(row: JobRow) -> dict:
        return {"stage": "queued", "step": 0, "steps": row.params.get("steps"), "frames_done": 0, "frames": None,
                "eta_s": None}

    # ------------------------------------------------------------------ storage
    def _remove_files(self, job_id: str, uploads: bool = False, results: bool = False) -> None:
        if not valid_id(job_id):  # never build a path from anything else
            return
        if uploads:
            shutil.rmtree(self.data / "uploads" / job_id, ignore_errors=True)
        if results:
            shutil.rmtree(self.data / "results" / job_id, ignore_errors=True)

    def expire(self) -> None:
        """Delete finished jobs (rows, results), and unused references, older than keep_hours."""
        before = time.time() - self.settings.keep_hours * 3600
        for job_id in self.store.expired(before):
            self._remove_files(job_id, uploads=True, results=True)
            self.notifier.forget(job_id)
        for ref_id, path in self.store.expired_references(before):
            (self.data / path).unlink(missing_ok=True)
        # results whose job is gone (a crash between the two)
        for folder in (self.data / "results").iterdir():
            if valid_id(folder.name) and self.store.get(folder.name) is None:
                shutil.rmtree(folder, ignore_errors=True)
        # DensePose clips of person videos no job has used for keep_hours (each use touches its clip)
        for clip in self.densepose_cache.glob("*.mp4"):
            try:
                if clip.stat().st_mtime < before:
                    clip.unlink()
            except OSError:  # a job uses or removes it meanwhile
                pass

    def _janitor_loop(self) -> None:
        period = min(300.0, max(1.0, self.settings.keep_hours * 3600 / 10))
        while not self._janitor_stop.wait(period):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - the janitor must not die; it retries next period
                log.error("expiring old jobs failed:\n%s", traceback.format_exc())
