"""Benchmark the runtime: the reference schedule against the default runtime, every exact
saving alone, per stage and end to end, with FLOP counts, peak memory and charts.

    python -m benchmarks.runtime_bench --config tiny,mid --frames 32 --steps 3 --repeats 3 \\
        [--backends torch,onnxruntime --engines mid=ENGINE_DIR] [--out DIR] [--update-docs]
    python -m benchmarks.runtime_bench --config sd15 --width 512 --height 768 ...   # a portrait row

Each config runs in fresh subprocesses (benchmarks/bench_worker.py): one for the timings of all
variants (one warm-up each, then ``repeats`` rounds in the same order: ABAB...), one per
point of the memory-versus-frames sweep, one for the profile. The report goes to
``<out>/<date>-<machine>/`` (report.json, report.md, *.png), written into a temporary
directory and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import bench_report as rep
from .modelsets import CONFIGS, DEFAULT_SIZES, model_set
from .bench_variants import ABLATION, BY_KEY, DEFAULT_WARM

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


def machine_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"cpu {name} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.runtime_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny,mid", help=f"comma list of {', '.join(CONFIGS)} (default tiny,mid)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (after one warm-up)")
    p.add_argument("--size", type=int, default=None,
                   help="output size (default per config: tiny/mid 128, sd15 256 on the CPU; mid 256, sd15 512 on CUDA)")
    p.add_argument("--width", type=int, default=None,
                   help="output width, with --height, instead of --size (e.g. sd15 portrait: 512 x 768)")
    p.add_argument("--height", type=int, default=None, help="output height, with --width")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on the CPU, float16 on CUDA by default")
    p.add_argument("--backends", default="torch", help="comma list: torch[,onnxruntime]")
    p.add_argument("--engines", default="", help="engine directories for onnxruntime rows: CONFIG=DIR[,CONFIG=DIR]")
    p.add_argument("--variants", default="all",
                   help=f"ablation rows besides reference and default: 'all', 'none' or a comma list of "
                        f"{', '.join(v.key for v in ABLATION + (DEFAULT_WARM,))}")
    p.add_argument("--ablation-configs", default=None,
                   help="configs that get the ablation rows (default: all); the others get reference and default only")
    p.add_argument("--memory-frames", default="16,32,64", help="frame counts of the memory sweep ('' to skip)")
    p.add_argument("--memory-variants", default="reference,default,default_bounded")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="parent directory of the report")
    p.add_argument("--name", default=None, help="report directory name (default <date>-<machine>)")
    p.add_argument("--cache", default=None, help="where model sets are written (default the demo cache dir)")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the tables in {DOCS.relative_to(ROOT)}")
    p.add_argument("--docs-from", default=None, metavar="DIR[,DIR]",
                   help="measure nothing: rewrite the docs' tables from existing report directories")
    return p.parse_args(argv)


def run_job(spec: dict, work: Path) -> dict:
    name = f"{spec['config']}-{spec['job']}-{len(list(work.iterdir()))}"
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "benchmarks.bench_worker", str(spec_path), str(out_path)], cwd=ROOT, check=True)
    return json.loads(out_path.read_text())


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.docs_from:
        dirs = [Path(d) for d in a.docs_from.split(",") if d]
        update_docs([(json.loads((d / "report.json").read_text()), d) for d in dirs])
        return 0
    device = a.device
    dev_type = torch.device(device).type
    dtype = a.dtype or ("float16" if dev_type == "cuda" else "float32")
    configs = [c.strip() for c in a.config.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            sys.exit(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    backends = {b.strip() for b in a.backends.split(",") if b.strip()}
    engines = dict(kv.split("=", 1) for kv in a.engines.split(",") if "=" in kv)
    if a.variants == "all":
        extra = [v.key for v in ABLATION] + [DEFAULT_WARM.key]
    elif a.variants == "none":
        extra = []
    else:
        extra = [k.strip() for k in a.variants.split(",") if k.strip()]
    for k in extra + a.memory_variants.split(","):
        if k and k not in BY_KEY:
            sys.exit(f"unknown variant {k!r}; choose from {', '.join(BY_KEY)}")
    if (a.width is None) != (a.height is None):
        sys.exit("--width and --height go together")
    mem_frames = [int(f) for f in a.memory_frames.split(",") if f.strip()]
    ablation_configs = set(configs if a.ablation_configs is None else a.ablation_configs.split(","))

    machine = machine_name(device)
    name = a.name or f"{_dt.date.today().isoformat()}-{machine}"
    report = {"name": name, "command": "python -m benchmarks.runtime_bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "environment": {"machine": machine, "device": device, "dtype": dtype, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                              "python": platform.python_version(), "date": _dt.datetime.now().isoformat(timespec="seconds")},
              "configs": {}}
    with tempfile.TemporaryDirectory(prefix="ma-bench-") as tmp:
        work = Path(tmp)
        for cfg in configs:
            size = a.size or DEFAULT_SIZES.get(dev_type, DEFAULT_SIZES["cpu"])[cfg]
            width, height = (a.width, a.height) if a.width is not None else (size, size)
            models_dir = model_set(cfg, Path(a.cache) if a.cache else None)
            base = {"config": cfg, "models_dir": str(models_dir), "size": size if width == height else None,
                    "width": width, "height": height, "frames": a.frames, "steps": a.steps,
                    "repeats": a.repeats, "device": device, "dtype": dtype, "guidance": a.guidance, "seed": a.seed}
            entry = {"spec": base}
            skipped = {}
            engine_dir = None
            if "onnxruntime" in backends:
                if cfg not in engines:
                    skipped["onnxruntime"] = f"no engine directory given for {cfg} (--engines {cfg}=DIR)"
                elif not Path(engines[cfg]).is_dir():
                    skipped["onnxruntime"] = f"engine directory {engines[cfg]} not found"
                else:
                    engine_dir = engines[cfg]
            print(f"== {cfg}: timing ({rep.shape_label(base)} px, {a.frames} frames, {a.steps} steps)",
                  file=sys.stderr, flush=True)
            rows = ["reference", "default"] + (extra if cfg in ablation_configs else [])
            timing = run_job({**base, "job": "timing", "variants": rows,
                              "engine_dir": engine_dir}, work)
            skipped.update(timing.get("skipped", {}))
            entry["skipped"] = skipped
            entry["raw_timing"] = timing
            entry["timing"] = rep.summarize_timing(timing)
            if mem_frames:
                mem = {"frames": mem_frames, "variants": {}}
                for key in [k for k in a.memory_variants.split(",") if k]:
                    peaks, records = [], []
                    for f in mem_frames:
                        print(f"== {cfg}: memory {key} {f} frames", file=sys.stderr, flush=True)
                        r = run_job({**base, "job": "memory", "variants": [key], "frames": f, "steps": 1}, work)
                        peaks.append(r["memory"]["peak_bytes"])
                        records.append(r)
                    mem["variants"][key] = {"label": BY_KEY[key].label, "peak_bytes": peaks,
                                            "fit": rep.fit_memory(list(zip(mem_frames, peaks))), "runs": records}
                entry["memory"] = mem
            if not a.no_profile and dev_type == "cpu":
                print(f"== {cfg}: profile", file=sys.stderr, flush=True)
                entry["profile"] = run_job({**base, "job": "profile", "variants": ["reference", "default"],
                                            "steps": 1}, work)
                entry["profile"] = {k: v for k, v in entry["profile"].items() if k in ("reference", "default")}
            report["configs"][cfg] = entry
    loads = [x for c in report["configs"].values() for v in c["raw_timing"]["variants"].values()
             for r in v["runs"] for x in (r["load_before"], r["load_after"])]
    if loads:
        report["load_summary"] = {"median": statistics.median(loads), "max": max(loads)}
    final = write_report(report, Path(a.out))
    print(f"report: {final}", file=sys.stderr)
    if a.update_docs:
        update_docs([(report, final)])
    print(rep.markdown(report))
    return 0


def write_report(report: dict, parent: Path) -> Path:
    """Write report.json, report.md and the charts into ``parent/<name>``, atomically."""
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / report["name"]
    tmp = parent / f".{report['name']}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        report["charts"] = rep.charts(report, tmp)
        (tmp / "report.md").write_text(rep.markdown(report) + (
            "\n" + "\n".join(f"![{c}]({c})" for c in report["charts"]) + "\n" if report["charts"] else
            "\n(charts need matplotlib: `pip install -e .[bench]`)\n"))
        old = None
        if final.exists():
            old = parent / f".{report['name']}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def update_docs(reports: list[tuple[dict, Path]]) -> None:
    """Replace the generated block of docs/PERFORMANCE.md with these reports' tables."""
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOCS}: markers {BEGIN} / {END} not found")
    parts = []
    for report, final in reports:
        body = rep.markdown(report).split("\n", 2)[2]  # without the title
        body = body.replace("\n### ", "\n#### ").replace("\n## ", "\n### ")  # nest under this file's headings
        rel = os.path.relpath(final, DOCS.parent)
        parts.append(f"### Report [{final.name}]({rel}/report.md)\n\n"
                     f"_Generated by `{report['command']}`; charts in the report directory._\n\n{body}")
    block = BEGIN + "\n" + "\n".join(parts) + "\n" + END
    new = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    tmp = DOCS.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, DOCS)


if __name__ == "__main__":
    sys.exit(main())
