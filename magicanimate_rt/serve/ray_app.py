"""The service on Ray Serve: one ingress, N worker replicas, each holding one warm pipeline.

    magicanimate-rt serve --ray --models DIR [--address auto] [--replicas N | --min-replicas M --max-replicas X]
                          [--gpus-per-replica G]
    serve run magicanimate_rt.serve.ray_app:app models=DIR replicas=N ...     (or a config file:
    serve deploy deploy/ray-serve.yaml; README "A fleet on Ray Serve")

Two deployments:

- ``Ingress`` (exactly one replica): the FastAPI app of ``app.py`` (``@serve.ingress`` with
  ``__serve_build_asgi_app__``, so it is built in the replica with its settings), holding the
  SQLite store, the uploads, the results and the bounded FIFO queue of ``jobs.JobManager``.
  Clients see the API and the page of ``magicanimate-rt serve`` unchanged.
- ``AnimationWorker`` (``replicas`` of them, or between ``min_replicas`` and
  ``max_replicas`` under Serve's autoscaler; ``max_ongoing_requests=1``, ``num_gpus`` each
  on GPU hosts): each loads one pipeline at start and animates one job at a time.

The manager's executor here is :class:`RayExecutor`: one ingress thread per worker replica
takes the oldest queued job, ships its inputs (bytes) to the worker deployment through a
streaming deployment handle, relays every progress event into the job's live state (so
``/events`` shows the steps) and writes the returned mp4 bytes under the ingress's results.
As many jobs are in flight as there are replicas and each replica takes one at a time, so
a job waits in the ingress's queue, where the limit and the 429s are the single machine's.
Autoscaled, the ingress keeps ``max_replicas`` slots: jobs beyond the running replicas wait
in Serve's queue, which is what the autoscaler counts to add a replica.

Faults: a replica that dies mid-job (a crash, ``ray.kill``, a lost host) makes the relay
raise a Ray error; the job starts again once on whichever replica is free (the status's
``worker`` names it, ``timings.attempts`` says 2) or, if that fails too, ends ``failed``
with a line saying so. A job ends once: only the ingress writes the store. Cancel (and a
shutdown) cancels the handle call; the replica stops at its next step boundary.

This is the only module that imports ``ray`` (the base install has none:
``pip install -e ".[serve,ray]"``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ray
from ray import serve
from ray.exceptions import RayError

from ..errors import InputError
from .app import create_app
from .jobs import (JobCancelled, JobFailed, JobFiles, JobManager, Progress, Worker, failure_line, load_pipeline,
                   render_job)
from .settings import ServeSettings, read_api_key

log = logging.getLogger("magicanimate_rt.serve")

#: the Serve application's name (``serve status`` shows it)
APP_NAME = "magicanimate"
#: how long the ingress waits for the first worker replica to answer (its models load)
LOAD_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class RayOptions:
    """How the fleet is laid out (the Serve side; the service's own limits are ServeSettings).

    address: the Ray cluster to join (``auto``: the one ``ray start`` runs here); None
        starts a local one for this command.
    replicas: worker replicas, each one warm pipeline and one job at a time.
    gpus_per_replica: GPUs each replica reserves (0: a CPU replica); Ray places replicas
        on the cluster's hosts by these resources.
    cpus_per_replica: CPUs each replica reserves.
    min_replicas, max_replicas: instead of ``replicas``, Serve's autoscaler keeps between
        these many replicas (``replicas`` is then ignored): one more while jobs wait for a
        replica longer than ``upscale_delay_s``, one fewer after ``downscale_delay_s`` with
        a replica idle. The ingress hands out up to ``max_replicas`` jobs at once; a job
        waits in Serve's queue while a replica starts (its models load). ``min_replicas``
        0 lets an idle fleet release every GPU (the next job then waits for a load).
    """

    address: Optional[str] = None
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 300.0

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def slots(self) -> int:
        """Jobs the ingress runs at once: one per replica there may be."""
        return self.max_replicas if self.autoscaling else self.replicas

    def autoscaling_config(self) -> dict:
        """Serve's ``autoscaling_config`` for the worker deployment: one ongoing job per
        replica is the target (each runs one at a time)."""
        return {"min_replicas": self.min_replicas, "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas, "target_ongoing_requests": 1,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "metrics_interval_s": 1.0, "look_back_period_s": 5.0}

    def describe(self) -> str:
        if self.autoscaling:
            return f"{self.min_replicas}-{self.max_replicas} replicas (autoscaling)"
        return f"{self.replicas} replica(s)"

    def check(self) -> "RayOptions":
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise InputError("autoscaling needs both --min-replicas and --max-replicas")
        if self.autoscaling:
            if self.min_replicas < 0:
                raise InputError(f"--min-replicas must be >= 0, got {self.min_replicas}")
            if self.max_replicas < max(self.min_replicas, 1):
                raise InputError(f"--max-replicas must be >= 1 and >= --min-replicas ({self.min_replicas}), got "
                                 f"{self.max_replicas}")
            if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
                raise InputError("upscale_delay_s and downscale_delay_s must be >= 0")
        if self.replicas < 1:
            raise InputError(f"--replicas must be >= 1, got {self.replicas}")
        if self.gpus_per_replica < 0:
            raise InputError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica:g}")
        if self.cpus_per_replica < 0:
            raise InputError(f"--cpus-per-replica must be >= 0, got {self.cpus_per_replica:g}")
        return self

    @property
    def device(self) -> str:
        # Ray hides every GPU but the replica's own (CUDA_VISIBLE_DEVICES), so it is "cuda"
        return "cuda" if self.gpus_per_replica > 0 else "cpu"


def absolute(settings: ServeSettings) -> ServeSettings:
    """The settings with absolute paths: replicas do not run in the caller's directory."""
    def a(p):
        return None if p is None else Path(p).resolve()

    return dataclasses.replace(settings, models=a(settings.models), engines=a(settings.engines),
                               data_dir=a(settings.data_dir), examples_dir=a(settings.examples_dir))


# --------------------------------------------------------------------------- the replica side
class _ReplicaProgress:
    """The pipeline's callbacks on a replica: each becomes an event for the ingress, and each
    stops the job (JobCancelled) once the ingress has cancelled the call."""

    def __init__(self, put, cancel: threading.Event):
        self.put, self.cancel = put, cancel

    def _check(self) -> None:
        if self.cancel.is_set():
            raise JobCancelled()

    def started(self, frames: int) -> None:
        self.put({"kind": "started", "frames": frames})
        self._check()

    def step(self, step: int, steps: int) -> None:
        self.put({"kind": "step", "step": step, "steps": steps})
        self._check()

    def frames(self, done: int, total: int) -> None:
        self.put({"kind": "frames", "done": done, "total": total})
        self._check()


@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 1})
class AnimationWorker:
    """One warm pipeline; ``animate`` runs one job and streams its events (max_ongoing_requests=1:
    the router never gives a replica a second job while one runs)."""

    def __init__(self, settings: ServeSettings, device: str):
        t0 = time.perf_counter()
        self.device = device
        self.pipe = load_pipeline(settings, device)
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        # a cancelled job's thread runs to its next step boundary after the call has ended;
        # the next job's thread waits for it here rather than share the pipeline
        self._busy = threading.Lock()
        log.info("replica %s loaded its models on %s in %.1f s", self.replica, device, time.perf_counter() - t0)

    def info(self) -> dict:
        import torch

        # on a CPU the result depends (slightly) on torch's thread count; Ray sets a replica's
        # to the CPUs it reserves (OMP_NUM_THREADS)
        return {"replica": self.replica, "device": self.device, "threads": torch.get_num_threads()}

    def _render(self, job: dict, put, cancel: threading.Event) -> None:
        """In a thread: the job's inputs to a temporary directory, animate, the results back as bytes."""
        with self._busy, tempfile.TemporaryDirectory(prefix=f"magicanimate-{job['id']}-") as tmp:
            tmp = Path(tmp)
            (tmp / "source").write_bytes(job["source"])
            (tmp / "driving").write_bytes(job["driving"])
            files = JobFiles(job["id"], job["params"], tmp / "source", tmp / "driving", tmp / "out", job["grid"])
            try:
                timings = render_job(self.pipe, files, _ReplicaProgress(put, cancel))
                done = {"kind": "done", "timings": timings, "video": (files.out / "video.mp4").read_bytes(),
                        "grid": (files.out / "grid.mp4").read_bytes() if job["grid"] else None}
            except JobCancelled:
                done = {"kind": "cancelled"}
            except Exception as e:  # noqa: BLE001 - the job's one line goes back; the traceback to this log
                done = {"kind": "failed", "error": failure_line(e, files)}
            put(done)

    async def animate(self, job: dict):
        """Yield ``{"kind": "replica"}`` (who runs it), then the job's progress events, then one
        of ``done`` (timings, video and grid bytes), ``failed`` (the client's line) or
        ``cancelled``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(event: dict) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        threading.Thread(target=self._render, args=(job, put, cancel), name=f"job-{job['id']}", daemon=True).start()
        try:
            yield {"kind": "replica", "replica": self.replica, "device": self.device}
            while True:
                event = await events.get()
                yield event
                if event["kind"] in ("done", "failed", "cancelled"):
                    return
        finally:
            # the call ended: normally after the last event; else the ingress cancelled it
            # (CancelledError here), and the thread stops at its next step boundary
            cancel.set()

    def __del__(self):
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()


# --------------------------------------------------------------------------- the ingress side
class RayExecutor:
    """JobManager's executor on Ray: one worker slot per replica; each job goes to the worker
    deployment through ``handle`` and its events and results come back here."""

    def __init__(self, handle, replicas: int, load_timeout_s: float = LOAD_TIMEOUT_S):
        self.handle, self.replicas, self.load_timeout_s = handle, replicas, load_timeout_s

    def workers(self) -> list[Worker]:
        return [Worker(f"slot-{i}", "ray") for i in range(self.replicas)]

    def open(self, worker: Worker) -> None:
        """Wait until a replica answers (its models are loaded); the slot is then ready."""
        info = self.handle.info.remote().result(timeout_s=self.load_timeout_s)
        worker.pipe = self.handle
        log.info("%s: the worker deployment answers (replica %s on %s)", worker.name, info["replica"], info["device"])

    def close(self, worker: Worker) -> None:
        worker.pipe = None

    def run(self, worker: Worker, job: JobFiles, progress: Progress) -> dict:
        payload = {"id": job.id, "params": job.params, "grid": job.grid, "source": job.source.read_bytes(),
                   "driving": job.driving.read_bytes()}
        for attempt in (1, 2):
            progress.check_cancel()  # cancelled (or shutting down) while it waited for a retry
            call = self.handle.options(stream=True).animate.remote(payload)
            replica = "a replica"
            try:
                for event in call:
                    kind = event["kind"]
                    if kind == "replica":
                        replica = event["replica"]
                        progress.ran_on(replica)
                    elif kind == "started":
                        progress.started(event["frames"])
                    elif kind == "step":
                        progress.step(event["step"], event["steps"])
                    elif kind == "frames":
                        progress.frames(event["done"], event["total"])
                    elif kind == "done":
                        self._write(job, event)
                        return dict(event["timings"], attempts=attempt)
                    elif kind == "failed":
                        raise JobFailed(event["error"])
                    elif kind == "cancelled":
                        raise JobCancelled()
                raise RayError(f"{replica} ended the job's stream without a result")
            except JobCancelled:
                call.cancel()  # the replica stops at its next step boundary
                raise
            except RayError as e:
                why = f"{replica} stopped during the job ({type(e).__name__})"
                if attempt == 2:
                    raise JobFailed(f"the job was tried twice and its worker replica stopped both times; last: "
                                    f"{why}") from None
                log.warning("job %s: %s; starting it again on another replica", job.id, why)
                progress.restarted(2, why)
        raise AssertionError("unreachable")

    @staticmethod
    def _write(job: JobFiles, event: dict) -> None:
        """The result bytes under the ingress's results (renamed when complete, as the CLI's writer does)."""
        job.out.mkdir(parents=True, exist_ok=True)
        for kind in ("video", "grid"):
            if event.get(kind) is not None:
                part = job.out / f"{kind}.mp4.tmp"
                part.write_bytes(event[kind])
                part.replace(job.out / f"{kind}.mp4")


@serve.deployment(num_replicas=1, max_ongoing_requests=10000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP service (one replica: it owns the store and the queue). Each SSE stream is an
    ongoing request, hence the high ``max_ongoing_requests``; the job limit is the queue's."""

    def __init__(self, settings: ServeSettings, worker, replicas: int):
        logging.getLogger("magicanimate_rt").setLevel(logging.INFO)
        self.settings = settings
        self.manager = JobManager(settings, executor=RayExecutor(worker, replicas))

    def __serve_build_asgi_app__(self):
        # the app's lifespan starts the manager (restart recovery, the slots) and, when Serve
        # stops this replica, drains it
        return create_app(self.settings, self.manager)


def build_app(settings: ServeSettings, options: RayOptions):
    """The Serve application: the worker deployment, ``options.replicas`` wide (or
    autoscaled between ``min_replicas`` and ``max_replicas``), bound into the ingress."""
    settings = absolute(settings)
    width = ({"autoscaling_config": options.autoscaling_config()} if options.autoscaling
             else {"num_replicas": options.replicas})
    worker = AnimationWorker.options(
        **width, ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
    ).bind(settings, options.device)
    return Ingress.options(graceful_shutdown_timeout_s=settings.shutdown_grace_s + 30).bind(settings, worker,
                                                                                          options.slots)


#: the arguments ``serve run ... :app`` and a config file's ``args:`` take (README)
SETTING_ARGS = {"models": Path, "engines": Path, "backend": str, "dtype": str, "data_dir": Path, "max_queue": int,
                "max_upload_mb": float, "max_frames": int, "max_steps": int, "max_side": int, "keep_hours": float,
                "shutdown_grace_s": float, "examples_dir": Path, "api_key_file": Path, "gpu_memory_gb": float}
OPTION_ARGS = {"replicas": int, "gpus_per_replica": float, "cpus_per_replica": float, "min_replicas": int,
               "max_replicas": int, "upscale_delay_s": float, "downscale_delay_s": float}


def app(args: dict):
    """The application builder for ``serve run magicanimate_rt.serve.ray_app:app key=value ...``
    and for a Serve config file's ``import_path`` (its ``args:`` are these keys)."""
    known = SETTING_ARGS | OPTION_ARGS
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise InputError(f"unknown argument {unknown[0]!r}; known: {', '.join(sorted(known))}")
    try:
        given = {k: known[k](v) for k, v in args.items() if v is not None}
    except (TypeError, ValueError) as e:
        raise InputError(f"a bad argument value: {e}") from None
    if "replicas" in given and ("min_replicas" in given or "max_replicas" in given):
        raise InputError("give either replicas (a fixed fleet) or min_replicas and max_replicas (autoscaling)")
    options = RayOptions(**{k: given.pop(k) for k in OPTION_ARGS if k in given}).check()
    key_file = given.pop("api_key_file", None)
    upload_mb = given.pop("max_upload_mb", None)
    settings = ServeSettings(**given, api_key=read_api_key(key_file) if key_file else None,
                             **({"max_upload_bytes": int(upload_mb * 2**20)} if upload_mb else {})).check()
    return build_app(settings, options)


# --------------------------------------------------------------------------- magicanimate-rt serve --ray
def serve_on_ray(settings: ServeSettings, options: RayOptions, log_level: str = "info") -> int:
    """Join (``--address``) or start a Ray cluster, run the app on ``settings.host:port`` and
    block until SIGTERM / Ctrl-C (then ``serve.shutdown()``: the ingress drains) or until the
    app is gone (``serve shutdown`` from elsewhere). Returns the exit code."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    init: dict[str, Any] = {"address": options.address, "logging_level": logging.WARNING}
    if options.address is None:  # a local cluster for this command only
        init.update(include_dashboard=False)
    ray.init(**init)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        logs = {"log_level": log_level.upper()}  # Serve's own and the replicas' (access lines are INFO)
        serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=logs)
        serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/", logging_config=logs)
        print(f"magicanimate-rt serve --ray: http://{settings.host}:{settings.port}/ (API docs at /docs); "
              f"{options.describe()}, {options.gpus_per_replica:g} GPU(s) each; data in "
              f"{Path(settings.data_dir).resolve()}", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            if APP_NAME not in serve.status().applications:  # `serve shutdown` elsewhere
                print("magicanimate-rt: the Serve application was shut down", file=sys.stderr)
                return 0
        serve.shutdown()
        return 0
    except RuntimeError as e:  # a deployment failed (a replica's models did not load); Serve logged why
        print(f"magicanimate-rt: error: the Ray Serve application did not start: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
