"""RoIAlign, NMS and box coding on plain torch ops, with the semantics detectron2 gets from
torchvision's CPU kernels and ``Box2BoxTransform``.

Why our own: torchvision's wheels do not match the torch build here, and the next step exports these
graphs to ONNX, where a custom C++ op does not travel. RoIAlign is vectorised over boxes
(one ``grid_sample`` per image); NMS loops only over a boolean IoU matrix (see :func:`nms`). Box coordinates, sample positions and
IoUs are float32 whatever the feature dtype (float16 cannot hold 1333 px boxes to a pixel).

Sources: torchvision 0.28 ``csrc/ops/cpu/roi_align_kernel.cpp`` (+ ``roi_align_common.h``,
``pre_calc_for_bilinear_interpolate``), ``csrc/ops/cpu/nms_kernel.cpp`` (``nms_kernel_impl``),
``ops/boxes.py`` (``batched_nms``); detectron2 ``modeling/box_regression.py:91-116`` (``apply_deltas``),
``structures/boxes.py:183-197`` (``Boxes.clip``, ``nonempty``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# RoIs per grid_sample call, as a number of output bins: bounds the working set (~50 MB at C = 256)
_ROI_CHUNK = 1 << 14


def _axis_samples(start: torch.Tensor, size: torch.Tensor, pooled: int, grid: int, length: int):
    """Sample positions of torchvision's ``pre_calc_for_bilinear_interpolate`` along one axis.

    start, size: (K,) float32 RoI start and (clamped) extent in feature pixels. Returns the positions
    (K, pooled * grid), computed as the kernel does (``start + p * bin + (i + .5f) * bin / grid`` in
    float32, in its order), and whether each lies in [-1, length] (else the sample counts 0).
    """
    dev = start.device
    bin_size = size / pooled
    p = torch.arange(pooled, device=dev, dtype=torch.float32)
    i = torch.arange(grid, device=dev, dtype=torch.float32) + 0.5
    pos = (start[:, None] + p[None, :] * bin_size[:, None])[:, :, None] + (i[None, :] * bin_size[:, None] / grid)[:, None, :]
    pos = pos.reshape(len(start), pooled * grid)
    return pos, (pos >= -1.0) & (pos <= length)


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int) -> torch.Tensor:
    """torchvision's ``roi_align(..., aligned=False)`` (detectron2's legacy ``ROIAlign``).

    features (N, C, H, W); rois (K, 5) = (image index, x1, y1, x2, y2) in image pixels.
    Returns (K, C, output_size, output_size) float32. Per box: start = x1 * scale (no -0.5 shift),
    extent forced >= 1, ``sampling_ratio`` x ``sampling_ratio`` bilinear samples per bin averaged; a
    sample outside [-1, H] x [-1, W] counts 0, coordinates below 0 clamp to 0 and above H - 1 to H - 1.

    The bilinear samples are ``grid_sample``'s (align_corners=True, padding "border": exactly that
    clamping), one call per image over all its boxes' samples, times the in-range mask. Why not
    torchvision's loop: it is not available here and does not export; why not a gather of the four
    neighbours: it writes 4 x samples x channels intermediates and measured ~10x slower on the CPU.
    grid_sample recomputes pixel positions from normalised ones, so they differ from the kernel's by
    float32 rounding (~1e-7 relative of the sample weights); the sampling stays float32 whatever
    the feature dtype.
    """
    if sampling_ratio <= 0:
        raise ValueError("roi_align: only a fixed sampling_ratio > 0 is implemented (detectron2's configs use 2)")
    n, c, h, w = features.shape
    k, p, s = rois.shape[0], output_size, sampling_ratio
    out = torch.zeros((k, c, p, p), dtype=torch.float32, device=features.device)
    if k == 0:
        return out
    rois = rois.float()
    scale = torch.tensor(spatial_scale, dtype=torch.float32, device=rois.device)
    x1, y1, x2, y2 = (rois[:, j] * scale for j in range(1, 5))
    ys, yok = _axis_samples(y1, (y2 - y1).clamp(min=1.0), p, s, h)
    xs, xok = _axis_samples(x1, (x2 - x1).clamp(min=1.0), p, s, w)
    # align_corners=True: -1 and +1 are the centres of the first and last pixel
    gy = ys * (2.0 / (h - 1)) - 1.0 if h > 1 else torch.zeros_like(ys)
    gx = xs * (2.0 / (w - 1)) - 1.0 if w > 1 else torch.zeros_like(xs)
    # samples outside [-1, H] x [-1, W] count 0; boxes clipped to the image never have any
    ok = None if bool(yok.all() & xok.all()) else (yok[:, :, None] & xok[:, None, :]).float()
    batch = rois[:, 0].long()
    chunk = max(1, _ROI_CHUNK // (p * p))
    for b in torch.unique(batch).tolist():
        # channels last: grid_sample reads the C values of a pixel contiguously (2x faster on the CPU)
        img = features[b:b + 1].float().contiguous(memory_format=torch.channels_last)
        ids = torch.nonzero(batch == b).flatten()
        for idx in ids.split(chunk):
            m = len(idx)
            grid = torch.stack(torch.broadcast_tensors(gx[idx][:, None, :], gy[idx][:, :, None]), dim=-1)  # (m, PS, PS, 2)
            vals = F.grid_sample(img, grid.view(1, m * p * s, p * s, 2), mode="bilinear", padding_mode="border",
                                 align_corners=True)  # (1, C, m*PS, PS)
            if ok is not None:
                vals = vals * ok[idx].view(1, 1, m * p * s, p * s)
            # the bin's s*s samples summed (row-major, as the kernel) and divided by their count
            pooled = F.avg_pool2d(vals, s)  # (1, C, m*P, P)
            out[idx] = pooled.reshape(c, m, p, p).transpose(0, 1)
    return out


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's ``nms``: indices of the kept boxes, by score descending.

    The IoU matrix is one vectorised float32 computation (inter / (area_i + area_j - inter), as the
    CPU kernel); the greedy pass over it (keep a box unless a kept earlier one overlaps it by more
    than the threshold) is a loop over the boxes on a (n, n) boolean matrix in numpy, ~1 us a box.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    order = torch.sort(scores.float(), descending=True, stable=True)[1]
    b = boxes[order]
    area = box_area(b)
    x1, y1, x2, y2 = b.unbind(1)
    iw = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :])).clamp_(min=0)
    ih = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :])).clamp_(min=0)
    inter = iw * ih
    over = (inter / (area[:, None] + area[None, :] - inter) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each group independently (detectron2's per-level RPN NMS, per-class box NMS);
    kept indices by score descending, as torchvision's ``batched_nms``."""
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    kept = [idx[nms(boxes[idx], scores[idx], iou_threshold)] for g in torch.unique(groups)
            for idx in [torch.nonzero(groups == g).flatten()]]
    keep = torch.cat(kept)
    return keep[torch.sort(scores[keep].float(), descending=True, stable=True)[1]]


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights, scale_clamp: float) -> torch.Tensor:
    """``Box2BoxTransform.apply_deltas`` for one class: deltas (R, 4) applied to boxes (R, 4), float32."""
    deltas, boxes = deltas.float(), boxes.float()
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3] / wh, max=scale_clamp)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack((pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h), dim=-1)


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """``Boxes.clip``: x to [0, width], y to [0, height] (not width - 1)."""
    return torch.stack((boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                        boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)), dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)
