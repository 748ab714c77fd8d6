"""``DensePoseResultExtractor``: the predictor's 112x112 maps placed on each detection's integer box.

detectron2 (``densepose/converters``): the box (x, y, w, h) is truncated to integers, w and h at
least 1; coarse and fine logits are bilinearly resampled (align_corners=False) straight to (h, w);
labels = argmax(fine) * (argmax(coarse) > 0); U/V are resampled the same way and each pixel takes
the U/V of its own part (0 on the background).

Sources (detectron2 02b5c4e, ``projects/DensePose/densepose/``): ``vis/extractor.py:33-39, 88-106``,
``converters/base.py:92-95`` (``make_int_box``), ``converters/segm_to_mask.py:34-64``,
``converters/chart_output_to_chart_result.py:20-47, 165-191``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def int_boxes_xywh(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """(K, 4) float XYXY -> (K, 4) int64 XYWH by truncation (``make_int_box``), w and h >= 1 later."""
    xywh = boxes_xyxy.float().clone()
    xywh[:, 2:] -= xywh[:, :2]
    return xywh.long()


def _resample(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(t.float(), (h, w), mode="bilinear", align_corners=False)


def extract_one(coarse: torch.Tensor, fine: torch.Tensor, u: torch.Tensor, v: torch.Tensor, box_xywh) -> tuple[np.ndarray, np.ndarray]:
    """One instance: maps (1, C, 112, 112) and its integer box -> labels (h, w) uint8, uv (2, h, w) float32."""
    h, w = max(int(box_xywh[3]), 1), max(int(box_xywh[2]), 1)
    coarse_lbl = _resample(coarse, h, w).argmax(dim=1)
    labels = _resample(fine, h, w).argmax(dim=1) * (coarse_lbl > 0).long()  # (1, h, w)
    idx = labels[:, None]  # (1, 1, h, w): each pixel's own part channel
    fg = labels[0] > 0
    uv = torch.stack([torch.where(fg, torch.gather(_resample(t, h, w), 1, idx)[0, 0], 0.0) for t in (u, v)])
    return labels[0].to(torch.uint8).cpu().numpy(), uv.cpu().numpy()


def extract(maps: tuple[torch.Tensor, ...], boxes_xyxy: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All instances of one frame: maps = (coarse, fine, u, v) each (K, C, 112, 112); boxes in the
    frame's pixels. Returns K labels and K uv arrays."""
    coarse, fine, u, v = maps
    labels, uvs = [], []
    for k, box in enumerate(int_boxes_xywh(boxes_xyxy).tolist()):
        lbl, uv = extract_one(coarse[k:k + 1], fine[k:k + 1], u[k:k + 1], v[k:k + 1], box)
        labels.append(lbl)
        uvs.append(uv)
    return labels, uvs
