"""Compiled stages (``TorchOptions.compile_mode``, ``runtime/compiled.py``) and their
on-disk compile cache.

What it costs here decides what runs by default. On these 2 shared CPU cores inductor
compiles the tiny set's six graphs (64 px, 16 frames) in about 9 minutes cold (the guided
UNet alone about 7; a VAE decode 1-2: Python codegen plus gcc); a second process warm from
the cache file took 4.4 minutes (the C++ kernels are rebuilt on the CPU, see
``test_a_second_process_starts_warm_from_the_cache_file``) and 39 s with inductor's local
cache kept too. So the default tests compile one small stage with inductor (the ControlNet
conditioning embedding, ~30 s), and the whole request compiled with inductor runs when
``MAGICANIMATE_RT_FULL_COMPILE_TEST=1`` is set (~10 minutes cold).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import fields, replace

import pytest
import torch

from magicanimate_rt import cli, demo
from magicanimate_rt.models import load_model_set
from magicanimate_rt.runtime.backends.torch_backend import TorchOptions, TorchStages, architecture_fingerprint
from magicanimate_rt.runtime.compiled import (STAGES, CompileCache, CompiledCall, CompileFallbackWarning,
                                              CompileKey)
from magicanimate_rt.runtime.pipeline import AnimationPipeline, PipelineOptions
from magicanimate_rt.runtime.planner import LoopPlan

CPU = torch.device("cpu")
SIZE, FRAMES = 64, 16
#: a fixed budget (1 GiB besides the tiny set's 41 MiB of weights), so the plan (and with it
#: the compile key) is the same in every run
OPTIONS = PipelineOptions(memory_gb=1.1)
FULL = os.environ.get("MAGICANIMATE_RT_FULL_COMPILE_TEST") == "1"


@pytest.fixture(scope="module")
def models(tiny_models):
    return load_model_set(tiny_models)


@pytest.fixture(scope="module")
def clip():
    return demo.source_image(SIZE), demo.driving_clip(FRAMES, SIZE)


def animate(models, clip, options: TorchOptions = TorchOptions(), steps: int = 1):
    """(final latents, the stages) of one 1-step guided request on the shared model set."""
    stages = TorchStages(models, CPU, torch.float32, options)
    pipe = AnimationPipeline(stages, options=OPTIONS, ranks=None)
    result = pipe.animate(*clip, size=SIZE, steps=steps, guidance_scale=7.5, seed=0)
    return result.latents, stages


@pytest.fixture(scope="module")
def eager(models, clip):
    return animate(models, clip)[0]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------- the same function
@pytest.mark.slow
def test_compiled_stage_is_the_same_function_and_a_corrupt_cache_is_one_warning(models, clip, eager, tmp_path):
    """Inductor on the CPU compiles the ControlNet embedding; the request's final latents
    equal eager's (measured: rel L2 0.0 in float32, the convolutions are the same oneDNN
    calls and inductor's fused SiLU rounds as eager's; bound 1e-4). The cache file the key
    names is corrupt beforehand: one warning, a cold compile, and the request replaces it
    with a file that loads; an unwritable directory is one warning. ~20-45 s cold here, most
    of it inductor and gcc."""
    options = TorchOptions(compile_mode="default", compile_stages=("controlnet_embed",),
                           compile_cache_dir=str(tmp_path))
    stages = TorchStages(models, CPU, torch.float32, options)
    pipe = AnimationPipeline(stages, options=OPTIONS, ranks=None)
    path = stages.compile_cache.path(stages.compile_key(SIZE, SIZE, pipe.plan(SIZE, FRAMES)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a cache file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latents = pipe.animate(*clip, size=SIZE, steps=1, guidance_scale=7.5, seed=0).latents
    ours = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(ours) == 1 and "unreadable" in str(ours[0].message), [str(w.message) for w in ours]
    assert stages.compile_failures() == {}
    assert rel_l2(latents, eager) < 1e-4
    assert stages.compile_cache.saved == {path: path.stat().st_size}
    key = stages.compile_key(SIZE, SIZE, pipe.plan(SIZE, FRAMES))
    assert CompileCache(tmp_path).load(key) >= 1
    # a cache directory that cannot be written: one warning, no error
    (tmp_path / "a-file").write_text("")
    unwritable = CompileCache(tmp_path / "a-file")
    with pytest.warns(CompileFallbackWarning, match="could not write"):
        assert unwritable.save(key) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        assert unwritable.save(key) is None


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="inductor on every stage takes ~10 minutes on 2 CPU cores; "
                                     "set MAGICANIMATE_RT_FULL_COMPILE_TEST=1")
def test_every_stage_compiled_is_the_same_function(models, clip, eager, tmp_path):
    """Every stage through inductor: the final latents equal eager's (float32; measured rel
    L2 9.3e-7, so the 1e-4 bound has a 100x margin)."""
    latents, stages = animate(models, clip, TorchOptions(compile_mode="default", compile_cache_dir=str(tmp_path)))
    assert stages.compile_failures() == {}
    error = rel_l2(latents, eager)
    print(f"compiled vs eager: rel L2 {error:.3g}")
    assert error < 1e-4


# --------------------------------------------------------------------------- the key
BASE = CompileKey(torch_version="2.13.0", triton_version="none", device_model="cpu-x86_64-X", dtype="torch.float32",
                  mode="default", backend="inductor", options="{}", model_set="abc", width=512, height=512,
                  windows_per_call=1, controlnet_chunk=16, decode_chunk=4)


def test_the_key_changes_with_every_field_and_only_then():
    assert replace(BASE).digest() == BASE.digest()
    digests = {BASE.digest()}
    for f in fields(CompileKey):
        value = getattr(BASE, f.name)
        other = ((not value) if isinstance(value, bool) else 1024 if value is None else
                 value + 1 if isinstance(value, int) else value + "x")
        digests.add(replace(BASE, **{f.name: other}).digest())
    assert len(digests) == len(fields(CompileKey)) + 1
    assert BASE.file_name == f"512x512-{BASE.digest()}.bin"


def test_the_backend_keys_its_model_set_options_and_plan(models, tiny_models):
    compiled = TorchOptions(compile_mode="default")
    st = TorchStages(models, CPU, torch.float32, compiled)
    key = st.compile_key(SIZE, SIZE, LoopPlan())
    again = TorchStages(load_model_set(tiny_models), CPU, torch.float32, compiled)
    assert again.compile_key(SIZE, SIZE, LoopPlan()) == key  # another load of the same set
    assert key.device_model.startswith("cpu-") and key.dtype == "torch.float32" and key.triton_version
    changed = [
        st.compile_key(SIZE * 2, SIZE, LoopPlan()),
        st.compile_key(SIZE, SIZE, LoopPlan(windows_per_call=2)),
        st.compile_key(SIZE, SIZE, LoopPlan(controlnet_chunk=8)),
        st.compile_key(SIZE, SIZE, LoopPlan(decode_chunk=4)),
        st.compile_key(SIZE, SIZE, LoopPlan(controlnet_residuals="per_window")),
        st.compile_key(SIZE, SIZE, LoopPlan(cfg_sequential=True)),
        st.compile_key(SIZE, SIZE, LoopPlan(ff_chunk=1024)),
        TorchStages(models, CPU, torch.float32, replace(compiled, share_cfg_prefix=False)).compile_key(
            SIZE, SIZE, LoopPlan()),
        TorchStages(models, CPU, torch.float32, replace(compiled, compile_mode="max-autotune")).compile_key(
            SIZE, SIZE, LoopPlan()),
        TorchStages(models, CPU, torch.float32, replace(compiled, compile_backend="aot_eager")).compile_key(
            SIZE, SIZE, LoopPlan()),
    ]
    assert len({k.digest() for k in changed} | {key.digest()}) == len(changed) + 1
    # the cache directory is where the key's file goes, not part of it
    elsewhere = TorchStages(models, CPU, torch.float32, replace(compiled, compile_cache_dir="/elsewhere"))
    assert elsewhere.compile_key(SIZE, SIZE, LoopPlan()) == key
    # the architecture: channels_last changes the weights' strides, so the compiled graphs
    fingerprint = architecture_fingerprint(again.models)
    again.models.unet.to(memory_format=torch.channels_last)
    assert architecture_fingerprint(again.models) != fingerprint


# --------------------------------------------------------------------------- warm start
@pytest.mark.slow
def test_a_second_process_starts_warm_from_the_cache_file(tiny_models, tmp_path):
    """``warmup`` (here in-process) writes the cache file; a second process, with an empty
    inductor cache of its own (TORCHINDUCTOR_CACHE_DIR), loads it and compiles no graph:
    every graph comes from the file. One small stage (see the module docstring). On the
    CPU the file holds inductor's graphs (its lowering and Python codegen); the C++ kernels
    they call are rebuilt from inductor's local cache, unlike CUDA's Triton kernels, which
    travel in the file."""
    args = ["warmup", "--models", str(tiny_models), "--size", str(SIZE), "--frames", str(FRAMES),
            "--compile-stages", "controlnet_embed", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(args) == 0
    files = list((tmp_path / "cache").glob("*.bin"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"compile artifacts from {files[0]}" in out, out
    assert "(0 graph(s) compiled, " in out and "1 from the cache" in out, out
    assert "nothing new to write" in out, out


# --------------------------------------------------------------------------- fallback
def failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_a_failing_compile_is_one_warning_and_the_eager_result(models, clip, eager, tmp_path):
    options = TorchOptions(compile_mode="default", compile_backend=failing_backend,
                           compile_stages=("vae_decode", "controlnet_embed"), compile_cache_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latents, stages = animate(models, clip, options)
    ours = [str(w.message) for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(ours) == 2 and all("no compiler here" in m for m in ours), ours  # one per stage, of 16 decodes
    assert sorted(stages.compile_failures()) == ["controlnet_embed", "vae_decode"]
    assert torch.equal(latents, eager)


def test_errors_of_the_call_itself_and_out_of_memory_propagate():
    def bad_input(x):
        raise ValueError("the call's own error")

    call = CompiledCall("unet", bad_input, "default", failing_backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        with pytest.raises(ValueError, match="own error"):
            call(torch.ones(2))
    assert call.failed is None

    def out_of_memory(gm, example_inputs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    calls = []
    oom = CompiledCall("unet", lambda x: calls.append(1) or x + 1, "default", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        oom(torch.ones(2))
    assert calls == [] and oom.failed is None  # not retried eager: the caller steps down on it


def test_cuda_graph_outputs_are_copied_for_every_compiled_stage(models, monkeypatch):
    """Under "reduce-overhead" every compiled call begins a graph step and returns copies:
    the loop keeps the reference latent, the bank, the embedding and the residuals across
    calls, which the next graph step may overwrite. Each call is replaced by a fake that
    returns the same buffer every time, as a CUDA graph does (nothing compiles here)."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    st = TorchStages(models, CPU, torch.float32, TorchOptions(compile_mode="reduce-overhead"))
    pool = torch.zeros(4)
    one, many = (lambda *args: pool), (lambda *args: [pool] * 13)
    st._encode = st._embed = st._forward = st._decode = one
    st._appearance = st._controlnet = st._embedded = many
    st._guided = lambda *args: (pool, pool)
    x = torch.zeros(1, 1, 1, 1)
    outputs = [st.encode_reference(x), *st.bank(x, x), st.controlnet_embed(x), *st.controlnet(x, x, x),
               *st.controlnet_embedded(x, x, x), *st.unet_guided(x, x, [x] * 13, []), st.unet_cond(x, x, [x] * 13, []),
               st.decode(x)]
    assert len(marks) == 8
    assert all(o.data_ptr() != pool.data_ptr() for o in outputs)


# --------------------------------------------------------------------------- the command line
def assert_one_line(argv, needle: str, capsys) -> None:
    """``magicanimate-rt ARGV`` (in this process: nothing loads before these errors) ends
    with exit code 2 and one stderr line holding ``needle``."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("args, needle", [
    (["--models", "{tmp}/nope", "--frames", "4"], "--models"),
    (["--models", "{tmp}", "--frames", "0"], "--frames must be >= 1"),
    (["--models", "{tmp}", "--frames", "four"], "argument --frames"),
    (["--models", "{tmp}", "--size", "65"], "--size"),
    (["--models", "{tmp}", "--compile-stages", "unet,vae"], "--compile-stages"),
    (["--models", "{tmp}", "--compile-mode", "fast"], "argument --compile-mode"),
])
def test_warmup_bad_input_is_one_line(args, needle, tmp_path, capsys):
    assert_one_line(["warmup", *(a.format(tmp=tmp_path) for a in args)], needle, capsys)


@pytest.mark.parametrize("extra, needle", [
    (["--engines", "{tmp}", "--compile", "default"], "--compile is for the torch backend"),
    (["--models", "{tmp}", "--backend", "onnxruntime", "--compile", "default"], "--compile is for the torch backend"),
    (["--models", "{tmp}", "--compile-stages", "unet"], "need --compile MODE"),
    (["--models", "{tmp}", "--compile", "fastest"], "argument --compile"),
])
def test_animate_compile_flags_bad_input_is_one_line(extra, needle, tmp_path, capsys):
    assert_one_line(["animate", "--source", str(tmp_path / "s.png"), "--driving", str(tmp_path / "d.mp4"),
                     "--output", str(tmp_path / "out.mp4"), *(a.format(tmp=tmp_path) for a in extra)], needle, capsys)


def test_compile_options_are_checked():
    from magicanimate_rt.errors import InputError

    with pytest.raises(InputError, match="compile_stages"):
        TorchOptions(compile_mode="default", compile_stages=("unet", "text"))
    with pytest.raises(InputError, match="compile_mode"):
        TorchOptions(compile_mode="fast")
    assert TorchOptions().compile_stages == STAGES
