"""benchmarks/gpu_check.py as CI can run it: --help, its refusal without a GPU, and the
whole script end to end on the CPU (--dry-run: tiny set, 128 px, 2 steps, float32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


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
    proc = run("--out", out, "--dry-run", "--shared", shared_dir, "--cache", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert proc.stdout.strip() == md.strip()
    assert report["errors"] == []
    assert report["environment"]["dry_run"] is True and report["environment"]["device"] == "cpu"
    (row,) = report["correctness"]
    assert row["backend"] == "torch cpu fp32" and row["ok"] and row["rel_l2"] < 1e-4
    # every timing ran or says why not (the budget decides on a slow machine)
    ran = {(r["config"], r["frames"]) for r in report["timings"]}
    said = {s["what"] for s in report["skipped"]}
    for config in ("original schedule", "ours (torch)"):
        for frames in (16, 32):
            assert (config, frames) in ran or f"timing {config}, {frames} frames" in said
    portrait = "timing ours (torch), portrait 128x192, 16 frames"
    assert ("ours (torch), portrait 128x192", 16) in ran or portrait in said
    for r in report["timings"]:
        assert r["steps"] == 2 and r["size"] == 128
        assert (r["width"], r["height"]) == ((128, 192) if "portrait" in r["config"] else (128, 128))
        assert r["timings"]["total"] > 0 and {"unet", "controlnet", "vae_decode"} <= set(r["timings"])
    assert "TensorRT timings" in said and "## Correctness" in md and "| torch cpu fp32 |" in md
