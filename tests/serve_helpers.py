"""Starting, driving and stopping `magicanimate-rt serve` in tests (loopback only)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``magicanimate-rt serve`` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, models: Path, data_dir: Path, *extra: str, key: Optional[str] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}-server-{self.port}.log"
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        cmd = [sys.executable, "-m", "magicanimate_rt.cli", "serve", "--models", str(models), "--data-dir",
               str(data_dir), "--port", str(self.port), "--log-level", "info", *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(data_dir.parent))
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server was not ready within {timeout} s:\n{self.output()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the server did not stop within {timeout} s:\n{self.output()}")
        self.client.close()
        self.log.close()
        return self.proc.returncode


class ServerThread:
    """The app in this process under uvicorn, in a thread (to inject a pipeline loader)."""

    def __init__(self, settings, load_pipeline=None):
        import uvicorn

        from magicanimate_rt.serve.app import create_app
        from magicanimate_rt.serve.jobs import JobManager

        self.manager = JobManager(settings, load_pipeline=load_pipeline)
        self.app = create_app(settings, self.manager)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(120)
        self.client.close()


def ray_samples(shared_dir: Path) -> dict[str, Path]:
    """The source image and driving video the Ray Serve tests animate."""
    s = shared_dir / "samples"
    return {"source": s / "source_image" / "multi1_source.png", "driving": s / "driving" / "running.mp4"}


def submit_job(client: httpx.Client, samples: dict, **fields) -> str:
    """Submit ``fields`` (size, steps, max_frames, seed, ...) for ``samples``; the job id."""
    r = submit(client, samples["source"], samples["driving"], **fields)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def decode_mp4(data: bytes, path: Path):
    """The frames of mp4 ``data`` (written to ``path`` first)."""
    from magicanimate_rt.runtime.media import read_video

    path.write_bytes(data)
    return read_video(path)


def submit(client: httpx.Client, source: Optional[Path], driving: Path, names=None, **fields) -> httpx.Response:
    files = {}
    names = names or {}
    if source is not None:
        files["source"] = (names.get("source", source.name), source.read_bytes(), "application/octet-stream")
    if driving is not None:
        files["driving"] = (names.get("driving", driving.name), driving.read_bytes(), "application/octet-stream")
    return client.post("/v1/animations", files=files, data={k: str(v) for k, v in fields.items()})


def wait_final(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get(f"/v1/animations/{job_id}").json()
        if st["status"] in FINAL:
            return st
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {st}")


def wait_for(client: httpx.Client, job_id: str, predicate, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get(f"/v1/animations/{job_id}").json()
        if predicate(st):
            return st
        time.sleep(0.02)
    raise AssertionError(f"job {job_id}: condition not met within {timeout} s: {st}")


def events(client: httpx.Client, job_id: str, timeout: float = 300) -> list[dict]:
    """Every status object the job's event stream sends, until it ends."""
    got = []
    with client.stream("GET", f"/v1/animations/{job_id}/events", timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "status":
                got.append(json.loads(line.split(":", 1)[1]))
    return got


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: PIL reads its size at open."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def chromium() -> Optional[str]:
    """A Chromium for the page tests (playwright drives it), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@contextlib.contextmanager
def page_at(url: str):
    """The service's page at ``url`` in Chromium (playwright), once it shows the server ready;
    skips the test without playwright or a Chromium."""
    import pytest

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip install -e '.[dev]')")
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe,
                                    args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url + "/")
            page.wait_for_selector("#server-state.ready", timeout=30000)
            yield page
        finally:
            browser.close()
