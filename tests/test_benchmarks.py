"""The benchmark's own arithmetic: FLOP counting per stage, summaries, memory fits and the
atomic report writer, on synthetic inputs (no model runs)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_report as rep
from benchmarks.flop_count import CountingStages
from benchmarks.runtime_bench import write_report
from magicanimate_rt.runtime.stages import Capabilities, Stages


class MatmulStages(Stages):
    """Each stage is one (n, 64) x (64, 32) matmul: 2 * n * 64 * 32 FLOPs."""

    name = "matmul"
    device = torch.device("cpu")
    dtype = torch.float32
    window = 16
    capabilities = Capabilities(max_windows_per_call=3)

    def __init__(self):
        self.text_embedding = torch.zeros(1, 77, 8)
        self.w = torch.ones(64, 32)

    def _mm(self, x):
        return x.reshape(-1, 64) @ self.w

    def encode_reference(self, image):
        return self._mm(image)

    def bank(self, ref_latent, t):
        return [self._mm(ref_latent)]

    def controlnet(self, latents, t, cond):
        return [self._mm(latents)]

    def unet_guided(self, latents, t, residuals, bank):
        return self._mm(latents), self._mm(latents)

    def unet_cond(self, latents, t, residuals, bank):
        return self._mm(latents)

    def decode(self, latents):
        return self._mm(latents)


def test_counting_stages_counts_per_stage_and_reuses_counts_per_shape():
    st = CountingStages(MatmulStages())
    t = torch.zeros(1)
    st.controlnet(torch.zeros(3, 64), t, None)
    st.controlnet(torch.zeros(3, 64), t, None)  # same shapes: counted from the cache
    st.controlnet(torch.zeros(5, 64), t, None)
    st.unet_guided(torch.zeros(2, 64), t, [], [])
    assert st.flops["controlnet"] == 2 * 64 * 32 * (3 + 3 + 5)
    assert st.calls["controlnet"] == 3
    assert st.flops["unet"] == 2 * (2 * 2 * 64 * 32)
    assert st.capabilities.max_windows_per_call == 3 and st.window == 16  # delegated


def fake_result(totals: dict[str, list[float]], flops: dict[str, int]) -> dict:
    variants = {}
    for key, ts in totals.items():
        runs = [{"timings": {"unet": 0.8 * x, "vae_decode": 0.2 * x, "total": x}, "wall_s": x,
                 "memory": {"peak_bytes": 100 + i, "working_bytes": 10, "baseline_bytes": 90 + i},
                 "load_before": 0.1, "load_after": 0.2} for i, x in enumerate(ts)]
        variants[key] = {"label": key, "note": "", "plan": None, "calls": {}, "flops": {"unet": flops[key]},
                         "rel_l2_vs_reference": 0.0, "runs": runs}
    return {"spec": {"frames": 32, "steps": 3, "size": 128, "repeats": 3}, "variants": variants}


def test_summary_ratios_are_ratios_of_medians():
    s = rep.summarize_timing(fake_result({"reference": [10, 12, 30], "default": [7, 6, 8]},
                                         {"reference": 1000, "default": 800}))
    assert s["reference"]["stages"]["total"]["median"] == 12
    assert s["default"]["ratio_measured"] == pytest.approx(7 / 12)
    assert s["default"]["ratio_flops"] == pytest.approx(0.8)
    assert s["default"]["fps"] == pytest.approx(32 / 7)
    assert s["default"]["stages"]["total"]["min"] == 6 and s["default"]["stages"]["total"]["max"] == 8
    assert s["reference"]["peak_rss_bytes"] == 102


def test_memory_fit_recovers_a_line():
    fit = rep.fit_memory([(16, 1000 + 16 * 50), (32, 1000 + 32 * 50), (64, 1000 + 64 * 50)])
    assert fit["per_frame_bytes"] == pytest.approx(50) and fit["fixed_bytes"] == pytest.approx(1000)
    assert rep.fit_memory([(16, 5)]) is None


def test_report_written_atomically(tmp_path):
    timing = fake_result({"reference": [10, 12, 11], "default": [7, 6, 8]}, {"reference": 1000, "default": 800})
    report = {"name": "r", "command": "x", "environment": {"machine": "m", "device": "cpu", "dtype": "float32",
                                                           "torch": "t", "threads": 2, "cores": 2},
              "configs": {"tiny": {"spec": timing["spec"], "raw_timing": timing,
                                   "timing": rep.summarize_timing(timing)}}}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "stale.txt").write_text("old")
    final = write_report(report, tmp_path)
    assert final == tmp_path / "r" and not (final / "stale.txt").exists()
    assert json.loads((final / "report.json").read_text())["name"] == "r"
    md = (final / "report.md").read_text()
    assert "| default | 7.00 [6.00–8.00] | 4.571 | 0.636 | 0.800 |" in md
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary directory left


def test_decode_chunks_script_measures_every_chunk(shared_dir, tmp_path):
    # SD 1.5's VAE config from the conformance data, at 32 px on the CPU: a run of the
    # script that picks the decode chunk rule's numbers on a GPU (docs/PERFORMANCE.md)
    from benchmarks import decode_chunks
    from magicanimate_rt.runtime.backends.torch_backend import MEMORY_FACTORS

    out = tmp_path / "dc.json"
    config = shared_dir / "conformance" / "sd15-configs" / "sd-vae-ft-mse" / "config.json"
    assert decode_chunks.main(["--vae-config", str(config), "--size", "32", "--frames", "3", "--chunks", "1,2,3",
                               "--device", "cpu", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["chunk"] for r in result["rows"]] == [1, 2, 3]
    assert all(r["median_s"] > 0 and r["peak_working_mib"] is None for r in result["rows"])
    # the backend's estimate: 26 x 128 channels x S^2 x 4 bytes per frame
    assert result["rows"][2]["predicted_working_mib"] == pytest.approx(
        3 * MEMORY_FACTORS["cpu"]["decode_frame"] * 128 * 32 * 32 * 4 / 2**20)


# --------------------------------------------------------------------------- scaling
def test_scaling_benchmark_times_the_gather_on_two_processes(tiny_models):
    from benchmarks.window_scaling import run_processes, summarise

    rows = [summarise(run_processes(n, tiny_models, size=64, frames=28, steps=1, threads=1, timeout_s=300), 1)
            for n in (1, 2)]
    assert [r["world"] for r in rows] == [1, 2] and [r["windows"] for r in rows] == [3, 3]
    assert rows[0]["gather_s"] == 0.0 and rows[1]["gather_s"] > 0.0  # only a split run exchanges anything
    assert 0 < rows[1]["comm_share"] < 1 and rows[1]["s_per_step"] > 0


def test_cost_model_counts_windows_and_stops_where_they_run_out():
    from benchmarks.window_scaling import H200_SD15, predict, windows_of

    assert [windows_of(f) for f in (1, 16, 17, 64, 256)] == [1, 1, 3, 6, 22]
    one = predict(64, 1)
    # calibration: the H200 report's own 64-frame run took 26.0 s (docs/PERFORMANCE.md "GPU")
    assert abs(one["total_s"] - 26.0) / 26.0 < 0.05
    assert one["comm_s_per_step"] == 0.0
    # 6 windows: 6 and 8 GPUs both leave one window per rank, so the loop is no faster
    six, eight = predict(64, 6), predict(64, 8)
    assert six["windows_per_rank"] == eight["windows_per_rank"] == 1
    assert eight["step_s"] >= six["step_s"] - 1e-9
    # the step never drops below one window plus the replicated appearance encoder
    assert eight["step_s"] > H200_SD15["window_s"] + H200_SD15["appearance_s"]


# --------------------------------------------------------------------------- module names
def test_no_benchmark_module_shares_a_name_with_an_installed_package():
    """Issue 25: benchmarks/kernels.py shadowed PyPI's `kernels` (which diffusers probes for) when a
    script put benchmarks/ on sys.path. Every module here must have a name that neither the standard
    library nor anything installed in this environment takes (checked with benchmarks/ off sys.path)."""
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parents[1] / "benchmarks"
    assert str(here) not in sys.path
    names = sorted(p.stem for p in here.glob("*.py") if p.stem != "__init__")
    assert "gpu_check" in names and "attention_kernels" in names
    taken = [n for n in names if n in sys.stdlib_module_names or importlib.util.find_spec(n) is not None]
    assert taken == [], f"rename these benchmarks/ modules, an installed package or the stdlib has the name: {taken}"


def test_every_relative_import_in_benchmarks_names_a_module_there():
    """The issue 25 renames left benchmarks/densepose.py importing ``.run`` (now runtime_bench), inside
    its main, so nothing failed until someone ran it: every ``from .x import ...`` in benchmarks/ must
    name a module that exists (a static check: running the scripts takes minutes)."""
    import ast
    from pathlib import Path

    here = Path(__file__).resolve().parents[1] / "benchmarks"
    modules = {p.stem for p in here.glob("*.py")}
    missing = []
    for path in sorted(here.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is not None:
                if node.module.split(".")[0] not in modules:
                    missing.append(f"{path.name}: from .{node.module}")
    assert len(modules) > 10
    assert missing == [], f"relative imports of modules benchmarks/ does not have: {missing}"
