"""Everything the ``demo`` command needs, generated here: no downloads.

- a tiny random model set (the ``tiny`` preset), written once into a cache directory;
- a source image: a stylised figure on a gradient background;
- a driving clip: a walking, waving figure rendered in DensePose-like part colours on
  black, as MagicAnimate's driving videos are.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .layout import cache_dir

DEMO_SET = "demo-tiny-v1"

# DensePose-style colours per body part (the part-index colour map of the renders)
PART_COLOURS = {
    "torso": (64, 96, 220), "head": (250, 220, 60), "upper_arm_l": (60, 200, 210), "lower_arm_l": (110, 230, 160),
    "upper_arm_r": (200, 90, 200), "lower_arm_r": (240, 130, 150), "thigh_l": (80, 170, 90),
    "shin_l": (170, 220, 80), "thigh_r": (230, 120, 50), "shin_r": (250, 180, 90),
}


def demo_models(root: Path | None = None) -> Path:
    """The demo's tiny random model set, written on first use (atomically)."""
    from .models.presets import preset_configs
    from .models.writer import write_random_model_set

    path = (root or cache_dir()) / DEMO_SET
    if not (path / "MagicAnimate" / "temporal_attention" / "temporal_attention.ckpt").is_file():
        write_random_model_set(preset_configs("tiny"), path, seed=0, overwrite=True)
    return path


def _pose(t: float) -> dict[str, tuple[tuple[float, float], tuple[float, float]]]:
    """Limb segments (in units of the frame side) of a figure walking in place and waving,
    at phase t (radians)."""
    hip, neck = (0.5, 0.58), (0.5, 0.30)
    sway = 0.015 * math.sin(2 * t)
    hip = (hip[0] + sway, hip[1])
    neck = (neck[0] + sway, neck[1])

    def limb(start, length, angle):
        return (start[0] + length * math.sin(angle), start[1] + length * math.cos(angle))

    segs = {"torso": (neck, hip)}
    swing = 0.45 * math.sin(t)
    for side, sign in (("l", 1), ("r", -1)):
        knee = limb(hip, 0.17, sign * swing)
        segs[f"thigh_{side}"] = (hip, knee)
        segs[f"shin_{side}"] = (knee, limb(knee, 0.17, sign * swing - 0.3 * max(0.0, sign * math.sin(t))))
    elbow_l = limb(neck, 0.13, 0.5 + 0.35 * math.sin(t + math.pi))
    segs["upper_arm_l"] = (neck, elbow_l)
    segs["lower_arm_l"] = (elbow_l, limb(elbow_l, 0.12, 0.3 + 0.3 * math.sin(t + math.pi)))
    elbow_r = limb(neck, 0.13, -2.2 - 0.2 * math.sin(3 * t))  # raised, waving
    segs["upper_arm_r"] = (neck, elbow_r)
    segs["lower_arm_r"] = (elbow_r, limb(elbow_r, 0.12, -2.8 + 0.6 * math.sin(3 * t)))
    return segs


def _draw_figure(draw: ImageDraw.ImageDraw, size: int, segs, colours, width: float,
                 offset: tuple[float, float] = (0.0, 0.0)) -> None:
    """Draw the figure in a ``size`` square whose top-left corner is ``offset``."""
    w = max(2, int(width * size))
    ox, oy = offset
    for name, (a, b) in segs.items():
        thick = int(w * 1.8) if name == "torso" else w
        pa, pb = (ox + a[0] * size, oy + a[1] * size), (ox + b[0] * size, oy + b[1] * size)
        draw.line([pa, pb], fill=colours[name], width=thick)
        for p in (pa, pb):
            r = thick / 2
            draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=colours[name])
    neck = segs["torso"][0]
    r = 0.07 * size
    cx, cy = ox + neck[0] * size, oy + neck[1] * size - r * 1.1
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colours["head"])


def _frame(size: int, height: int | None) -> tuple[int, int, int, tuple[float, float]]:
    """(width, height, side, offset) of a frame: the figure fills a centred square of
    the shorter side."""
    width, height = size, size if height is None else height
    side = min(width, height)
    return width, height, side, ((width - side) / 2, (height - side) / 2)


def driving_clip(frames: int = 64, size: int = 256, height: int | None = None) -> np.ndarray:
    """(frames, height, size, 3) uint8 (height None: square): a DensePose-like rendering of
    a walking, waving figure on black, one gait cycle every 32 frames."""
    width, height, side, offset = _frame(size, height)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        img = Image.new("RGB", (width, height), (0, 0, 0))
        _draw_figure(ImageDraw.Draw(img), side, _pose(2 * math.pi * i / 32), PART_COLOURS, 0.055, offset)
        out[i] = np.asarray(img)
    return out


def source_image(size: int = 256, height: int | None = None) -> np.ndarray:
    """(height, size, 3) uint8 (height None: square): a person-like figure in clothing
    colours on a soft gradient background."""
    width, height, side, offset = _frame(size, height)
    yy, xx = np.mgrid[0:height, 0:width] / side
    bg = np.stack([180 + 50 * yy, 200 - 40 * xx, 230 - 60 * yy], -1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    clothes = {k: (150, 60, 60) for k in PART_COLOURS}
    clothes.update(head=(235, 195, 160), lower_arm_l=(235, 195, 160), lower_arm_r=(235, 195, 160),
                   thigh_l=(40, 50, 90), thigh_r=(40, 50, 90), shin_l=(40, 50, 90), shin_r=(40, 50, 90))
    _draw_figure(ImageDraw.Draw(img), side, _pose(0.0), clothes, 0.07, offset)
    return np.asarray(img)
