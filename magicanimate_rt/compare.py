"""``magicanimate-rt compare``: the exact default against another sampling mode, on the
user's own weights and inputs.

The deviations this project measures for its fast modes (README "Faster, approximately")
come from random weights; it cannot download real ones. This is the check on real ones:
the same request rendered twice, with ``mode="exact"`` and with the other settings, and

- the wall time of each and the speed-up (exact time / other time);
- per-frame PSNR and SSIM of the other's frames against the exact frames (scikit-image's
  ``peak_signal_noise_ratio`` and ``structural_similarity``, data range 255), mean, min and
  per frame;
- the relative L2 distance of the final latents, ``||other - exact|| / ||exact||`` (float64);
- a temporal measure: the mean absolute frame-to-frame difference (0..255) of each video and
  their ratio, so a mode that adds flicker shows it even where each frame looks close.

``out_dir`` gets ``exact.mp4``, ``other.mp4``, ``side_by_side.mp4`` ([exact | other | 4 x
absolute difference]), ``compare.json`` and ``compare.md``. Both videos are rendered and
measured before anything is written, so a failure in either render leaves ``out_dir`` as it
was; each file is written to a temporary name and renamed when complete.

Timing: the wall time of each ``AnimationPipeline.animate`` call, the reference cache
emptied before each, so both pay the same VAE encode of the source. By default each mode
is first rendered once, untimed, at up to 3 steps on the first window of frames: the
first render in a process pays one-time costs (kernel and primitive selection, allocator
growth; on this project's CPU runner the first of two equal renders took several times
longer), which would otherwise be charged to the exact render and flatter the other mode.
``warmup=False`` (``--no-warmup``) skips it.

Both videos are held in memory (the metrics need them side by side): this is a tool for
judging a mode on a clip, not for rendering long ones.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .errors import InputError
from .runtime.media import VideoWriter
from .runtime.request import AnimationRequest
#: how much the difference panel of ``side_by_side.mp4`` is amplified
DIFF_GAIN = 4
#: files ``compare`` writes into its output directory
OUTPUTS = ("exact.mp4", "other.mp4", "side_by_side.mp4", "compare.json", "compare.md")

WARNING = ("These numbers compare two samplings of the same weights: how far this mode's frames are from "
           "the exact ones for this request. Only your own weights and inputs say what the mode does to your "
           "videos; watch side_by_side.mp4 before trusting it.")


def require_scikit_image():
    """``skimage.metrics``, or an InputError saying how to install it (an optional extra)."""
    try:
        from skimage import metrics
    except ImportError:
        raise InputError('compare needs scikit-image, which is not installed: pip install -e ".[compare]"') \
            from None
    return metrics


# --------------------------------------------------------------------------- the measures
def frame_metrics(exact: np.ndarray, other: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-frame (PSNR in dB, SSIM) of ``other`` against ``exact``, both (F, H, W, 3) uint8,
    with scikit-image (data range 255, SSIM over the colour channels). Identical frames
    have PSNR ``inf``."""
    metrics = require_scikit_image()
    if exact.shape != other.shape or exact.dtype != np.uint8 or other.dtype != np.uint8:
        raise ValueError(f"frames differ in shape or type: {exact.shape} {exact.dtype} vs {other.shape} {other.dtype}")
    psnr, ssim = [], []
    for a, b in zip(exact, other):
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # identical frames: log10(x / 0) = inf, on purpose
            psnr.append(float(metrics.peak_signal_noise_ratio(a, b, data_range=255)))
        ssim.append(float(metrics.structural_similarity(a, b, channel_axis=-1, data_range=255)))
    return psnr, ssim


def latent_rel_l2(exact, other) -> float:
    """``||other - exact|| / ||exact||`` over the whole latent video, in float64 (0.0 when
    they are equal). The two renders have the same frames, so the same latent shape."""
    a = np.asarray(exact, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"latents differ in shape: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def temporal_difference(frames: np.ndarray) -> Optional[float]:
    """The mean absolute difference between consecutive frames, in 0..255 units (None for
    a single frame). Flicker raises it; compared with the exact video's it says whether a
    mode makes the motion less steady."""
    if frames.shape[0] < 2:
        return None
    total = 0.0
    for prev, cur in zip(frames[:-1], frames[1:]):  # frame by frame: no float copy of the whole video
        total += float(np.abs(cur.astype(np.int16) - prev.astype(np.int16)).mean())
    return total / (frames.shape[0] - 1)


def side_by_side(exact: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[exact | other | DIFF_GAIN x |exact - other|] frames: (F, H, 3W, 3) uint8."""
    diff = np.abs(exact.astype(np.int16) - other.astype(np.int16)) * DIFF_GAIN
    return np.concatenate([exact, other, np.clip(diff, 0, 255).astype(np.uint8)], axis=2)


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "per_frame": values}


# --------------------------------------------------------------------------- rendering
@dataclass
class Comparison:
    """What :func:`compare` returns: the report (``compare.json``) and both renders."""

    report: dict
    exact: object  #: the exact render's ``AnimationResult`` (frames and latents)
    other: object  #: the other render's


def _describe(request) -> str:
    """The request's sampling without its step count (the report gives the steps each
    render ran, which a request may have changed)."""
    return request.mode.with_steps(None).describe()


def _render(pipe, request, progress) -> tuple[object, float]:
    """One render from an empty reference cache, timed: (AnimationResult, seconds)."""
    pipe.reference_cache.clear()
    t0 = time.perf_counter()
    result = pipe.run(request, progress=progress)
    return result, time.perf_counter() - t0


def compare(pipe, request: AnimationRequest, out_dir: Path, *, other_steps: Optional[int] = None,
            warmup: bool = True, progress: Union[bool, Callable[[int, int], None]] = False,
            inputs: Optional[dict] = None, log: Optional[Callable[[str], None]] = None) -> Comparison:
    """Render ``request`` with the original's sampling (:meth:`AnimationRequest.exact`) and
    with its own preset and knobs, write the five :data:`OUTPUTS` into ``out_dir`` (created
    if missing) and return the report and both renders.

    ``request``: its inputs read (:meth:`AnimationRequest.read_inputs`); its ``steps`` are
    the exact render's (None: 25). ``other_steps``: the other's (None: its preset's own,
    else the request's). ``warmup``: first render each once, untimed, at up to 3 steps on
    the first window of frames (see the module docstring; the other first, so settings the
    backend cannot run fail before any long render). ``inputs``: what the report says the
    inputs were (e.g. their file names). ``log``: progress notes."""
    require_scikit_image()
    if pipe.world_size > 1:
        raise InputError("compare runs in one process, not under torchrun")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output directory {out_dir}: is not a directory")
    exact = request.exact()
    if other_steps is None:
        other_steps = request.mode.steps if request.mode.steps is not None else exact.num_steps
    other = replace(request, steps=other_steps)
    runs = (("exact", exact), ("other", other))
    say = log or (lambda msg: None)
    if warmup:
        say("warm-up renders (untimed) ...")
        for label, r in reversed(runs):
            _render(pipe, replace(r, driving=r.driving[: pipe.stages.window], steps=min(r.num_steps, 3)), False)
    results, seconds = {}, {}
    for label, r in runs:
        say(f"rendering {label}: {_describe(r)}, {r.num_steps} steps ...")
        results[label], seconds[label] = _render(pipe, r, progress)
    width, height = request.shape
    frames_exact, frames_other = results["exact"].frames, results["other"].frames
    say("measuring ...")
    psnr, ssim = frame_metrics(frames_exact, frames_other)
    t_exact, t_other = temporal_difference(frames_exact), temporal_difference(frames_other)
    report = {
        "request": {"width": width, "height": height, "frames": int(frames_exact.shape[0]),
                    "guidance": request.guidance_scale, "seed": request.seed, **(inputs or {})},
        "exact": {"mode": _describe(exact), "steps": exact.num_steps, "seconds": seconds["exact"]},
        "other": {"mode": _describe(other), "steps": other.num_steps, "seconds": seconds["other"]},
        "speedup": seconds["exact"] / seconds["other"],
        "warmup": warmup,
        "psnr_db": _summary(psnr),
        "ssim": _summary(ssim),
        "latent_rel_l2": latent_rel_l2(results["exact"].latents, results["other"].latents),
        "temporal": {"exact": t_exact, "other": t_other,
                     "ratio": None if t_exact is None or t_exact == 0 else t_other / t_exact},
        "note": WARNING,
    }
    write_outputs(out_dir, frames_exact, frames_other, report)
    return Comparison(report, results["exact"], results["other"])


# --------------------------------------------------------------------------- writing
def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_safe(value):
    """``inf`` (the PSNR of identical frames) as null, so compare.json is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(out_dir: Path, exact: np.ndarray, other: np.ndarray, report: dict, chunk: int = 16) -> None:
    """The three videos, compare.json and compare.md (each atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with VideoWriter(out_dir / "exact.mp4") as video:
        video.write(exact)
    with VideoWriter(out_dir / "other.mp4") as video:
        video.write(other)
    with VideoWriter(out_dir / "side_by_side.mp4") as video:
        for first in range(0, exact.shape[0], chunk):  # one chunk at a time: no 3x copy of the video
            video.write(side_by_side(exact[first : first + chunk], other[first : first + chunk]))
    _write_text(out_dir / "compare.json", json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    _write_text(out_dir / "compare.md", markdown(report))


def _fmt(value: Optional[float], digits: int = 2) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf (identical)"
    return f"{value:.{digits}f}"


def summary_table(report: dict) -> str:
    """The report's numbers as a Markdown table (what the command prints)."""
    e, o, t = report["exact"], report["other"], report["temporal"]
    ratio = "" if t["ratio"] is None else f" ({t['ratio']:.3f} x exact)"
    rows = [
        ("settings", e["mode"], o["mode"]),
        ("steps", str(e["steps"]), str(o["steps"])),
        ("time (s)", _fmt(e["seconds"]), _fmt(o["seconds"])),
        ("speed-up", "1.00 x", f"{report['speedup']:.2f} x"),
        ("PSNR vs exact (dB), mean / min", "-",
         f"{_fmt(report['psnr_db']['mean'])} / {_fmt(report['psnr_db']['min'])}"),
        ("SSIM vs exact, mean / min", "-", f"{_fmt(report['ssim']['mean'], 4)} / {_fmt(report['ssim']['min'], 4)}"),
        ("latent rel L2 vs exact", "-", f"{report['latent_rel_l2']:.4g}"),
        ("mean abs frame-to-frame difference (0..255)", _fmt(t["exact"], 3), _fmt(t["other"], 3) + ratio),
    ]
    lines = ["| | exact | other |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """compare.md: the request, the summary table, the warning and the per-frame values."""
    r = report["request"]
    inputs = "".join(f", {k} `{v}`" for k, v in r.items() if k not in ("width", "height", "frames", "guidance", "seed"))
    warm = ("each mode was first rendered once, untimed, at up to 3 steps on the first window of frames"
            if report["warmup"] else "no warm-up: the exact render, first, includes one-time start-up costs")
    lines = [
        "# magicanimate-rt compare",
        "",
        f"{r['frames']} frames at {r['width']}x{r['height']}, guidance {r['guidance']}, seed {r['seed']}{inputs}. "
        f"Timing: wall time of each render from an empty reference cache; {warm}.",
        "",
        summary_table(report),
        "",
        f"**{WARNING}**",
        "",
        "Files: `exact.mp4`, `other.mp4`, `side_by_side.mp4` ([exact | other | "
        f"{DIFF_GAIN} x absolute difference]), `compare.json` (infinite PSNR, identical frames, is null there).",
        "",
        "## Per frame",
        "",
        "| frame | PSNR (dB) | SSIM |",
        "| ---: | ---: | ---: |",
    ]
    for i, (p, s) in enumerate(zip(report["psnr_db"]["per_frame"], report["ssim"]["per_frame"])):
        lines.append(f"| {i} | {_fmt(p)} | {s:.4f} |")
    return "\n".join(lines) + "\n"
