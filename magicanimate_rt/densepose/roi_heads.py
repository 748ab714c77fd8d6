"""detectron2's StandardROIHeads box branch at test time: multi-level ROIAlign pooler,
FastRCNNConvFCHead (2 fc), FastRCNNOutputLayers and ``fast_rcnn_inference``.

Sources (detectron2 02b5c4e): ``modeling/roi_heads/roi_heads.py:780-815`` (``_forward_box``),
``modeling/poolers.py:51-57`` (``assign_boxes_to_levels``) and :163-176, ``modeling/roi_heads/box_head.py``,
``modeling/roi_heads/fast_rcnn.py:137-164`` (``fast_rcnn_inference_single_image``), :142 and :568 (softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import STRIDES, DensePoseConfig
from .ops import batched_nms, box_area, clip_boxes, decode_boxes, roi_align


def rois_of(boxes_per_image: list[torch.Tensor]) -> torch.Tensor:
    """(K, 5) = (image index, x1, y1, x2, y2), ROIPooler's ``convert_boxes_to_pooler_format``."""
    return torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=torch.float32, device=b.device), b.float()], 1)
                      for i, b in enumerate(boxes_per_image)])


def assign_levels(boxes: torch.Tensor, cfg: DensePoseConfig, num_levels: int) -> torch.Tensor:
    """``assign_boxes_to_levels``: floor(4 + log2(sqrt(area) / 224 + 1e-8)) clamped to p2..p5, as 0..3."""
    size = torch.sqrt(box_area(boxes.float()))
    lvl = torch.floor(cfg.canonical_level + torch.log2(size / cfg.canonical_box_size + 1e-8))
    return torch.clamp(lvl, min=2, max=1 + num_levels).long() - 2


def pool_multilevel(features: list[torch.Tensor], rois: torch.Tensor, cfg: DensePoseConfig) -> torch.Tensor:
    """The box pooler: each RoI pooled (7x7) from the FPN level its size picks. (K, 256, 7, 7) float32."""
    p = cfg.box_pooler_resolution
    out = torch.zeros((rois.shape[0], features[0].shape[1], p, p), dtype=torch.float32, device=rois.device)
    levels = assign_levels(rois[:, 1:], cfg, len(features))
    for lvl, x in enumerate(features):
        idx = torch.nonzero(levels == lvl).flatten()
        if len(idx):
            out[idx] = roi_align(x, rois[idx], p, 1.0 / STRIDES[lvl], cfg.sampling_ratio)
    return out


class BoxHead(nn.Module):
    """FastRCNNConvFCHead with two fc layers (flatten channel-major, fc1 + ReLU, fc2 + ReLU)."""

    def __init__(self, resolution: int = 7):
        super().__init__()
        self.fc1 = nn.Linear(256 * resolution * resolution, 1024)
        self.fc2 = nn.Linear(1024, 1024)

    def forward(self, x):
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """FastRCNNOutputLayers for one class: logits (person, background) and one box delta."""

    def __init__(self):
        super().__init__()
        self.cls_score = nn.Linear(1024, 2)
        self.bbox_pred = nn.Linear(1024, 4)

    def forward(self, x):
        return self.cls_score(x).float(), self.bbox_pred(x).float()


def box_inference(logits: torch.Tensor, deltas: torch.Tensor, proposals: torch.Tensor, image_size: tuple[int, int],
                  cfg: DensePoseConfig):
    """``fast_rcnn_inference_single_image``: (boxes (D, 4), scores (D,), classes (D,)) in resized pixels."""
    boxes = decode_boxes(deltas, proposals, cfg.box_reg_weights, cfg.scale_clamp)
    probs = F.softmax(logits.float(), dim=-1)
    scores = probs[:, :-1]  # background is the last column
    # rows with a non-finite box or score dropped and the threshold applied in one mask, read
    # once (nonzero: the count of candidates is the one host sync); softmax and clipping are row
    # by row, so this is detectron2's filter-then-threshold
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
    inds = torch.nonzero((scores > cfg.score_thresh) & valid[:, None])
    boxes = clip_boxes(boxes, *image_size)[inds[:, 0]]
    scores, classes = scores[inds[:, 0], inds[:, 1]], inds[:, 1]
    keep = batched_nms(boxes, scores, classes, cfg.box_nms_thresh)[: cfg.detections_per_image]
    return boxes[keep], scores[keep], classes[keep]
