"""One request, one set of defaults (issue 26): the command line's flags, the service's
OpenAPI schema, config runs and the Python API all read their defaults and rules from
``runtime/request.py``; the service runs the sampling presets within its limits."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import pytest

from magicanimate_rt.runtime.request import (DEFAULT_STEPS, DEFAULTS, AnimationRequest, RequestError,
                                             settings_fields)

#: the original's defaults (its animate.py and shipped animation.yaml): what the one place says
ORIGINAL = {"size": 512, "guidance_scale": 7.5, "seed": 0, "start_frame": 0, "max_frames": None, "fit": "stretch"}


def test_the_one_place_holds_the_originals_defaults():
    assert DEFAULT_STEPS == 25 and AnimationRequest().num_steps == 25
    assert {k: DEFAULTS[k] for k in ORIGINAL} == ORIGINAL
    assert AnimationRequest().mode.is_exact and AnimationRequest(preset="fast").num_steps == 15


def test_cli_flags_are_declared_from_the_request():
    from magicanimate_rt.cli import build_parser

    p = build_parser()
    animate = vars(p.parse_args(["animate", "--source", "s.png", "--driving", "d.mp4", "--output", "o.mp4"]))
    compare = vars(p.parse_args(["compare", "--source", "s.png", "--driving", "d.mp4", "--output-dir", "o"]))
    for f in settings_fields():
        if f.metadata["cli"]:
            assert animate[f.name] == DEFAULTS[f.name], f.name
    for name in ("size", "steps", "guidance_scale", "seed", "start_frame", "preset"):
        assert compare[name] == DEFAULTS[name], name
    assert vars(p.parse_args(["warmup", "--models", "m"]))["size"] == DEFAULTS["size"]
    sub = next(a for a in p._actions if a.dest == "command").choices["animate"]
    text = " ".join(sub.format_help().split())
    for needle in (f"(default {DEFAULTS['size']})", f"(default {DEFAULTS['guidance_scale']})",
                   f"(default {DEFAULT_STEPS}, or the preset's)", "--guidance GUIDANCE_SCALE", "{exact,fast}"):
        assert needle in text, needle


def test_openapi_schema_is_the_request(tmp_path):
    pytest.importorskip("fastapi")
    from magicanimate_rt.serve.app import create_app
    from magicanimate_rt.serve.jobs import JobManager
    from magicanimate_rt.serve.settings import ServeSettings

    settings = ServeSettings(models=tmp_path, data_dir=tmp_path / "data").check()
    app = create_app(settings, JobManager(settings, load_pipeline=lambda device: None))
    body = app.openapi()["paths"]["/v1/animations"]["post"]["requestBody"]
    props = body["content"]["multipart/form-data"]["schema"]["properties"]
    for f in settings_fields():
        name = f.metadata["form"] or f.name
        assert props[name].get("default") == DEFAULTS[f.name], name  # (FastAPI leaves out a null default)
        assert f.metadata["help"] in props[name]["description"], name
    assert props["guidance"]["default"] == 7.5 and props["size"]["default"] == 512
    assert props["preset"]["enum"] == ["exact", "fast"] and "0.25x the exact time" in props["preset"]["description"]
    assert {"source", "driving", "reference_id", "steps", "cache_interval", "guidance_until"} <= set(props)


def test_config_runs_and_the_python_api_take_the_same_defaults():
    from magicanimate_rt import config_run
    from magicanimate_rt.runtime.pipeline import AnimationPipeline

    d = config_run.DEFAULTS
    assert (d["size"], d["steps"], d["guidance_scale"], d["offset"], d["max_length"]) == (
        DEFAULTS["size"], DEFAULT_STEPS, DEFAULTS["guidance_scale"], DEFAULTS["start_frame"], DEFAULTS["max_frames"])
    params = inspect.signature(AnimationPipeline.animate).parameters
    for name in ("size", "steps", "guidance_scale", "seed", "start_frame", "max_frames", "width", "height", "fit",
                 "crop_output"):
        assert params[name].default == DEFAULTS[name], name


@pytest.mark.parametrize("settings, field, words", [
    (dict(steps=0), "steps", "steps must be an integer >= 1, got 0"),
    (dict(size=100), "size", "size must be a positive multiple of 64 up to 2048, got 100"),
    (dict(width=64), "width", "width needs height"),
    (dict(guidance_scale=0.5), "guidance_scale", "guidance scale must be a number >= 1, got 0.5"),
    (dict(preset="turbo"), "preset", "preset must be one of exact, fast, got 'turbo'"),
    (dict(preset="fast", cache_interval=0), "cache_interval", "cache_interval must be an integer >= 1, got 0"),
    (dict(sampler="euler"), "sampler", "sampler must be one of ddim, dpmpp-2m, got 'euler'"),
    (dict(guidance_until=1.5), "guidance_until", "guidance_until must be a number in 0..1, got 1.5"),
    (dict(max_frames=0), "max_frames", "max_frames must be >= 1, got 0"),
    (dict(start_frame=-1), "start_frame", "start_frame must be a whole number >= 0, got -1"),
    (dict(seed=True), "seed", "seed must be a whole number, got True"),
    (dict(crop_output=True), "crop_output", "cropping the output back needs fit 'pad'"),
    (dict(fit="zoom"), "fit", "fit must be one of stretch, crop, pad, got 'zoom'"),
])
def test_each_bad_value_is_one_line_naming_the_field(settings, field, words):
    with pytest.raises(RequestError) as e:
        AnimationRequest(**settings)
    assert e.value.field == field and words in str(e.value) and "\n" not in str(e.value)


def test_a_mode_becomes_the_preset_or_its_knobs():
    from magicanimate_rt.runtime.modes import SamplingMode

    assert AnimationRequest.with_mode("fast").preset == "fast"
    assert AnimationRequest.with_mode(SamplingMode.preset("fast")).mode == SamplingMode.preset("fast")
    r = AnimationRequest.with_mode(SamplingMode(sampler="dpmpp-2m", steps=12))
    assert r.mode == SamplingMode(sampler="dpmpp-2m") and r.num_steps == 12
    assert r.exact().is_exact and r.exact().num_steps == 12
    back = AnimationRequest.from_settings(r.settings())
    assert back.settings() == r.settings() and (back.shape, back.mode, back.num_steps) == (r.shape, r.mode, 12)


# --------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def samples(shared_dir):
    s = shared_dir / "samples"
    return {"source": s / "source_image" / "multi1_source.png", "driving": s / "driving" / "running.mp4"}


def test_the_service_runs_a_fast_preset_job_within_its_limits(tiny_models, tmp_path, samples, monkeypatch):
    """The form takes the preset and each knob, checked within the server's limits, and the
    job's frames are the ones ``animate`` gives the writer for the same flags (compared as
    given to the writers: x264's output differs run to run, tests/helpers.py)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from helpers import record_writes
    from serve_helpers import ServerThread, free_port, submit, wait_final

    from magicanimate_rt.cli import main
    from magicanimate_rt.serve.settings import ServeSettings

    given = record_writes(monkeypatch)
    settings = ServeSettings(models=tiny_models, port=free_port(), data_dir=tmp_path / "data", max_steps=10).check()
    fields = dict(size=64, max_frames=16, seed=3)
    with ServerThread(settings) as srv:
        c = srv.client
        wait = time.monotonic() + 120
        while c.get("/readyz").status_code != 200:  # the worker loads the tiny set
            assert time.monotonic() < wait
            time.sleep(0.05)
        r = submit(c, samples["source"], samples["driving"], preset="fast", **fields)  # its 15 steps > 10
        assert r.status_code == 422, r.text
        assert r.json()["error"] == {"message": "steps 15: more than this server's limit of 10 (--max-steps)",
                                     "field": "steps"}
        r = submit(c, samples["source"], samples["driving"], preset="turbo", **fields)
        assert r.status_code == 422 and r.json()["error"]["field"] == "preset"
        assert "preset must be one of exact, fast, got 'turbo'" in r.json()["error"]["message"]
        r = submit(c, samples["source"], samples["driving"], preset="fast", steps=3, cache_interval=2, **fields)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        st = wait_final(c, job_id)
        assert st["status"] == "succeeded", st
        assert st["settings"]["preset"] == "fast" and st["settings"]["steps"] == 3
        assert st["settings"]["cache_interval"] == 2 and "sampler" not in st["settings"]  # not given: the preset's
        presets = c.get("/v1/presets").json()
        assert [p["name"] for p in presets["presets"]] == ["exact", "fast"]
        assert presets["presets"][1]["steps"] == 15 and presets["defaults"]["guidance"] == 7.5
    out = tmp_path / "cli.mp4"
    assert main(["animate", "--models", str(tiny_models), "--source", str(samples["source"]), "--driving",
                 str(samples["driving"]), "--output", str(out), "--size", "64", "--max-frames", "16", "--seed", "3",
                 "--preset", "fast", "--steps", "3", "--cache-interval", "2"]) == 0
    served = np.concatenate(given[(tmp_path / "data" / "results" / job_id / "video.mp4").resolve()])
    cli = np.concatenate(given[out.resolve()])
    assert served.shape == cli.shape == (16, 64, 64, 3)
    # the same function; the two pipelines may batch the decode differently (memory at the time)
    assert np.abs(served.astype(int) - cli.astype(int)).max() <= 1


def test_request_imports_nothing_above_runtime():
    import ast

    import magicanimate_rt.runtime.request as module

    tree = ast.parse(Path(module.__file__).read_text())
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.split(".")[0] in ("torch", "pydantic", "serve", "cli", "fastapi") for m in found), found
