"""The CLI as a user runs it: each bad input in a subprocess gets one line on stderr
naming the file or argument, exit code 2, no traceback and no output file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import linked_copy, replace_file


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tiny(shared_dir):
    return shared_dir / "conformance" / "tiny-models"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from magicanimate_rt import demo
    from magicanimate_rt.runtime.media import write_video
    from PIL import Image

    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(demo.source_image(64)).save(d / "source.png")
    write_video(d / "driving.mp4", demo.driving_clip(4, 64))
    (d / "notes.txt").write_text("not a video\n")
    (d / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return d


def assert_clean_failure(proc, out: Path, *needles: str):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]


def base_args(models, inputs, out, **over):
    args = {"--models": models, "--source": inputs / "source.png", "--driving": inputs / "driving.mp4",
            "--output": out, "--size": 64, "--steps": 1}
    args.update(over)
    flat = ["animate"]
    for k, v in args.items():
        if v is not None:
            flat += [k, v]
    return flat


@pytest.mark.parametrize("over,needles", [
    ({"--size": 100}, ["size must be a positive multiple of 64"]),
    ({"--steps": 0}, ["steps must be an integer >= 1"]),
    ({"--guidance": 0.5}, ["guidance scale must be a number >= 1"]),
    ({"--source": "missing.png"}, ["missing.png"]),
    ({"--source": "fake.png"}, ["fake.png"]),
    ({"--driving": "notes.txt"}, ["notes.txt"]),
    ({"--driving": "nothing.mp4"}, ["nothing.mp4"]),
    ({"--models": "no-such-models"}, ["--models", "no-such-models"]),
])
def test_bad_arguments_and_inputs(tiny, inputs, tmp_path, over, needles):
    out = tmp_path / "out.mp4"
    over = {k: (inputs / v if k in ("--source", "--driving") else v) for k, v in over.items()}
    proc = run_cli(*base_args(tiny, inputs, out, **over))
    assert_clean_failure(proc, out, *needles)


def test_missing_component(tiny, inputs, tmp_path):
    models = linked_copy(tiny, tmp_path / "models")
    for p in (models / "MagicAnimate" / "densepose_controlnet").iterdir():
        p.unlink()
    (models / "MagicAnimate" / "densepose_controlnet").rmdir()
    out = tmp_path / "out.mp4"
    assert_clean_failure(run_cli(*base_args(models, inputs, out)), out, "densepose_controlnet", "missing")


def test_truncated_weights(tiny, inputs, tmp_path):
    models = linked_copy(tiny, tmp_path / "models")
    f = models / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors"
    replace_file(f, f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "out.mp4"
    assert_clean_failure(run_cli(*base_args(models, inputs, out)), out, str(f), "truncated or corrupt")


def test_driving_with_no_frames(tiny, inputs, tmp_path):
    # an mp4 cut right after its header boxes has a stream but no decodable frame
    data = (inputs / "driving.mp4").read_bytes()
    empty = tmp_path / "empty.mp4"
    cut = data.find(b"mdat")
    empty.write_bytes(data[: cut + 4] if cut > 0 else data[:64])
    out = tmp_path / "out.mp4"
    proc = run_cli(*base_args(tiny, inputs, out, **{"--driving": empty}))
    assert_clean_failure(proc, out, "empty.mp4")


def test_animate_writes_video_and_grid(tiny, inputs, tmp_path):
    from magicanimate_rt.runtime.media import read_video

    out, grid = tmp_path / "anim.mp4", tmp_path / "grid.mp4"
    proc = run_cli(*base_args(tiny, inputs, out), "--grid", grid)
    assert proc.returncode == 0, proc.stderr
    assert read_video(out).shape == (4, 64, 64, 3)
    assert read_video(grid).shape == (4, 68, 200, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anim.mp4", "grid.mp4"]


def test_help_and_usage_errors():
    assert run_cli("--help").returncode == 0
    proc = run_cli("animate", "--size", "64")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_demo_runs_without_downloads(tmp_path):
    out = tmp_path / "demo.mp4"
    proc = run_cli("demo", "--output", out, "--frames", "16", "--steps", "1",
                   env={"MAGICANIMATE_RT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and (tmp_path / "demo-grid.mp4").is_file()
    assert "animate --models" in proc.stdout
    from magicanimate_rt.runtime.media import read_video

    frames = read_video(out)
    assert frames.shape == (16, 128, 128, 3) and frames.std() > 1.0


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    """CUDA OOM (simulated) ends with one line naming the options that lower memory."""
    import torch

    from magicanimate_rt import cli

    def oom(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cli, "cmd_demo", oom)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA out of memory" in err[0] and "--dtype float16" in err[0]
