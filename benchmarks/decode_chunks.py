#!/usr/bin/env python3
"""VAE decode time and peak working memory against the decode chunk (frames per call).

    python -m benchmarks.decode_chunks [--vae-config PATH] [--size 512 | --width W --height H] [--frames 16]
                                       [--chunks 1,2,4,8,16] [--device cuda] [--repeats 5]
                                       [--cudnn-benchmark both|on|off] [--out FILE.json]

The pipeline picks its decode chunk from a memory budget (``plan_loop``); this measures
what that choice trades: seconds for ``--frames`` frames and the decode's peak working
memory (CUDA: ``max_memory_allocated`` above the weights; the CPU: not measured), per
chunk size, with random VAE weights (the function's cost does not depend on the values).
The VAE is the project's ``models.vae.VAE`` built from an ``AutoencoderKL`` config: by
default the one of the benchmarks' ``sd15`` set (``benchmarks/modelsets.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, Python puts benchmarks/ first on sys.path, where a module of ours would shadow an
# installed package of the same name (issue 25: diffusers imports `kernels`). Put the checkout there
# instead: only `benchmarks.<name>` reaches our modules, as under `python -m benchmarks.<script>`.
if __package__ in (None, ""):
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

from magicanimate_rt.models.vae import VAE  # noqa: E402
from magicanimate_rt.runtime.backends.torch_backend import decode_bytes_per_frame  # noqa: E402


def vae_config(path: Path | None) -> dict:
    """The VAE the loader would use for the ``sd15`` benchmark set (its fine-tuned VAE when
    the set has one), or ``path``."""
    if path is not None:
        return json.loads(path.read_text())
    from benchmarks.modelsets import config_source
    from magicanimate_rt.models.writer import read_config_set

    src = config_source("sd15")
    cfgs = read_config_set(src) if isinstance(src, Path) else src
    return cfgs.get("vae_mse", cfgs["vae"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae-config", type=Path, default=None, help="an AutoencoderKL config.json")
    p.add_argument("--size", type=int, default=512, help="square output side")
    p.add_argument("--width", type=int, default=None, help="output width, with --height (e.g. 512 x 768)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--chunks", default="1,2,4,8,16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float16 on CUDA, float32 on the CPU by default")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cudnn-benchmark", choices=("both", "on", "off"), default="off")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if (a.width is None) != (a.height is None):
        p.error("give --width and --height together")
    width, height = (a.width, a.height) if a.width is not None else (a.size, a.size)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("float16" if device.type == "cuda" else "float32"))
    chunks = [int(c) for c in a.chunks.split(",") if c.strip()]
    torch.manual_seed(0)
    vae = VAE(vae_config(a.vae_config)).to(device=device, dtype=dtype).eval()
    latents = torch.randn(a.frames, 4, height // 8, width // 8, device=device, dtype=dtype)
    predicted = decode_bytes_per_frame(vae, width, dtype, height, device.type)  # the torch backend's estimate
    rows = []
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[a.cudnn_benchmark]
    for bench in modes:
        torch.backends.cudnn.benchmark = bench
        for chunk in chunks:
            with torch.inference_mode():
                def run() -> None:
                    for i in range(0, a.frames, chunk):
                        vae.decode(latents[i:i + chunk])

                run()  # warm-up (and cuDNN's algorithm search when benchmark is on)
                sync(device)
                peak = None
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                times = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    run()
                    sync(device)
                    times.append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            rows.append({"cudnn_benchmark": bench, "chunk": chunk, "median_s": statistics.median(times),
                         "min_s": min(times), "max_s": max(times), "peak_working_mib": peak,
                         "predicted_working_mib": predicted * chunk / 2**20})
            print(f"cudnn.benchmark={bench!s:5} chunk {chunk:3}: {statistics.median(times):.4f} s "
                  f"[{min(times):.4f}-{max(times):.4f}], working "
                  f"{'-' if peak is None else f'{peak:,.0f}'} MiB (model {predicted * chunk / 2**20:,.0f})", flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "width": width, "height": height, "frames": a.frames,
              "repeats": a.repeats, "rows": rows}
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
