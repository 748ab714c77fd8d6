"""``magicanimate-rt compare`` (compare.py): the report's numbers are scikit-image's and
numpy's on the very frames and latents the two renders made, the files hold those videos,
and bad input is one line before any model loads.

Real renders on the tiny model set (128 px, 16 frames, 2 steps): exact against exact
(identical: PSNR inf, SSIM 1, latent distance 0) and exact against the ``fast`` preset (at 2
steps, so every knob acts: DPM-Solver++(2M), a reused-feature step, a step without
guidance)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

skimage_metrics = pytest.importorskip("skimage.metrics")

from magicanimate_rt import compare as cmp  # noqa: E402
from magicanimate_rt.cli import main  # noqa: E402
from magicanimate_rt.runtime.media import driving_frames, load_source_image, read_video  # noqa: E402
from magicanimate_rt.runtime.modes import SamplingMode  # noqa: E402
from magicanimate_rt.runtime.request import AnimationRequest  # noqa: E402

SIZE, FRAMES, STEPS = 128, 16, 2


@pytest.fixture(scope="module")
def files(shared_dir):
    return (shared_dir / "samples" / "source_image" / "multi1_source.png",
            shared_dir / "samples" / "driving" / "running.mp4")


@pytest.fixture(scope="module")
def inputs(files):
    source, driving = files
    return load_source_image(source, SIZE), driving_frames(driving, SIZE, 0, FRAMES)[0]


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from magicanimate_rt.runtime.pipeline import AnimationPipeline

    with AnimationPipeline.from_pretrained(tiny_models) as p:
        yield p


@pytest.fixture(scope="module")
def same(pipe, inputs, tmp_path_factory):
    """exact against exact, without compare's own warm-up (checked on its own below)."""
    out = tmp_path_factory.mktemp("same")
    request = AnimationRequest(*inputs, size=SIZE, steps=STEPS, preset="exact")
    return cmp.compare(pipe, request, out, warmup=False), out


@pytest.fixture(scope="module")
def fast(pipe, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast")
    request = AnimationRequest(*inputs, size=SIZE, steps=STEPS, preset="fast")
    return cmp.compare(pipe, request, out, other_steps=STEPS, warmup=False), out


def test_fast_numbers_are_scikit_image_and_numpy_on_the_rendered_frames(fast):
    c, _ = fast
    r = c.report
    exact, other = c.exact.frames, c.other.frames
    assert c.other.mode == SamplingMode.preset("fast") and r["other"]["steps"] == STEPS
    assert r["other"]["mode"] == SamplingMode.preset("fast").with_steps(None).describe()
    assert not np.array_equal(exact, other)
    for i in range(FRAMES):
        mse = np.mean((exact[i].astype(np.float64) - other[i].astype(np.float64)) ** 2)
        assert abs(r["psnr_db"]["per_frame"][i] - 10 * np.log10(255.0**2 / mse)) < 1e-9
        ssim = skimage_metrics.structural_similarity(exact[i], other[i], channel_axis=-1, data_range=255)
        assert r["ssim"]["per_frame"][i] == pytest.approx(ssim, abs=1e-12)
    assert r["psnr_db"]["min"] == min(r["psnr_db"]["per_frame"]) < r["psnr_db"]["mean"] < math.inf
    assert r["ssim"]["mean"] == pytest.approx(np.mean(r["ssim"]["per_frame"]), abs=1e-12) and r["ssim"]["mean"] < 1
    a = c.exact.latents.numpy().astype(np.float64)
    b = c.other.latents.numpy().astype(np.float64)
    assert r["latent_rel_l2"] == pytest.approx(np.sqrt(((b - a) ** 2).sum() / (a**2).sum()), rel=1e-12)
    assert r["latent_rel_l2"] > 0
    for key, frames in (("exact", exact), ("other", other)):
        assert r["temporal"][key] == pytest.approx(np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(),
                                                   abs=1e-9)
    assert r["temporal"]["ratio"] == pytest.approx(r["temporal"]["other"] / r["temporal"]["exact"], rel=1e-12)
    assert r["speedup"] == r["exact"]["seconds"] / r["other"]["seconds"] and r["warmup"] is False


def test_exact_against_itself_is_identical(same, fast):
    c, _ = same
    r = c.report
    assert c.exact.frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.array_equal(c.exact.frames, c.other.frames)  # the renders are deterministic ...
    assert np.array_equal(c.exact.frames, fast[0].exact.frames)  # (and fast's exact side is the exact render)
    assert r["psnr_db"]["per_frame"] == [math.inf] * FRAMES  # ... and the report says so
    assert r["psnr_db"]["mean"] == r["psnr_db"]["min"] == math.inf
    assert r["ssim"]["per_frame"] == [1.0] * FRAMES and r["ssim"]["min"] == 1.0
    assert r["latent_rel_l2"] == 0.0
    assert r["temporal"]["exact"] == r["temporal"]["other"] > 0 and r["temporal"]["ratio"] == 1.0
    # the same work twice; the speed-up is the ratio of the two wall times, near 1 on a quiet
    # machine but not asserted to be (on a shared CPU two equal renders have differed 5x)
    assert r["speedup"] == r["exact"]["seconds"] / r["other"]["seconds"] and r["exact"]["seconds"] > 0
    assert r["exact"]["steps"] == r["other"]["steps"] == STEPS and r["warmup"] is False


def test_files_hold_the_videos_and_the_report(same, fast):
    c, out = fast
    assert sorted(p.name for p in out.iterdir()) == sorted(cmp.OUTPUTS)  # no temporary files left
    exact, other = c.exact.frames, c.other.frames
    videos = {name: read_video(out / name) for name in ("exact.mp4", "other.mp4", "side_by_side.mp4")}
    assert videos["exact.mp4"].shape == videos["other.mp4"].shape == (FRAMES, SIZE, SIZE, 3)
    assert videos["side_by_side.mp4"].shape == (FRAMES, SIZE, 3 * SIZE, 3)

    def psnr(a, b):
        return skimage_metrics.peak_signal_noise_ratio(a, b, data_range=255)

    def shows(frames, decoded):
        # random weights make noise-like frames that H.264 keeps only roughly (~23 dB), but
        # each decoded frame is far closer to its own render than to the next one
        own, shifted = psnr(frames, decoded), psnr(np.roll(frames, 1, axis=0), decoded)
        return own > 18 and own > shifted + 6, (own, shifted)

    panels = np.split(videos["side_by_side.mp4"], 3, axis=2)
    for frames, decoded in ((exact, videos["exact.mp4"]), (other, videos["other.mp4"]), (exact, panels[0]),
                            (other, panels[1])):
        ok, values = shows(frames, decoded)
        assert ok, values
    diff = np.clip(np.abs(exact.astype(np.int16) - other.astype(np.int16)) * cmp.DIFF_GAIN, 0, 255).astype(np.uint8)
    assert psnr(diff, panels[2]) > 30, (psnr(diff, panels[2]), diff.mean(), panels[2].mean())

    def strict(text):  # standard JSON: no Infinity or NaN
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))

    assert strict((out / "compare.json").read_text()) == json.loads(json.dumps(c.report))
    same_json = strict((same[1] / "compare.json").read_text())
    assert same_json["psnr_db"]["per_frame"] == [None] * FRAMES and same_json["ssim"]["min"] == 1.0
    md = (out / "compare.md").read_text()
    assert cmp.WARNING in md and cmp.summary_table(c.report) in md
    assert f"| speed-up | 1.00 x | {c.report['speedup']:.2f} x |" in md
    assert f"| {FRAMES - 1} | {c.report['psnr_db']['per_frame'][-1]:.2f} |" in md
    assert "inf (identical)" in (same[1] / "compare.md").read_text()


class RecordingPipe:
    """A stand-in pipeline that records the calls compare() makes (no rendering): the
    warm-up and the reference cache's emptying are about what is timed."""

    world_size = 1

    def __init__(self):
        self.calls = []
        self.stages = type("Stages", (), {"window": 4})()
        self.reference_cache = self

    def clear(self):
        self.calls.append("clear")

    def run(self, request, **kw):
        from magicanimate_rt.runtime.pipeline import AnimationResult
        import torch

        driving, steps = request.driving, request.num_steps
        self.calls.append((driving.shape[0], steps, "exact" if request.is_exact else request.mode))
        frames = np.full((driving.shape[0], 8, 8, 3), 10 * steps, np.uint8)
        return AnimationResult(frames=frames, latents=torch.full((1, 4, driving.shape[0], 1, 1), float(steps)))


def test_warmup_renders_each_mode_briefly_first_and_every_render_starts_cold(tmp_path):
    fake = RecordingPipe()
    source, driving = np.zeros((8, 8, 3), np.uint8), np.zeros((10, 8, 8, 3), np.uint8)
    request = AnimationRequest(source, driving, size=64, steps=5, sampler="dpmpp-2m")
    c = cmp.compare(fake, request, tmp_path / "out", other_steps=4)
    m = SamplingMode(sampler="dpmpp-2m")
    assert fake.calls == ["clear", (4, 3, m), "clear", (4, 3, "exact"),  # warm-up: the other first, <= 3 steps
                          "clear", (10, 5, "exact"), "clear", (10, 4, m)]
    assert c.report["latent_rel_l2"] == pytest.approx(1 / 5)  # latents 5 vs 4 everywhere
    assert c.report["psnr_db"]["mean"] == pytest.approx(10 * np.log10(255**2 / 10**2))  # frames 50 vs 40
    fake.calls.clear()  # a preset's own steps, unless the request names others; the exact's default 25
    cmp.compare(fake, AnimationRequest(source, driving, size=64, preset="fast"), tmp_path / "out", warmup=False)
    assert fake.calls == ["clear", (10, 25, "exact"), "clear", (10, 15, SamplingMode.preset("fast"))]


# --------------------------------------------------------------------------- the command line
@pytest.fixture
def cli_args(tiny_models, files, tmp_path):
    source, driving = files
    return {"--models": tiny_models, "--source": source, "--driving": driving, "--output-dir": tmp_path / "cmp",
            "--size": 64, "--steps": 1, "--max-frames": 4, "--preset": "fast"}


def run_main(args: dict, *flags):
    return main(["compare", *[str(x) for kv in args.items() if kv[1] is not None for x in kv], *map(str, flags)])


@pytest.mark.parametrize("over,needles", [
    ({"--source": "missing.png"}, ["missing.png"]),
    ({"--driving": "missing.mp4"}, ["missing.mp4"]),
    ({"--preset": "turbo"}, ["preset must be one of exact, fast", "turbo"]),
    ({"--preset": None}, ["--preset NAME"]),
    ({"--cache-interval": 0}, ["cache_interval must be an integer >= 1"]),
    ({"--sampler": "euler"}, ["sampler must be one of", "euler"]),
    ({"--models": "no-such-models"}, ["--models", "no-such-models"]),
    ({"--other-steps": 0}, ["--other-steps"]),
    ({"--size": 100}, ["--size"]),
])
def test_bad_input_is_one_line_and_writes_nothing(cli_args, tmp_path, capsys, over, needles):
    args = {**cli_args, **{k: (tmp_path / v if k in ("--source", "--driving") else v) for k, v in over.items()}}
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("magicanimate-rt: error: "), err
    assert all(n in err[0] for n in needles), err
    assert not (tmp_path / "cmp").exists()


def test_an_output_dir_that_is_a_file_is_refused(cli_args, tmp_path, capsys):
    (tmp_path / "cmp").write_text("a file")
    assert run_main(cli_args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"magicanimate-rt: error: --output-dir {tmp_path / 'cmp'}: is not a directory"]
    assert (tmp_path / "cmp").read_text() == "a file"


def test_without_scikit_image_it_says_what_to_install(cli_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now raises ImportError
    assert run_main(cli_args) == 2
    assert capsys.readouterr().err.strip() == ('magicanimate-rt: error: compare needs scikit-image, which is not '
                                               'installed: pip install -e ".[compare]"')
    assert not (tmp_path / "cmp").exists()


def test_bad_preset_in_a_real_process(cli_args, tmp_path):
    args = [str(x) for kv in {**cli_args, "--preset": "turbo"}.items() for x in kv]
    proc = subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", "compare", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["magicanimate-rt: error: preset must be one of exact, fast, got "
                                                "'turbo'"]
    assert not (tmp_path / "cmp").exists()


def test_preset_fast_on_the_command_line(cli_args, tmp_path, capsys):
    # (no warm-up: compare's warm-up is checked above; here it would double the test's time)
    assert run_main({**cli_args, "--steps": 2}, "--other-steps", 2, "--cache-interval", 2, "--no-warmup") == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert f"| speed-up | 1.00 x | {report['speedup']:.2f} x |" in out and cmp.WARNING in out
    assert 0 < report["psnr_db"]["min"] < math.inf and report["latent_rel_l2"] > 0
    mode = replace(SamplingMode.preset("fast"), cache_interval=2, steps=None)  # a knob overrides the preset's
    assert report["other"]["mode"] == mode.describe() and report["warmup"] is False
    assert report["exact"]["steps"] == report["other"]["steps"] == 2
    assert report["request"]["frames"] == 4 and (report["request"]["width"], report["request"]["height"]) == (64, 64)
    assert read_video(tmp_path / "cmp" / "side_by_side.mp4").shape == (4, 64, 192, 3)
