"""The HTTP API and the page (FastAPI). ``create_app(settings, manager)``; README "Serving".

    POST   /v1/animations              multipart: source | reference_id, driving, driving_kind (densepose, or
                                       person with --densepose-weights), and the request's settings
                                       (serve/form.py: size | width+height, steps, guidance, seed, preset and
                                       the sampling knobs, ...) -> 202 {id, status, queue_position};
                                       429 + Retry-After when the queue is full; 503 while the models load
    GET    /v1/animations?limit=N      recent jobs, newest first
    GET    /v1/animations/{id}         the status object
    GET    /v1/animations/{id}/events  text/event-stream of status objects until the job ends
    GET    /v1/animations/{id}/video   video/mp4 (HTTP Range); /grid the [source | driving | result] video
    DELETE /v1/animations/{id}         cancel (queued: at once; running: at the next step boundary)
    POST   /v1/references              multipart: image -> {reference_id}
    GET    /v1/examples                example photos and motions the page offers
    GET    /v1/presets                 the sampling presets, what each costs, the driving kinds this server
                                       takes, and the request's defaults
    GET    /healthz, /readyz, /metrics, /docs (OpenAPI), / (the page)

Every error is ``{"error": {"message": "...", "field": "..."}}``; the message is the line the
CLI prints for the same input, with the client's file name in place of the server's path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import shutil
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from .errors import ServiceError
from .form import DEFAULT_KIND, JOB_FILES, form_fields, job_request, openapi_body, presets
from .jobs import JobManager, new_id, valid_id
from .metrics import CONTENT_TYPE
from .settings import ServeSettings
from .store import FINAL
from .uploads import Form, read_form, replace_path

log = logging.getLogger("magicanimate_rt.serve")

#: paths that need no key: liveness, and the page's static files (they hold no data; the
#: page asks for the key and sends it with every API call)
OPEN_PATHS = ("/healthz", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
#: seconds between keep-alive comments on an idle event stream
KEEPALIVE_S = 15.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")

#: the page's files
STATIC = resources.files("magicanimate_rt.serve") / "static"

IMAGE_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "properties": {"image": {"type": "string", "format": "binary"}}}}}}}


def error_response(e: ServiceError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# --------------------------------------------------------------------------- inputs
def check_image(path: Path, display: str, field: str) -> None:
    """400 unless ``path`` is an image PIL reads within the decoder's pixel limit."""
    from ..runtime.media import load_source_image

    try:
        load_source_image(path, 64)
    except InputError as e:
        raise ServiceError(400, replace_path(str(e), path, display), field) from None


def check_video(path: Path, display: str, start: int, max_frames: Optional[int], limit: int) -> int:
    """400 unless ``path`` is a video FFmpeg decodes (every frame this job uses, within the
    frame-side limit); 422 when it has more frames than ``limit`` and max_frames does not cut
    them. Returns the frames the job will animate."""
    from ..runtime.media import iter_video_frames

    take = min(max_frames or limit, limit) + (0 if max_frames is not None and max_frames <= limit else 1)
    count = 0
    try:
        for _ in iter_video_frames(path, start_frame=start, max_frames=take):
            count += 1
    except InputError as e:
        raise ServiceError(400, replace_path(str(e), path, display), "driving") from None
    if count > limit:
        raise ServiceError(422, f"driving video '{display}': more than this server's limit of {limit} frames from "
                                f"frame {start} (--max-frames); set max_frames", "max_frames")
    return count


# --------------------------------------------------------------------------- the app
def create_app(settings: ServeSettings, manager: JobManager) -> FastAPI:
    """The app: the guard (draining, the key, metrics), the error handlers, and the routes by
    group (health, jobs, references, the page and its examples)."""
    app = FastAPI(title="magicanimate-rt", summary="MagicAnimate as a service: one photo + a DensePose motion "
                  "video -> a video of that person doing the motion", version="1",
                  lifespan=_lifespan(settings, manager))
    app.state.manager = manager
    app.middleware("http")(_guard(settings, manager))
    _add_error_handlers(app)
    app.include_router(health_routes(manager))
    app.include_router(job_routes(settings, manager))
    app.include_router(reference_routes(settings, manager))
    app.include_router(page_routes(settings))
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def _lifespan(settings: ServeSettings, manager: JobManager):
    """Start the manager with the app (its notifier on the app's loop); drain it at the end."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.notifier.bind(asyncio.get_running_loop())
        manager.start()
        try:
            yield
        finally:
            manager.draining = True
            await asyncio.to_thread(manager.shutdown, settings.shutdown_grace_s)

    return lifespan


# --------------------------------------------------------------------------- middleware and errors
def _guard(settings: ServeSettings, manager: JobManager):
    """The middleware every request passes: 503 while draining, 401 without the key (but on
    the open paths), the request counter and a Server-Timing header."""
    key = settings.api_key.encode() if settings.api_key else None

    async def guard(request: Request, call_next):
        path = request.url.path
        t0 = time.perf_counter()
        if manager.draining and path != "/healthz":
            response = error_response(ServiceError(503, "the server is shutting down", headers={"Retry-After": "30"}))
        elif key is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            refused = _key_refusal(request.headers.get("authorization", ""), key)
            response = error_response(refused) if refused is not None else await call_next(request)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        manager.metrics.requests.labels(request.method, getattr(route, "path", "other"),
                                        str(response.status_code)).inc()
        if path.startswith("/v1/") and not isinstance(response, StreamingResponse):
            response.headers.setdefault("Server-Timing", f"app;dur={(time.perf_counter() - t0) * 1e3:.1f}")
        return response

    return guard


def _key_refusal(given: str, key: bytes) -> Optional[ServiceError]:
    """The 401 for an Authorization header that does not carry ``key`` as a bearer token, else None."""
    scheme, _, token = given.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key):
        return None
    what = "missing" if not given else "wrong"
    return ServiceError(401, f"{what} API key: send 'Authorization: Bearer <key>' (the server's --api-key-file)",
                        headers={"WWW-Authenticate": "Bearer"})


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": {"message", "field"}}``: ours, FastAPI's 422s, 404/405, and
    a 500 whose traceback goes to the log."""
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = [str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body")]
        name = where[-1] if where else None
        return error_response(ServiceError(422, f"{name or 'request'}: {first.get('msg', 'invalid value')}", name))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no such path: {request.url.path}", 405: f"method {request.method} not allowed here"}.get(
            e.status_code, str(e.detail))
        return error_response(ServiceError(e.status_code, message))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return error_response(ServiceError(500, f"internal error ({type(e).__name__}); the server log has the "
                                                "details"))


# --------------------------------------------------------------------------- health
def health_routes(manager: JobManager) -> APIRouter:
    """/healthz, /readyz and /metrics."""
    router = APIRouter()

    @router.get("/healthz", summary="The process answers")
    async def healthz():
        return {"status": "ok"}

    @router.get("/readyz", summary="200 once every worker's models are loaded")
    async def readyz():
        workers = [{"name": w.name, "device": w.device, "loaded": w.pipe is not None, "error": w.error,
                    "job": w.job} for w in manager.workers]
        if manager.ready and not manager.draining:
            return {"status": "ready", "workers": workers}
        message = ("the server is shutting down" if manager.draining else
                   f"the models failed to load: {manager.fatal}" if manager.fatal else "the models are loading")
        return JSONResponse({"status": "not ready", "error": {"message": message, "field": None},
                             "workers": workers}, status_code=503, headers={"Retry-After": "5"})

    @router.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(manager.metrics.render(), media_type=CONTENT_TYPE)

    return router


# --------------------------------------------------------------------------- jobs
def job_routes(settings: ServeSettings, manager: JobManager) -> APIRouter:
    """/v1/animations: submit, list, status, events, the videos, cancel."""
    router = APIRouter()

    def job_or_404(job_id: str):
        row = manager.store.get(job_id) if valid_id(job_id) else None
        if row is None:
            raise ServiceError(404, f"no animation with id {job_id!r} (unknown, or expired after "
                                    f"{settings.keep_hours:g} hours)")
        return row

    @router.post("/v1/animations", status_code=202, summary="Submit an animation job", openapi_extra=openapi_body())
    async def submit(request: Request):
        return await _submit(request, settings, manager)

    @router.get("/v1/animations", summary="Recent jobs, newest first")
    async def recent(limit: int = 20):
        if not 1 <= limit <= 200:
            raise ServiceError(422, f"limit must be in 1..200, got {limit}", "limit")
        return {"animations": manager.recent(limit)}

    @router.get("/v1/animations/{job_id}", summary="A job's status")
    async def status(job_id: str):
        return manager.status(job_id, job_or_404(job_id))

    @router.get("/v1/animations/{job_id}/events", summary="Server-sent events: the status object at every change")
    async def events(job_id: str, request: Request):
        job_or_404(job_id)
        return StreamingResponse(_status_stream(manager, job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def result(job_id: str, kind: str):
        row = job_or_404(job_id)
        if row.status != "succeeded":
            raise ServiceError(409, f"animation {job_id} is {row.status}; its video exists once it has succeeded")
        if kind == "grid" and not row.grid:
            raise ServiceError(404, f"animation {job_id} has no grid video (it was submitted without grid=true)")
        path = manager.result_path(job_id, kind)
        if not path.is_file():
            raise ServiceError(404, f"animation {job_id}: its {kind} video is gone (expired)")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}-{kind}.mp4",
                            content_disposition_type="inline")

    @router.get("/v1/animations/{job_id}/video", summary="The animation (video/mp4, Range requests)")
    async def video(job_id: str):
        return result(job_id, "video")

    @router.get("/v1/animations/{job_id}/grid", summary="The [source | driving | result] grid (video/mp4)")
    async def grid(job_id: str):
        return result(job_id, "grid")

    @router.delete("/v1/animations/{job_id}", summary="Cancel a job")
    async def cancel(job_id: str):
        row = job_or_404(job_id)
        if row.status in FINAL:
            raise ServiceError(409, f"animation {job_id} has already ended ({row.status})")
        manager.cancel(job_id)
        st = manager.status(job_id)
        return JSONResponse(st, status_code=200 if st["status"] == "cancelled" else 202)

    return router


async def _submit(request: Request, settings: ServeSettings, manager: JobManager) -> JSONResponse:
    """POST /v1/animations: the upload read and checked (nothing stays of a refused one), the
    files moved under ``uploads/<id>/`` and the job queued."""
    manager._check_accepting()
    job_id = new_id()
    data = Path(settings.data_dir)
    form = await read_form(request, data / ".incoming" / job_id, settings.max_upload_bytes, JOB_FILES, form_fields())
    try:
        job, ref, params = await _job_params(form, settings, manager)
        target = data / "uploads" / job_id
        form.directory.rename(target)
    except BaseException:
        form.discard()
        raise
    try:
        position = manager.submit(job_id, params, f"uploads/{job_id}/source" if ref is None else None, ref,
                                  f"uploads/{job_id}/driving", job.grid)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return JSONResponse({"id": job_id, "status": "queued", "queue_position": position,
                         "status_url": f"/v1/animations/{job_id}"}, status_code=202,
                        headers={"Location": f"/v1/animations/{job_id}"})


async def _job_params(form: Form, settings: ServeSettings, manager: JobManager):
    """(the request, its reference_id, the settings the job records) of a job's form: its text
    fields within this server's limits, one photo (a file or a reference), and its files
    checked by content (ServiceError naming the field). The settings hold ``driving_kind``
    only for a person video (the default, a DensePose clip, as before it existed)."""
    job, ref, kind = job_request(form.fields, settings)
    params = job.settings()
    if kind != DEFAULT_KIND:
        params["driving_kind"] = kind
    if "driving" not in form.files:
        raise ServiceError(422, "driving: missing (the DensePose motion video, a file field)", "driving")
    if ("source" in form.files) == (ref is not None):
        raise ServiceError(422, "give exactly one of source (a photo file) or reference_id", "source")
    if ref is not None and (not valid_id(ref) or manager.store.reference(ref, touch=True) is None):
        raise ServiceError(422, f"reference_id {ref!r}: unknown (expired, or never uploaded to /v1/references)",
                           "reference_id")
    drv = form.files["driving"]
    if "source" in form.files:
        src = form.files["source"]
        await run_in_threadpool(check_image, src.path, src.display, "source")
        params["source_name"] = src.display
    params["driving_name"] = drv.display
    params["frames"] = await run_in_threadpool(check_video, drv.path, drv.display, params["start_frame"],
                                               params["max_frames"], settings.max_frames)
    return job, ref, params


async def _status_stream(manager: JobManager, job_id: str, request: Request):
    """The job's event stream: its status object at every change until it ends (or the server
    drains, or the client goes), with a keep-alive comment on a quiet stream."""
    notifier = manager.notifier
    last = None
    while True:
        seen = notifier.version(job_id)
        st = manager.status(job_id)
        if st is None:
            break
        if st != last:
            yield f"event: status\ndata: {json.dumps(st)}\n\n"
            last = st
        if st["status"] in FINAL:
            break
        if manager.draining or await request.is_disconnected():
            yield 'event: end\ndata: {"reason": "the server is shutting down"}\n\n'
            break
        t0 = time.monotonic()
        await notifier.wait(job_id, seen, KEEPALIVE_S)
        if notifier.version(job_id) == seen and time.monotonic() - t0 >= KEEPALIVE_S * 0.9:
            yield ": keep-alive\n\n"


# --------------------------------------------------------------------------- references
def reference_routes(settings: ServeSettings, manager: JobManager) -> APIRouter:
    """/v1/references: one photo, animated with many motions."""
    router = APIRouter()
    data = Path(settings.data_dir)

    @router.post("/v1/references", status_code=201, summary="Upload a photo to animate with many motions",
                 openapi_extra=IMAGE_DOC)
    async def reference(request: Request):
        ref_id = new_id()
        form = await read_form(request, data / ".incoming" / f"ref-{ref_id}", settings.max_upload_bytes, ("image",),
                               ())
        try:
            if "image" not in form.files:
                raise ServiceError(422, "image: missing (a photo, a file field)", "image")
            up = form.files["image"]
            await run_in_threadpool(check_image, up.path, up.display, "image")
            up.path.rename(data / "references" / ref_id)
            manager.store.add_reference(ref_id, f"references/{ref_id}")
        finally:
            form.discard()
        return JSONResponse({"reference_id": ref_id}, status_code=201)

    return router


# --------------------------------------------------------------------------- examples and the page
def page_routes(settings: ServeSettings) -> APIRouter:
    """The page, the presets and defaults it offers, and its examples."""
    router = APIRouter()

    @router.get("/v1/presets", summary="The sampling presets (what each is and costs) and the request's defaults")
    async def sampling_presets():
        return presets(settings)

    @router.get("/v1/examples", summary="Example photos and motions for the page")
    async def examples():
        listing, _ = await run_in_threadpool(_examples, settings)
        return listing

    @router.get("/v1/examples/{name}", summary="One example file")
    async def example(name: str):
        _, files = await run_in_threadpool(_examples, settings)
        if name not in files:
            raise ServiceError(404, f"no example named {name!r}")
        path = Path(files[name])
        return FileResponse(path, media_type="video/mp4" if path.suffix == ".mp4" else None)

    @router.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    return router


def _examples(settings: ServeSettings) -> tuple[dict, dict[str, Path]]:
    """The built-in example (a generated figure and its motion, written once into the data
    directory) and the images and videos of --examples-dir."""
    from .. import demo
    from ..runtime.media import write_video

    folder = Path(settings.data_dir) / "examples"
    source, motion = folder / "figure.png", folder / "figure-walk.mp4"
    if not motion.exists():
        from PIL import Image

        folder.mkdir(exist_ok=True)
        tmp = folder / ".figure.png.tmp"
        Image.fromarray(demo.source_image(256)).save(tmp, format="PNG")
        tmp.replace(source)
        write_video(motion, demo.driving_clip(32, 256))
    files = {"figure.png": source, "figure-walk.mp4": motion}
    if settings.examples_dir is not None:
        for p in sorted(Path(settings.examples_dir).iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES and p.name not in files:
                files[p.name] = p
    listing = {"sources": [], "drivings": []}
    for name, p in files.items():
        kind = "sources" if p.suffix.lower() in IMAGE_SUFFIXES else "drivings"
        listing[kind].append({"name": name, "url": f"/v1/examples/{name}"})
    return listing, files
