"""Load test and HTTP overhead of `magicanimate-rt serve` (loopback only, bounded).

    python -m benchmarks.serve_load [--clients 8] [--jobs 3] [--max-queue 4] [--devices cpu]
                                    [--steps 2] [--frames 16] [--size 128] [--deadline 900]
                                    [--overhead-runs 5] [--ray [--replicas 1] [--cpus-per-replica 2]
                                                             [--ranks-per-replica 1]]

1. Overhead: the same tiny job (the sample photo + motion, ``--size``, ``--frames``,
   ``--steps``) through the Python API in this process (``render.animate_to_files`` from
   the files, as the server's worker does) and through HTTP (upload, follow the event
   stream, download the video), alternating, ``--overhead-runs`` times each after one
   warm-up each; overhead = median(HTTP) / median(API) - 1.
2. Load: ``--clients`` threads each submit ``--jobs`` jobs, one after another; a 429 is
   counted and the job submitted again after its ``Retry-After`` (at most 2 s); each
   accepted job is followed to its end and its video downloaded. Queue wait and run come
   from the server's timings, end to end from the client. The server's RSS is sampled
   every 0.25 s. Everything stops by ``--deadline`` seconds.

With ``--ray`` the server is ``magicanimate-rt serve --ray`` (a local Ray cluster, an ingress
and ``--replicas`` worker replicas, README "A fleet on Ray Serve"), and the server's memory
is that of its whole process tree (the driver, Ray's GCS and raylet, the Serve controller,
proxy, ingress and replicas); the report goes to ``...-serve-ray/``. ``--ranks-per-replica
K`` splits each clip over K processes per replica (each with ``--cpus-per-replica / K``
CPUs); the report then goes to ``...-serve-ray-split<K>/``.

The report (serve_load.json, serve_load.md, serve_load.png) goes to
``benchmarks/results/<date>-<machine>-serve/``. The server runs the tiny random model set;
the point is the service's own cost and behaviour, not the model's speed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """RSS of ``pid`` and all its descendants (a Ray server is a tree of processes)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss_of(p)
        todo.extend(children.get(p, ()))
    return total


def start_server(models: Path, data: Path, extra: list[str], ready_timeout: float = 180):
    import httpx

    from .window_scaling import free_port

    port = free_port()
    log = open(data.parent / "server.log", "wb")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "magicanimate_rt.cli", "serve", "--models", str(models),
                             "--data-dir", str(data), "--port", str(port), "--log-level", "warning", *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {(data.parent / 'server.log').read_text()}")
        try:
            if client.get("/readyz").status_code == 200:
                return proc, client, log
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not become ready in {ready_timeout:g} s")


def http_job(client, source: Path, driving: Path, fields: dict, deadline: float) -> dict:
    """Submit (again after each 429), follow the event stream, download. Returns timings."""
    t0 = time.perf_counter()
    refused = 0
    while True:
        r = client.post("/v1/animations", files={"source": (source.name, source.read_bytes()),
                                                 "driving": (driving.name, driving.read_bytes())},
                        data={k: str(v) for k, v in fields.items()})
        if r.status_code == 202:
            break
        if r.status_code != 429:
            raise RuntimeError(f"submit: {r.status_code} {r.text}")
        refused += 1
        if time.monotonic() > deadline:
            return {"refused": refused, "accepted": False}
        time.sleep(min(2.0, float(r.headers.get("retry-after", "1"))))
    job_id = r.json()["id"]
    last = None
    with client.stream("GET", f"/v1/animations/{job_id}/events", timeout=max(1.0, deadline - time.monotonic())) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                last = json.loads(line[5:])
    if last is None or last.get("status") != "succeeded":
        last = client.get(f"/v1/animations/{job_id}").json()
    video = client.get(f"/v1/animations/{job_id}/video") if last["status"] == "succeeded" else None
    return {"id": job_id, "refused": refused, "accepted": True, "status": last["status"],
            "end_to_end_s": time.perf_counter() - t0, "queue_wait_s": (last.get("timings") or {}).get("queue_wait"),
            "run_s": (last.get("timings") or {}).get("run"), "bytes": len(video.content) if video else 0}


def measure_overhead(models: Path, client, source: Path, driving: Path, a) -> dict:
    from magicanimate_rt import AnimationPipeline
    from magicanimate_rt.render import animate_to_files
    from magicanimate_rt.runtime.request import AnimationRequest

    fields = {"size": a.size, "steps": a.steps, "max_frames": a.frames, "seed": 0}
    request = AnimationRequest(source, driving, size=a.size, steps=a.steps, max_frames=a.frames, seed=0)
    out = Path(tempfile.mkdtemp(prefix="overhead-"))
    api, http = [], []
    try:
        with AnimationPipeline.from_pretrained(models) as pipe:
            def api_job():
                t0 = time.perf_counter()
                animate_to_files(pipe, request.read_inputs(), out / "api.mp4", progress=False)
                return time.perf_counter() - t0

            api_job(), http_job(client, source, driving, fields, time.monotonic() + 600)  # warm-ups
            for _ in range(a.overhead_runs):
                api.append(api_job())
                http.append(http_job(client, source, driving, fields, time.monotonic() + 600)["end_to_end_s"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"api_s": api, "http_s": http, "api_median_s": statistics.median(api),
            "http_median_s": statistics.median(http),
            "overhead": statistics.median(http) / statistics.median(api) - 1}


def run_load(client, pid: int, source: Path, driving: Path, a) -> dict:
    fields = {"size": a.size, "steps": a.steps, "max_frames": a.frames, "seed": 1}
    deadline = time.monotonic() + a.deadline
    results: list[dict] = []
    lock = threading.Lock()
    rss: list[tuple[float, int]] = []
    stop = threading.Event()
    t_start = time.perf_counter()

    def sample():
        while not stop.wait(0.25):
            rss.append((time.perf_counter() - t_start, tree_rss(pid)))

    def client_loop(k: int):
        import httpx

        with httpx.Client(base_url=str(client.base_url), timeout=600) as c:
            for j in range(a.jobs):
                if time.monotonic() > deadline:
                    return
                try:
                    got = http_job(c, source, driving, dict(fields, seed=100 * k + j), deadline)
                except Exception as e:  # noqa: BLE001 - recorded as a lost job
                    got = {"accepted": True, "status": f"error: {e}", "refused": 0}
                got["client"] = k
                with lock:
                    results.append(got)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 30))
    wall = time.perf_counter() - t_start
    stop.set()
    sampler.join()
    done = [r for r in results if r.get("status") == "succeeded"]
    return {"results": results, "rss": rss, "wall_s": wall, "submitted_jobs": a.clients * a.jobs,
            "succeeded": len(done), "lost": sum(1 for r in results if r.get("accepted") and r.get("status") != "succeeded"),
            "refused_429": sum(r.get("refused", 0) for r in results),
            "never_accepted": sum(1 for r in results if not r.get("accepted")),
            "throughput_jobs_per_min": 60 * len(done) / wall,
            "queue_wait_s": {"p50": percentile([r["queue_wait_s"] for r in done], 0.5),
                             "p95": percentile([r["queue_wait_s"] for r in done], 0.95)},
            "run_s": {"p50": percentile([r["run_s"] for r in done], 0.5), "p95": percentile([r["run_s"] for r in done], 0.95)},
            "end_to_end_s": {"p50": percentile([r["end_to_end_s"] for r in done], 0.5),
                             "p95": percentile([r["end_to_end_s"] for r in done], 0.95)},
            "rss_max_mb": max((b for _, b in rss), default=0) / 2**20,
            "rss_start_mb": (rss[0][1] if rss else 0) / 2**20}


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    m, load, ov = report["meta"], report["load"], report["overhead"]
    lines = [f"# Service load test: {m['clients']} clients x {m['jobs']} jobs", "",
             f"Machine: {m['machine']}; server: `{m['server']}`; jobs: tiny random set, {m['size']} px, {m['frames']} "
             f"frames, {m['steps']} steps. Command: `{m['command']}`.", "",
             "| jobs | succeeded | lost | 429 answers | wall s | jobs/min | queue wait p50 / p95 s | run p50 / p95 s "
             "| end to end p50 / p95 s | server RSS start / max MiB |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| {load['submitted_jobs']} | {load['succeeded']} | {load['lost']} | {load['refused_429']} | "
             f"{load['wall_s']:.1f} | {load['throughput_jobs_per_min']:.1f} | {load['queue_wait_s']['p50']:.2f} / "
             f"{load['queue_wait_s']['p95']:.2f} | {load['run_s']['p50']:.2f} / {load['run_s']['p95']:.2f} | "
             f"{load['end_to_end_s']['p50']:.2f} / {load['end_to_end_s']['p95']:.2f} | {load['rss_start_mb']:.0f} / "
             f"{load['rss_max_mb']:.0f} |", "",
             "HTTP overhead for one job (same job, alternating, medians of "
             f"{len(ov['api_s'])}): Python API {ov['api_median_s']:.3f} s, HTTP {ov['http_median_s']:.3f} s, "
             f"overhead **{100 * ov['overhead']:.1f}%**."]
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
        ax1.plot([t for t, _ in load["rss"]], [b / 2**20 for _, b in load["rss"]])
        ax1.set_xlabel("seconds")
        ax1.set_ylabel("server RSS, MiB")
        ax1.set_title("server memory during the load test")
        done = [r for r in load["results"] if r.get("status") == "succeeded"]
        ax2.hist([[r["queue_wait_s"] for r in done], [r["run_s"] for r in done]], bins=12, label=["queue wait", "run"])
        ax2.set_xlabel("seconds")
        ax2.set_ylabel("jobs")
        ax2.legend()
        ax2.set_title("job latency")
        fig.tight_layout()
        fig.savefig(out / "serve_load.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--jobs", type=int, default=3, help="jobs per client")
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--devices", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--deadline", type=float, default=900, help="seconds after which clients stop submitting")
    p.add_argument("--overhead-runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ray", action="store_true", help="the server on Ray Serve (serve --ray) instead of one process")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: worker replicas")
    p.add_argument("--cpus-per-replica", type=float, default=2,
                   help="with --ray: CPUs each replica reserves, its torch threads (default 2: as one process here)")
    p.add_argument("--ranks-per-replica", type=int, default=1,
                   help="with --ray: split each clip over K processes of a replica (its CPUs shared out)")
    a = p.parse_args(argv)

    from magicanimate_rt.demo import demo_models

    from .window_scaling import free_port
    from .runtime_bench import machine_name

    source = SAMPLES / "source_image" / "multi1_source.png"
    driving = SAMPLES / "driving" / "running.mp4"
    if not source.is_file() or not driving.is_file():
        raise SystemExit(f"the samples are not at {SAMPLES}")
    models = demo_models()
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    if a.ray:
        extra = ["--ray", "--replicas", str(a.replicas), "--cpus-per-replica", f"{a.cpus_per_replica:g}",
                 "--ranks-per-replica", str(a.ranks_per_replica), "--max-queue", str(a.max_queue),
                 "--dashboard-port", str(free_port())]
    else:
        extra = ["--devices", a.devices, "--max-queue", str(a.max_queue)]
    proc, client, log = start_server(models, work / "data", extra, ready_timeout=300 if a.ray else 180)
    try:
        print("overhead ...", flush=True)
        overhead = measure_overhead(models, client, source, driving, a)
        print(f"  API {overhead['api_median_s']:.3f} s, HTTP {overhead['http_median_s']:.3f} s: "
              f"{100 * overhead['overhead']:.1f}%", flush=True)
        print(f"load: {a.clients} clients x {a.jobs} jobs ...", flush=True)
        load = run_load(client, proc.pid, source, driving, a)
        print(f"  {load['succeeded']}/{load['submitted_jobs']} succeeded, {load['lost']} lost, "
              f"{load['refused_429']} answers 429, {load['wall_s']:.1f} s", flush=True)
    finally:
        proc.terminate()
        rc = proc.wait(120)
        client.close()
        log.close()
    machine = machine_name("cpu")
    meta = {"machine": machine, "date": _dt.date.today().isoformat(), "clients": a.clients, "jobs": a.jobs,
            "size": a.size, "frames": a.frames, "steps": a.steps, "server_exit": rc,
            "server": "magicanimate-rt serve " + " ".join(extra),
            "command": "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:])}
    kind = ("-ray" + (f"-split{a.ranks_per_replica}" if a.ranks_per_replica > 1 else "")) if a.ray else ""
    out = a.out or ROOT / "benchmarks" / "results" / f"{meta['date']}-{machine}-serve{kind}"
    write_report(out, {"meta": meta, "overhead": overhead, "load": load})
    shutil.rmtree(work, ignore_errors=True)
    print(out)
    return 0 if load["lost"] == 0 and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
