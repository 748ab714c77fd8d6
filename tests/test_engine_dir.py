"""The engine directory: its manifest, the model-set fingerprint, every way a directory can
be wrong for a runtime (each one clear EngineError), and build_engines.py as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import linked_copy, replace_file

from magicanimate_rt.engines import manifest as mf
from magicanimate_rt.engines.manifest import EngineError, load_manifest, model_set_fingerprint
from magicanimate_rt.export import build
from magicanimate_rt.engines.specs import STAGE_NAMES
from magicanimate_rt.runtime.ddim import DDIMSettings

ROOT = Path(__file__).resolve().parents[1]


def run_build(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "build_engines.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def one_line_failure(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- the manifest
def test_manifest_describes_the_build(engines_fp32, tiny_models, tiny_model_set):
    d, _ = engines_fp32
    m = load_manifest(d, size=128, precision="fp32", model_set=model_set_fingerprint(tiny_models),
                      verify_hashes=True)
    assert m.format_version == mf.FORMAT_VERSION and m.size == 128 and m.window == 16 and m.latent_size == 16
    assert m.precision == "fp32" and m.exporter == "torchscript"
    assert list(m.stages) == list(STAGE_NAMES)
    assert m.ddim == DDIMSettings().to_dict()
    assert set(m.versions) >= {"torch", "onnx", "onnxruntime", "diffusers"}
    np.testing.assert_array_equal(m.text_embedding(), tiny_model_set.text_embedding.numpy())
    raw = json.loads((d / "manifest.json").read_text())
    assert raw["tensorrt"] is None
    for name, stage in raw["stages"].items():
        assert stage["plans"] == {} and stage["onnx"] == f"{name}.onnx"
        assert stage["validation"]["rel_l2"] < 1e-4
        assert [f["name"] for f in stage["files"]] == [f"{name}.onnx"]
        assert stage["signature"]["name"] == name
    assert raw["stages"]["controlnet"]["signature"]["axes"] == {"frames": [1, 16, 16]}
    assert sorted(p.name for p in d.iterdir()) == sorted(["manifest.json", "text_embedding.npy",
                                                          *(f"{s}.onnx" for s in STAGE_NAMES)])


def test_fingerprint_covers_configs_and_weights(tiny_models, tmp_path):
    fp = model_set_fingerprint(tiny_models)
    assert len(fp) == 64 and fp == model_set_fingerprint(tiny_models)
    copy = linked_copy(tiny_models, tmp_path / "m")
    assert model_set_fingerprint(copy) == fp  # paths relative to the root, not absolute
    cfg = copy / "MagicAnimate" / "densepose_controlnet" / "config.json"
    replace_file(cfg, cfg.read_bytes().replace(b'"act_fn"', b'"act_fn" ', 1))
    fp_cfg = model_set_fingerprint(copy)
    assert fp_cfg != fp
    w = copy / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    replace_file(w, bytes(data))
    assert model_set_fingerprint(copy) not in (fp, fp_cfg)
    # files the loader never reads do not count
    (copy / "stable-diffusion-v1-5" / "unet" / "README.md").write_text("notes\n")
    (copy / "stable-diffusion-v1-5" / "scheduler" / "scheduler_config.json").unlink()
    assert model_set_fingerprint(copy) == model_set_fingerprint(copy)


def test_fingerprint_files_follow_the_loader(tiny_models):
    """The fingerprinted weights are exactly the files the loader reads (both resolve the
    layout through magicanimate_rt/layout.py: the VAE-MSE override, the weights order)."""
    from magicanimate_rt.layout import weights_names
    from magicanimate_rt.models.loading import ModelPaths, find_weights

    paths = ModelPaths.locate(tiny_models)
    read = {find_weights(getattr(paths, c), weights_names(c))
            for c in ("unet", "vae", "text_encoder", "appearance_encoder", "controlnet")} | {paths.motion}
    files = set(mf.model_set_files(tiny_models))
    assert read <= files
    assert {f for f in files if f.suffix in (".safetensors", ".bin", ".ckpt")} == read
    assert paths.vae.name == "sd-vae-ft-mse"  # the override is taken in both


# --------------------------------------------------------------------------- refusals
def damaged_copy(src: Path, dst: Path) -> Path:
    """A linked copy whose manifest is a real file (so it can be edited)."""
    linked_copy(src, dst)
    replace_file(dst / "manifest.json", (src / "manifest.json").read_bytes())
    return dst


def edit_manifest(d: Path, **changes) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(m))


def assert_refused(d: Path, *needles, **kwargs):
    with pytest.raises(EngineError) as e:
        load_manifest(d, **kwargs)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(d) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_refuses_another_size_precision_or_model_set(engines_fp32):
    d, _ = engines_fp32
    assert_refused(d, "size 128, not 256", "--size 256", "build_engines.py", "--force", size=256)
    assert_refused(d, "precision fp32, not fp16", "--precision fp16", "build_engines.py", precision="fp16")
    assert_refused(d, "another model set", "build_engines.py", model_set="0" * 64)


def test_refuses_another_format_version(engines_fp32, tmp_path):
    d = damaged_copy(engines_fp32[0], tmp_path / "e")
    edit_manifest(d, format_version=mf.FORMAT_VERSION + 1)
    assert_refused(d, f"format version {mf.FORMAT_VERSION + 1}", f"reads version {mf.FORMAT_VERSION}",
                   "--size 128 --precision fp32 --force")


def test_refuses_missing_or_corrupt_manifest(engines_fp32, tmp_path):
    d = damaged_copy(engines_fp32[0], tmp_path / "e")
    (d / "manifest.json").write_text('{"format_version": 1, "size": 128,')
    assert_refused(d, "not valid JSON", "build_engines.py")
    edit = damaged_copy(engines_fp32[0], tmp_path / "f")
    m = json.loads((edit / "manifest.json").read_text())
    del m["stages"]["unet"]["signature"]
    (edit / "manifest.json").write_text(json.dumps(m))
    assert_refused(edit, "damaged manifest", "signature")
    (d / "manifest.json").unlink()
    assert_refused(d, "no manifest.json", "build_engines.py")
    assert_refused(tmp_path / "nowhere", "not found", "build_engines.py")


def test_refuses_missing_or_truncated_graphs(engines_fp32, tmp_path):
    d = damaged_copy(engines_fp32[0], tmp_path / "e")
    (d / "unet.onnx").unlink()
    assert_refused(d, "unet.onnx is missing", "build_engines.py --models", "--force")
    d = damaged_copy(engines_fp32[0], tmp_path / "f")
    replace_file(d / "controlnet.onnx", (d / "controlnet.onnx").read_bytes()[:1000])
    assert_refused(d, "controlnet.onnx is 1000 bytes", "truncated", "build_engines.py")
    d = damaged_copy(engines_fp32[0], tmp_path / "g")
    data = bytearray((d / "vae_decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    replace_file(d / "vae_decoder.onnx", bytes(data))
    load_manifest(d)  # sizes are checked on every load; contents on request
    assert_refused(d, "vae_decoder.onnx does not match its recorded sha256", verify_hashes=True)


def test_runtime_refuses_a_damaged_directory(engines_fp32, tmp_path):
    from magicanimate_rt import AnimationPipeline

    d = damaged_copy(engines_fp32[0], tmp_path / "e")
    (d / "text_embedding.npy").unlink()
    with pytest.raises(EngineError, match="text_embedding.npy is missing"):
        AnimationPipeline.from_engines(d, backend="onnxruntime")


# --------------------------------------------------------------------------- build_engines.py
def test_build_prints_a_table_and_progress(engines_fp32):
    d, proc = engines_fp32
    table = proc.stdout.splitlines()
    assert table[0].split()[:2] == ["stage", "max"] and "rel L2 err" in table[0]
    rows = {line.split()[0]: line.split() for line in table[2:7]}
    assert list(rows) == list(STAGE_NAMES)
    for row in rows.values():
        assert float(row[2]) < 1e-4  # relative L2 against the torch stage
    assert f"wrote {d}" in proc.stdout
    for k, stage in enumerate(STAGE_NAMES, 1):
        assert f"[{k}/5] {stage}" in proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    assert not list(d.parent.glob(".fp32.*"))  # no temporary directory left behind


def test_same_build_is_up_to_date(engines_fp32, tiny_models):
    d, _ = engines_fp32
    before = (d / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    proc = run_build("--models", tiny_models, "--out", d, "--size", 128, "--precision", "fp32", "--onnx-only")
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr and proc.stdout == ""
    assert time.perf_counter() - t0 < 60
    assert (d / "manifest.json").stat().st_mtime_ns == before


def test_refuses_to_overwrite_another_build_without_force(engines_fp32, tiny_models):
    d, _ = engines_fp32
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    for args, what in ((("--size", 64, "--precision", "fp32"), "built for size 128"),
                       (("--size", 128, "--precision", "fp16"), "built for precision fp32")):
        proc = run_build("--models", tiny_models, "--out", d, *args, "--onnx-only")
        one_line_failure(proc, str(d), what, "--force")
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before


@pytest.mark.skipif(build.tensorrt_available(), reason="TensorRT is installed here")
def test_without_onnx_only_says_tensorrt_is_missing(tiny_models, tmp_path):
    proc = run_build("--models", tiny_models, "--out", tmp_path / "e", "--size", 128, "--precision", "fp16")
    one_line_failure(proc, "TensorRT is not installed", "--onnx-only")
    assert not (tmp_path / "e").exists()


def test_bad_arguments_are_one_line(tiny_models, tmp_path):
    one_line_failure(run_build("--models", tiny_models, "--out", tmp_path / "e", "--size", 100, "--onnx-only"),
                     "--size", "multiple of 64")
    one_line_failure(run_build("--models", tmp_path / "nothing", "--out", tmp_path / "e", "--onnx-only"),
                     str(tmp_path / "nothing"), "not found")
    one_line_failure(run_build("--models", tiny_models, "--out", tmp_path / "e", "--precision", "fp8"),
                     "--precision")
    one_line_failure(run_build("--out", tmp_path / "e"), "--models")
    (tmp_path / "file").write_text("x")
    one_line_failure(run_build("--models", tiny_models, "--out", tmp_path / "file", "--size", 64, "--onnx-only"),
                     "not a directory")
    assert not (tmp_path / "e").exists()


def fake_build(fail=False):
    def _build_into(d, s, fingerprint, log):
        if fail:
            (d / "half.onnx").write_bytes(b"x")
            raise build.EngineError("export failed")
        (d / "new.onnx").write_bytes(b"new")
        return build.BuildReport(d, up_to_date=False)

    return _build_into


def test_force_replaces_only_engine_directories(monkeypatch, tiny_models, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "old.onnx").write_bytes(b"old")
    settings = build.BuildSettings(models=tiny_models, out=out, size=64, precision="fp32", onnx_only=True)
    monkeypatch.setattr(build, "_build_into", fake_build())
    with pytest.raises(EngineError, match="--force"):
        build.build_engines(settings, log=lambda m: None)
    build.build_engines(build.BuildSettings(**{**settings.__dict__, "force": True}), log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["new.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temporary or old directory left

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(EngineError, match="not an engine directory"):
        build.build_engines(build.BuildSettings(**{**settings.__dict__, "out": mine, "force": True}),
                            log=lambda m: None)
    assert (mine / "holiday.jpg").exists()


def test_failed_build_leaves_the_directory_as_it_was(monkeypatch, tiny_models, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "old.onnx").write_bytes(b"old")
    monkeypatch.setattr(build, "_build_into", fake_build(fail=True))
    with pytest.raises(EngineError, match="export failed"):
        build.build_engines(build.BuildSettings(models=tiny_models, out=out, size=64, precision="fp32",
                                                onnx_only=True, force=True), log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["old.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_from_fp32_refuses_another_build(engines_fp32, tiny_models, tmp_path):
    with pytest.raises(EngineError, match="size 128, not 64"):
        build.build_engines(build.BuildSettings(models=tiny_models, out=tmp_path / "e", size=64, precision="fp16",
                                                onnx_only=True, fp32_graphs=engines_fp32[0]), log=lambda m: None)
    with pytest.raises(build.InputError, match="fp16"):
        build.BuildSettings(models=tiny_models, out=tmp_path / "e", precision="fp32", fp32_graphs=engines_fp32[0])


def test_fp16_build_from_fp32_graphs(engines_fp16, engines_fp32, tiny_models):
    m = load_manifest(engines_fp16, size=128, precision="fp16", model_set=model_set_fingerprint(tiny_models))
    assert m.exporter == "torchscript"
    for name, stage in m.stages.items():
        assert stage.validation == {}, name  # built with --no-validate; test_export.py checks them
        assert all(t.dtype == ("float32" if t.name == "timestep" else "float16") for t in stage.spec.inputs)
        assert all(t.dtype == "float16" for t in stage.spec.outputs)
        assert stage.files[0].bytes < 0.6 * os.path.getsize(engines_fp32[0] / f"{name}.onnx"), name
