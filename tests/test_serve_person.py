"""`serve --densepose-weights` (issue 27 item 5): a job may upload an ordinary video of a person
(``driving_kind=person``); the server makes its DensePose clip first (a "densepose" phase in the
job's progress), cached by content in ``<data-dir>/densepose``, then animates it.

The estimator costs ~10-55 s a frame on 2 busy cores (the person video is resized to 800 px on its
short side whatever its size), so the real estimation runs once, for 1 frame (the first test's
job); the CLI run it is compared with, and the page's job, find that clip in the server's cache
(the same key: the same video bytes, weights, settings and precision), which the tests check.
Cancelling mid-phase uses a stand-in for the model's forward (no detections), in this process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service's packages: pip install -e '.[serve]'")
pytest.importorskip("httpx")

from serve_helpers import (ServerProcess, ServerThread, decode_mp4, events, free_port,  # noqa: E402
                           page_at, submit, wait_final, wait_for)

SIZE, FRAMES, STEPS = 64, 1, 2


@pytest.fixture(scope="module")
def person(shared_dir):
    s = shared_dir / "samples"
    return {"source": s / "source_image" / "monalisa.png", "driving": s / "person" / "input_video.mp4"}


@pytest.fixture(scope="module")
def server(tiny_models, densepose_weights, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve_person") / "data"
    srv = ServerProcess(tiny_models, data, "--densepose-weights", str(densepose_weights), "--max-frames", "16")
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, srv.output()


def test_a_person_video_job_equals_animate_densepose_weights(server, person, tiny_models, densepose_weights,
                                                            tmp_path, monkeypatch, estimations):
    ready = server.client.get("/v1/presets").json()
    assert {k["name"]: k["enabled"] for k in ready["driving_kinds"]} == {"densepose": True, "person": True}
    r = submit(server.client, person["source"], person["driving"], driving_kind="person", size=SIZE, steps=STEPS,
               max_frames=FRAMES, seed=3)
    assert r.status_code == 202, r.text
    seen = events(server.client, r.json()["id"])
    st = seen[-1]
    assert st["status"] == "succeeded", st
    stages = [e["progress"]["stage"] for e in seen if e["status"] == "running"]
    assert "densepose" in stages and stages.index("densepose") < stages.index("denoising"), stages
    made = [e["progress"]["densepose"]["frames_done"] for e in seen if e["progress"].get("stage") == "densepose"]
    assert made == sorted(made) and made[-1] == FRAMES, made  # the phase reported its frames as they were made
    assert st["settings"]["driving_kind"] == "person" and st["timings"]["densepose"] > 0
    clips = sorted((server.data_dir / "densepose").glob("*.mp4"))
    assert len(clips) == 1
    metrics = server.client.get("/metrics").text
    assert 'magicanimate_job_seconds_count{phase="densepose"} 1.0' in metrics
    served = decode_mp4(server.client.get(st["video_url"]).content, tmp_path / "served.mp4")

    # the CLI, on the same person video and request, its clip cache the server's: it finds the
    # server's clip (nothing estimated here), so both made the same key from the same inputs
    from magicanimate_rt.cli import main

    monkeypatch.setenv("MAGICANIMATE_RT_CACHE", str(server.data_dir))
    args = ["animate", "--models", str(tiny_models), "--source", str(person["source"]), "--size", str(SIZE),
            "--steps", str(STEPS), "--max-frames", str(FRAMES), "--seed", "3"]
    out, raw = tmp_path / "cli.mp4", tmp_path / "raw.mp4"
    assert main([*args, "--driving", str(person["driving"]), "--densepose-weights", str(densepose_weights),
                 "--output", str(out)]) == 0
    assert estimations == [] and sorted((server.data_dir / "densepose").glob("*.mp4")) == clips
    # control: the person video animated as if it were DensePose (no clip made first)
    assert main([*args, "--driving", str(person["driving"]), "--output", str(raw)]) == 0
    cli, wrong = read(out), read(raw)
    assert served.shape == cli.shape == (FRAMES, SIZE, SIZE, 3)
    # the same frames encoded twice differ by at most 0.61 per-frame mean |diff| (the encoder's
    # measured variation, tests/test_media.py; measured here: 0, the same bytes), so 2.0 as there;
    # the person video taken for a DensePose clip moves every frame's mean by 3.7-4.5 (measured)
    assert per_frame_mean(served, cli).max() < 2.0, per_frame_mean(served, cli)
    assert per_frame_mean(wrong, cli).min() > 3.0, per_frame_mean(wrong, cli)


def read(path):
    from magicanimate_rt.runtime.media import read_video

    return read_video(path)


def per_frame_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(float) - b).reshape(len(a), -1).mean(1)


def test_cancel_during_the_densepose_phase(tiny_models, densepose_weights, tmp_path, person, monkeypatch):
    """A job cancelled while its clip is made stops at the next batch: no clip, no result."""
    from magicanimate_rt.densepose.estimator import DensePoseEstimator
    from magicanimate_rt.densepose.result import DensePoseResult
    from magicanimate_rt.runtime.pipeline import AnimationPipeline
    from magicanimate_rt.serve.settings import ServeSettings

    batches, entered, release = [], threading.Event(), threading.Event()

    def predict(self, frames):  # no detections (the background frame), and a pause at the second batch
        # (frames: what the estimator's prepare made of them on the video's reader thread)
        batches.append(len(frames))
        if len(batches) == 2:
            entered.set()
            assert release.wait(60), "the test never released the estimator"
        return [DensePoseResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32)) for _ in range(len(frames))]

    monkeypatch.setattr(DensePoseEstimator, "predict", predict)
    settings = ServeSettings(models=tiny_models, port=free_port(), data_dir=tmp_path / "data",
                             densepose_weights=densepose_weights).check()
    with ServerThread(settings, lambda device: AnimationPipeline.from_pretrained(tiny_models, device=device)) as srv:
        c = srv.client
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        job_id = submit(c, person["source"], person["driving"], driving_kind="person", size=SIZE, steps=STEPS,
                        max_frames=12).json()["id"]
        assert entered.wait(120)
        st = wait_for(c, job_id, lambda st: (st["progress"].get("densepose") or {}).get("frames_done") == 4)
        assert st["progress"]["stage"] == "densepose"  # the first batch of 4 made, the second under way
        r = c.delete(f"/v1/animations/{job_id}")
        assert r.status_code == 202 and r.json()["progress"]["cancelling"]
        release.set()
        st = wait_final(c, job_id)
        assert st["status"] == "cancelled" and st["error"]["message"] == "cancelled by the client"
        assert st["progress"]["densepose"]["frames_done"] == 8 and batches == [4, 4]  # stopped after batch 2
    data = tmp_path / "data"
    assert not list((data / "densepose").glob("*.mp4")) and not (data / "results" / job_id).exists()
    assert not [p for p in data.rglob("*") if ".tmp" in p.name]


def test_the_page_takes_a_person_video(server, person, tmp_path):
    with page_at(server.url) as page:
        page.wait_for_function("() => !document.querySelector('#driving-kind option[value=person]').disabled")
        page.select_option("#driving-kind", "person")
        page.set_input_files("#source", str(person["source"]))
        page.set_input_files("#driving", str(person["driving"]))
        for sel, value in (("#width", str(SIZE)), ("#height", str(SIZE)), ("#steps", str(STEPS)),
                           ("#max-frames", str(FRAMES)), ("#seed", "3")):
            page.fill(sel, value)
        page.click("#start")
        page.wait_for_function("() => ['succeeded', 'failed', 'cancelled'].includes("
                               "document.getElementById('job-status').textContent)", timeout=180000)
        assert page.inner_text("#job-status") == "succeeded" and page.is_hidden("#error"), page.inner_text("#error")
        job_id = page.inner_text("#job-id")
        page.wait_for_function("() => document.getElementById('result-video').readyState >= 1", timeout=30000)
        assert page.get_attribute("#result-video", "src") == f"/v1/animations/{job_id}/video"
        assert server.client.get(f"/v1/animations/{job_id}").json()["settings"]["driving_kind"] == "person"
        # how the page shows the phase (with the clip in the server's cache, the job's own
        # phase may pass between two events): a status mid-phase, as the stream sends it
        page.evaluate("""() => show({id: current, status: "running", progress: {stage: "densepose", step: 0,
                                     steps: 2, densepose: {frames_done: 3, frames: 8}}})""")
        assert page.inner_text("#progress-text") == "densepose: 3 of about 8 frames of the motion made"
        assert abs(page.evaluate("document.getElementById('progress').value") - 0.3 * 3 / 8) < 1e-6
