"""Where the time goes: one request under ``torch.profiler``, every operator's own CPU time
attributed to the stage it ran in and to a kind of work."""

from __future__ import annotations

from collections import defaultdict

from torch.profiler import ProfilerActivity, profile, record_function

from .flop_count import STAGE_OF, RoutedStages

#: operator-name fragments -> kind of work (first match wins)
KINDS = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("convolution", ("convolution", "conv2d", "_slow_conv2d")),
    ("matmul", ("addmm", "aten::mm", "bmm", "matmul", "baddbmm", "aten::linear")),
    ("normalisation", ("group_norm", "layer_norm", "var_mean", "rsqrt")),
    ("copies and layout", ("copy_", "aten::cat", "clone", "contiguous", "index_select", "index_add", "repeat",
                           "_to_copy", "aten::to", "upsample", "expand", "empty", "zeros")),
    ("elementwise", ("aten::add", "aten::mul", "aten::sub", "aten::div", "silu", "gelu", "clamp", "aten::exp",
                     "aten::sin", "aten::cos", "aten::neg", "aten::pow", "aten::sqrt")),
)


def kind_of(name: str) -> str:
    for kind, parts in KINDS:
        if any(p in name for p in parts):
            return kind
    return "other"


class ProfiledStages(RoutedStages):
    """Stages whose every call is a ``record_function`` range named after its stage."""

    def _call(self, method, *args):
        with record_function("stage::" + STAGE_OF[method]):
            return getattr(self.inner, method)(*args)


def profile_request(pipe, run) -> dict:
    """Run ``run()`` (one request on ``pipe``) under the profiler; returns
    ``{"by_stage_kind": {stage: {kind: seconds}}, "top_ops": [[name, seconds, calls], ...]}``
    (own CPU time of each operator; the stage is the innermost enclosing stage range,
    "loop" outside every stage)."""
    inner = pipe.stages
    pipe.stages = ProfiledStages(inner)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    finally:
        pipe.stages = inner
    by = defaultdict(lambda: defaultdict(float))
    ops = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.name.startswith("stage::"):
            continue
        stage, parent = "loop", ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("stage::"):
                stage = parent.name[len("stage::"):]
                break
            parent = parent.cpu_parent
        seconds = ev.self_cpu_time_total / 1e6
        by[stage][kind_of(ev.name)] += seconds
        ops[ev.name][0] += seconds
        ops[ev.name][1] += 1
    top = sorted(([n, s, c] for n, (s, c) in ops.items()), key=lambda x: -x[1])[:15]
    return {"by_stage_kind": {s: dict(k) for s, k in by.items()}, "top_ops": top}
