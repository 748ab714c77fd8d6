"""The service on Ray Serve: one ingress, N worker replicas, each holding one warm pipeline.

    magicanimate-rt serve --ray --models DIR [--address auto] [--replicas N | --min-replicas M --max-replicas X]
                          [--gpus-per-replica G] [--ranks-per-replica K]
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
  With ``ranks_per_replica`` K > 1 a replica owns K GPUs of one host (a placement group of
  K bundles, STRICT_PACK) and runs each clip across them with the torch.distributed window
  split: the replica is rank 0, :class:`RankWorker` actors (one per further bundle) are the
  others, joined on loopback; every rank runs every job, rank 0 returns the frames. For
  long clips (README "Several GPUs" has the scaling); a fleet of such replicas still runs
  one job per replica.

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
shutdown) cancels the handle call; the replica stops at its next step boundary (with a
split, every rank at the same one: rank 0 broadcasts its word at each step). A rank of a
split that dies mid-job fails rank 0's next collective: the replica reports the job lost
(the ingress runs it again, as for a dead replica), kills its other ranks and starts its
group again; if that fails, its health check fails and Serve replaces it.

This is the only module that imports ``ray`` (the base install has none:
``pip install -e ".[serve,ray]"``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import ray
from ray import serve
from ray.exceptions import RayError

from ..errors import DistributedError, InputError, MagicAnimateError
from .app import create_app
from .jobs import (JobCancelled, JobFailed, JobFiles, JobManager, Progress, Worker, failure_line, load_pipeline,
                   render_job)
from .settings import RayOptions, ServeSettings, from_given, parse_ray_args

log = logging.getLogger("magicanimate_rt.serve")

#: the Serve application's name (``serve status`` shows it)
APP_NAME = "magicanimate"
#: how long the ingress waits for the first worker replica to answer (its models load)
LOAD_TIMEOUT_S = 1800.0


def absolute(settings: ServeSettings) -> ServeSettings:
    """The settings with absolute paths: replicas do not run in the caller's directory."""
    def a(p):
        return None if p is None else Path(p).resolve()

    return dataclasses.replace(settings, models=a(settings.models), engines=a(settings.engines),
                               data_dir=a(settings.data_dir), examples_dir=a(settings.examples_dir),
                               densepose_weights=a(settings.densepose_weights))


# --------------------------------------------------------------------------- the replica side
class _ReplicaProgress:
    """The pipeline's callbacks on a replica: each becomes an event for the ingress, and each
    stops the job (JobCancelled) once the ingress has cancelled the call.

    With the clip split over ranks (``ranks``), the other ranks must stop at the same
    boundary or they would wait in the next collective: the check is then made at step
    boundaries only, and rank 0's answer goes to every rank (:class:`_RankProgress`)."""

    def __init__(self, put, cancel: threading.Event, ranks=None):
        self.put, self.cancel, self.ranks = put, cancel, ranks

    def _check(self) -> None:
        if self.ranks is None and self.cancel.is_set():
            raise JobCancelled()

    def densepose(self, done: int, total) -> None:
        self.put({"kind": "densepose", "done": done, "total": total})
        self._check()  # (with a split, every rank makes the clip; they stop together at the first step)

    def started(self, frames: int) -> None:
        self.put({"kind": "started", "frames": frames})
        self._check()

    def step(self, step: int, steps: int) -> None:
        self.put({"kind": "step", "step": step, "steps": steps})
        if self.ranks is not None:
            if self.ranks.broadcast_object(self.cancel.is_set()):
                raise JobCancelled()
        self._check()

    def frames(self, done: int, total: int) -> None:
        self.put({"kind": "frames", "done": done, "total": total})
        self._check()


class _RankProgress:
    """The callbacks of ranks 1.. of a split clip: at each step boundary, rank 0's word on
    whether the job was cancelled (one small broadcast per step)."""

    def __init__(self, ranks):
        self.ranks = ranks

    def densepose(self, done: int, total) -> None:
        pass

    def started(self, frames: int) -> None:
        pass

    def step(self, step: int, steps: int) -> None:
        if self.ranks.broadcast_object(False):
            raise JobCancelled()

    def frames(self, done: int, total: int) -> None:
        pass


def _job_files(job: dict, tmp: Path) -> JobFiles:
    """A shipped job's inputs written under ``tmp`` (its results go to ``tmp/out``)."""
    (tmp / "source").write_bytes(job["source"])
    (tmp / "driving").write_bytes(job["driving"])
    request = dataclasses.replace(job["request"], source=tmp / "source", driving=tmp / "driving")
    return JobFiles(job["id"], request, tmp / "out", *job["names"], *job["densepose"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankWorker:
    """Rank ``rank`` (>= 1) of a replica that splits each clip: a Ray actor in the replica's
    placement group (bundle ``rank``: its own GPU) with a warm pipeline in the replica's
    process group. It does the same work as rank 0 for every job and writes nothing."""

    def __init__(self, settings: ServeSettings, device: str, rank: int, size: int, port: int, timeout_s: float):
        from ..runtime.distributed import Ranks

        # every rank of a replica is on its host (STRICT_PACK): the rendezvous is on loopback
        ranks = Ranks.join(rank, size, device, "127.0.0.1", port, timeout_s)
        self.pipe = load_pipeline(settings, device, ranks=ranks)

    def ready(self) -> int:
        return os.getpid()

    def run(self, job: dict) -> str:
        """This rank's part of ``job``: "done", "cancelled" or the job's one-line error."""
        with tempfile.TemporaryDirectory(prefix=f"magicanimate-{job['id']}-r{self.pipe.rank}-") as tmp:
            files = _job_files(job, Path(tmp))
            try:
                render_job(self.pipe, files, _RankProgress(self.pipe.ranks))
                return "done"
            except JobCancelled:
                return "cancelled"
            except Exception as e:  # noqa: BLE001 - rank 0 reports the job's outcome; this one its own
                return failure_line(e, files)


class _RankGroup:
    """A replica's process group for splitting clips: this process is rank 0 (its
    ``pipe``) and ``size - 1`` :class:`RankWorker` actors the others. Ray kills the actors
    with the replica (it owns them)."""

    def __init__(self, settings: ServeSettings, device: str, size: int, resources: dict, timeout_s: float):
        self.settings, self.device, self.size = settings, device, size
        self.resources, self.timeout_s = resources, timeout_s
        self.actors: list = []
        self.pipe = None
        self.build()

    def build(self) -> None:
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ..runtime.distributed import Ranks

        port = _free_port()
        pg = get_current_placement_group()
        remote = ray.remote(max_restarts=0)(RankWorker)
        self.actors = [
            remote.options(**self.resources, scheduling_strategy=None if pg is None else
                           PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r))
            .remote(self.settings, self.device, r, self.size, port, self.timeout_s)
            for r in range(1, self.size)]
        ranks = Ranks.join(0, self.size, self.device, "127.0.0.1", port, self.timeout_s)
        self.pipe = load_pipeline(self.settings, self.device, ranks=ranks)
        ray.get([a.ready.remote() for a in self.actors], timeout=LOAD_TIMEOUT_S)

    def start(self, job: dict) -> list:
        """The other ranks' part of ``job`` (rank 0 then runs its own)."""
        return [a.run.remote(job) for a in self.actors]

    def finish(self, refs: list) -> Optional[str]:
        """Wait for the other ranks' parts; a line when one of them did not end (its process
        died or hung), else None."""
        try:
            ray.get(refs, timeout=self.timeout_s)
            return None
        except (RayError, TimeoutError) as e:
            return f"a rank of the clip split stopped ({type(e).__name__})"

    def rebuild(self) -> None:
        """A fresh group after a rank was lost: the actors killed, this rank's group left,
        new actors, a new rendezvous, every pipeline loaded again."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
        self.build()


@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 1})
class AnimationWorker:
    """One warm pipeline; ``animate`` runs one job and streams its events (max_ongoing_requests=1:
    the router never gives a replica a second job while one runs). With ``ranks > 1`` the
    pipeline is rank 0 of a :class:`_RankGroup` and every job is split over the group."""

    def __init__(self, settings: ServeSettings, device: str, ranks: int = 1, rank_resources: Optional[dict] = None):
        from ..runtime.distributed import timeout_from_env

        t0 = time.perf_counter()
        self.device = device
        self.broken: Optional[str] = None  # why this replica cannot run jobs (Serve then replaces it)
        self.group = (_RankGroup(settings, device, ranks, rank_resources or {}, timeout_from_env()) if ranks > 1
                      else None)
        self._pipe = load_pipeline(settings, device) if self.group is None else None
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        # a cancelled job's thread runs to its next step boundary after the call has ended;
        # the next job's thread waits for it here rather than share the pipeline
        self._busy = threading.Lock()
        log.info("replica %s loaded its models on %s in %.1f s%s", self.replica, device, time.perf_counter() - t0,
                 f" ({ranks} ranks)" if ranks > 1 else "")

    @property
    def pipe(self):
        """The warm pipeline: this process's own, or rank 0's of the group (rebuilt after a lost rank)."""
        return self.group.pipe if self.group is not None else self._pipe

    def info(self) -> dict:
        import torch

        # on a CPU the result depends (slightly) on torch's thread count; Ray sets a replica's
        # to the CPUs it reserves (OMP_NUM_THREADS)
        return {"replica": self.replica, "device": self.device, "threads": torch.get_num_threads(),
                "ranks": self.pipe.world_size if self.pipe is not None else 0}

    def check_health(self) -> None:
        """Serve's health check: a replica whose rank group could not be rebuilt is replaced."""
        if self.broken is not None:
            raise RuntimeError(self.broken)

    def _render(self, job: dict, put, cancel: threading.Event) -> None:
        """In a thread: the job's inputs to a temporary directory, animate, the results back as bytes."""
        with self._busy, tempfile.TemporaryDirectory(prefix=f"magicanimate-{job['id']}-") as tmp:
            if self.broken is not None:
                put({"kind": "lost", "error": self.broken})
                return
            files = _job_files(job, Path(tmp))
            group, lost = self.group, None
            refs = group.start(job) if group is not None else []
            try:
                timings = render_job(self.pipe, files, _ReplicaProgress(put, cancel, self.pipe.ranks))
                lost = group.finish(refs) if group is not None else None
                done = {"kind": "done", "timings": dict(timings, ranks=self.pipe.world_size),
                        "video": (files.out / "video.mp4").read_bytes(),
                        "grid": (files.out / "grid.mp4").read_bytes() if job["grid"] else None}
            except JobCancelled:
                lost = group.finish(refs) if group is not None else None
                done = {"kind": "cancelled"}
            except DistributedError as e:  # another rank died or hung: the job runs again, here once rebuilt
                lost = failure_line(e, files)
                done = {"kind": "lost", "error": lost}
            except Exception as e:  # noqa: BLE001 - the job's one line goes back; the traceback to this log
                if group is not None:  # every rank meets a bad request alike; anything else leaves them waiting
                    lost = (group.finish(refs) if isinstance(e, MagicAnimateError)
                            else f"rank 0 stopped mid-job ({type(e).__name__})")
                done = {"kind": "failed", "error": failure_line(e, files)}
            put(done)
            if lost is not None:  # still holding the pipeline: the next job waits for the new group
                log.warning("replica %s: %s; starting its ranks again", self.replica, lost)
                try:
                    group.rebuild()
                except Exception as e:  # noqa: BLE001 - the health check now fails and Serve replaces us
                    self.broken = f"{self.replica} could not start its ranks again: {failure_line(e, files)}"
                    log.error("%s", self.broken)

    async def animate(self, job: dict):
        """Yield ``{"kind": "replica"}`` (who runs it), then the job's progress events, then one
        of ``done`` (timings, video and grid bytes), ``failed`` (the client's line),
        ``cancelled`` or ``lost`` (a rank of the split died: the ingress runs the job again)."""
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
                if event["kind"] in ("done", "failed", "cancelled", "lost"):
                    return
        finally:
            # the call ended: normally after the last event; else the ingress cancelled it
            # (CancelledError here), and the thread stops at its next step boundary
            cancel.set()

    def __del__(self):
        group = getattr(self, "group", None)  # (a failed __init__ may have set neither)
        pipe = group.pipe if group is not None else getattr(self, "_pipe", None)
        if pipe is not None:
            pipe.close()


# --------------------------------------------------------------------------- the ingress side
class _RankLost(Exception):
    """A replica's rank group lost a process during the job (the replica lives on)."""


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
        # the typed request travels (pickled by Ray), its inputs as bytes (the replica writes them to files)
        payload = {"id": job.id, "request": dataclasses.replace(job.request, source=None, driving=None),
                   "names": (job.source_name, job.driving_name), "grid": job.grid, "source": job.source.read_bytes(),
                   "densepose": (job.densepose_weights, job.densepose_cache),
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
                    elif kind == "densepose":
                        progress.densepose(event["done"], event["total"])
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
                    elif kind == "lost":
                        raise _RankLost(f"{replica} lost a rank of its clip split ({event['error']})")
                raise RayError(f"{replica} ended the job's stream without a result")
            except JobCancelled:
                call.cancel()  # the replica stops at its next step boundary
                raise
            except (RayError, _RankLost) as e:
                why = str(e) if isinstance(e, _RankLost) else f"{replica} stopped during the job ({type(e).__name__})"
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
    autoscaled between ``min_replicas`` and ``max_replicas``; each replica a placement
    group of ``ranks_per_replica`` bundles when it splits clips), bound into the ingress."""
    settings = absolute(settings)
    worker = AnimationWorker.options(**options.deployment_options()).bind(
        settings, options.device, options.ranks_per_replica, options.rank_resources())
    return Ingress.options(graceful_shutdown_timeout_s=settings.shutdown_grace_s + 30).bind(settings, worker,
                                                                                          options.slots)


def app(args: dict):
    """The application builder for ``serve run magicanimate_rt.serve.ray_app:app key=value ...``
    and for a Serve config file's ``import_path`` (its ``args:`` are ``settings.RAY_ARGS``,
    the keys of the settings ``serve --ray`` takes as flags)."""
    given = parse_ray_args(args)
    if "replicas" in given and ("min_replicas" in given or "max_replicas" in given):
        raise InputError("give either replicas (a fixed fleet) or min_replicas and max_replicas (autoscaling)")
    settings, ray_options = from_given(given)
    options = RayOptions(**ray_options).check()
    return build_app(settings.check(), options)


# --------------------------------------------------------------------------- magicanimate-rt serve --ray
def serve_on_ray(settings: ServeSettings, options: RayOptions, log_level: str = "info") -> int:
    """Join (``--address``) or start a Ray cluster, run the app on ``settings.host:port`` and
    block until SIGTERM / Ctrl-C (then ``serve.shutdown()``: the ingress drains) or until the
    app is gone (``serve shutdown`` from elsewhere). Returns the exit code."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    init: dict[str, Any] = {"address": options.address, "logging_level": logging.WARNING}
    if options.address is None:  # a local cluster for this command only; its dashboard on loopback, where
        # `serve status` and `serve shutdown` reach it (Ray's own services listen on the host's address)
        init.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=options.dashboard_port)
    try:
        ray.init(**init)
    except (ConnectionError, RuntimeError, ValueError) as e:
        print(f"magicanimate-rt: error: Ray did not start: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        logs = {"log_level": log_level.upper()}  # Serve's own and the replicas' (access lines are INFO)
        serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=logs)
        serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/", logging_config=logs)
        # a local cluster has Ray's token authentication on (the token in ~/.ray/auth_token);
        # the serve CLI in another shell uses it only when told
        token = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""
        stop_with = (f"; stop with Ctrl-C or `{token}serve shutdown -y -a http://127.0.0.1:{options.dashboard_port}`"
                     if options.address is None else "")
        print(f"magicanimate-rt serve --ray: http://{settings.host}:{settings.port}/ (API docs at /docs); "
              f"{options.describe()}, {options.gpus_per_replica:g} GPU(s) each; data in "
              f"{Path(settings.data_dir).resolve()}{stop_with}", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            try:
                gone = APP_NAME not in serve.status().applications
            except RayError:  # `serve shutdown` stops Serve's controller too
                gone = True
            if gone:  # `serve shutdown` (or `serve delete`) from another shell
                print("magicanimate-rt: the Serve application was shut down", file=sys.stderr, flush=True)
                return 0
        serve.shutdown()
        return 0
    except RuntimeError as e:  # a deployment failed (a replica's models did not load); Serve logged why
        print(f"magicanimate-rt: error: the Ray Serve application did not start: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
