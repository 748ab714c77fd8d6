"""The work of one request, counted instead of timed: every aten operator each denoising
step runs, per stage, and the bytes it writes, for the reference schedule and the default.

    python -m benchmarks.op_counts [--config tiny|mid|sd15] [--size 256] [--frames 16]
                                   [--steps 3] [--meta] [--models DIR] [--json FILE]

Counts depend on shapes and code only, not on the machine or its load, so they show a
change of work (a copy added to the exact path, something planned per step) on a busy
2-core VM where timings cannot (docs/PERFORMANCE.md, "Counting the work"). ``--meta``
builds the preset's models on PyTorch's meta device (shapes, no storage: SD 1.5 at
256 px in seconds); it stops at the decode's move to the host, after every step. The
meta kernels' output strides may differ from the CPU's, which changes which reshapes
copy: compare meta counts with meta counts.

How it counts (:class:`OpCounter`, a ``TorchDispatchMode``): each operator as dispatched;
its output bytes count as written unless the output is an alias of an input (views,
no-op casts, a reshape of a dense tensor, eval-mode dropout) or the operator mutates an
argument (``copy_``, ``index_add_``: the written region counts). "Copies" are the
operators whose only job is moving data (:data:`COPY_OPS`) and that wrote something.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, Python puts benchmarks/ first on sys.path (see benchmarks/residency.py)
if __package__ in (None, ""):
    sys.path[0] = str(ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from benchmarks.flop_count import RoutedStages  # noqa: E402

#: operators whose only job is moving data (counted as copies when they write)
COPY_OPS = frozenset({"copy_", "clone", "contiguous", "reshape", "_to_copy", "to", "cat", "stack", "repeat",
                      "index_select", "expand_copy", "permute_copy", "transpose_copy", "_unsafe_view"})


@dataclass
class StepCounts:
    """One step's operators: (stage, operator) -> [calls, bytes written]."""

    ops: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def total(self, copies_only: bool = False, stage: str | None = None) -> tuple[int, int]:
        """(calls, bytes) of every operator (or the copies), of one stage or all."""
        calls = nbytes = 0
        for (s, op), (c, b) in self.ops.items():
            if (stage is None or s == stage) and (not copies_only or (op in COPY_OPS and b > 0)):
                calls, nbytes = calls + c, nbytes + b
        return calls, nbytes

    def stages(self) -> list[str]:
        return sorted({s for s, _ in self.ops})

    def as_dict(self) -> dict:
        return {f"{s}|{op}": v for (s, op), v in sorted(self.ops.items())}


class OpCounter(TorchDispatchMode):
    """Counts every operator dispatched inside it, by step and stage (``step``, ``stage``:
    set by the caller as the request goes)."""

    def __init__(self):
        super().__init__()
        self.steps: dict[int, StepCounts] = defaultdict(StepCounts)
        self.step = 0
        self.stage = "loop"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        mutates = func._schema.is_mutable
        written = 0
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (mutates or not any(torch._C._is_alias_of(t, a) for a in inputs)):
                written += t.numel() * t.element_size()
        rec = self.steps[self.step].ops[(self.stage, func.overloadpacket.__name__)]
        rec[0] += 1
        rec[1] += written
        return out


class LabelledStages(RoutedStages):
    """Stages that tell the counter which stage method each operator runs in ("loop":
    outside every stage: the sampling loop's own work)."""

    def __init__(self, inner, counter: OpCounter):
        super().__init__(inner)
        self.counter = counter

    def _call(self, method: str, *args):
        before, self.counter.stage = self.counter.stage, method
        try:
            return getattr(self.inner, method)(*args)
        finally:
            self.counter.stage = before


def count_request(pipe, source, driving, size: int, steps: int, meta: bool = False) -> dict[int, StepCounts]:
    """One request through ``pipe`` under an :class:`OpCounter`: step k's counts (step 0
    also holds the request's preparation; step ``steps`` the decode). ``meta``: the stages
    are on the meta device, and the request ends at the decode's move to the host."""
    counter = OpCounter()

    def next_step(done: int, total: int) -> None:
        counter.step = done

    inner = pipe.stages
    pipe.stages = LabelledStages(inner, counter)
    try:
        with counter:
            pipe.animate(source, driving, size=size, steps=steps, seed=0, progress=next_step)
    except NotImplementedError as e:  # "Cannot copy out of meta tensor": the decoded frames to the host
        if not meta:
            raise
        assert "meta" in str(e), e
    finally:
        pipe.stages = inner
    return dict(counter.steps)


def pipelines(models, device: torch.device, dtype: torch.dtype) -> dict:
    """The benchmark's two variants (benchmarks/bench_variants.py) on ``models``."""
    from magicanimate_rt import AnimationPipeline
    from magicanimate_rt.runtime.backends.torch_backend import TorchStages

    from benchmarks.bench_variants import DEFAULT, REFERENCE

    out = {}
    for v in (REFERENCE, DEFAULT):
        options = v.pipeline if device.type != "meta" else replace(v.pipeline, memory_gb=64.0)
        out[v.key] = AnimationPipeline(TorchStages(models, device, dtype, v.torch), options=options)
    return out


def meta_models(preset: str, dtype: torch.dtype = torch.float32):
    """The preset's model set on the meta device (see benchmarks/residency.py)."""
    from benchmarks.residency import meta_stages

    models = meta_stages(preset, device="meta", dtype=str(dtype).removeprefix("torch.")).models
    for m in (models.vae, models.appearance_encoder, models.controlnet, models.unet):
        m.eval()  # as the loader leaves them
    return models


def report(counts: dict[str, dict[int, StepCounts]], step: int) -> str:
    """Markdown: step ``step`` of each variant, per stage: operators, copies, MiB written."""
    lines = ["| variant | stage | operators | MiB written | copies | MiB copied |", "|---|---|---|---|---|---|"]
    for key, steps in counts.items():
        sc = steps[step]
        for stage in [*sc.stages(), None]:
            (n, b), (cn, cb) = sc.total(stage=stage), sc.total(True, stage)
            lines.append(f"| {key} | {stage or '**step**'} | {n:,} | {b / 2**20:,.1f} | {cn:,} | {cb / 2**20:,.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from magicanimate_rt.demo import driving_clip, source_image
    from magicanimate_rt.models import load_model_set

    from benchmarks.modelsets import model_set

    p = argparse.ArgumentParser(prog="python -m benchmarks.op_counts", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="tiny, mid or sd15 (the benchmark's model sets)")
    p.add_argument("--models", type=Path, default=None, help="a model set directory instead of --config's")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="at least 2: step 1 is the one reported")
    p.add_argument("--meta", action="store_true", help="the preset's models on the meta device (no weights)")
    p.add_argument("--json", type=Path, default=None, help="write every step's counts here")
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be at least 2 (step 1 runs between two progress calls)")
    if a.meta:
        device, models = torch.device("meta"), meta_models(a.config)
    else:
        device, models = torch.device("cpu"), load_model_set(a.models or model_set(a.config))
    source, driving = source_image(a.size), driving_clip(a.frames, a.size)
    counts = {key: count_request(pipe, source, driving, a.size, a.steps, a.meta)
              for key, pipe in pipelines(models, device, torch.float32).items()}
    print(f"{a.config}{' (meta)' if a.meta else ''}, {a.size} px, {a.frames} frames: step 1 of {a.steps}\n")
    print(report(counts, 1))
    if a.json is not None:
        a.json.write_text(json.dumps({k: {s: c.as_dict() for s, c in v.items()} for k, v in counts.items()},
                                     indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
