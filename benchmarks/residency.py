"""What the residency planner (``--memory-gb``) chooses for a model preset, without
weights or a GPU: the preset's stages are built on PyTorch's meta device (shapes, no
storage), so the weight bytes and the backend's memory model are the real ones.

    python -m benchmarks.residency [--preset sd15] [--size 512] [--steps 25]
                                   [--frames 16,64,256] [--gib 80,24,12,8,6] [--out DIR]

Prints (and with ``--out`` writes ``residency.md`` / ``residency.json``) one row per budget
and frame count: the plan, each phase's predicted peak, or why nothing fits. Predictions,
not measurements: ``benchmarks/gpu_check.py`` measures the peaks on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, Python puts benchmarks/ first on sys.path, where a module of ours would shadow an
# installed package of the same name (issue 25: diffusers imports `kernels`). Put the checkout there
# instead: only `benchmarks.<name>` reaches our modules, as under `python -m benchmarks.<script>`.
if __package__ in (None, ""):
    sys.path[0] = str(ROOT)


def meta_stages(preset: str = "sd15", device: str = "cuda", dtype: str = "float16"):
    """TorchStages of ``preset`` "on ``device``" whose modules live on the meta device:
    ``weight_bytes`` and ``memory_model`` work, nothing can run."""
    import torch

    from magicanimate_rt.models import ModelSet
    from magicanimate_rt.models.appearance import AppearanceEncoder
    from magicanimate_rt.models.config import MotionModuleConfig, UNetConfig
    from magicanimate_rt.models.controlnet import ControlNet
    from magicanimate_rt.models.presets import preset_configs
    from magicanimate_rt.models.unet import TemporalUNet
    from magicanimate_rt.models.vae import VAE
    from magicanimate_rt.runtime.backends.torch_backend import TorchStages
    from magicanimate_rt.runtime.dtypes import float_torch_dtype

    c = preset_configs(preset)
    with torch.device("meta"):
        models = ModelSet(
            paths=None, text_embedding=torch.empty(1, 77, c["unet"]["cross_attention_dim"]),
            vae=VAE(c["vae"]), appearance_encoder=AppearanceEncoder(UNetConfig.from_dict(c["appearance_encoder"])),
            controlnet=ControlNet(c["controlnet"]),
            unet=TemporalUNet(UNetConfig.from_dict(c["unet"]), MotionModuleConfig()))
    dt = float_torch_dtype(dtype)
    models.to(dtype=dt)
    return TorchStages(models, torch.device(device), dt)


def plan_rows(stages, size: int, steps: int, frames: list[int], gibs: list[float]) -> list[dict]:
    from magicanimate_rt.errors import InputError
    from magicanimate_rt.runtime.pipeline import AnimationPipeline, PipelineOptions
    from magicanimate_rt.runtime.planner import GIB

    rows = []
    for n in frames:
        for gib in gibs:
            pipe = AnimationPipeline(stages, options=PipelineOptions(memory_gb=gib), ranks=None)
            row = {"memory_gb": gib, "frames": n, "size": size, "steps": steps}
            try:
                plan = pipe.plan_request(size, n, steps=steps)
            except InputError as e:
                row["error"] = str(e)
            else:
                row.update(plan=plan.describe().removeprefix("plan: ").split("; predicted")[0],
                           predicted_peak_gib=round(plan.predicted_peak / GIB, 2),
                           phases_gib={k: round(v / GIB, 2) for k, v in plan.phase_bytes.items()})
            rows.append(row)
    return rows


def markdown(rows: list[dict], weights: dict, preset: str) -> str:
    lines = [f"Weights on the device ({preset}): " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in weights.items()),
             "", "| --memory-gb | frames | predicted peak GiB (reference / loop / decode) | plan |",
             "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['memory_gb']:g} | {r['frames']} | - | does not fit: {r['error'].split(': ', 1)[1]} |")
        else:
            p = r["phases_gib"]
            lines.append(f"| {r['memory_gb']:g} | {r['frames']} | {r['predicted_peak_gib']:.2f} "
                         f"({p['reference']:.2f} / {p['loop']:.2f} / {p['decode']:.2f}) | {r['plan']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.residency", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--frames", default="16,64,256")
    p.add_argument("--gib", default="80,24,12,8,6,5")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    stages = meta_stages(a.preset)
    rows = plan_rows(stages, a.size, a.steps, [int(x) for x in a.frames.split(",")],
                     [float(x) for x in a.gib.split(",")])
    md = markdown(rows, stages.weight_bytes(), a.preset)
    print(md)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "residency.md").write_text(md)
        (a.out / "residency.json").write_text(json.dumps({"weights": stages.weight_bytes(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
