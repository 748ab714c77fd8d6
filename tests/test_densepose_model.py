"""The DensePose R-CNN port against detectron2's own outputs (shared/conformance/densepose/).

The conformance data was made by detectron2 (CPU, float32, torchvision's CPU roi_align/nms) on
random weights in the real layout (``densepose_weights``, seed 0). Every float stage is compared by
``err = max|ours - theirs| / max|theirs|`` (the stage's own scale). Our float32 computation differs
from theirs only in rounding: the order of accumulation in convolutions (channels-last oneDNN
kernels, thread count), FrozenBN folded into the convolutions, RoIAlign through ``grid_sample``
(sample positions recomputed from normalised ones). Measured on this CPU (2 threads, stages_small
and video_default): FPN p2..p6 <= 2.9e-6; proposals (matched, see ``_match``) <= 2.5e-6 of the
box scale, logits <= 2.5e-6; box head logits <= 3.5e-7, deltas <= 9.6e-7; instance boxes <= 9e-7,
scores <= 7.9e-7; DensePose 56x56 outputs <= 8.1e-6 (the 9-conv head amplifies pooled differences).
FLOAT_TOL = 5e-4 is >= 170x the first group's errors, DP_TOL = 1e-3 >= 120x the DensePose ones.

Labels are argmaxes of bilinearly resampled logits: where two parts' logits are within the float
error of each other the argmax flips, so end to end a few pixels differ (measured <= 11 of ~590,000
per instance). The flips grow with the error (1e-5 / 1e-4 / 1e-3 relative noise on detectron2's
56x56 outputs flips 58 / 513 / 4,991 pixels of frame 0), so LABEL_FRACTION allows the flips of
~1e-4 noise (0.1% of the box, >= 50x what we measure), while plausible bugs flip far more (resampling
the 56x56 maps without the x2 upsampling: 31,350 pixels; align_corners=True: 50,594). With
detectron2's own 56x56 outputs as input our upsampling and extractor reproduce its 112x112 maps,
labels and U/V bit for bit (same torch ops).
"""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from magicanimate_rt.densepose import CheckpointError, DensePoseEstimator
from magicanimate_rt.densepose.config import DensePoseConfig
from magicanimate_rt.densepose.extractor import extract
from magicanimate_rt.densepose.head import upsample
from magicanimate_rt.densepose.model import DensePoseRCNN, validate_state_dict
from magicanimate_rt.densepose.ops import nms, roi_align
from magicanimate_rt.densepose.preprocess import network_input, resize_frames, resized_shape
from magicanimate_rt.densepose.weights import read_checkpoint

FLOAT_TOL = 5e-4
DP_TOL = 1e-3
#: end to end, the share of a box's label pixels allowed to differ (argmax near-ties; see above)
LABEL_FRACTION = 1e-3
#: U/V (values ~0.5) where the labels agree: resampled from outputs within ~2e-6 (measured <= 1.7e-6,
#: 115x below; a pixel given another part's U/V is off by ~0.1)
UV_TOL = 2e-4
DP_NAMES = ("coarse_segm", "fine_segm", "u", "v")
SMALL = DensePoseConfig(min_size=256, max_size=427)


def err(ours, theirs) -> float:
    ours = np.asarray(ours.detach().cpu() if isinstance(ours, torch.Tensor) else ours, np.float64)
    theirs = np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def conformance(shared_dir):
    d = shared_dir / "conformance" / "densepose"
    return {name: np.load(d / f"{name}.npz") for name in ("stages_small", "video_default")}


@pytest.fixture(scope="module")
def state(densepose_weights):
    return read_checkpoint(densepose_weights)


@pytest.fixture(scope="module")
def small_model(state, densepose_weights):
    return DensePoseRCNN.from_state_dict(state, densepose_weights, SMALL)


@pytest.fixture(scope="module")
def small_run(small_model, conformance):
    """Both stages_small frames through every stage in one batch."""
    d = conformance["stages_small"]
    frames = np.stack([d["f0_frame"], d["f1_frame"]])  # BGR, as detectron2 was fed
    resized = resize_frames(frames, SMALL)
    size = resized.shape[1:3]
    with torch.inference_mode():
        feats = small_model.features(network_input(resized, SMALL))
        props = small_model.proposals(feats, size)
        dets = small_model.detect(feats, props, size)
    return dict(frames=frames, resized=resized, size=size, feats=feats, props=props, dets=dets)


def test_resize_is_detectron2s(small_run, conformance):
    d = conformance["stages_small"]
    for f in range(2):
        np.testing.assert_array_equal(small_run["resized"][f], d[f"f{f}_resized"])  # PIL's own bytes
        assert tuple(d[f"f{f}_image_size"]) == small_run["size"]
    assert resized_shape(1024, 576, 800, 1333) == (1333, 750)
    assert resized_shape(540, 540, 800, 1333) == (800, 800)
    v = conformance["video_default"]
    np.testing.assert_array_equal(resize_frames(v["f0_frame"][None], DensePoseConfig())[0], v["f0_resized"])
    x = network_input(small_run["resized"], SMALL)
    assert tuple(x.shape[2:]) == tuple(d["f0_padded_size"])
    assert float(x[:, :, small_run["size"][0]:].abs().max()) == 0.0  # zero padding after the mean


def test_fpn_features(small_run, conformance):
    d = conformance["stages_small"]
    for lvl, p in enumerate(small_run["feats"], start=2):
        assert err(p[0], d[f"f0_p{lvl}"]) < FLOAT_TOL, lvl


def _match(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest distance from each of their rows to our nearest row, checking the nearest rows are
    distinct: compares two sets of proposals whose order may swap where logits tie within rounding."""
    dist = np.abs(theirs[:, None, :].astype(np.float64) - ours[None, :, :]).max(axis=2)
    nearest = dist.argmin(axis=1)
    assert len(set(nearest.tolist())) == len(theirs)
    return float(dist.min(axis=1).max())


def test_proposals(small_run, conformance):
    d = conformance["stages_small"]
    for f, (boxes, logits) in enumerate(small_run["props"]):
        ref_boxes, ref_logits = d[f"f{f}_proposal_boxes"], d[f"f{f}_proposal_logits"]
        assert boxes.shape == ref_boxes.shape
        rows = np.concatenate([boxes.numpy(), logits.numpy()[:, None]], 1)
        ref_rows = np.concatenate([ref_boxes, ref_logits[:, None]], 1)
        # in resized-image pixels (<= 427) and logits (|l| ~ 2): FLOAT_TOL of each scale
        assert _match(rows, ref_rows) < FLOAT_TOL * np.abs(ref_boxes).max()
        assert err(logits, ref_logits) < FLOAT_TOL  # the order by logit holds


def test_box_head_on_their_proposals(small_model, small_run, conformance):
    d = conformance["stages_small"]
    boxes = [torch.from_numpy(d[f"f{f}_proposal_boxes"]) for f in range(2)]
    with torch.inference_mode():
        logits, deltas = small_model.box_outputs(small_run["feats"], boxes)
    for f in range(2):
        sl = slice(1000 * f, 1000 * (f + 1))
        assert err(logits[sl], d[f"f{f}_box_cls_logits"]) < FLOAT_TOL
        assert err(deltas[sl], d[f"f{f}_box_deltas"]) < FLOAT_TOL


def test_instances(small_run, conformance):
    d = conformance["stages_small"]
    for f, (boxes, scores, classes) in enumerate(small_run["dets"]):
        np.testing.assert_array_equal(classes.numpy(), d[f"f{f}_pred_classes"])
        assert err(boxes, d[f"f{f}_pred_boxes_net"]) < FLOAT_TOL
        assert err(scores, d[f"f{f}_scores"]) < FLOAT_TOL


def test_densepose_lowres_on_their_boxes(small_model, small_run, conformance):
    d = conformance["stages_small"]
    boxes = [torch.from_numpy(d[f"f{f}_pred_boxes_net"]) for f in range(2)]
    with torch.inference_mode():
        low = small_model.densepose_lowres(small_run["feats"], boxes)
    for j, name in enumerate(DP_NAMES):
        for f in range(2):
            assert err(low[j][f:f + 1], d[f"f{f}_dp_lowres_{name}"]) < DP_TOL, (name, f)


def test_extractor_on_their_outputs_is_exact(conformance):
    """detectron2's 56x56 outputs -> our x2 upsampling and extractor: bit for bit."""
    v = conformance["video_default"]
    up = upsample(tuple(torch.from_numpy(v[f"f0_dp_lowres_{n}"]) for n in DP_NAMES))
    for t, n in zip(up, DP_NAMES):
        np.testing.assert_array_equal(t.numpy(), v[f"f0_dp_{n}"])
    d = conformance["stages_small"]
    for f in range(2):
        maps = upsample(tuple(torch.from_numpy(d[f"f{f}_dp_lowres_{n}"]) for n in DP_NAMES))
        labels, uv = extract(maps, torch.from_numpy(d[f"f{f}_pred_boxes"]))
        np.testing.assert_array_equal(labels[0], d[f"f{f}_i0_labels"])
        np.testing.assert_array_equal(uv[0][:, ::4, ::4], d[f"f{f}_i0_uv_sub4"])


def _check_result(r, d, f, sub):
    """One frame's DensePoseResult against the file's instances."""
    assert err(r.boxes, d[f"f{f}_pred_boxes"]) < FLOAT_TOL
    assert err(r.scores, d[f"f{f}_scores"]) < FLOAT_TOL
    for i in range(len(r)):
        np.testing.assert_array_equal(r.box_xywh[i], d[f"f{f}_i{i}_box_xywh_int"])
        ref = d[f"f{f}_i{i}_labels"]
        assert r.labels[i].shape == ref.shape and r.labels[i].dtype == np.uint8
        differ = int((r.labels[i] != ref).sum())
        assert differ <= LABEL_FRACTION * ref.size, (f, i, differ)
        same = r.labels[i][::sub, ::sub] == ref[::sub, ::sub]
        uv, ref_uv = r.uv[i][:, ::sub, ::sub], d[f"f{f}_i{i}_uv_sub{sub}"]
        assert np.abs(uv - ref_uv)[:, same].max() < UV_TOL


def test_predict_small(small_model, small_run, conformance):
    d = conformance["stages_small"]
    est = DensePoseEstimator(small_model)
    results = est.predict(np.ascontiguousarray(small_run["frames"][..., ::-1]))  # our API takes RGB
    assert len(results) == 2 and [len(r) for r in results] == [1, 1]
    for f, r in enumerate(results):
        _check_result(r, d, f, 4)
    single = est.predict(np.ascontiguousarray(d["f1_frame"][..., ::-1]))  # (H, W, 3): one frame
    assert len(single) == 1
    _check_result(single[0], d, 1, 4)
    for bad in (np.zeros((4, 5), np.uint8), np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8)):
        with pytest.raises(ValueError, match=r"^frames: need \(H, W, 3\) or \(N, H, W, 3\) uint8 RGB, got"):
            est.predict(bad)
    with pytest.raises(ValueError, match="^dtype: 'float64' is not one of float32, float16, bfloat16$"):
        DensePoseEstimator(small_model, dtype="float64")


def test_frames_without_detections(state, densepose_weights, conformance):
    """No box above the threshold (here: a threshold no softmax passes): an empty result per frame,
    as detectron2's empty Instances, which vid2densepose paints as a background frame."""
    d = conformance["stages_small"]
    est = DensePoseEstimator(DensePoseRCNN.from_state_dict(state, densepose_weights, replace(SMALL, score_thresh=1.0)))
    (r,) = est.predict(np.ascontiguousarray(d["f0_frame"][..., ::-1]))
    assert len(r) == 0 and r.boxes.shape == (0, 4) and r.scores.shape == (0,) and r.labels == [] and r.uv == []
    assert r.box_xywh.shape == (0, 4)


def test_predict_video_default_batch(state, densepose_weights, conformance):
    """The default 800/1333 config, the person video's 4 frames in one forward."""
    v = conformance["video_default"]
    est = DensePoseEstimator(DensePoseRCNN.from_state_dict(state, densepose_weights))
    frames = np.stack([v[f"f{f}_frame"][..., ::-1] for f in range(4)])
    results = est.predict(frames)
    assert [len(r) for r in results] == [4, 4, 5, 4]
    for f, r in enumerate(results):
        _check_result(r, v, f, 8)


# --------------------------------------------------------------------------- RoIAlign and NMS alone
def _roi_align_reference(feat: np.ndarray, roi, p: int, scale: float, s: int) -> np.ndarray:
    """torchvision's CPU ``roi_align`` (aligned=False) transcribed loop for loop, in float64."""
    c, h, w = feat.shape
    x1, y1, x2, y2 = (v * scale for v in roi)
    rw, rh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    bw, bh = rw / p, rh / p
    out = np.zeros((c, p, p))
    for ph in range(p):
        for pw in range(p):
            acc = np.zeros(c)
            for iy in range(s):
                y = y1 + ph * bh + (iy + 0.5) * bh / s
                for ix in range(s):
                    x = x1 + pw * bw + (ix + 0.5) * bw / s
                    if y < -1.0 or y > h or x < -1.0 or x > w:
                        continue
                    yy, xx = max(y, 0.0), max(x, 0.0)
                    yl, xl = int(yy), int(xx)
                    if yl >= h - 1:
                        yl = yh = h - 1
                        yy = float(yl)
                    else:
                        yh = yl + 1
                    if xl >= w - 1:
                        xl = xh = w - 1
                        xx = float(xl)
                    else:
                        xh = xl + 1
                    ly, lx = yy - yl, xx - xl
                    acc += ((1 - ly) * (1 - lx) * feat[:, yl, xl] + (1 - ly) * lx * feat[:, yl, xh]
                            + ly * (1 - lx) * feat[:, yh, xl] + ly * lx * feat[:, yh, xh])
            out[:, ph, pw] = acc / (s * s)
    return out


def test_roi_align_matches_torchvisions_kernel():
    """Edge cases the conformance boxes (clipped, large) do not reach: boxes partly or wholly
    outside the map, thinner than a pixel, on the last row; two images. float32 vs the float64
    transcription: rounding only (measured ~1e-7), 1e-5 of the map's scale."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 9, 11, generator=g)
    rois = torch.tensor([[0, 0.0, 0.0, 44.0, 36.0], [1, -10.0, -6.0, 20.0, 15.0], [0, 30.0, 20.0, 60.0, 50.0],
                         [1, 5.2, 7.9, 5.4, 8.1], [0, 38.5, 33.0, 43.9, 35.9], [1, -30.0, -30.0, -8.0, -9.0],
                         [0, 12.3, 4.7, 31.1, 29.6]])
    ours = roi_align(feats, rois, 3, 0.25, 2)
    for k, r in enumerate(rois.tolist()):
        ref = _roi_align_reference(feats[int(r[0])].double().numpy(), r[1:], 3, 0.25, 2)
        np.testing.assert_allclose(ours[k].double().numpy(), ref, rtol=0, atol=1e-5)
    # half-precision features: the sampling stays float32 (same result as on the float32 values)
    half = feats.half()
    np.testing.assert_allclose(roi_align(half, rois, 3, 0.25, 2).numpy(), roi_align(half.float(), rois, 3, 0.25, 2).numpy(),
                               rtol=0, atol=1e-6)


def test_nms_matches_greedy_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (300, 2))], 1).astype(np.float32)
    boxes[150:160] = boxes[140:150]  # exact duplicates
    scores = rng.permutation(300).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    keep, dead = [], np.zeros(300, bool)
    for i in order:
        if dead[i]:
            continue
        keep.append(i)
        for j in order:
            b, a = boxes[i], boxes[j]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            area = lambda q: (q[2] - q[0]) * (q[3] - q[1])  # noqa: E731
            if inter / (area(a) + area(b) - inter) > 0.5:
                dead[j] = True
    ours = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).tolist()
    assert ours == keep and len(keep) < 300


# --------------------------------------------------------------------------- loading
def test_load_errors(state, densepose_weights, tmp_path):
    name = str(densepose_weights)

    def error(sd) -> str:
        with pytest.raises(CheckpointError) as e:
            DensePoseRCNN.from_state_dict(sd, densepose_weights)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(name), msg
        return msg

    missing = dict(state)
    del missing["roi_heads.box_head.fc2.bias"]
    assert "missing keys: roi_heads.box_head.fc2.bias" in error(missing)
    extra = dict(state, **{"roi_heads.mask_head.mask_fcn1.weight": np.zeros((256, 256, 3, 3), np.float32)})
    assert "unexpected keys: roi_heads.mask_head.mask_fcn1.weight" in error(extra)
    wrong = dict(state, **{"roi_heads.box_predictor.cls_score.weight": np.zeros((81, 1024), np.float32)})
    assert "wrong shapes: roi_heads.box_predictor.cls_score.weight (81, 1024) (model: (2, 1024))" in error(wrong)
    detector = {k: v for k, v in state.items() if "densepose" not in k and "decoder" not in k}
    assert "not a DensePose R-CNN checkpoint" in error(detector)
    # through the file: a plain Faster R-CNN checkpoint, as the model zoo writes it
    path = tmp_path / "faster_rcnn.pkl"
    path.write_bytes(pickle.dumps({"model": {"roi_heads.box_predictor.cls_score.weight": np.zeros((81, 1024), np.float32)},
                                   "__author__": "test"}))
    with pytest.raises(CheckpointError, match=r"faster_rcnn\.pkl: not a DensePose R-CNN checkpoint \(a detector"):
        DensePoseEstimator.from_checkpoint(path)


def test_depth_comes_from_the_weights(state, densepose_weights):
    """An R_101 checkpoint (23 res4 blocks) builds the deeper backbone; old checkpoints' extra
    buffers (pixel_mean, cell anchors) are ignored as detectron2 ignores them."""
    sd = dict(state, pixel_mean=np.zeros((3, 1, 1), np.float32),
              **{"proposal_generator.anchor_generator.cell_anchors.0": np.zeros((3, 4), np.float32)})
    for b in range(6, 23):
        for k, v in state.items():
            if k.startswith("backbone.bottom_up.res4.1."):
                sd[k.replace("res4.1.", f"res4.{b}.")] = v
    assert validate_state_dict(sd, densepose_weights)[1] == (3, 4, 23, 3)
    with torch.device("meta"):
        assert sum(t.numel() for t in DensePoseRCNN(blocks=(3, 4, 23, 3)).state_dict().values()) == \
            sum(np.size(v) for k, v in sd.items() if k in state or "res4." in k)


def test_bfloat16_network_float32_reductions(state, densepose_weights, conformance):
    """The half-precision seam (meant for CUDA) on the CPU: the network in bfloat16, box decoding,
    softmax, NMS, RoIAlign sampling and the extractor in float32. bfloat16 keeps ~3 significant
    digits, so only the decisions are compared: the same instance (its box is clipped to the frame,
    exactly), its score within 1e-2 (measured 8e-4), labels agreeing on >= 90% of the pixels
    (measured 95.7%)."""
    d = conformance["stages_small"]
    est = DensePoseEstimator(DensePoseRCNN.from_state_dict(state, densepose_weights, SMALL), dtype="bfloat16")
    (r,) = est.predict(np.ascontiguousarray(d["f0_frame"][..., ::-1]))
    assert r.boxes.dtype == r.scores.dtype == r.uv[0].dtype == np.float32
    np.testing.assert_array_equal(r.boxes, d["f0_pred_boxes"])
    assert abs(float(r.scores[0]) - float(d["f0_scores"][0])) < 1e-2
    assert (r.labels[0] == d["f0_i0_labels"]).mean() >= 0.9
