"""`magicanimate-rt serve` (issue 14): a live uvicorn server on 127.0.0.1, driven over HTTP.

The main server has two CPU workers and the tiny model set; jobs are 128 px, 16 frames,
2-8 steps (about a second each). Servers with other flags (a key, a restart, SIGTERM) are
their own processes; queueing and cancelling are tested on the app in this process, with a
pipeline that waits at its first step boundary until the test lets it go on, so no timing
decides the outcome.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service's packages: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")

from serve_helpers import (ServerProcess, ServerThread, events, files_under, free_port,  # noqa: E402
                           page_at, png_header_only, submit, wait_final, wait_for)

SIZE, FRAMES = 128, 16


@pytest.fixture(scope="module")
def samples(shared_dir):
    s = shared_dir / "samples"
    return {"source": s / "source_image" / "multi1_source.png", "driving": s / "driving" / "running.mp4",
            "source2": s / "source_image" / "dalle8.jpeg", "driving2": s / "driving" / "dancing2.mp4"}


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve") / "data"
    srv = ServerProcess(tiny_models, data, "--devices", "cpu,cpu", "--max-upload-mb", "4", "--max-steps", "20",
                        "--max-side", "512", "--max-frames", "64")
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, srv.output()


def job(server, samples, **fields):
    fields = {"size": SIZE, "steps": 2, "max_frames": FRAMES, "seed": 3, **fields}
    r = submit(server.client, samples["source"], samples["driving"], **fields)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def decode(data: bytes, tmp_path: Path, name: str) -> np.ndarray:
    from magicanimate_rt.runtime.media import read_video

    path = tmp_path / name
    path.write_bytes(data)
    return read_video(path)


# --------------------------------------------------------------------------- the happy path
def test_submit_follow_download_equals_the_cli(server, samples, tiny_models, tmp_path):
    r = submit(server.client, samples["source"], samples["driving"], size=SIZE, steps=3, max_frames=FRAMES, seed=3,
               guidance=7.5, grid="true")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and body["queue_position"] >= 1 and r.headers["location"].endswith(body["id"])
    seen = events(server.client, body["id"])
    assert seen[-1]["status"] == "succeeded", seen[-1]
    steps = [e["progress"]["step"] for e in seen if e["status"] == "running"]
    assert steps == sorted(steps) and 3 in steps, steps  # the stream reports every step, in order
    assert {"reading", "denoising", "decoding"} <= {e["progress"]["stage"] for e in seen}
    st = seen[-1]
    assert st["error"] is None and st["timings"]["run"] > 0 and st["timings"]["unet"] > 0
    assert st["settings"] == {"width": SIZE, "height": SIZE, "steps": 3, "guidance": 7.5, "seed": 3,
                              "start_frame": 0, "max_frames": FRAMES, "fit": "stretch", "grid": True}

    served = server.client.get(st["video_url"])
    assert served.status_code == 200 and served.headers["content-type"] == "video/mp4"
    grid = server.client.get(st["grid_url"])
    assert grid.status_code == 200

    from magicanimate_rt.cli import main

    out, out_grid = tmp_path / "cli.mp4", tmp_path / "cli-grid.mp4"
    assert main(["animate", "--models", str(tiny_models), "--source", str(samples["source"]), "--driving",
                 str(samples["driving"]), "--output", str(out), "--grid", str(out_grid), "--size", str(SIZE),
                 "--steps", "3", "--max-frames", str(FRAMES), "--seed", "3"]) == 0
    a, b = decode(served.content, tmp_path, "served.mp4"), decode(out.read_bytes(), tmp_path, "cli-copy.mp4")
    assert a.shape == b.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # the bound: 1/255 after decoding
    g1, g2 = decode(grid.content, tmp_path, "served-grid.mp4"), decode(out_grid.read_bytes(), tmp_path, "g.mp4")
    assert g1.shape == g2.shape and np.abs(g1.astype(int) - g2.astype(int)).max() <= 1


def test_video_supports_range_requests(server, samples):
    job_id = job(server, samples)
    st = wait_final(server.client, job_id)
    whole = server.client.get(st["video_url"]).content
    part = server.client.get(st["video_url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
    assert server.client.get(f"/v1/animations/{job_id}/grid").status_code == 404  # submitted without a grid


def test_two_workers_run_two_jobs_at_once(server, samples):
    ids = [job(server, samples, steps=8), job(server, samples, steps=8, seed=4)]
    a, b = [wait_final(server.client, i) for i in ids]
    assert a["status"] == b["status"] == "succeeded"
    assert a["worker"] != b["worker"]
    # the two runs overlap in time
    assert a["started"] < b["finished"] and b["started"] < a["finished"], (a, b)


def test_references_one_photo_many_motions(server, samples):
    r = server.client.post("/v1/references", files={"image": ("me.png", samples["source"].read_bytes())})
    assert r.status_code == 201, r.text
    ref = r.json()["reference_id"]
    ids = []
    for drv in ("driving", "driving2"):
        r = server.client.post("/v1/animations", files={"driving": ("m.mp4", samples[drv].read_bytes())},
                               data={"reference_id": ref, "size": SIZE, "steps": 2, "max_frames": 8})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    for i in ids:
        st = wait_final(server.client, i)
        assert st["status"] == "succeeded" and st["reference_id"] == ref and st["frames"] == 8
    r = server.client.post("/v1/animations", files={"driving": ("m.mp4", samples["driving"].read_bytes())},
                           data={"reference_id": "0123456789abcdef", "steps": 2})
    assert r.status_code == 422 and r.json()["error"]["field"] == "reference_id"


def test_recent_jobs_health_metrics_docs_and_page(server, samples):
    job_id = job(server, samples)
    wait_final(server.client, job_id)
    recent = server.client.get("/v1/animations", params={"limit": 50}).json()["animations"]
    assert job_id in [j["id"] for j in recent]
    assert recent == sorted(recent, key=lambda j: j["created"], reverse=True)
    assert server.client.get("/v1/animations", params={"limit": 0}).status_code == 422
    assert server.client.get("/healthz").json() == {"status": "ok"}
    ready = server.client.get("/readyz").json()
    assert ready["status"] == "ready" and len(ready["workers"]) == 2
    text = server.client.get("/metrics").text
    for needle in ("magicanimate_queue_depth ", 'magicanimate_jobs{status="succeeded"}',
                   'magicanimate_job_seconds_bucket{le="1.0",phase="run"}', "magicanimate_step_seconds_count",
                   'magicanimate_worker_memory_bytes{kind="rss",worker="all"}', "magicanimate_http_requests_total"):
        assert needle in text, needle
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values['magicanimate_jobs{status="succeeded"}'] >= 1
    assert values["magicanimate_step_seconds_count"] >= 2
    assert values['magicanimate_worker_memory_bytes{kind="rss",worker="all"}'] > 50e6
    spec = server.client.get("/openapi.json").json()
    assert "/v1/animations" in spec["paths"] and "multipart/form-data" in str(spec["paths"]["/v1/animations"])
    assert server.client.get("/docs").status_code == 200
    page = server.client.get("/")
    assert page.status_code == 200 and "<progress" in page.text and "/static/app.js" in page.text
    assert server.client.get("/static/app.js").status_code == 200
    ex = server.client.get("/v1/examples").json()
    assert ex["sources"] and ex["drivings"]
    assert server.client.get(ex["drivings"][0]["url"]).content[4:8] == b"ftyp"  # an mp4


# --------------------------------------------------------------------------- bad input
def bad_inputs(samples, tmp_path):
    src, drv = samples["source"].read_bytes(), samples["driving"].read_bytes()
    long = samples["driving2"].read_bytes()  # 100 frames: over the server's --max-frames 64
    ok = {"size": SIZE, "steps": 2, "max_frames": FRAMES}
    return [
        ("a non-image source", {"source": ("notes.txt", b"hello, not a picture"), "driving": ("d.mp4", drv)}, ok,
         400, "source", "source image 'notes.txt': not an image file PIL can read"),
        ("a non-video driving file", {"source": ("s.png", src), "driving": ("moves.mp4", os.urandom(5000))}, ok,
         400, "driving", "driving video 'moves.mp4': not a video file FFmpeg can read"),
        ("a truncated driving file", {"source": ("s.png", src), "driving": ("cut.mp4", drv[: len(drv) // 3])}, ok,
         400, "driving", "driving video 'cut.mp4'"),
        ("an oversize upload", {"source": ("s.png", src), "driving": ("big.mp4", os.urandom(5 * 2**20))}, ok,
         413, None, "more than this server's limit of 4 MiB"),
        ("huge frame dimensions", {"source": ("huge.png", png_header_only(40000, 40000)), "driving": ("d.mp4", drv)},
         ok, 400, "source", "source image 'huge.png': too large"),
        ("no driving video", {"source": ("s.png", src)}, ok, 422, "driving", "driving: missing"),
        ("no source", {"driving": ("d.mp4", drv)}, ok, 422, "source", "give exactly one of source"),
        ("steps not a number", {"source": ("s.png", src), "driving": ("d.mp4", drv)}, {**ok, "steps": "many"},
         422, "steps", "steps: expected a whole number, got 'many'"),
        ("steps 0", {"source": ("s.png", src), "driving": ("d.mp4", drv)}, {**ok, "steps": 0},
         422, "steps", "steps must be an integer >= 1, got 0"),
        ("steps over the limit", {"source": ("s.png", src), "driving": ("d.mp4", drv)}, {**ok, "steps": 500},
         422, "steps", "more than this server's limit of 20"),
        ("a size not a multiple of 64", {"source": ("s.png", src), "driving": ("d.mp4", drv)}, {**ok, "size": 100},
         422, "size", "size must be a positive multiple of 64"),
        ("a size over the limit", {"source": ("s.png", src), "driving": ("d.mp4", drv)}, {**ok, "size": 1024},
         422, "size", "larger than this server's limit of 512 px"),
        ("width without height", {"source": ("s.png", src), "driving": ("d.mp4", drv)},
         {"width": 128, "steps": 2}, 422, "width", "width"),
        ("guidance below 1", {"source": ("s.png", src), "driving": ("d.mp4", drv)}, {**ok, "guidance": 0.5},
         422, "guidance", "guidance scale must be a number >= 1, got 0.5"),
        ("too many frames", {"source": ("s.png", src), "driving": ("d.mp4", long)}, {"size": SIZE, "steps": 1},
         422, "max_frames", "more than this server's limit of 64 frames"),
        ("an unknown field", {"source": ("s.png", src), "driving": ("d.mp4", drv)}, {**ok, "colour": "red"},
         422, "colour", "unknown field 'colour'"),
        ("a person video on a server without weights", {"source": ("s.png", src), "driving": ("d.mp4", drv)},
         {**ok, "driving_kind": "person"}, 400, "driving_kind",
         "driving_kind person: this server takes DensePose motion videos only (it was started without "
         "--densepose-weights FILE)"),
        ("an unknown driving kind", {"source": ("s.png", src), "driving": ("d.mp4", drv)},
         {**ok, "driving_kind": "dance"}, 422, "driving_kind",
         "driving_kind: expected one of densepose, person, got 'dance'"),
    ]


def test_bad_input_is_one_json_error_and_leaves_nothing(server, samples, tmp_path):
    data = server.data_dir
    before = files_under(data / "uploads") | files_under(data / ".incoming") | files_under(data / "references")
    for what, files, fields, status, field, message in bad_inputs(samples, tmp_path):
        r = server.client.post("/v1/animations", files=files, data={k: str(v) for k, v in fields.items()})
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert message in err["message"], (what, err)
        assert "\n" not in err["message"] and str(data) not in err["message"], (what, err)  # no server paths
        if field is not None:
            assert err["field"] == field, (what, err)
        assert server.client.get("/healthz").status_code == 200  # still serving
    after = files_under(data / "uploads") | files_under(data / ".incoming") | files_under(data / "references")
    assert after <= before, after - before
    # not multipart at all
    r = server.client.post("/v1/animations", json={"source": "x"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = server.client.post("/v1/references", files={"image": ("x.gif", b"GIF89a broken")})
    assert r.status_code == 400 and "x.gif" in r.json()["error"]["message"]


def test_unknown_ids_and_unfinished_results(server, samples):
    for path in ("/v1/animations/0123456789abcdef", "/v1/animations/not-an-id", "/v1/animations/0123456789abcdef/video",
                 "/v1/animations/0123456789abcdef/events", "/v1/animations/0123456789abcdef/grid"):
        r = server.client.get(path)
        assert r.status_code == 404 and "no animation with id" in r.json()["error"]["message"], (path, r.text)
    r = server.client.get("/v1/animations/..%2F..%2Fjobs.sqlite3/video")  # never a path: no route takes it
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("no such path")
    assert server.client.delete("/v1/animations/nothing").status_code == 404
    assert server.client.get("/v1/nothing").json()["error"]["message"] == "no such path: /v1/nothing"
    job_id = job(server, samples, steps=8)
    r = server.client.get(f"/v1/animations/{job_id}/video")
    assert r.status_code in (409, 200)  # 409 until it has succeeded
    if r.status_code == 409:
        assert "its video exists once it has succeeded" in r.json()["error"]["message"]
    wait_final(server.client, job_id)
    assert server.client.delete(f"/v1/animations/{job_id}").status_code == 409  # already ended


def test_a_path_traversal_file_name_never_becomes_a_path(server, samples):
    outside = server.data_dir.parent
    before = set(os.listdir(outside))
    r = submit(server.client, samples["source"], samples["driving"], size=SIZE, steps=1, max_frames=4,
               names={"source": "../../evil.png", "driving": "/etc/../../motion.mp4"})
    assert r.status_code == 202, r.text
    st = wait_final(server.client, r.json()["id"])
    assert st["status"] == "succeeded" and st["source"] == "evil.png" and st["driving"] == "motion.mp4"
    assert set(os.listdir(outside)) == before and not list(server.data_dir.rglob("evil.png"))


# --------------------------------------------------------------------------- queue and cancel (in process)
class Gate:
    """A pipeline that stops at each job's first step boundary until ``release`` is set."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def run(self, request, progress=None, **kwargs):
        def gated(step, steps):
            if step == 1:
                self.entered.set()
                assert self.release.wait(60), "the test never released the pipeline"
            if callable(progress):
                progress(step, steps)

        return self.pipe.run(request, progress=gated, **kwargs)


def settings_for(tiny_models, tmp_path, **kw):
    from magicanimate_rt.serve.settings import ServeSettings

    return ServeSettings(models=tiny_models, port=free_port(), data_dir=tmp_path / "data", **kw).check()


def test_queue_full_is_429_and_cancel_queued_and_running(tiny_models, tmp_path, samples):
    from magicanimate_rt.runtime.pipeline import AnimationPipeline

    gates = []

    def load(device):
        gates.append(Gate(AnimationPipeline.from_pretrained(tiny_models, device=device)))
        return gates[-1]

    with ServerThread(settings_for(tiny_models, tmp_path, max_queue=1), load) as srv:
        c = srv.client
        wait = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < wait
            time.sleep(0.05)
        args = dict(size=SIZE, steps=3, max_frames=FRAMES)
        running = submit(c, samples["source"], samples["driving"], **args).json()["id"]
        assert gates[0].entered.wait(60)  # the worker holds it at step 1
        queued = submit(c, samples["source"], samples["driving"], **args)
        assert queued.status_code == 202 and queued.json()["queue_position"] == 1
        queued = queued.json()["id"]
        full = submit(c, samples["source"], samples["driving"], **args)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert "the queue is full (1 jobs waiting)" in full.json()["error"]["message"]

        r = c.delete(f"/v1/animations/{queued}")  # a queued job leaves the queue at once
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert not (tmp_path / "data" / "uploads" / queued).exists()
        r = c.delete(f"/v1/animations/{running}")  # a running one at its next step boundary
        assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["progress"]["cancelling"]
        gates[0].release.set()
        st = wait_final(c, running)
        assert st["status"] == "cancelled" and st["error"]["message"] == "cancelled by the client"
        assert st["progress"]["step"] == 1 and st["video_url"] is None
        assert c.get(f"/v1/animations/{running}/video").status_code == 409
        assert not (tmp_path / "data" / "results" / running).exists()
        # the queue has room again, and the worker goes on
        ok = submit(c, samples["source"], samples["driving"], **args).json()["id"]
        assert wait_final(c, ok)["status"] == "succeeded"
    leftovers = [p for p in (tmp_path / "data").rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers


def test_503_while_the_models_load(tiny_models, tmp_path, samples):
    from magicanimate_rt.runtime.pipeline import AnimationPipeline

    go = threading.Event()

    def load(device):
        assert go.wait(60)
        return AnimationPipeline.from_pretrained(tiny_models, device=device)

    with ServerThread(settings_for(tiny_models, tmp_path), load) as srv:
        r = srv.client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["message"] == "the models are loading"
        r = submit(srv.client, samples["source"], samples["driving"], size=SIZE, steps=1)
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
        assert srv.client.get("/healthz").status_code == 200
        go.set()
        wait = time.monotonic() + 60
        while srv.client.get("/readyz").status_code != 200:
            assert time.monotonic() < wait
            time.sleep(0.05)


# --------------------------------------------------------------------------- auth, flags
def test_api_key(tiny_models, tmp_path, samples):
    key = "k3y-" + "x" * 28
    (tmp_path / "key").write_text(key + "\n")
    srv = ServerProcess(tiny_models, tmp_path / "data", "--api-key-file", str(tmp_path / "key"), key=key)
    try:
        srv.wait_ready()
        bare = httpx.Client(base_url=srv.url, timeout=30)
        assert bare.get("/healthz").status_code == 200  # liveness needs no key
        assert bare.get("/").status_code == 200  # nor the page (no data; it asks for the key)
        for path in ("/v1/animations", "/metrics", "/readyz", "/docs"):
            r = bare.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert r.json()["error"]["message"].startswith("missing API key")
        r = bare.get("/v1/animations", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["message"].startswith("wrong API key")
        r = submit(bare, samples["source"], samples["driving"], size=SIZE)
        assert r.status_code == 401
        assert srv.client.get("/v1/animations").status_code == 200  # the right key
        bare.close()
    finally:
        assert srv.stop() == 0


def test_bad_flags_are_one_line_exit_2(tiny_models, tmp_path, capsys):
    from magicanimate_rt.cli import main

    cases = [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 is not a loopback address: give --api-key-file"),
        (["--api-key-file", str(tmp_path / "absent")], "--api-key-file"),
        (["--devices", "gpu0"], "--devices: 'gpu0' is not cpu, cuda or cuda:N"),
        (["--port", "70000"], "--port must be in 1..65535"),
        (["--densepose-weights", str(tmp_path / "absent.pkl")], f"--densepose-weights: {tmp_path / 'absent.pkl'}: "
                                                                  "no such file"),
        (["--densepose-weights", str(tmp_path / "lfs.pkl")], "a Git LFS pointer, not the weights"),
    ]
    (tmp_path / "lfs.pkl").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    for extra, message in cases:
        rc = main(["serve", "--models", str(tiny_models), "--data-dir", str(tmp_path / "d"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, (extra, err)
    rc = main(["serve", "--models", str(tmp_path / "nowhere")])
    assert rc == 2 and "--models" in capsys.readouterr().err


# --------------------------------------------------------------------------- SIGTERM and restart
def test_sigterm_mid_job_then_restart_serves_finished_jobs(tiny_models, tmp_path, samples):
    data = tmp_path / "data"
    srv = ServerProcess(tiny_models, data).wait_ready()
    try:
        done = job(srv, samples)
        assert wait_final(srv.client, done)["status"] == "succeeded"
        video = srv.client.get(f"/v1/animations/{done}/video").content
        long = job(srv, samples, steps=40, max_frames=32)
        wait_for(srv.client, long, lambda st: st["status"] == "running" and st["progress"]["step"] >= 1)
        waiting = job(srv, samples)  # queued behind it
    finally:
        rc = srv.stop(signal.SIGTERM)
    assert rc == 0, srv.output()
    assert not (data / "results" / long).exists()
    assert not [p for p in data.rglob("*") if ".tmp" in p.name]  # no partial file anywhere

    again = ServerProcess(tiny_models, data).wait_ready()
    try:
        st = again.client.get(f"/v1/animations/{long}").json()
        assert st["status"] == "cancelled" and st["error"]["message"] == "cancelled: the server shut down"
        assert 1 <= st["progress"]["step"] < 40
        assert again.client.get(f"/v1/animations/{done}/video").content == video  # finished: still served
        assert wait_final(again.client, waiting)["status"] == "succeeded"  # queued: run after the restart
    finally:
        assert again.stop() == 0


def test_restart_marks_running_jobs_failed_and_expires_old_results(tiny_models, tmp_path, samples):
    from magicanimate_rt.serve.store import Store

    data = tmp_path / "data"
    srv = ServerProcess(tiny_models, data).wait_ready()
    try:
        old = job(srv, samples)
        wait_final(srv.client, old)
    finally:
        assert srv.stop() == 0
    store = Store(data / "jobs.sqlite3")  # what a crash leaves: a running row; and a day-old result
    store.add_job("00000000000000aa", {"steps": 2}, None, None, "uploads/00000000000000aa/driving", False)
    store.start("00000000000000aa", "worker-0")
    store._exec("UPDATE jobs SET finished = finished - 90000 WHERE id = ?", (old,))
    store.close()
    again = ServerProcess(tiny_models, data, "--keep-hours", "24").wait_ready()
    try:
        st = again.client.get("/v1/animations/00000000000000aa").json()
        assert st["status"] == "failed" and st["error"]["message"] == "interrupted by a restart"
        assert again.client.get(f"/v1/animations/{old}").status_code == 404
        assert not (data / "results" / old).exists()
    finally:
        assert again.stop() == 0


# --------------------------------------------------------------------------- a real browser
def test_the_page_in_a_real_browser(server, samples, tmp_path):
    with page_at(server.url) as page:
        # this server has no --densepose-weights: the page offers DensePose videos only
        page.wait_for_function("() => document.querySelector('#driving-kind option[value=person]').disabled")
        assert page.input_value("#driving-kind") == "densepose"
        page.set_input_files("#source", str(samples["source"]))
        page.set_input_files("#driving", str(samples["driving"]))
        for sel, value in (("#width", "128"), ("#height", "128"), ("#steps", "8"), ("#max-frames", "16")):
            page.fill(sel, value)
        # record every value the progress bar takes
        page.evaluate("""() => { window.__progress = [];
            new MutationObserver(() => window.__progress.push(document.getElementById('progress').value))
                .observe(document.getElementById('progress'), {attributes: true}); }""")
        page.click("#start")
        page.wait_for_function("() => { const v = document.getElementById('result-video');"
                               " return v.readyState >= 2 && v.duration > 0; }", timeout=180000)
        values = page.evaluate("window.__progress")
        assert len(set(values)) >= 3 and max(values) == 1, values  # it advanced, and reached the end
        assert values == sorted(values), values
        duration = page.evaluate("document.getElementById('result-video').duration")
        assert abs(duration - FRAMES / 25) < 0.1, duration
        assert page.inner_text("#job-status") == "succeeded"
        assert page.is_hidden("#error")
        page.wait_for_function("() => document.getElementById('grid-video').readyState >= 2", timeout=60000)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        shot = tmp_path / "video.png"
        page.locator("#result-video").screenshot(path=str(shot))
        from PIL import Image

        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
        assert pixels.std() > 10, pixels.std()  # the video's box shows frames, not a blank
        # an error appears inline, in words
        page.set_input_files("#source", [])
        page.select_option("#source-example", "")
        page.click("#start")
        page.wait_for_selector("#error:not([hidden])")
        assert "choose a photo" in page.inner_text("#error")
