"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ``shared/`` directory (conformance data, samples, docs).

    The repository is checked out next to it (``/somewhere/main`` and
    ``/somewhere/shared``); tests that need it are skipped where it is absent.
    """
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.skip(f"shared data directory not found at {path}")
    return path


# --------------------------------------------------------------------------- engine directories
# Exporting the tiny set takes about a minute, so it happens once per session: fp32 through
# build_engines.py itself (its output is checked in test_engine_dir.py), fp16 converted from
# those fp32 graphs in-process (build_engines.py --from-fp32 --no-validate: test_export.py
# checks the fp16 graphs against the torch stages itself).
ENGINE_SIZE = 128


@pytest.fixture(scope="session")
def tiny_models(shared_dir) -> Path:
    return shared_dir / "conformance" / "tiny-models"


@pytest.fixture(scope="session")
def tiny_model_set(tiny_models):
    from magicanimate_rt.models import load_model_set

    return load_model_set(tiny_models)


@pytest.fixture(scope="session")
def engines_fp32(tiny_models, tmp_path_factory):
    """(engine dir, CompletedProcess) of ``build_engines.py --precision fp32 --onnx-only``."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("engines") / "fp32"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "build_engines.py"), "--models", str(tiny_models), "--out",
                           str(out), "--size", str(ENGINE_SIZE), "--precision", "fp32", "--onnx-only"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def engines_fp16(tiny_models, engines_fp32, tmp_path_factory) -> Path:
    from magicanimate_rt.export.build import BuildSettings, build_engines

    out = tmp_path_factory.mktemp("engines") / "fp16"
    build_engines(BuildSettings(models=tiny_models, out=out, size=ENGINE_SIZE, precision="fp16", onnx_only=True,
                                validate=False, fp32_graphs=engines_fp32[0]), log=lambda msg: None)
    return out


# --------------------------------------------------------------------------- DensePose weights
@pytest.fixture(scope="session")
def densepose_weights(shared_dir, tmp_path_factory) -> Path:
    """The conformance data's random DensePose R_50_FPN_s1x weights (make_weights.py --seed 0, the
    model zoo .pkl format, 256 MB, ~2 s), written once per session."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("densepose") / "densepose_seed0.pkl"
    script = shared_dir / "conformance" / "densepose" / "make_weights.py"
    proc = subprocess.run([sys.executable, str(script), str(out), "--seed", "0"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def estimations(monkeypatch):
    """Every DensePose clip estimated in this process while a test runs (cached_driving_video's
    calls of prepare_driving_video): a cache hit adds none."""
    from magicanimate_rt.densepose import prepare

    calls = []
    real = prepare.prepare_driving_video
    monkeypatch.setattr(prepare, "prepare_driving_video", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls
