"""The DensePose stages of an engine directory (``build_engines.py --densepose-weights``) run by ONNX
Runtime (CPU, float32), against the PyTorch estimator and against detectron2's conformance data.

The directory is built once for the module, at the conformance file's small input config (256/427),
so both stages_small frames go through every graph in one batch of 2 (batch and image axes other than
the traced ones: the build traces at batch 2, 128x192 and validates at batch 1, 96x160).

Tolerances are test_densepose_model.py's, and for the same reason: ONNX Runtime's float32 kernels
differ from PyTorch's and from detectron2's only in rounding (accumulation order, fused conv+bias,
its own ConvTranspose and Resize). Measured on this CPU (2 threads), err = max|ours - theirs| /
max|theirs|: ORT vs PyTorch (same input) backbone outputs (p2..p6, decoder map, RPN objectness and
deltas) <= 3.7e-6, box head <= 4.0e-7, DensePose head <= 9.0e-6; ORT vs detectron2 FPN <= 1.4e-6,
proposal logits <= 1.3e-6 (boxes <= 2.3e-4 px of ~427), box head <= 5.3e-7, instance scores
<= 7.9e-7 (boxes equal), DensePose 56x56 <= 2.8e-6, U/V where labels agree <= 4.5e-7. FLOAT_TOL
(5e-4) is >= 130x and DP_TOL (1e-3) >= 110x every one of them. Labels and the rendered frame differ
where bilinearly resampled logits tie within that rounding: measured 3 and 5 label pixels of 589,248
against detectron2 (12 and 6 against PyTorch, whose own differ from detectron2's by 11 and 5), within
LABEL_FRACTION (0.1% of the box: >= 49x), while a plausible bug flips tens of thousands.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from magicanimate_rt.densepose import DensePoseEstimator
from magicanimate_rt.densepose.preprocess import network_input, resize_frames
from magicanimate_rt.densepose.rpn import find_proposals
from magicanimate_rt.densepose.stages import BACKBONE_OUTPUTS, box_outputs, densepose_lowres, detect
from magicanimate_rt.engines.densepose import DENSEPOSE_STAGES, read_densepose
from magicanimate_rt.errors import EngineError, InputError
from magicanimate_rt.export.build import main as build_main
from magicanimate_rt.export.onnx_export import graph_signature
from test_densepose_model import (
    DP_NAMES, DP_TOL, FLOAT_TOL, LABEL_FRACTION, SMALL, UV_TOL, _check_result, _match, err,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine_dir(densepose_weights, tmp_path_factory):
    """The DensePose stages alone in a new directory, through build_engines.py's command line."""
    out = tmp_path_factory.mktemp("dp_engines") / "engines"
    rc = build_main(["--densepose-weights", str(densepose_weights), "--out", str(out),
                     "--densepose-min-size", str(SMALL.min_size), "--densepose-max-size", str(SMALL.max_size)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def ort(engine_dir):
    return DensePoseEstimator.from_engines(engine_dir, backend="onnxruntime")


@pytest.fixture(scope="module")
def reference(densepose_weights):
    return DensePoseEstimator.from_checkpoint(densepose_weights, min_size=SMALL.min_size, max_size=SMALL.max_size)


@pytest.fixture(scope="module")
def conformance(shared_dir):
    return np.load(shared_dir / "conformance" / "densepose" / "stages_small.npz")


@pytest.fixture(scope="module")
def small_input(conformance):
    frames = np.stack([conformance["f0_frame"], conformance["f1_frame"]])  # BGR, as detectron2 was fed
    resized = resize_frames(frames, SMALL)
    return frames, network_input(resized, SMALL), resized.shape[1:3]


def test_the_build_records_three_checked_dynamic_graphs(engine_dir):
    m = read_densepose(engine_dir)
    assert tuple(m.stages) == DENSEPOSE_STAGES and (m.min_size, m.max_size, m.precision) == (256, 427, "fp32")
    assert m.blocks == (3, 4, 6, 3)
    for name in DENSEPOSE_STAGES:
        # the build's own ORT-vs-torch check (random inputs, other axes than traced): fp32 rounding
        assert m.stages[name].validation["rel_l2"] < 1e-5, name
    sig = graph_signature(m.onnx_path("densepose_backbone"))
    assert sig["inputs"] == [("images", ("batch", 3, "height", "width"), "float32")]
    assert [o[0] for o in sig["outputs"]] == list(BACKBONE_OUTPUTS)
    assert m.spec("densepose_backbone").axes["height"].max == 448  # 427 padded to a multiple of 32
    assert graph_signature(m.onnx_path("densepose_head"))["inputs"] == [
        ("pooled", ("instances", 256, 28, 28), "float32")]


def test_every_stage_against_pytorch_and_detectron2(ort, reference, small_input, conformance):
    d = conformance
    _, x, size = small_input
    with torch.inference_mode():
        got, want = ort.stages.backbone(x), reference.stages.backbone(x)
        flat = lambda o: [*o.features, o.densepose_features, *o.objectness, *o.anchor_deltas]  # noqa: E731
        for name, a, b in zip(BACKBONE_OUTPUTS, flat(got), flat(want), strict=True):
            assert err(a, b) < FLOAT_TOL, name
        for lvl in range(5):
            assert err(got.features[lvl][0], d[f"f0_p{lvl + 2}"]) < FLOAT_TOL, lvl
        props = find_proposals(got.features, got.objectness, got.anchor_deltas, size, SMALL)
        for f, (boxes, logits) in enumerate(props):
            ref_boxes, ref_logits = d[f"f{f}_proposal_boxes"], d[f"f{f}_proposal_logits"]
            rows = np.concatenate([boxes.numpy(), logits.numpy()[:, None]], 1)
            assert _match(rows, np.concatenate([ref_boxes, ref_logits[:, None]], 1)) < FLOAT_TOL * np.abs(ref_boxes).max()
            assert err(logits, ref_logits) < FLOAT_TOL
        # the box head on detectron2's proposals, and against PyTorch's box head on the same pooled input
        their = [torch.from_numpy(d[f"f{f}_proposal_boxes"]) for f in range(2)]
        logits, deltas = box_outputs(ort.stages, got.features, their, SMALL)
        ref_logits, ref_deltas = box_outputs(reference.stages, got.features, their, SMALL)
        assert err(logits, ref_logits) < FLOAT_TOL and err(deltas, ref_deltas) < FLOAT_TOL
        for f in range(2):
            sl = slice(1000 * f, 1000 * (f + 1))
            assert err(logits[sl], d[f"f{f}_box_cls_logits"]) < FLOAT_TOL
            assert err(deltas[sl], d[f"f{f}_box_deltas"]) < FLOAT_TOL
        for f, (boxes, scores, classes) in enumerate(detect(ort.stages, got.features, props, size, SMALL)):
            np.testing.assert_array_equal(classes.numpy(), d[f"f{f}_pred_classes"])
            assert err(boxes, d[f"f{f}_pred_boxes_net"]) < FLOAT_TOL
            assert err(scores, d[f"f{f}_scores"]) < FLOAT_TOL
        their = [torch.from_numpy(d[f"f{f}_pred_boxes_net"]) for f in range(2)]
        low = densepose_lowres(ort.stages, got.densepose_features, their, SMALL)
        ref_low = densepose_lowres(reference.stages, got.densepose_features, their, SMALL)
        for j, name in enumerate(DP_NAMES):
            assert err(low[j], ref_low[j]) < DP_TOL, name
            for f in range(2):
                assert err(low[j][f:f + 1], d[f"f{f}_dp_lowres_{name}"]) < DP_TOL, (name, f)


def test_predict_and_render_against_pytorch_and_detectron2(ort, reference, small_input, conformance):
    frames = np.ascontiguousarray(small_input[0][..., ::-1])  # our API takes RGB
    results, ref_results = ort.predict(frames), reference.predict(frames)
    assert [len(r) for r in results] == [len(r) for r in ref_results] == [1, 1]
    height, width = frames.shape[1:3]
    for f, (r, ref) in enumerate(zip(results, ref_results)):
        _check_result(r, conformance, f, 4)  # boxes, scores, integer boxes, labels, U/V vs detectron2
        assert err(r.boxes, ref.boxes) < FLOAT_TOL and err(r.scores, ref.scores) < FLOAT_TOL
        assert all(int((a != b).sum()) <= LABEL_FRACTION * a.size for a, b in zip(r.labels, ref.labels))
        picture = ort.render(r, height, width)
        want = conformance[f"f{f}_rendered"][..., ::-1]  # stored BGR
        assert int((picture != want).any(-1).sum()) <= LABEL_FRACTION * height * width


def test_densepose_command_with_engines(engine_dir, reference, shared_dir, tmp_path):
    """``densepose --engines`` end to end on 2 frames at 128x128, against the same preparation with the
    PyTorch estimator (what ``densepose --weights`` runs, here at the engines' input size)."""
    from magicanimate_rt.densepose.video import PrepareSettings, prepare_driving_video

    video = shared_dir / "samples" / "person" / "input_video.mp4"
    out, iuv = tmp_path / "dp.mp4", tmp_path / "dp.npz"
    proc = subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", "densepose", str(video), "--engines",
                           str(engine_dir), "--backend", "onnxruntime", "--size", "128", "--max-frames", "2",
                           "--output", str(out), "--save-iuv", str(iuv)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "wrote" in proc.stdout + proc.stderr and "2 frames" in proc.stdout + proc.stderr
    ref_out, ref_iuv = tmp_path / "ref.mp4", tmp_path / "ref.npz"
    prepare_driving_video(video, ref_out, reference, PrepareSettings(size=128, max_frames=2), save_iuv=ref_iuv)
    got, want = np.load(iuv), np.load(ref_iuv)
    assert sorted(got.files) == sorted(want.files) and int(got["num_frames"]) == 2
    for k in got.files:
        a, b = got[k], want[k]
        assert a.shape == b.shape, k
        if k.endswith(("_boxes", "_scores")):
            assert err(a, b) < FLOAT_TOL, k
        elif k.endswith("_labels"):  # part labels: argmax near-ties only
            assert int((a != b).sum()) <= LABEL_FRACTION * a.size, k
        elif k.endswith("_uv"):  # where the labels agree
            same = got[k[:-3] + "_labels"] == want[k[:-3] + "_labels"]
            assert np.abs(a - b)[:, same].max() < UV_TOL, k
        else:  # integer boxes, frame count, fps, size
            np.testing.assert_array_equal(a, b, err_msg=k)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", "densepose", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_bad_engine_directories_fail_in_one_line(engine_dir, shared_dir, tmp_path):
    video = shared_dir / "samples" / "person" / "input_video.mp4"
    # a copy whose head graph is truncated (the others linked, not copied)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(engine_dir / "manifest.json", bad / "manifest.json")
    for p in engine_dir.glob("*.onnx"):
        (bad / p.name).symlink_to(p)
    (bad / "densepose_head.onnx").unlink()
    (bad / "densepose_head.onnx").write_bytes(b"\x08\x07")
    for args, message in (
        ((video, "--engines", tmp_path / "none", "--output", tmp_path / "o.mp4"), "engine directory not found"),
        ((video, "--engines", bad, "--output", tmp_path / "o.mp4"),
         "densepose_head.onnx is missing or not the size the manifest records"),
        ((video, "--output", tmp_path / "o.mp4"), "densepose needs --weights FILE or --engines DIR"),
        ((video, "--engines", engine_dir, "--backend", "nope", "--output", tmp_path / "o.mp4"),
         "--backend: 'nope' cannot run the DensePose stages"),
    ):
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)
        assert not (tmp_path / "o.mp4").exists()


def test_manifest_errors_name_the_directory(engine_dir, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "stages": {}}))
    with pytest.raises(EngineError, match=r"has no DensePose stages; build them with: python build_engines.py "
                                          r"--densepose-weights FILE --out"):
        read_densepose(tmp_path)
    raw = json.loads((engine_dir / "manifest.json").read_text())
    del raw["densepose"]["stages"]["densepose_box_head"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="damaged DensePose section \\(no stage 'densepose_box_head'\\)"):
        read_densepose(tmp_path)
    # (the TensorRT backend's refusals: tests/test_densepose_tensorrt.py)
    # the animation's loader says what the directory holds instead of "damaged"
    from magicanimate_rt.engines.manifest import read_manifest

    with pytest.raises(EngineError, match="holds the DensePose stages only"):
        read_manifest(engine_dir)


def test_animate_person_video_with_the_engines_densepose_stages(engine_dir, engines_fp32, tiny_models, shared_dir,
                                                               tmp_path):
    """``animate --engines DIR --person-video``: the DensePose clip from the directory's graphs (ONNX
    Runtime), cached under their content hash, then the animation from the same directory."""
    from magicanimate_rt.densepose.prepare import cached_driving_video
    from magicanimate_rt.densepose.video import PrepareSettings
    from magicanimate_rt.engines.densepose import write_densepose
    from magicanimate_rt.engines.manifest import read_manifest
    from magicanimate_rt.runtime.media import read_video

    # the animation's directory with the DensePose stages added, as the build adds them (graphs linked)
    eng = tmp_path / "engines"
    shutil.copytree(engines_fp32[0], eng)
    section = read_densepose(engine_dir)
    for rec in section.stages.values():
        for f in rec.files:
            (eng / f.name).symlink_to(engine_dir / f.name)
    write_densepose(eng, section)
    assert read_manifest(eng).densepose == json.loads((engine_dir / "manifest.json").read_text())["densepose"]
    person = shared_dir / "samples" / "person" / "input_video.mp4"
    source = shared_dir / "samples" / "source_image" / "monalisa.png"
    cache, out = tmp_path / "cache", tmp_path / "out.mp4"
    env = dict(__import__("os").environ, MAGICANIMATE_RT_CACHE=str(cache), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "magicanimate_rt.cli", "animate", "--engines", str(eng), "--backend", "onnxruntime",
           "--source", str(source), "--driving", str(person), "--person-video", "--output", str(out),
           "--size", "128", "--steps", "1", "--max-frames", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "densepose: loaded the DensePose stages of" in proc.stdout + proc.stderr
    assert read_video(out).shape == (1, 128, 128, 3)
    (clip,) = (cache / "densepose").glob("*.mp4")
    # the key is the stages' content hash (and backend): the Python API with the same engines finds the clip
    settings = PrepareSettings(max_frames=1)
    assert cached_driving_video(person, None, settings, engines=eng, cache_dir=cache / "densepose") == clip
    with pytest.raises(InputError, match="one of them"):
        cached_driving_video(person, None, settings)
    bad = subprocess.run([*cmd[:4], "--models", str(tiny_models), *cmd[8:]], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert bad.returncode == 2 and "--person-video needs --engines DIR" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_float16_graphs(densepose_weights, ort, small_input, tmp_path):
    """``--densepose-precision fp16``: every node float16 (engines' _all_float16 says why nothing stays
    float32). Not an equality: float16 rounding (2^-11) moves the networks' outputs by ~1e-3 relative
    (measured relative L2 vs the float32 network 1.3e-3 backbone and DensePose head, 3.1e-4 box head,
    23x under the project's fp16 graph tolerance 3e-2, which the build enforces). End to end against the
    float32 graphs: the same detections, scores within 7.3e-5 (bound 1e-3), boxes equal, and part
    labels flipped at argmax near-ties in 0.29% of each box (1,683 and 1,702 of 589,248; bound 1%),
    as ~1e-3 noise on detectron2's outputs flips (test_densepose_model.py), while dropping the x2
    upsampling flips 5.3%."""
    out = tmp_path / "fp16"
    assert build_main(["--densepose-weights", str(densepose_weights), "--out", str(out), "--densepose-precision",
                       "fp16", "--densepose-min-size", "256", "--densepose-max-size", "427"]) == 0
    m = read_densepose(out)
    assert m.precision == "fp16"
    assert graph_signature(m.onnx_path("densepose_head"))["inputs"] == [
        ("pooled", ("instances", 256, 28, 28), "float16")]
    assert all(m.stages[s].validation["rel_l2"] < 3e-2 for s in DENSEPOSE_STAGES)
    est = DensePoseEstimator.from_engines(out)
    assert est.dtype == torch.float16
    frames = np.ascontiguousarray(small_input[0][..., ::-1])
    for r16, r32 in zip(est.predict(frames), ort.predict(frames), strict=True):
        assert len(r16) == len(r32) == 1
        assert np.abs(r16.scores - r32.scores).max() < 1e-3
        np.testing.assert_array_equal(r16.box_xywh, r32.box_xywh)
        assert all(int((a != b).sum()) <= 0.01 * a.size for a, b in zip(r16.labels, r32.labels))


def test_build_engines_bad_densepose_arguments_are_one_line(densepose_weights, tmp_path, capsys):
    (tmp_path / "not-engines").mkdir()
    (tmp_path / "not-engines" / "notes.txt").write_text("mine")
    for args, needle in (
        ([], "give --models DIR, --densepose-weights FILE, or both"),
        (["--densepose-weights", str(tmp_path / "missing.pkl")], "--densepose-weights " + str(tmp_path / "missing.pkl")
         + ": file not found"),
        (["--densepose-weights", str(densepose_weights), "--densepose-min-size", "900", "--densepose-max-size", "800"],
         "need 32 <= min <= max <= 4096, got 900/800"),
        (["--densepose-weights", str(densepose_weights), "--out", str(tmp_path / "not-engines")],
         "exists and is not an engine directory; refusing to write into it"),
    ):
        argv = args if "--out" in args else [*args, "--out", str(tmp_path / "e")]
        assert build_main(argv) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "e").exists() and sorted(p.name for p in (tmp_path / "not-engines").iterdir()) == ["notes.txt"]
