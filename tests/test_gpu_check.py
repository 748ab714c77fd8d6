"""python -m benchmarks.gpu_check as CI can run it: --help, its refusal without a GPU, and the
whole script end to end on the CPU (--dry-run: tiny set, 128 px, 2 steps, float32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600):
    # as the README runs it: a module of the benchmarks package (issue 25: run as a file, benchmarks/
    # was first on sys.path and its kernels.py shadowed the `kernels` package diffusers probes for)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_help_works_without_a_gpu():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--out", "--dry-run", "--quick", "--shared", "--budget-s", "--sd15-engines"):
        assert option in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_asks_for_dry_run(tmp_path):
    proc = run("--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu_check.py: error: torch sees no CUDA GPU here (use --dry-run to check the script on a CPU)"]


def test_dry_run_end_to_end(shared_dir, tmp_path):
    out = tmp_path / "out"
    # --quick (16 frames) and a budget that lets issue 17's parts run on 2 cores (~100 s)
    proc = run("--out", out, "--dry-run", "--quick", "--budget-s", 240, "--shared", shared_dir,
               "--cache", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert proc.stdout.strip() == md.strip()
    assert report["errors"] == []
    assert report["environment"]["dry_run"] is True and report["environment"]["device"] == "cpu"
    rows = {r["backend"]: r for r in report["correctness"]}
    assert set(rows) == {"torch cpu fp32", "torch cpu fp32, lean plan", "torch cpu fp32, compiled (aot_eager)"}
    for row in rows.values():  # the same function: measured 7.2e-6 / 7.3e-6 / 7.2e-6
        assert row["ok"] and row["rel_l2"] < 1e-4
    # every timing ran or says why not (the budget decides on a slow machine)
    ran = {(r["config"], r["frames"]) for r in report["timings"]}
    said = {s["what"] for s in report["skipped"]}

    def ran_or_said(config, frames, what=None):
        return (config, frames) in ran or (what or f"timing {config}, {frames} frames") in said

    for config in ("original schedule", "ours (torch)", "ours (torch, compiled)", "ours (torch), fused GroupNorm"):
        assert ran_or_said(config, 16), config
    assert ran_or_said("ours (torch), portrait 128x192", 16, "timing ours (torch), portrait 128x192, 16 frames")
    for cap in ("0.12", "0.2"):
        config = f"ours (torch), --memory-gb {cap}"
        assert ran_or_said(config, 16, f"memory {config}, 16 frames")
    for r in report["timings"]:
        assert r["steps"] == 2 and r["size"] == 128
        assert (r["width"], r["height"]) == ((128, 192) if "portrait" in r["config"] else (128, 128))
        assert r["timings"]["total"] > 0 and {"unet", "controlnet", "vae_decode"} <= set(r["timings"])
        if r["memory_cap_gib"] is not None:  # the plan fits the cap (weights included)
            peak, budget = (float(x) for x in r["plan"].rsplit("predicted peak ", 1)[1].split(" GiB")[0].split(" of "))
            assert peak <= budget <= r["memory_cap_gib"]
    starts = {s["start"] for s in report["starts"]}
    for label in ("cold", "warm"):
        assert label in starts or f"start {label}: process start to first step, compiled" in said
    for r in report["starts"]:
        assert 0 < r["loaded_s"] <= r["first_step_s"]
    assert report["profile"] or "kernel profile" in said
    if report["profile"]:
        share = {r["class"]: r["share"] for r in report["profile"]}
        assert share["gemm/conv"] > 0.1 and abs(sum(share.values()) - 1) < 1e-3
    assert report["sdpa"] or "SDPA backends" in said
    for entry in report["sdpa"]:  # the CPU runs flash and math; the fastest exact one is named
        assert entry["fastest_exact"] in ("flash", "math")
    # DensePose (issues 27/28): bfloat16 against float32 at batch 1, the video's size, 256 px network input
    assert {r["dtype"] for r in report["densepose"]} | {w.removeprefix("DensePose ").split()[0] for w in said} >= {
        "bfloat16", "float32"}
    for r in report["densepose"]:
        assert (r["width"], r["height"], r["batch"], r["min_size"]) == (576, 1024, 1, 256)
        assert r["frames_per_s"] > 0 and r["detections_per_frame"] >= 1  # stages_small.npz: 1 per frame
    for d in report["densepose_deviation"]:
        assert d["frames"] == 1 and d["frames_other_detection_count"] in (0, 1)
        assert 0 <= d["label_agreement_pct"] <= 100 and 0 <= d["pixel_agreement_pct"] <= 100
    if report["densepose"]:
        assert "## DensePose estimator, PyTorch" in md
    assert "memory factors" in said  # CUDA allocator statistics only
    assert "TensorRT timings" in said and "## Correctness" in md and "| torch cpu fp32 |" in md


def test_part_labels_reads_back_the_rendered_labels():
    # the DensePose deviation compares part labels read back from rendered frames: painted
    # labels (later detections over earlier ones, label 0 keeping what is under it) come back
    import numpy as np

    from benchmarks.gpu_check import densepose_deviation, part_labels
    from magicanimate_rt.densepose.render import render_frame
    from magicanimate_rt.densepose.result import DensePoseResult

    rng = np.random.default_rng(0)
    boxes = np.array([[2, 3, 30, 20], [10, 8, 40, 35]], np.float32)  # XYXY, overlapping
    labels = [rng.integers(0, 25, (17, 28)).astype(np.uint8), rng.integers(0, 25, (27, 30)).astype(np.uint8)]
    r = DensePoseResult(boxes=boxes, scores=np.ones(2, np.float32), labels=labels,
                        uv=[np.zeros((2, *x.shape), np.float32) for x in labels])
    want = np.zeros((40, 48), np.uint8)
    for (x0, y0, _, _), lab in zip(boxes.astype(int), labels):
        region = want[y0:y0 + lab.shape[0], x0:x0 + lab.shape[1]]
        region[lab > 0] = lab[lab > 0]
    assert (part_labels(render_frame(r, 40, 48)) == want).all()
    # against itself: no deviation; against one box moved by 2 px: boxes 2 px apart
    same = densepose_deviation([r], [r], render_frame, 40, 48)
    assert same == {"frames": 1, "frames_other_detection_count": 0, "boxes_max_abs_px": 0.0,
                    "label_agreement_pct": 100.0, "pixel_agreement_pct": 100.0}
    moved = DensePoseResult(boxes=boxes + np.array([[0, 0, 0, 0], [2, 0, 2, 0]], np.float32), scores=r.scores,
                            labels=labels, uv=r.uv)
    dev = densepose_deviation([moved], [r], render_frame, 40, 48)
    assert dev["boxes_max_abs_px"] == 2.0 and dev["label_agreement_pct"] < 100
