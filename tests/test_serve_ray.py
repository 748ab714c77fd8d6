"""The service on Ray Serve (issue 19): a local Ray on loopback, two CPU worker replicas.

One Ray cluster (``ray.init(num_cpus=2)``, no dashboard, HTTP on 127.0.0.1) and one app
(an ingress and two ``AnimationWorker`` replicas on the tiny model set, ``max_queue=2``)
serve the whole module; jobs are 128 px, 16 frames, 2-40 steps. Budget: about 3 minutes on
2 CPU cores (the cluster and the replicas start in ~35 s; every wait below is bounded).
Skipped where ray is not installed (``pip install -e ".[serve,ray]"``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service's packages: pip install -e '.[serve]'")
pytest.importorskip("ray.serve", reason="Ray Serve: pip install -e '.[ray]'")
httpx = pytest.importorskip("httpx")

from serve_helpers import (FINAL, ROOT, decode_mp4, events, free_port, ray_samples, submit, submit_job,  # noqa: E402
                           wait_final, wait_for)

pytestmark = pytest.mark.slow

SIZE, FRAMES = 128, 16


@pytest.fixture(scope="module")
def samples(shared_dir):
    return ray_samples(shared_dir)


class Fleet:
    def __init__(self, url: str, data_dir):
        self.url, self.data_dir = url, data_dir
        self.client = httpx.Client(base_url=url, timeout=60)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the Ray app was not ready within {timeout} s")


@pytest.fixture(scope="module")
def fleet(tiny_models, tmp_path_factory):
    import ray
    from ray import serve

    from magicanimate_rt.serve.ray_app import APP_NAME, RayOptions, build_app
    from magicanimate_rt.serve.settings import ServeSettings

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage report leaves the machine
    # the HTTP proxy binds 127.0.0.1 (http_options); Ray's own services bind this host's
    # address (Ray turns a loopback node address into it), reached only from this host
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        data = tmp_path_factory.mktemp("serve-ray") / "data"
        settings = ServeSettings(models=tiny_models, data_dir=data, max_queue=2, max_steps=50, max_side=512).check()
        serve.run(build_app(settings, RayOptions(replicas=2)), name=APP_NAME, route_prefix="/")
        f = Fleet(f"http://127.0.0.1:{port}", data)
        f.wait_ready()
        yield f
        f.client.close()
        serve.shutdown()
    finally:
        ray.shutdown()


def job(fleet, samples, **fields) -> str:
    return submit_job(fleet.client, samples, **{"size": SIZE, "steps": 2, "max_frames": FRAMES, "seed": 3, **fields})


def replica_actor(name: str):
    import ray

    return ray.get_actor(name, namespace="serve")


# --------------------------------------------------------------------------- flags (before the cluster starts:
# its log lines would join stderr)
def test_bad_ray_flags_are_one_line_exit_2(tiny_models, tmp_path, capsys):
    from magicanimate_rt.cli import main

    cases = [
        (["--ray", "--replicas", "0"], "--replicas must be >= 1, got 0"),
        (["--ray", "--devices", "cpu,cpu"], "give --replicas N (and --gpus-per-replica), not --devices"),
        (["--replicas", "2"], "--replicas is for a fleet on Ray Serve: add --ray"),
        (["--address", "auto"], "--address is for a fleet on Ray Serve: add --ray"),
        (["--ray", "--device", "cuda:1"], "with --ray give cpu or cuda"),
        (["--ray", "--gpus-per-replica", "1"], "--gpus-per-replica 1 does not fit --device cpu"),
        (["--min-replicas", "1"], "--min-replicas is for a fleet on Ray Serve: add --ray"),
        (["--ray", "--replicas", "2", "--min-replicas", "1", "--max-replicas", "2"],
         "give either --replicas N (a fixed fleet) or --min-replicas and --max-replicas (autoscaling)"),
        (["--ray", "--min-replicas", "1"], "autoscaling needs both --min-replicas and --max-replicas"),
        (["--ray", "--min-replicas", "2", "--max-replicas", "1"],
         "--max-replicas must be >= 1 and >= --min-replicas (2), got 1"),
    ]
    for extra, message in cases:
        rc = main(["serve", "--models", str(tiny_models), "--data-dir", str(tmp_path / "d"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, (extra, err)


# --------------------------------------------------------------------------- the happy path
def test_the_served_video_equals_the_cli_and_events_show_every_step(fleet, samples, tiny_models, tmp_path):
    r = submit(fleet.client, samples["source"], samples["driving"], size=SIZE, steps=3, max_frames=FRAMES, seed=3,
               guidance=7.5, grid="true")
    assert r.status_code == 202, r.text
    seen = events(fleet.client, r.json()["id"], timeout=300)
    st = seen[-1]
    assert st["status"] == "succeeded", st
    steps = [e["progress"]["step"] for e in seen if e["status"] == "running"]
    assert steps == sorted(steps) and {1, 2, 3} <= set(steps), steps  # relayed from the replica, in order
    assert {"reading", "denoising", "decoding"} <= {e["progress"]["stage"] for e in seen}
    assert st["worker"].startswith("SERVE_REPLICA::magicanimate#AnimationWorker#"), st["worker"]
    assert st["timings"]["attempts"] == 1 and st["timings"]["unet"] > 0
    served = fleet.client.get(st["video_url"])
    grid = fleet.client.get(st["grid_url"])
    assert served.status_code == grid.status_code == 200 and served.headers["content-type"] == "video/mp4"
    part = fleet.client.get(st["video_url"], headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == served.content[10:20]

    # the CLI with the replica's torch thread count: on a CPU the float sums (and so the
    # frames) differ with it (1 vs 2 threads: |diff| up to 20 on this tiny random model)
    from ray import serve

    info = serve.get_deployment_handle("AnimationWorker", "magicanimate").info.remote().result(timeout_s=60)
    out, out_grid = tmp_path / "cli.mp4", tmp_path / "cli-grid.mp4"
    env = dict(os.environ, OMP_NUM_THREADS=str(info["threads"]),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", "animate", "--models", str(tiny_models),
                           "--source", str(samples["source"]), "--driving", str(samples["driving"]), "--output",
                           str(out), "--grid", str(out_grid), "--size", str(SIZE), "--steps", "3", "--max-frames",
                           str(FRAMES), "--seed", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    a, b = decode_mp4(served.content, tmp_path / "a.mp4"), decode_mp4(out.read_bytes(), tmp_path / "b.mp4")
    assert a.shape == b.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    g1, g2 = decode_mp4(grid.content, tmp_path / "g1.mp4"), decode_mp4(out_grid.read_bytes(), tmp_path / "g2.mp4")
    assert g1.shape == g2.shape and np.abs(g1.astype(int) - g2.astype(int)).max() <= 1


def test_two_jobs_run_at_once_on_different_replicas(fleet, samples):
    ids = [job(fleet, samples, steps=6), job(fleet, samples, steps=6, seed=4)]
    a, b = [wait_final(fleet.client, i, timeout=300) for i in ids]
    assert a["status"] == b["status"] == "succeeded", (a, b)
    assert a["worker"] != b["worker"] and all(w.startswith("SERVE_REPLICA::") for w in (a["worker"], b["worker"]))
    assert a["started"] < b["finished"] and b["started"] < a["finished"], (a, b)  # they overlap in time
    ready = fleet.client.get("/readyz").json()
    assert ready["status"] == "ready" and [w["name"] for w in ready["workers"]] == ["slot-0", "slot-1"]


def test_queue_full_is_429_and_cancel_reaches_the_replica(fleet, samples):
    c = fleet.client
    running = [job(fleet, samples, steps=40, seed=s) for s in (1, 2)]
    for i in running:
        wait_for(c, i, lambda st: st["status"] == "running" and st["progress"]["step"] >= 1, timeout=120)
    queued = [job(fleet, samples, seed=s) for s in (3, 4)]  # both replicas busy: these wait at the ingress
    assert [c.get(f"/v1/animations/{i}").json()["queue_position"] for i in queued] == [1, 2]
    full = submit(c, samples["source"], samples["driving"], size=SIZE, steps=2, max_frames=FRAMES)
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert "the queue is full (2 jobs waiting)" in full.json()["error"]["message"]

    for i in queued:
        r = c.delete(f"/v1/animations/{i}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
    for i in running:
        assert c.delete(f"/v1/animations/{i}").status_code == 202
    for i in running:  # the replica stops at its next step boundary, long before step 40
        st = wait_final(c, i, timeout=60)
        assert st["status"] == "cancelled" and st["error"]["message"] == "cancelled by the client", st
        assert st["progress"]["step"] < 40 and not (fleet.data_dir / "results" / i).exists()
    # the replicas are free again
    assert wait_final(c, job(fleet, samples), timeout=120)["status"] == "succeeded"


# --------------------------------------------------------------------------- faults
def test_a_replica_killed_mid_job_is_retried_once_and_nothing_is_lost(fleet, samples):
    import ray

    c = fleet.client
    long = job(fleet, samples, steps=12, seed=7)
    st = wait_for(c, long, lambda st: st["status"] == "running" and st["progress"]["step"] >= 2
                  and (st["worker"] or "").startswith("SERVE_REPLICA::"), timeout=120)
    victim = st["worker"]
    behind = job(fleet, samples, seed=8)  # waits or runs meanwhile: it must end too
    ray.kill(replica_actor(victim), no_restart=True)

    end = wait_final(c, long, timeout=240)
    if end["status"] == "succeeded":  # retried on the other (or a fresh) replica
        assert end["worker"] != victim and end["timings"]["attempts"] == 2, end
        assert end["progress"]["attempt"] == 2 and "stopped during the job" in end["progress"]["retried"]
        assert c.get(end["video_url"]).content[4:8] == b"ftyp"
    else:
        assert end["status"] == "failed" and "worker replica stopped" in end["error"]["message"], end
    print(f"killed {victim} at step {st['progress']['step']}: the job {end['status']} on {end['worker']} "
          f"({end['error'] or end['timings']})")
    assert wait_final(c, behind, timeout=240)["status"] == "succeeded"
    # reported once: the final status stays as it was, and the job is listed once
    time.sleep(1.0)
    assert c.get(f"/v1/animations/{long}").json() == end
    listed = [j["id"] for j in c.get("/v1/animations", params={"limit": 200}).json()["animations"]]
    assert listed.count(long) == 1
    # Serve replaces the dead replica; the fleet keeps serving
    assert wait_final(c, job(fleet, samples, seed=9), timeout=240)["status"] == "succeeded"


def test_the_ingress_restarting_keeps_finished_jobs(fleet, samples):
    import ray

    c = fleet.client
    done = job(fleet, samples, seed=11)
    assert wait_final(c, done, timeout=120)["status"] == "succeeded"
    video = c.get(f"/v1/animations/{done}/video").content
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "#Ingress#" in a["name"]]
    assert len(names) == 1, names
    ray.kill(replica_actor(names[0]), no_restart=True)
    deadline = time.monotonic() + 180
    while True:  # Serve starts a new ingress on the same data directory
        new = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == "serve" and "#Ingress#" in a["name"]]
        try:
            if new and new != names and c.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "no new ingress within 180 s"
        time.sleep(0.3)
    st = c.get(f"/v1/animations/{done}").json()
    assert st["status"] == "succeeded" and c.get(f"/v1/animations/{done}/video").content == video
    assert wait_final(c, job(fleet, samples, seed=12), timeout=240)["status"] in FINAL


def test_autoscaling_adds_a_replica_while_jobs_wait_and_removes_it_when_idle(fleet, samples, tiny_models,
                                                                            tmp_path):
    # a second app beside the fleet's, autoscaled between 1 and 2 replicas (0 CPUs each: the
    # fleet's replicas hold the cluster's 2), the autoscaler quick to act both ways
    from ray import serve

    from magicanimate_rt.serve.ray_app import RayOptions, build_app
    from magicanimate_rt.serve.settings import ServeSettings

    settings = ServeSettings(models=tiny_models, data_dir=tmp_path / "data", max_queue=4, max_steps=50,
                             max_side=512).check()
    options = RayOptions(min_replicas=1, max_replicas=2, cpus_per_replica=0, upscale_delay_s=0,
                         downscale_delay_s=2).check()
    name = "magicanimate-autoscale"
    serve.run(build_app(settings, options), name=name, route_prefix="/auto")
    try:
        auto = Fleet(fleet.url + "/auto", settings.data_dir)
        auto.wait_ready()

        def running() -> int:
            states = serve.status().applications[name].deployments["AnimationWorker"].replica_states
            return states.get("RUNNING", 0)

        def wait_replicas(n: int, timeout: float) -> float:
            t0 = time.monotonic()
            while running() != n:
                assert time.monotonic() - t0 < timeout, f"not {n} replicas within {timeout} s ({running()})"
                time.sleep(0.2)
            return time.monotonic() - t0

        assert running() == 1
        assert [w["name"] for w in auto.client.get("/readyz").json()["workers"]] == ["slot-0", "slot-1"]
        ids = [job(auto, samples, steps=20, seed=s) for s in (21, 22)]  # both handed to Serve at once
        up = wait_replicas(2, 120)
        a, b = [wait_final(auto.client, i, timeout=240) for i in ids]
        assert a["status"] == b["status"] == "succeeded", (a, b)
        assert a["worker"] != b["worker"]  # the second ran on the replica the autoscaler added
        down = wait_replicas(1, 90)
        print(f"autoscaling: 2 replicas {up:.1f} s after the jobs; back to 1 {down:.1f} s after they ended")
    finally:
        serve.delete(name)


def test_the_documented_config_builds_the_app(tiny_models, tmp_path):
    # deploy/ray-serve.yaml's args, with this machine's paths, through the builder `serve run` calls
    import yaml

    from magicanimate_rt.errors import InputError
    from magicanimate_rt.serve.ray_app import app

    config = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    entry = config["applications"][0]
    assert entry["import_path"] == "magicanimate_rt.serve.ray_app:app"
    args = dict(entry["args"], models=str(tiny_models), data_dir=str(tmp_path / "data"), dtype="float32")
    built = app(args)
    assert type(built).__name__ == "Application" and (tmp_path / "data").is_dir()
    with pytest.raises(InputError, match="unknown argument 'replica'"):
        app(dict(args, replica=2))
    with pytest.raises(InputError, match="--replicas must be >= 1"):
        app(dict(args, replicas=0))
    with pytest.raises(InputError, match="give either replicas .* or min_replicas and max_replicas"):
        app(dict(args, min_replicas=1, max_replicas=4))
    fixed = {k: v for k, v in args.items() if k != "replicas"}
    assert type(app(dict(fixed, min_replicas=0, max_replicas=4, gpu_memory_gb=8))).__name__ == "Application"
    # a replica per 4-GPU host, each clip split over its GPUs: a placement group of 4 bundles
    split = app(dict(args, replicas=2, ranks_per_replica=4, gpus_per_replica=4, cpus_per_replica=8))
    worker = split._bound_deployment.init_args[1]._bound_deployment  # the ingress is bound to the workers
    assert worker.num_replicas == 2 and worker.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert worker.init_args[2:] == (4, {"num_cpus": 2.0, "num_gpus": 1.0})  # rank 0 starts 3 such actors
    config = worker._replica_config  # (Serve keeps the placement group here)
    assert config.placement_group_bundles == [{"CPU": 2.0, "GPU": 1.0}] * 4
    assert config.placement_group_strategy == "STRICT_PACK"
    with pytest.raises(InputError, match="--ranks-per-replica 4 runs one process per GPU: give --gpus-per-replica 4"):
        app(dict(args, ranks_per_replica=4, gpus_per_replica=1))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_serve_ray_and_serve_run_reserve_the_same_for_the_same_settings(tiny_models, tmp_path, monkeypatch, ranks,
                                                                          device):
    # issue 26: the two entry points read one declaration (serve/settings.py) and derive a
    # replica's reservation in one place (RayOptions); built apps only, no cluster
    from magicanimate_rt import cli
    from magicanimate_rt.serve import ray_app

    key = tmp_path / "key"
    key.write_text("k" * 20 + "\n")
    seen = {}
    monkeypatch.setattr(ray_app, "serve_on_ray", lambda settings, options, log_level: seen.update(
        settings=settings, options=options) or 0)
    rc = cli.main(["serve", "--ray", "--models", str(tiny_models), "--data-dir", str(tmp_path / "d"),
                   "--device", device, "--ranks-per-replica", str(ranks), "--max-upload-mb", "1.5",
                   "--shutdown-grace", "2", "--api-key-file", str(key), "--max-queue", "3"])
    assert rc == 0
    from_cli = ray_app.build_app(seen["settings"], seen["options"])
    from_run = ray_app.app({"models": str(tiny_models), "data_dir": str(tmp_path / "d"), "device": device,
                            "ranks_per_replica": str(ranks), "max_upload_mb": "1.5", "shutdown_grace_s": 2,
                            "api_key_file": str(key), "max_queue": "3"})

    def reserved(application):
        worker = application._bound_deployment.init_args[1]._bound_deployment  # the ingress is bound to the workers
        config = worker._replica_config
        return (worker.ray_actor_options, worker.init_args[1:], config.placement_group_bundles,
                config.placement_group_strategy)

    assert reserved(from_cli) == reserved(from_run)
    # the numbers themselves: one CPU per rank, and one GPU per rank on cuda
    per_rank = {"num_cpus": 1.0, "num_gpus": 1.0 if device == "cuda" else 0.0}
    bundles = [{"CPU": 1.0, **({"GPU": 1.0} if device == "cuda" else {})}] * ranks if ranks > 1 else None
    assert reserved(from_run)[:3] == (per_rank, (device, ranks, per_rank), bundles)
    # and the service's own settings (the ingress's) are the same object
    settings = from_run._bound_deployment.init_args[0]
    assert settings == from_cli._bound_deployment.init_args[0]
    assert (settings.max_upload_bytes, settings.shutdown_grace_s, settings.max_queue) == (int(1.5 * 2**20), 2.0, 3)
    assert settings.api_key == "k" * 20
