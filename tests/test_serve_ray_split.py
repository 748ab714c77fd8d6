"""The Ray Serve fleet (issue 19) from the command line: one replica that splits every clip
over two processes (``serve --ray --ranks-per-replica 2``: the torch.distributed window
split, gloo on loopback), and ``serve shutdown`` from another shell.

One ``magicanimate-rt serve --ray`` process starts its own local Ray cluster (2 CPUs, one
per rank; the dashboard and the HTTP proxy on 127.0.0.1; Ray's own services listen on this
host's address, which Ray 2.60 uses for a local node even when given 127.0.0.1). Jobs are
64 px, 28 driving frames (three 16-frame windows: two for rank 0, one for rank 1).
It runs after ``test_serve_ray.py`` (whose cluster is gone by then). Budget: about 2
minutes on 2 CPU cores; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service's packages: pip install -e '.[serve]'")
pytest.importorskip("ray.serve", reason="Ray Serve: pip install -e '.[ray]'")
httpx = pytest.importorskip("httpx")

from serve_helpers import (ROOT, ServerProcess, decode_mp4, free_port, ray_samples, submit_job,  # noqa: E402
                           wait_final, wait_for)

pytestmark = pytest.mark.slow

SIZE, FRAMES = 64, 28


@pytest.fixture(scope="module")
def samples(shared_dir):
    return ray_samples(shared_dir)


@pytest.fixture(scope="module")
def split(tiny_models, tmp_path_factory):
    """``serve --ray`` with one replica of two ranks; yields the server (stopped at the end
    by the shutdown test, or here)."""
    data = tmp_path_factory.mktemp("serve-ray-split") / "data"
    data.mkdir()
    dash = free_port()
    server = ServerProcess(tiny_models, data, "--ray", "--ranks-per-replica", "2", "--cpus-per-replica", "2",
                           "--dashboard-port", str(dash), "--max-queue", "2", "--max-side", "512",
                           "--dtype", "float64")  # see test_a_split_replica_serves_the_single_process_video
    server.dashboard = f"http://127.0.0.1:{dash}"
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()


def job(server, samples, **fields) -> str:
    return submit_job(server.client, samples, **{"size": SIZE, "steps": 2, "max_frames": FRAMES, "seed": 3, **fields})


def rank_processes() -> list[int]:
    """The pids of the RankWorker actors on this host (Ray names its worker processes
    ``ray::Class`` or ``ray::Class.method``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if cmd.startswith(b"ray::RankWorker"):
                pids.append(int(d.name))
    return pids


def test_bad_split_flags_are_one_line_exit_2(tiny_models, tmp_path, capsys):
    from magicanimate_rt.cli import main

    cases = [
        (["--ray", "--ranks-per-replica", "0"], "--ranks-per-replica must be an integer >= 1, got 0"),
        (["--ray", "--device", "cuda", "--ranks-per-replica", "2", "--gpus-per-replica", "1"],
         "--ranks-per-replica 2 runs one process per GPU: give --gpus-per-replica 2 (got 1)"),
        (["--ray", "--ranks-per-replica", "2", "--cpus-per-replica", "0"],
         "--ranks-per-replica 2 reserves a share of the replica's resources for each rank: give --cpus-per-replica > 0"),
        (["--ranks-per-replica", "2"], "--ranks-per-replica is for a fleet on Ray Serve: add --ray"),
        (["--ray", "--address", "auto", "--dashboard-port", "9000"],
         "--dashboard-port is for the local cluster serve --ray starts"),
    ]
    for extra, message in cases:
        rc = main(["serve", "--models", str(tiny_models), "--data-dir", str(tmp_path / "d"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, (extra, err)


@pytest.mark.xfail(strict=False, reason=(
    "known defect (issue 25's investigation): a split replica's video is not reproducible. In float64, "
    "the same job submitted three times to one 2-rank replica gave frames 0-3 (rank 0's first decode "
    "chunk, and the video's first frames) up to 44/255 apart from each other and from one process, while "
    "frames 4-27 were identical; torchrun's split (tests/test_distributed.py) and a one-rank replica "
    "(tests/test_serve_ray.py) are reproducible. Whether the frames or their encoding differ is not yet "
    "known; to be fixed in the split replica's job path, not by loosening this bound"))
def test_a_split_replica_serves_the_single_process_video(split, samples, tiny_models, tmp_path):
    assert len(rank_processes()) == 1  # rank 1; rank 0 is the replica itself
    st = wait_final(split.client, job(split, samples, steps=3), timeout=240)
    assert st["status"] == "succeeded", st
    t = st["timings"]
    assert t["ranks"] == 2 and t["attempts"] == 1 and t["gather"] > 0, t  # the windows' predictions were gathered
    served = split.client.get(st["video_url"]).content

    # one process against the split, both in float64 (issue 25): in float32 the tiny random set
    # amplifies a few ulps of reordering ~1e3..1e4 (README "What the tolerances mean"), and the two
    # sides batch differently whatever we pin (the ranks decode their own frames, in chunks the
    # automatic plan sizes; Ray, not us, sets each rank's threads), so a fresh AMD machine saw
    # 43/255 between them. In float64 the same reorderings move frames by ~1e-9 of a level: the
    # frames agree up to a rounding flip (1/255), and their H.264 to 2, as tests/test_distributed.py
    out = tmp_path / "one.mp4"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", "animate", "--models", str(tiny_models),
                           "--source", str(samples["source"]), "--driving", str(samples["driving"]), "--output",
                           str(out), "--size", str(SIZE), "--steps", "3", "--max-frames", str(FRAMES), "--seed", "3",
                           "--dtype", "float64"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    a, b = decode_mp4(served, tmp_path / "a.mp4"), decode_mp4(out.read_bytes(), tmp_path / "b.mp4")
    assert a.shape == b.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_cancel_stops_every_rank_at_the_same_step(split, samples):
    c = split.client
    long = job(split, samples, steps=40, seed=5)
    wait_for(c, long, lambda st: st["status"] == "running" and st["progress"]["step"] >= 1, timeout=120)
    t0 = time.monotonic()
    assert c.delete(f"/v1/animations/{long}").status_code == 202
    st = wait_final(c, long, timeout=60)
    assert st["status"] == "cancelled" and st["progress"]["step"] < 40, st
    # both ranks left the job at one step boundary: the next job runs at once on the same
    # group (a rank left behind would hold it in a collective until the 300 s timeout)
    after = wait_final(c, job(split, samples, seed=6), timeout=120)
    assert after["status"] == "succeeded" and after["timings"]["attempts"] == 1, after
    assert time.monotonic() - t0 < 90


def test_a_rank_killed_mid_job_is_retried_on_a_new_group(split, samples):
    c = split.client
    [victim] = rank_processes()
    long = job(split, samples, steps=12, seed=7)
    st = wait_for(c, long, lambda st: st["status"] == "running" and st["progress"]["step"] >= 2, timeout=120)
    os.kill(victim, signal.SIGKILL)  # a lost GPU process: rank 0's next collective fails
    end = wait_final(c, long, timeout=240)
    assert end["status"] == "succeeded", end  # the replica started its ranks again and ran the job there
    assert end["timings"]["attempts"] == 2 and end["timings"]["ranks"] == 2, end
    assert "lost a rank of its clip split" in end["progress"]["retried"], end["progress"]
    print(f"killed rank 1 (pid {victim}) at step {st['progress']['step']}: {end['progress']['retried']}")
    assert len(new := rank_processes()) == 1 and new != [victim]
    listed = [j["id"] for j in c.get("/v1/animations", params={"limit": 200}).json()["animations"]]
    assert listed.count(long) == 1  # reported once
    assert wait_final(c, job(split, samples, seed=8), timeout=120)["status"] == "succeeded"


def test_serve_shutdown_from_another_shell_stops_the_app_and_keeps_the_jobs(split, samples):
    done = wait_final(split.client, job(split, samples, seed=9), timeout=120)
    assert done["status"] == "succeeded"
    # the command the server's start line gives (the local cluster has Ray's token auth on)
    line = next(x for x in split.output().splitlines() if x.startswith("magicanimate-rt serve --ray:"))
    command = line.split("stop with Ctrl-C or `")[1].rstrip("`")
    assert command == f"RAY_AUTH_MODE=token serve shutdown -y -a {split.dashboard}", line
    proc = subprocess.run(["serve", "shutdown", "-y", "-a", split.dashboard], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token"))
    assert proc.returncode == 0 and "Sent shutdown request" in proc.stderr + proc.stdout, proc.stderr[-2000:]
    try:
        split.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"serve --ray still running 120 s after `serve shutdown`:\n{split.output()[-3000:]}")
    out = split.output()
    assert split.proc.returncode == 0 and "the Serve application was shut down" in out, out[-3000:]
    assert not rank_processes()  # the local cluster went with it
    # the job store persisted: a single-process server on the same data directory has the jobs
    from magicanimate_rt.serve.store import Store

    store = Store(split.data_dir / "jobs.sqlite3")
    try:
        row = store.get(done["id"])
        assert row is not None and row.status == "succeeded"
    finally:
        store.close()
    assert (split.data_dir / "results" / done["id"] / "video.mp4").is_file()
