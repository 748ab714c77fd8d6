"""Turning worker results into the report: JSON (everything), Markdown (tables), PNG charts
(if matplotlib is installed: ``pip install -e .[bench]``)."""

from __future__ import annotations

import statistics
from typing import Optional

STAGES = ("vae_encode", "appearance_encoder", "controlnet", "unet", "scheduler", "vae_decode")


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize_timing(result: dict) -> dict:
    """Per variant: median/min/max per stage and end to end, FLOPs, FLOP/s, memory,
    ratios to the reference schedule."""
    spec = result["spec"]
    out = {}
    ref_key = "reference"
    for key, v in result["variants"].items():
        runs = v["runs"]
        stages = {}
        for s in STAGES + ("total",):
            xs = [r["timings"].get(s, 0.0) for r in runs]
            stages[s] = {"median": _median(xs), "min": min(xs, default=0.0), "max": max(xs, default=0.0)}
        flops = v.get("flops")
        achieved = None
        if flops:
            achieved = {s: flops.get(s, 0) / stages[s]["median"] if stages[s]["median"] > 0 else None
                        for s in STAGES if flops.get(s)}
            total_flops = sum(flops.values())
            achieved["total"] = total_flops / stages["total"]["median"] if stages["total"]["median"] else None
        out[key] = {
            "label": v["label"], "note": v["note"], "plan": v.get("plan"), "calls": v.get("calls"),
            "stages": stages, "flops": flops, "total_flops": sum(flops.values()) if flops else None,
            "flops_per_s": achieved,
            "fps": spec["frames"] / stages["total"]["median"] if stages["total"]["median"] else None,
            "peak_rss_bytes": max((r["memory"]["peak_bytes"] for r in runs), default=None),
            "working_bytes": _median([r["memory"]["working_bytes"] for r in runs]),
            "rel_l2_vs_reference": v.get("rel_l2_vs_reference"),
            "load": [r["load_before"] for r in runs],
        }
    ref = out.get(ref_key)
    for key, s in out.items():
        if ref is None:
            continue
        rt, t = ref["stages"]["total"]["median"], s["stages"]["total"]["median"]
        s["ratio_measured"] = t / rt if rt else None
        s["ratio_flops"] = (s["total_flops"] / ref["total_flops"]) if s["total_flops"] and ref["total_flops"] else None
        s["saved_s"] = rt - t
        s["stage_ratio"] = {st: (s["stages"][st]["median"] / ref["stages"][st]["median"])
                            if ref["stages"][st]["median"] > 0 else None for st in STAGES}
        s["stage_flop_ratio"] = {st: (s["flops"].get(st, 0) / ref["flops"][st]) if s["flops"] and ref["flops"].get(st)
                                 else None for st in STAGES}
    return out


def fit_memory(points: list[tuple[int, int]]) -> Optional[dict]:
    """Least-squares line peak = a + b * frames over (frames, bytes) points."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return {"fixed_bytes": my - b * mx, "per_frame_bytes": b}


def spec_shape(spec: dict) -> tuple[int, int]:
    """(width, height) of a config's requests (specs of square runs may hold ``size`` only)."""
    return spec.get("width") or spec["size"], spec.get("height") or spec["size"]


def shape_label(spec: dict) -> str:
    """"512" for a square, "512x768" otherwise (followed by " px" in the report)."""
    width, height = spec_shape(spec)
    return str(width) if width == height else f"{width}x{height}"


def _mb(x) -> str:
    return "–" if x is None else f"{x / 2**20:,.0f}"


def _s(x) -> str:
    return f"{x:.2f}"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def peak_label(report: dict) -> str:
    """What the peak-memory numbers are: the process's RSS on the CPU, allocated device
    memory on CUDA (benchmarks/peak_memory.py)."""
    return "peak CUDA allocated" if str(report["environment"]["device"]).startswith("cuda") else "peak RSS"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Benchmark {report['name']}", "",
             f"Machine: {env['machine']}; torch {env['torch']}, {env['threads']} threads; device {env['device']}, "
             f"{env['dtype']}. Command: `{report['command']}`.", ""]
    loads = report.get("load_summary")
    if loads:
        # the benchmark's own threads account for a load of about their number
        busy = loads["max"] > min(env["threads"], env["cores"]) + 0.5
        note = (" — **other work was running: timings are distorted**" if busy
                else " (the benchmark's own threads: a quiet machine)")
        lines += [f"Load average during the timed runs: median {loads['median']:.2f}, max {loads['max']:.2f} "
                  f"(on {env['cores']} cores){note}.", ""]
    for cfg, c in report["configs"].items():
        spec = c["spec"]
        lines += [f"## {cfg}: {spec['frames']} frames, {spec['steps']} steps, {shape_label(spec)} px, "
                  f"{spec['repeats']} timed runs per variant (ABAB after one warm-up)", ""]
        if c.get("skipped"):
            for k, why in c["skipped"].items():
                lines += [f"- skipped `{k}`: {why}"]
            lines += [""]
        t = c["timing"]
        ref = t.get("reference")
        lines += ["### End to end", "",
                  "| variant | total s, median [min–max] | frames/s | ratio to reference (measured) | ratio (FLOPs) "
                  f"| GFLOP | achieved GFLOP/s | {peak_label(report)} MiB | working MiB | rel L2 vs reference |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, s in t.items():
            tot = s["stages"]["total"]
            fl = s["total_flops"]
            ach = (s["flops_per_s"] or {}).get("total")
            err = s["rel_l2_vs_reference"]
            fl_s = "–" if fl is None else f"{fl / 1e9:,.0f}"
            ach_s = "–" if ach is None else f"{ach / 1e9:.1f}"
            err_s = "–" if err is None else f"{err:.1e}"
            lines.append(f"| {s['label']} | {_s(tot['median'])} [{_s(tot['min'])}–{_s(tot['max'])}] | "
                         f"{s['fps']:.3f} | {_ratio(s.get('ratio_measured'))} | {_ratio(s.get('ratio_flops'))} | "
                         f"{fl_s} | {ach_s} | {_mb(s['peak_rss_bytes'])} | {_mb(s['working_bytes'])} | {err_s} |")
        lines += [""]
        if ref:
            lines += ["### Per stage (median seconds; ratio to the reference: measured / FLOPs)", "",
                      "| stage | " + " | ".join(s["label"] for s in t.values()) + " |",
                      "|---|" + "---|" * len(t)]
            for st in STAGES:
                cells = []
                for s in t.values():
                    m = s["stages"][st]["median"]
                    r = s.get("stage_ratio", {}).get(st)
                    f = s.get("stage_flop_ratio", {}).get(st)
                    cells.append(f"{m:.2f} ({_ratio(r)} / {_ratio(f)})" if s is not ref else f"{m:.2f}")
                lines.append(f"| {st} | " + " | ".join(cells) + " |")
            lines += ["", "### FLOPs and achieved FLOP/s per stage", "",
                      "| stage | " + " | ".join(s["label"] for s in t.values()) + " |",
                      "|---|" + "---|" * len(t)]
            for st in STAGES:
                cells = []
                for s in t.values():
                    if not s["flops"] or not s["flops"].get(st):
                        cells.append("–")
                        continue
                    ach = s["flops_per_s"].get(st)
                    cells.append(f"{s['flops'][st] / 1e9:,.1f} G @ {'–' if not ach else f'{ach / 1e9:.1f}'} G/s")
                lines.append(f"| {st} | " + " | ".join(cells) + " |")
            lines += ["", "### What each saving contributes (alone, on top of the reference schedule)", "",
                      "| saving | seconds saved (median) | share of reference time | FLOPs saved | note |",
                      "|---|---|---|---|---|"]
            rt = ref["stages"]["total"]["median"]
            for key, s in t.items():
                if key == "reference":
                    continue
                fs = (ref["total_flops"] - s["total_flops"]) if s["total_flops"] and ref["total_flops"] else None
                fs_s = "–" if fs is None else f"{fs / 1e9:,.0f} G ({100 * fs / ref['total_flops']:.1f}%)"
                lines.append(f"| {s['label']} | {s['saved_s']:.2f} | {100 * s['saved_s'] / rt:.1f}% | {fs_s} | "
                             f"{s['note']} |")
            lines += [""]
            plans = {s["label"]: s["plan"] for s in t.values() if s.get("plan")}
            if plans:
                lines += ["Batching plans: " + "; ".join(
                    f"{k}: {p['windows_per_call']} window(s)/call, residuals {p['controlnet_residuals']}, "
                    f"decode chunk {p['decode_chunk']}" for k, p in plans.items()), ""]
        mem = c.get("memory")
        if mem:
            lines += ["### Peak memory versus frame count (one request, 1 step, fresh process per point)", "",
                      "| variant | " + " | ".join(f"{f} frames" for f in mem["frames"]) +
                      " | fixed MiB | MiB per frame (fit) |", "|---|" + "---|" * (len(mem["frames"]) + 2)]
            for key, m in mem["variants"].items():
                fit = m.get("fit") or {}
                per = "–" if not fit else f"{fit['per_frame_bytes'] / 2**20:.2f}"
                lines.append(f"| {m['label']} | " + " | ".join(_mb(p) for p in m["peak_bytes"]) +
                             f" | {_mb(fit.get('fixed_bytes'))} | {per} |")
            lines += [""]
        prof = c.get("profile")
        if prof:
            lines += ["### Where the time goes (torch.profiler, own CPU time by stage and kind of work, seconds)", ""]
            for key, p in prof.items():
                kinds = sorted({k for st in p["by_stage_kind"].values() for k in st})
                lines += [f"{key}:", "", "| stage | " + " | ".join(kinds) + " | total |", "|---|" + "---|" * (len(kinds) + 1)]
                for st, ks in sorted(p["by_stage_kind"].items(), key=lambda x: -sum(x[1].values())):
                    lines.append(f"| {st} | " + " | ".join(f"{ks.get(k, 0):.2f}" for k in kinds) +
                                 f" | {sum(ks.values()):.2f} |")
                lines += ["", "Top operators: " + ", ".join(f"{n} {s:.2f} s ({c}x)" for n, s, c in p["top_ops"][:8]), ""]
    return "\n".join(lines) + "\n"


def charts(report: dict, out_dir) -> list[str]:
    """PNG charts; [] if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    cfgs = report["configs"]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # 1. time per stage, stacked, per variant
    fig, axes = plt.subplots(1, len(cfgs), figsize=(7 * len(cfgs), 5), squeeze=False)
    for ax, (cfg, c) in zip(axes[0], cfgs.items()):
        t = c["timing"]
        labels = [s["label"] for s in t.values()]
        bottom = [0.0] * len(labels)
        for st in STAGES:
            vals = [s["stages"][st]["median"] for s in t.values()]
            ax.barh(labels, vals, left=bottom, label=st)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median)")
        ax.set_title(f"{cfg}: time per stage")
        ax.legend(fontsize=7)
    save(fig, "time_per_stage.png")
    # 2. ratio to the reference schedule, measured vs FLOPs
    fig, axes = plt.subplots(1, len(cfgs), figsize=(7 * len(cfgs), 5), squeeze=False)
    for ax, (cfg, c) in zip(axes[0], cfgs.items()):
        t = [s for k, s in c["timing"].items() if k != "reference" and s.get("ratio_measured")]
        labels = [s["label"] for s in t]
        y = range(len(t))
        ax.barh([i - 0.2 for i in y], [s["ratio_measured"] for s in t], height=0.4, label="measured")
        ax.barh([i + 0.2 for i in y], [s["ratio_flops"] or 0 for s in t], height=0.4, label="FLOP count")
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(0.7, color="r", lw=0.8, ls="--", label="0.7 target")
        ax.invert_yaxis()
        ax.set_xlabel("time / reference schedule")
        ax.set_title(f"{cfg}: ratio to the reference schedule")
        ax.legend(fontsize=7)
    save(fig, "ratio_to_reference.png")
    # 3. memory versus frame count
    mems = {cfg: c["memory"] for cfg, c in cfgs.items() if c.get("memory")}
    if mems:
        fig, axes = plt.subplots(1, len(mems), figsize=(6 * len(mems), 4.5), squeeze=False)
        for ax, (cfg, mem) in zip(axes[0], mems.items()):
            for key, m in mem["variants"].items():
                ax.plot(mem["frames"], [p / 2**20 for p in m["peak_bytes"]], marker="o", label=m["label"])
            ax.set_xlabel("frames")
            ax.set_ylabel(f"{peak_label(report)}, MiB")
            ax.set_title(f"{cfg}: peak memory vs frames")
            ax.legend(fontsize=7)
        save(fig, "memory_vs_frames.png")
    return written
