"""One step from a person video to an animation (densepose/prepare.py): ``animate --driving person.mp4
--densepose-weights FILE`` and ``AnimationPipeline.animate(..., densepose_weights=)`` prepare the
DensePose clip once, cache it by content, and animate with it.

The estimator at the person video's own size costs ~55 s a frame on 2 busy cores, so the whole file
estimates exactly one frame, once (the module fixture's first ``animate`` run); every other run must
hit the cache, which the tests check (the log line, and a counter on the estimation)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from magicanimate_rt import cli
from magicanimate_rt.densepose import prepare
from magicanimate_rt.densepose.video import PrepareSettings
from magicanimate_rt.runtime.media import read_video

pytest.importorskip("av")
ROOT = Path(__file__).resolve().parents[1]
ANIMATE = ("--size", "64", "--steps", "1", "--max-frames", "1")


def _animate(person, weights, models, source, output, cache):
    env = dict(os.environ, MAGICANIMATE_RT_CACHE=str(cache), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", "animate", "--models", str(models),
                           "--source", str(source), "--driving", str(person), "--densepose-weights", str(weights),
                           "--output", str(output), *ANIMATE], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=900)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shared_dir, tiny_models, densepose_weights):
    """The command once on an empty cache: it estimates the person video's first frame."""
    tmp = tmp_path_factory.mktemp("dp_animate")
    person = shared_dir / "samples" / "person" / "input_video.mp4"
    source = shared_dir / "samples" / "source_image" / "monalisa.png"
    proc = _animate(person, densepose_weights, tiny_models, source, tmp / "out.mp4", tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(tmp=tmp, person=person, source=source, proc=proc, cache=tmp / "cache")


def test_animate_prepares_the_clip_then_hits_the_cache(first_run, shared_dir, tiny_models, densepose_weights):
    tmp, cache = first_run["tmp"], first_run["cache"]
    assert "densepose: prepared" in first_run["proc"].stdout and "cached" not in first_run["proc"].stdout
    clips = sorted((cache / "densepose").glob("*.mp4"))
    assert len(clips) == 1
    clip = read_video(clips[0])
    # the input's own size (vid2densepose's default), and the picture detectron2 draws for frame 0
    # (conformance video_default.npz, the same weights and video): the port's float differences touch
    # 2 of 589,824 pixels (test_densepose_video.py), H.264 moves a flat colour by a few levels
    # (measured median 2 there), a wrong frame or colour moves most pixels by tens
    assert clip.shape == (1, 1024, 576, 3)
    reference = np.load(shared_dir / "conformance" / "densepose" / "video_default.npz")["f0_rendered"][..., ::-1]
    assert np.median(np.abs(clip[0].astype(int) - reference)) <= 3

    again = _animate(first_run["person"], densepose_weights, tiny_models, first_run["source"], tmp / "again.mp4",
                     cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "densepose: cached clip" in again.stdout and "loaded DensePose" not in again.stdout
    assert sorted((cache / "densepose").glob("*.mp4")) == clips
    # the same request on the same clip, in a process of the same settings: the same video
    assert np.array_equal(read_video(tmp / "again.mp4"), read_video(tmp / "out.mp4"))


def test_python_api_animates_with_the_cached_clip(first_run, tiny_models, densepose_weights, monkeypatch,
                                                  estimations):
    from magicanimate_rt.runtime.pipeline import AnimationPipeline

    monkeypatch.setenv("MAGICANIMATE_RT_CACHE", str(first_run["cache"]))
    (clip,) = (first_run["cache"] / "densepose").glob("*.mp4")
    with AnimationPipeline.from_pretrained(tiny_models) as pipe:
        ours = pipe.animate(first_run["source"], first_run["person"], densepose_weights=densepose_weights,
                            size=64, steps=1, max_frames=1)
        direct = pipe.animate(first_run["source"], clip, size=64, steps=1)
    assert estimations == []  # the cache answered: nothing was estimated
    # one process, one pipeline, the same inputs: the same computation, bit for bit
    assert ours.frames.shape == direct.frames.shape and np.array_equal(ours.frames, direct.frames)


def test_cache_key_follows_every_input_but_the_batch(tmp_path):
    base = dict(video_digest="a" * 64, weights_sha="b" * 64, settings=PrepareSettings(), device="cpu",
                dtype="float32")
    key = prepare.clip_key(**base)
    changed = [dict(video_digest="c" * 64), dict(weights_sha="d" * 64), dict(settings=PrepareSettings(size=64)),
               dict(settings=PrepareSettings(size=(64, 32))), dict(settings=PrepareSettings(fps=30)),
               dict(settings=PrepareSettings(start_frame=1)), dict(settings=PrepareSettings(max_frames=2)),
               dict(dtype="float16"), dict(device="cuda:0")]
    keys = {prepare.clip_key(**dict(base, **c)) for c in changed}
    assert len(keys) == len(changed) and key not in keys
    for same in (dict(settings=PrepareSettings(batch=1)), dict(settings=PrepareSettings(fit="pad")),
                 dict(device="cpu:0"), dict(dtype=__import__("torch").float32)):
        assert prepare.clip_key(**dict(base, **same)) == key, same  # nothing the picture depends on
    assert prepare.clip_key(**dict(base, settings=PrepareSettings(size=64, fit="pad"))) != \
        prepare.clip_key(**dict(base, settings=PrepareSettings(size=64)))

    # the weights' digest: the file's sha256, remembered by (path, size, mtime) and recomputed when it changes
    weights = tmp_path / "w.pkl"
    weights.write_bytes(b"x" * 3000)
    assert prepare.weights_digest(weights, tmp_path / "c") == hashlib.sha256(b"x" * 3000).hexdigest()
    memo = tmp_path / "c" / "weights-digests.json"
    memo.write_text(memo.read_text().replace(hashlib.sha256(b"x" * 3000).hexdigest(), "remembered"))
    assert prepare.weights_digest(weights, tmp_path / "c") == "remembered"
    weights.write_bytes(b"y" * 3001)
    assert prepare.weights_digest(weights, tmp_path / "c") == hashlib.sha256(b"y" * 3001).hexdigest()


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, shared_dir, tiny_models):
    monkeypatch.setenv("MAGICANIMATE_RT_CACHE", str(tmp_path / "cache"))
    person = shared_dir / "samples" / "person" / "input_video.mp4"
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video\n")
    lfs = tmp_path / "lfs.pkl"
    lfs.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 256\n")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(b"\x80\x04\x95")
    out = tmp_path / "out.mp4"
    cases = [
        ((person, lfs), "lfs.pkl", "Git LFS pointer"),
        ((person, truncated), "truncated.pkl", "truncated"),
        ((person, tmp_path / "missing.pkl"), "missing.pkl", ""),
        ((not_video, lfs), "notes.mp4", "not a video file"),
        ((tmp_path / "missing.mp4", lfs), "missing.mp4", ""),
    ]
    for (video, weights), name, words in cases:
        code = cli.main(["animate", "--models", str(tiny_models), "--source",
                         str(shared_dir / "samples" / "source_image" / "monalisa.png"), "--driving", str(video),
                         "--densepose-weights", str(weights), "--output", str(out), *ANIMATE])
        err = capsys.readouterr().err
        assert code == 2, (video, weights, err)
        assert err.count("\n") == 1 and name in err and words in err and "Traceback" not in err, err
        assert not out.exists()
        assert not list((tmp_path / "cache").rglob("*.mp4"))


def test_config_run_video_type_video(first_run, tmp_path, capsys, monkeypatch, tiny_models, densepose_weights,
                                     estimations):
    """A config of the original's format with ``video_type: "video"``: the person video's clip comes
    from the cache the command filled (the same video, weights, frames and precision), and the pair
    is animated with it: the same request as the command's, so the same video."""
    import yaml

    monkeypatch.setenv("MAGICANIMATE_RT_CACHE", str(first_run["cache"]))
    config = tmp_path / "animation.yaml"
    entries = dict(source_image=[str(first_run["source"])], video_path=[str(first_run["person"])], seed=0, steps=1,
                   size=64, max_length=1, savename="run", video_type="video",
                   densepose_weights=str(densepose_weights))
    config.write_text(yaml.safe_dump(entries))
    code = cli.main(["batch", str(config), "--models", str(tiny_models), "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "densepose: cached clip" in out.out and estimations == [] and "no effect" not in out.out + out.err
    written = tmp_path / "out" / "run" / "videos" / "monalisa_input_video.mp4"
    # the command's request on the command's clip, in one machine's float32: the same frames
    assert np.array_equal(read_video(written), read_video(first_run["tmp"] / "out.mp4"))
    assert yaml.safe_load((tmp_path / "out" / "run" / "config.yaml").read_text())["video_path"] == \
        [str(first_run["person"])]

    # the key's partner missing, or given without video_type video: one line, exit 2
    for bad, words in ((dict(entries, densepose_weights=None), "densepose_weights: missing"),
                       (dict(entries, video_type="condition"), "is for video_type 'video'")):
        config.write_text(yaml.safe_dump(bad))
        code = cli.main(["batch", str(config), "--models", str(tiny_models), "--output-dir", str(tmp_path / "o2")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "o2").exists()
