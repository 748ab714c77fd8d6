"""``magicanimate-rt batch CONFIG.yaml``: a config of the original's
configs/prompts/animation.yaml shape runs with one warm pipeline and writes the original's
tree; each pair's video is the one ``magicanimate-rt animate`` writes for the same
settings; a failing pair is one line and the others still run (exit 1); a bad config is one
line and exit 2 before any model is loaded, with nothing written."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import record_writes

from magicanimate_rt import cli
from magicanimate_rt.config_run import ORIGINAL_INFERENCE, check_inference_config, load_batch
from magicanimate_rt.runtime.media import read_video

SIZE, STEPS, OFFSET, LENGTH = 64, 1, 2, 8

#: the original's configs/inference/inference.yaml (its values are checked against the
#: runtime's DDIMSettings and MotionModuleConfig by check_inference_config)
INFERENCE = ORIGINAL_INFERENCE
DROP = object()


@pytest.fixture(scope="module")
def inputs(shared_dir, tiny_models, tmp_path_factory) -> Path:
    """A config folder: ``inputs`` and ``models`` link to the shared samples and tiny set
    (links, not copies), the inference config, and a garbage "video"."""
    d = tmp_path_factory.mktemp("config")
    (d / "inputs").symlink_to(shared_dir / "samples")
    (d / "models").symlink_to(tiny_models)
    (d / "inference.yaml").write_text(yaml.safe_dump(INFERENCE))
    (d / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video " * 20)
    (d / "elsewhere").mkdir()  # the current directory of the runs: paths resolve against the config's folder
    return d


def animation_yaml(**over) -> dict:
    """The original's animation.yaml shape, with paths relative to the config's folder."""
    cfg = {
        "pretrained_model_path": "models/stable-diffusion-v1-5",
        "pretrained_vae_path": "models/sd-vae-ft-mse",
        "pretrained_controlnet_path": "models/MagicAnimate/densepose_controlnet",
        "pretrained_appearance_encoder_path": "models/MagicAnimate/appearance_encoder",
        "pretrained_unet_path": "",
        "motion_module": "models/MagicAnimate/temporal_attention/temporal_attention.ckpt",
        "savename": "run", "fusion_blocks": "midup", "seed": [-1, 11, 5], "steps": STEPS, "guidance_scale": 7.5,
        "source_image": ["inputs/source_image/monalisa.png", "inputs/source_image/demo4.png",
                         "inputs/source_image/monalisa.png"],
        "video_path": ["inputs/driving/running.mp4", "bad.mp4", "inputs/driving/dancing2.mp4"],
        "inference_config": "inference.yaml", "size": SIZE, "L": 16, "S": 1, "I": 0, "clip": 0,
        "offset": OFFSET, "max_length": LENGTH, "video_type": "condition", "invert_video": False,
        "save_individual_videos": True,
    }
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not DROP}


def write(folder: Path, name: str, cfg) -> Path:
    path = folder / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def batch_run(inputs, tmp_path_factory):
    """One in-process ``magicanimate-rt batch``: 3 pairs, the second's video is garbage.
    Returns (exit code, run folder, stdout, stderr, frames given to each writer)."""
    out = tmp_path_factory.mktemp("batch-out")
    config = write(inputs, "animation.yaml", animation_yaml(unknown_key=1))
    err, std = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stderr(err), redirect_stdout(std):
        mp.chdir(inputs / "elsewhere")
        given = record_writes(mp)
        rc = cli.main(["batch", str(config), "--output-dir", str(out)])
    return rc, out / "run", std.getvalue(), err.getvalue(), given


def decoded(path: Path) -> np.ndarray:
    return read_video(path).astype(np.int16)


def test_batch_writes_the_original_tree(batch_run):
    rc, run, stdout, stderr, given = batch_run
    assert rc == 1, stderr  # pair 2 failed
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert files == ["config.yaml", "videos",
                     "videos/monalisa_dancing2", "videos/monalisa_dancing2.mp4",
                     "videos/monalisa_dancing2/ctrl.mp4", "videos/monalisa_dancing2/grid.mp4",
                     "videos/monalisa_dancing2/orig.mp4",
                     "videos/monalisa_running", "videos/monalisa_running.mp4",
                     "videos/monalisa_running/ctrl.mp4", "videos/monalisa_running/grid.mp4",
                     "videos/monalisa_running/orig.mp4"]
    video = decoded(run / "videos" / "monalisa_running.mp4")
    assert video.shape == (LENGTH, SIZE, SIZE, 3)
    assert decoded(run / "videos" / "monalisa_running" / "grid.mp4").shape == (LENGTH, SIZE + 4, 3 * SIZE + 8, 3)


def test_a_failing_pair_is_one_line_and_the_others_run(batch_run):
    rc, run, stdout, stderr, given = batch_run
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("magicanimate-rt: error: pair 2 (inputs/source_image/demo4.png, bad.mp4): ")
    assert "bad.mp4" in errors[0].split("): ", 1)[1]
    assert "Traceback" not in stderr
    assert "failed: pair 2 (inputs/source_image/demo4.png, bad.mp4)" in stdout
    assert "magicanimate-rt: warning: config" in stdout and "'unknown_key'" in stdout


def test_seeds_are_recorded_and_the_written_config_runs_again(batch_run, inputs):
    rc, run, stdout, stderr, given = batch_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    drawn, *fixed = saved["seed"]
    assert fixed == [11, 5] and isinstance(drawn, int) and drawn != -1
    assert saved["random_seed"] == saved["seed"]
    assert saved["source_image"][0] == str(inputs / "inputs/source_image/monalisa.png")
    again = load_batch(run / "config.yaml", output_dir=run.parent)
    assert [p.seed for p in again.pairs] == saved["seed"]
    assert again.models == inputs / "models"


@pytest.mark.parametrize("pair", [1, 3])  # 3: the same source again (reference cache), another seed
def test_each_pair_is_what_animate_writes(batch_run, inputs, tmp_path, monkeypatch, pair):
    from magicanimate_rt.runtime.media import load_source_image

    rc, run, stdout, stderr, given = batch_run
    cfg = animation_yaml()
    seed = yaml.safe_load((run / "config.yaml").read_text())["seed"][pair - 1]
    source, video = (inputs / cfg["source_image"][pair - 1]), (inputs / cfg["video_path"][pair - 1])
    out, grid = tmp_path / "animate.mp4", tmp_path / "grid.mp4"
    theirs = record_writes(monkeypatch)
    assert cli.main(["animate", "--models", str(inputs / "models"), "--source", str(source), "--driving", str(video),
                     "--start-frame", str(OFFSET), "--max-frames", str(LENGTH), "--size", str(SIZE),
                     "--steps", str(STEPS), "--seed", str(seed), "--output", str(out), "--grid", str(grid)]) == 0
    name = f"{source.name.split('.')[0]}_{video.stem}"
    for ours, other in ((run / "videos" / f"{name}.mp4", out), (run / "videos" / name / "grid.mp4", grid)):
        a, b = np.concatenate(given[ours.resolve()]), np.concatenate(theirs[other.resolve()])
        assert a.shape[0] == LENGTH and np.array_equal(a, b), ours  # the same frames to the encoder
        a, b = decoded(ours), decoded(other)
        assert a.shape == b.shape and np.abs(a - b).mean() < 1.5, ours  # and the same video, up to x264
    # ctrl.mp4 / orig.mp4: the resized driving frames (offset, max_length) and the source
    driving = read_video(video, size=SIZE, start_frame=OFFSET, max_frames=LENGTH)
    ctrl = np.concatenate(given[(run / "videos" / name / "ctrl.mp4").resolve()])
    orig = np.concatenate(given[(run / "videos" / name / "orig.mp4").resolve()])
    assert np.array_equal(ctrl, driving)
    assert np.array_equal(orig, np.broadcast_to(load_source_image(source, SIZE), driving.shape))
    assert decoded(run / "videos" / name / "ctrl.mp4").shape == driving.shape


# --------------------------------------------------------------------------- bad configs
BAD = {
    "missing list": (dict(source_image=DROP), "source_image: missing"),
    "lengths differ": (dict(video_path=["inputs/driving/running.mp4"]), "source_image lists 3 paths but video_path 1"),
    "L": (dict(L=8), "L: 8 is not supported"),
    "S": (dict(S=2), "S: 2 is not supported"),
    "fusion_blocks": (dict(fusion_blocks="full"), "fusion_blocks: 'full' is not supported"),
    "missing source": (dict(source_image=["nothing.png", "bad.mp4", "bad.mp4"]),
                       "source_image: 'nothing.png' not found"),
    "missing video": (dict(video_path=["bad.mp4", "nothing.mp4", "bad.mp4"]), "video_path: 'nothing.mp4' not found"),
    "seed count": (dict(seed=[1, 2]), "seed: 2 seeds for 3 pairs"),
    "steps": (dict(steps=0), "steps must be an integer >= 1"),
    "size": (dict(size=100), "size must be a positive multiple of 64"),
    "img2img": (dict(num_actual_inference_steps=0), "num_actual_inference_steps"),
    "inference file": (dict(inference_config="nothing.yaml"), "inference_config: 'nothing.yaml' not found"),
    "beta_end": ({"inference_config": "ddim.yaml", "@ddim.yaml": {
        **INFERENCE, "noise_scheduler_kwargs": {"beta_start": 0.00085, "beta_end": 0.02, "beta_schedule": "linear"}}},
        "noise_scheduler_kwargs.beta_end is 0.02"),
    "no beta_start": ({"inference_config": "ddim.yaml", "@ddim.yaml": {
        **INFERENCE, "noise_scheduler_kwargs": {"beta_end": 0.012, "beta_schedule": "linear"}}},
        "noise_scheduler_kwargs.beta_start is absent (the original then uses 0.0001)"),
    "no motion module": ({"inference_config": "unet.yaml", "@unet.yaml": {**INFERENCE, "unet_additional_kwargs": {
        k: v for k, v in INFERENCE["unet_additional_kwargs"].items() if k != "use_motion_module"}}},
        "unet_additional_kwargs.use_motion_module is absent (the original then uses False)"),
    "unet key": ({"inference_config": "unet.yaml", "@unet.yaml": {
        **INFERENCE, "unet_additional_kwargs": {**INFERENCE["unet_additional_kwargs"], "sample_size": 32}}},
        "unet_additional_kwargs.sample_size is not a setting"),
    "not one models dir": (dict(pretrained_controlnet_path="models/MagicAnimate/appearance_encoder"),
                           "pretrained_controlnet_path"),
    "vae null": (dict(pretrained_vae_path=None), "sd-vae-ft-mse exists"),
    "no model paths": (dict(pretrained_model_path=DROP), "pretrained_model_path: missing (or pass --models DIR)"),
    "invalid YAML": ("source_image: [a.png\nvideo_path: b.mp4\n", "not valid YAML"),
    "duplicate key": ("steps: 1\nsteps: 2\n", "key 'steps' given twice"),
    "not a mapping": ("- a\n- b\n", "expected a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_config_is_one_line_and_exit_2_before_loading(inputs, tmp_path, monkeypatch, capsys, case):
    from magicanimate_rt import AnimationPipeline

    over, needle = BAD[case]
    if isinstance(over, str):
        cfg = over
    else:
        over = dict(over)
        for k in [k for k in over if k.startswith("@")]:
            write(inputs, k[1:], over.pop(k))
        cfg = animation_yaml(**over)
    config = write(inputs, f"bad-{case.replace(' ', '-')}.yaml", cfg)
    monkeypatch.setattr(AnimationPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    monkeypatch.chdir(inputs / "elsewhere")
    out = tmp_path / "out"
    assert cli.main(["batch", str(config), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("magicanimate-rt: error: "), err
    assert needle in err[0]
    assert not out.exists()


def test_the_command_exits_2_with_one_line(inputs, tmp_path):
    config = write(inputs, "bad-L-subprocess.yaml", animation_yaml(L=24))
    exe = shutil.which("magicanimate-rt")
    cmd = [exe] if exe else [sys.executable, "-m", "magicanimate_rt.cli"]
    out = tmp_path / "out"
    proc = subprocess.run([*cmd, "batch", str(config), "--output-dir", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=inputs / "elsewhere")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"magicanimate-rt: error: config {config}: L: 24 is not supported: "
                                                "this runtime runs 16 only (the temporal UNet's 16-frame window)"]
    assert not out.exists()


# --------------------------------------------------------------------------- reading the config
def test_relative_paths_try_the_current_directory_first(inputs, tmp_path, monkeypatch):
    here = tmp_path / "cwd"
    (here / "inputs").mkdir(parents=True)
    shutil.copy(inputs / "bad.mp4", here / "inputs" / "only-here.mp4")
    (here / "bad.mp4").write_bytes(b"x")
    config = write(inputs, "relative.yaml", animation_yaml(
        source_image=["inputs/source_image/monalisa.png"], video_path=["bad.mp4"], seed=3))
    monkeypatch.chdir(here)
    batch = load_batch(config)
    assert batch.pairs[0].video == here / "bad.mp4"  # in both places: the current directory wins
    assert batch.pairs[0].source == inputs / "inputs/source_image/monalisa.png"  # only beside the config
    assert batch.models == inputs / "models" and batch.output == Path("samples/run")
    assert (batch.start_frame, batch.max_length, batch.pairs[0].seed) == (OFFSET, LENGTH, 3)


def test_models_override_and_the_defaults_of_absent_keys(inputs, tiny_models, monkeypatch):
    import datetime

    cfg = {"source_image": ["inputs/source_image/dalle2.jpeg"], "video_path": ["inputs/driving/demo4.mp4"]}
    config = write(inputs, "minimal.yaml", cfg)
    monkeypatch.chdir(inputs / "elsewhere")
    batch = load_batch(config, models=tiny_models, output_dir=Path("out"), now=datetime.datetime(2024, 5, 6, 7, 8, 9))
    assert batch.models == tiny_models
    assert batch.output == Path("out/minimal-2024-05-06T07-08-09")
    assert (batch.size, batch.steps, batch.guidance_scale, batch.max_length) == (512, 25, 7.5, None)
    assert [p.seed for p in batch.pairs] == [-1] and batch.pairs[0].name == "dalle2_demo4"
    assert batch.warnings == []


def test_warnings_name_what_has_no_effect(inputs):
    cfg = animation_yaml(max_length=None, I=3, extra=1, inference_config="noted.yaml",
                         source_image=["inputs/source_image/monalisa.png"] * 2,
                         video_path=["inputs/driving/running.mp4"] * 2, seed=1)
    write(inputs, "noted.yaml", {**INFERENCE, "noise_scheduler_kwargs": {
        **INFERENCE["noise_scheduler_kwargs"], "steps_offset": 0, "clip_sample": True}})
    batch = load_batch(write(inputs, "warned.yaml", cfg))
    text = "\n".join(batch.warnings)
    assert "unknown keys 'extra'" in text
    assert "offset 2 is ignored without max_length" in text and batch.start_frame == 0
    assert "I: 3 has no effect" in text
    assert "pairs 1 and 2 both write videos/monalisa_running.mp4" in text
    assert "steps_offset 0 is replaced by 1" in text and "clip_sample True is replaced by False" in text


def test_the_originals_default_inference_config_may_be_absent(inputs, monkeypatch):
    """animation.yaml copied out of the original's repository names its
    configs/inference/inference.yaml: absent, its shipped values are used with one note; any
    other missing path stays an error."""
    from magicanimate_rt.errors import InputError

    assert check_inference_config(Path("shipped"), ORIGINAL_INFERENCE) == []  # the runtime's own values, no note
    monkeypatch.chdir(inputs / "elsewhere")
    batch = load_batch(write(inputs, "copied.yaml", animation_yaml(
        inference_config="configs/inference/inference.yaml", seed=1,
        source_image=["inputs/source_image/monalisa.png"], video_path=["inputs/driving/running.mp4"])))
    notes = [w for w in batch.warnings if "inference_config" in w]
    assert notes == [f"config {inputs / 'copied.yaml'}: inference_config 'configs/inference/inference.yaml' not "
                     "found; using the values of the original's shipped file (this runtime's fixed settings)"]
    assert batch.inference_config is None
    with pytest.raises(InputError, match="inference_config: 'configs/inference/other.yaml' not found"):
        load_batch(write(inputs, "copied-other.yaml", animation_yaml(
            inference_config="configs/inference/other.yaml", source_image=["inputs/source_image/monalisa.png"],
            video_path=["inputs/driving/running.mp4"], seed=1)))


def test_exponent_floats_are_numbers_as_in_omegaconf(inputs):
    from magicanimate_rt.config_run import read_yaml

    path = write(inputs, "floats.yaml", "a: 1e-5\nb: 8.5e-4\nc: 16\nd: '1e-5'\n")
    assert read_yaml(path, "config") == {"a": 1e-5, "b": 8.5e-4, "c": 16, "d": "1e-5"}
