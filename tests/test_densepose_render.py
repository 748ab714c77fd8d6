"""The DensePose picture (densepose/render.py) against detectron2's own frames and the real clips.

The conformance frames (``f{F}_rendered``) are vid2densepose's output made by detectron2 and OpenCV
4.11 from the extractor's labels and boxes stored beside them, so rendering those same labels must
give them bit for bit: rendering is integer work (truncated boxes, a table lookup), with no float
rounding that could differ between machines.
"""

from __future__ import annotations

import numpy as np
import pytest

from magicanimate_rt.densepose.render import BACKGROUND, PART_COLOURS, VIRIDIS, background_frame, render_frame
from magicanimate_rt.densepose.result import DensePoseResult

CONFORMANCE_FILES = ("stages_small.npz", "video_default.npz")
DRIVING_CLIPS = ("dancing2", "demo4", "multi_dancing", "running", "running2")


def conformance_frames(shared_dir):
    """(name, result, reference RGB frame) for every frame of the conformance files."""
    for name in CONFORMANCE_FILES:
        z = np.load(shared_dir / "conformance" / "densepose" / name)
        for f in range(int(z["num_frames"])):
            boxes = z[f"f{f}_pred_boxes"]
            k = len(boxes)
            result = DensePoseResult(boxes=boxes, scores=z[f"f{f}_scores"],
                                     labels=[z[f"f{f}_i{i}_labels"] for i in range(k)])
            xywh = np.stack([z[f"f{f}_i{i}_box_xywh_int"] for i in range(k)])
            assert np.array_equal(result.box_xywh, xywh), f"{name} frame {f}: integer boxes"
            yield f"{name}:f{f}", result, z[f"f{f}_rendered"][..., ::-1]  # stored BGR, as cv2 draws


def test_render_matches_detectron2_frames(shared_dir):
    frames = list(conformance_frames(shared_dir))
    assert len(frames) == 6
    for name, result, reference in frames:
        out = render_frame(result, *reference.shape[:2])
        assert out.dtype == np.uint8 and out.shape == reference.shape
        assert np.array_equal(out, reference), f"{name}: {(out != reference).any(-1).sum()} pixels differ"


def test_painting_order_is_detection_order(shared_dir):
    """Overlapping detections: the later one wins. The stored frames tell the two orders apart (so the
    exact test above checks the order), and drawing in reverse differs."""
    _, result, reference = list(conformance_frames(shared_dir))[2]  # video_default frame 0: 4 overlapping boxes
    reverse = DensePoseResult(boxes=result.boxes[::-1].copy(), scores=result.scores[::-1].copy(),
                              labels=result.labels[::-1])
    assert (render_frame(reverse, *reference.shape[:2]) != reference).any(-1).mean() > 0.05


def test_palette_is_the_colours_of_detectron2_frames(shared_dir):
    """Independently of render_frame: the colours in detectron2's frames are exactly our 25 (all 24
    parts and the background appear in them)."""
    seen = set()
    for _, _, reference in conformance_frames(shared_dir):
        dist, _ = _nearest(PART_COLOURS, reference[None])
        assert dist.max() == 0  # every pixel is one of our colours exactly
        seen |= set(np.unique(reference.reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1])).tolist())
    assert seen == set((PART_COLOURS.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])).tolist())  # all 25 appear
    assert tuple(BACKGROUND) == tuple(VIRIDIS[0]) == (68, 1, 84)  # cv2's VIRIDIS(0) is BGR (84, 1, 68)
    # L -> VIRIDIS(floor(L * 255/24)), PORTING.md section 8's list
    assert np.array_equal(PART_COLOURS[1:], VIRIDIS[[10, 21, 31, 42, 53, 63, 74, 85, 95, 106, 116, 127, 138, 148,
                                                     159, 170, 180, 191, 201, 212, 223, 233, 244, 255]])


def test_render_edge_cases():
    labels = np.array([[0, 1, 24], [2, 0, 3]], np.uint8)
    r = DensePoseResult(boxes=np.array([[1.9, 0.5, 4.95, 2.6], [0, 0, 0.5, 3]], np.float32),
                        scores=np.ones(2, np.float32), labels=[labels, np.ones((2, 1), np.uint8)])
    out = render_frame(r, 4, 6)
    expect = background_frame(4, 6)
    # box 0: x, y = int(1.9), int(0.5) = 1, 0; w, h = int(3.05), int(2.1) = 3, 2; label 0 keeps the canvas
    for (y, x), v in np.ndenumerate(labels):
        if v:
            expect[y, 1 + x] = PART_COLOURS[v]
    # box 1 has int(w) = 0: the visualizer skips it
    assert np.array_equal(out, expect)
    # a smaller canvas: the part inside it is drawn, no error
    assert np.array_equal(render_frame(r, 2, 3), expect[:2, :3])
    empty = DensePoseResult(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32))
    assert np.array_equal(render_frame(empty, 4, 6), background_frame(4, 6))
    with pytest.raises(ValueError, match="integer box"):
        render_frame(DensePoseResult(boxes=r.boxes[:1], scores=r.scores[:1], labels=[labels[:, :2]]), 4, 6)


# --------------------------------------------------------------------------- the real driving clips


def _nearest(palette: np.ndarray, frames: np.ndarray):
    """Per pixel: the distance (max over channels of |difference|) to the nearest palette colour,
    and its index; computed once per distinct colour."""
    a = frames.reshape(-1, 3).astype(np.int32)
    key = (a[:, 0] << 16) | (a[:, 1] << 8) | a[:, 2]
    colours, inverse = np.unique(key, return_inverse=True)
    rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], 1)
    d = np.abs(rgb[:, None, :] - palette.astype(np.int32)[None]).max(-1)
    shape = frames.shape[:3]
    return d.min(1)[inverse].reshape(shape), d.argmin(1)[inverse].reshape(shape)


def _clip_statistics(palette, frames):
    """(share of pixels within 8 of the palette, 99th percentile of the distance over flat areas,
    largest deviation of a part's mean colour over flat areas from its palette colour)."""
    dist, near = _nearest(palette, frames)
    centre = near[:, 1:-1, 1:-1]
    flat = np.ones(centre.shape, bool)  # the 3x3 neighbourhood has one nearest colour: no part edge
    for dy in range(3):
        for dx in range(3):
            flat &= near[:, dy:dy + centre.shape[1], dx:dx + centre.shape[2]] == centre
    inner = frames[:, 1:-1, 1:-1]
    deviation = 0.0
    for label in range(len(palette)):
        m = flat & (centre == label)
        if m.sum() >= 1000:  # enough pixels that the mean averages the coding noise out
            deviation = max(deviation, float(np.abs(inner[m].mean(0) - palette[label]).max()))
    return float((dist <= 8).mean()), float(np.percentile(dist[:, 1:-1, 1:-1][flat], 99)), deviation


@pytest.mark.parametrize("clip", DRIVING_CLIPS)
def test_real_driving_clips_use_our_palette(shared_dir, clip):
    """MagicAnimate's driving clips were made with detectron2 + vid2densepose and then H.264-coded:
    their colours are ours up to coding noise. Every 8th frame (512x512) of each clip.

    Measured (every 4th frame, distance = max over RGB of |pixel - nearest palette colour|): median 3
    in every clip (the coder's colour conversion shifts flat areas by ~3), 91.6-96.8% of pixels
    within 8 (the rest: part edges, where 4:2:0 chroma blends two colours), 99th percentile over
    flat areas 8-12, each part's mean colour over flat areas within 3.4-5.1 of its palette colour.
    The bounds leave room for the decoder's colour conversion rounding differently; a palette
    scaled by 255/25 instead of 255/24 puts part means 7.5-14.3 away and fails the last bound on
    every clip.
    """
    av = pytest.importorskip("av")
    with av.open(str(shared_dir / "samples" / "driving" / f"{clip}.mp4")) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0))
                           if i % 8 == 0])
    within, flat_p99, deviation = _clip_statistics(PART_COLOURS, frames)
    assert within >= 0.88, within
    assert flat_p99 <= 16, flat_p99
    assert deviation <= 6.5, deviation
    wrong = VIRIDIS[(np.arange(25) * 255) // 25]  # a plausible bug: 25 labels instead of 24
    assert _clip_statistics(wrong, frames)[2] > 6.5
