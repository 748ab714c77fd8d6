"""Loading a model set: seconds and peak host memory, cold and warm page cache.

    python -m benchmarks.model_loading [--models DIR] [--runs cpu,fake-cuda] [--cache cold,warm]
                              [--loader PATH] [--out FILE.json]

By default the model set is the SD 1.5-size random set (``benchmarks/modelsets.py``) with
its motion checkpoint replaced by a full-UNet one, as the published
``temporal_attention.ckpt`` is: SD's UNet + the motion modules in one DDP-wrapped file
(``{"epoch", "global_step", "state_dict": {"module." + key: ...}}``, 5.1 GB), written once
beside the set (``bench-sd15-v1-fullunet/``, its other files symlinks).

Each measurement is a fresh process that imports the loader, notes its resident set (VmRSS),
runs ``load_model_set`` and reports the seconds, its peak resident set (``VmHWM``: this
process image's high-water mark, not ``ru_maxrss``) and the bytes of the loaded tensors:

- ``cpu``: float32 on the CPU; target: peak <= 1.15 x the loaded tensor bytes;
- ``fake-cuda``: a CUDA float16 load's host side, modelled on the CPU: the same plan and
  placement path with the ``meta`` device standing in for the GPU; every page of every
  tensor is read from the mapped file (as the copy to the GPU reads it; the loader casts
  on the device) and nothing is kept. The figure is the host peak above the RSS before
  loading (target <= 2 GiB); its seconds are not a GPU's;
- ``cuda``: the real thing on a GPU (host peak above the RSS before loading, and the GPU's
  allocated bytes).

Cold page cache: every file of the set is evicted first (``posix_fadvise(DONTNEED)``, which
needs no privileges and leaves the rest of the page cache alone). ``--loader PATH`` measures
another version of ``models/loading.py`` (e.g. ``git show REV:magicanimate_rt/models/loading.py``),
imported in its place, so before/after figures come from the same machine and run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .peak_memory import _status_kib

TARGET_CPU_RATIO = 1.15
TARGET_HOST_EXTRA_GIB = 2.0
RUNS = ("cpu", "fake-cuda", "cuda")


# --------------------------------------------------------------------------- the model set
def full_unet_set(base: Path, out: Optional[Path] = None) -> Path:
    """``base`` with its motion checkpoint replaced by a full-UNet, DDP-wrapped one (SD's
    UNet file + the motion modules), written once; every other file a symlink into ``base``."""
    from magicanimate_rt.layout import MOTION_CKPT, SD_DIR
    from magicanimate_rt.models.loading import WeightsFile, find_weights
    from magicanimate_rt.models.writer import write_motion_checkpoint

    out = Path(out or base.with_name(base.name + "-fullunet"))
    if (out / MOTION_CKPT).is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    for p in sorted(base.rglob("*")):
        q = tmp / p.relative_to(base)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
        elif p.relative_to(base).as_posix() != MOTION_CKPT:
            q.parent.mkdir(parents=True, exist_ok=True)
            q.symlink_to(p.resolve())
    spatial = WeightsFile(find_weights(base / SD_DIR / "unet"))
    motion = WeightsFile(base / MOTION_CKPT)
    tensors = {k: f.tensor(k) for f in (spatial, motion) for k in f.entries}  # views of the mapped files
    write_motion_checkpoint(tmp / MOTION_CKPT, tensors, ddp=True)
    del tensors
    spatial.close(), motion.close()
    os.replace(tmp, out)
    return out


def evict(models: Path) -> str:
    """Drop every file of the set from the page cache (``posix_fadvise(DONTNEED)``: no
    privileges needed, and unlike ``/proc/sys/vm/drop_caches`` it leaves the rest of a
    shared machine's cache alone); says how."""
    from magicanimate_rt.models.loading import advise_file

    for p in sorted(models.rglob("*")):
        if p.is_file():
            advise_file(p.resolve(), "DONTNEED")
    return "posix_fadvise(DONTNEED) per file"


# --------------------------------------------------------------------------- one measurement
def _import_loader(path: Optional[str]):
    if not path:
        from magicanimate_rt.models import loading

        return loading
    spec = importlib.util.spec_from_file_location("magicanimate_rt.models._loading_measured", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fake_device_place(loading):
    """A CUDA float16 load's host side: every page of each tensor is read (as the copy to the
    GPU reads it; the cast happens there), nothing is kept."""
    import torch

    real = loading._place

    def place(src, device, dtype):
        if device.type != "meta":  # the text encoder, on the CPU in a CUDA load too
            return real(src, device, dtype)
        flat = src.reshape(-1) if src.is_contiguous() else src.contiguous().view(-1)
        flat[:: max(1, 4096 // flat.element_size())].sum()  # one element per page
        return torch.empty(src.shape, dtype=dtype, device="meta")

    loading._place = place


def tensor_bytes(ms) -> int:
    """Bytes of every tensor a loaded model set holds (parameters and buffers, the text
    embedding)."""
    total = ms.text_embedding.numel() * ms.text_embedding.element_size()
    for m in (ms.vae, ms.appearance_encoder, ms.controlnet, ms.unet):
        total += sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    return total


def child(spec: dict) -> dict:
    import torch

    loading = _import_loader(spec.get("loader"))
    run = spec["run"]
    device, dtype = {"cpu": ("cpu", torch.float32), "fake-cuda": ("meta", torch.float16),
                     "cuda": ("cuda", torch.float16)}[run]
    if run == "fake-cuda":
        if not hasattr(loading, "materialise"):
            raise SystemExit("this loader has no per-tensor placement to model a CUDA load with")
        _fake_device_place(loading)
    before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    ms = loading.load_model_set(spec["models"], device=device, dtype=dtype)
    if run == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nbytes = tensor_bytes(ms)
    out = {"run": run, "seconds": seconds, "rss_before_bytes": before, "peak_rss_bytes": _status_kib("VmHWM") * 1024,
           "tensor_bytes": nbytes}
    if run == "cuda":
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
    return out


def measure(models: Path, run: str, cache: str, loader: Optional[str] = None) -> dict:
    """One load in a fresh process (after evicting the set for ``cache == "cold"``)."""
    how = evict(models) if cache == "cold" else "as left by the previous run"
    spec = {"models": str(models), "run": run, "loader": loader}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.model_loading", "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{run} load failed: {proc.stderr.strip().splitlines()[-1:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record.update(cache=cache, cache_how=how, loader=loader or "magicanimate_rt/models/loading.py")
    record["ratio"] = record["peak_rss_bytes"] / record["tensor_bytes"]
    record["host_extra_bytes"] = record["peak_rss_bytes"] - record["rss_before_bytes"]
    return record


def table(records: list[dict]) -> str:
    gib = 2**30
    lines = ["| loader | run | cache | s | RSS before, GiB | peak RSS, GiB | tensors, GiB | peak / tensors | "
             "peak - before, GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {Path(r['loader']).name} | {r['run']} | {r['cache']} | {r['seconds']:.1f} | "
                     f"{r['rss_before_bytes'] / gib:.2f} | {r['peak_rss_bytes'] / gib:.2f} | "
                     f"{r['tensor_bytes'] / gib:.2f} | {r['ratio']:.2f} | {r['host_extra_bytes'] / gib:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        print(json.dumps(child(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_loading", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=None,
                   help="model set (default: the sd15 random set with a full-UNet motion checkpoint)")
    p.add_argument("--runs", default="cpu,fake-cuda", help=f"comma list of {', '.join(RUNS)} (default cpu,fake-cuda)")
    p.add_argument("--cache", default="cold,warm", help="comma list of cold, warm (default cold,warm)")
    p.add_argument("--loader", default=None, help="measure this loading.py instead of the package's")
    p.add_argument("--out", type=Path, default=None, help="also append the records as JSON lines here")
    args = p.parse_args(argv)
    if args.models is None:
        from .modelsets import model_set

        args.models = full_unet_set(model_set("sd15"))
    records = []
    for run in [r for r in args.runs.split(",") if r]:
        if run not in RUNS:
            p.error(f"unknown run {run!r}")
        for cache in [c for c in args.cache.split(",") if c]:
            r = measure(args.models, run, cache, args.loader)
            records.append(r)
            print(json.dumps(r), flush=True)
            if args.out is not None:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(table(records))
    for r in records:
        if r["run"] == "cpu" and r["ratio"] > TARGET_CPU_RATIO:
            print(f"cpu {r['cache']}: peak {r['ratio']:.2f} x the tensors, above the {TARGET_CPU_RATIO} target")
        if r["run"] != "cpu" and r["host_extra_bytes"] > TARGET_HOST_EXTRA_GIB * 2**30:
            print(f"{r['run']} {r['cache']}: host peak {r['host_extra_bytes'] / 2**30:.2f} GiB above the RSS before "
                  f"loading, above the {TARGET_HOST_EXTRA_GIB} GiB target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
