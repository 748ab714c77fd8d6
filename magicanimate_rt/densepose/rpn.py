"""detectron2's RPN at test time: StandardRPNHead, DefaultAnchorGenerator, ``find_top_rpn_proposals``.

Sources (detectron2 02b5c4e): ``modeling/proposal_generator/rpn.py`` (``StandardRPNHead``, the output layout
:458-465, ``_decode_proposals``), ``modeling/anchor_generator.py:40-50, 181-214``,
``modeling/proposal_generator/proposal_utils.py:22-135``, ``modeling/box_regression.py:91-116``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import STRIDES, DensePoseConfig
from .ops import batched_nms, clip_boxes, decode_boxes, nonempty


def cell_anchors(size: float, aspect_ratios) -> torch.Tensor:
    """(A, 4) anchors centred on (0, 0): w = sqrt(size^2 / r), h = r * w (Python floats, then float32)."""
    out = []
    for r in aspect_ratios:
        w = math.sqrt(size ** 2.0 / r)
        h = r * w
        out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32)


def grid_anchors(height: int, width: int, stride: int, base: torch.Tensor) -> torch.Tensor:
    """(H*W*A, 4) anchors in (y, x, anchor) order, shifted to the cells' top-left corners (OFFSET 0)."""
    dev = base.device
    xs = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=dev)
    ys = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=dev)
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    sx, sy = sx.reshape(-1), sy.reshape(-1)
    shifts = torch.stack((sx, sy, sx, sy), dim=1)
    return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    def __init__(self, num_anchors: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(256, 256, 3, padding=1)
        self.objectness_logits = nn.Conv2d(256, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(256, num_anchors * 4, 1)

    def forward(self, features: list[torch.Tensor]):
        """Per level: logits (N, H*W*A) and deltas (N, H*W*A, 4), float32."""
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            n, _, h, w = x.shape
            logits.append(self.objectness_logits(t).permute(0, 2, 3, 1).reshape(n, -1).float())
            d = self.anchor_deltas(t).float()
            deltas.append(d.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return logits, deltas


class RPN(nn.Module):
    """Holds the RPN head under detectron2's state-dict name (``proposal_generator.rpn_head``)."""

    def __init__(self, cfg: DensePoseConfig):
        super().__init__()
        self.rpn_head = RPNHead(len(cfg.aspect_ratios))


def find_proposals(features: list[torch.Tensor], objectness: list[torch.Tensor], anchor_deltas: list[torch.Tensor],
                   image_size: tuple[int, int], cfg: DensePoseConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``find_top_rpn_proposals`` on the RPN head's outputs: per image (boxes (P, 4) float32 in
    resized-image pixels, logits (P,)), sorted by logit (per-level top-k, decoding, clipping,
    per-level NMS, post-NMS top-k). ``features`` give the levels' grid sizes."""
    n = features[0].shape[0]
    top_boxes, top_logits, levels = [], [], []
    for lvl, (x, lg, dl) in enumerate(zip(features, objectness, anchor_deltas)):
        lg, dl = lg.float(), dl.float()
        anchors = grid_anchors(x.shape[2], x.shape[3], STRIDES[lvl],
                               cell_anchors(cfg.anchor_sizes[lvl], cfg.aspect_ratios).to(x.device))
        k = min(lg.shape[1], cfg.rpn_pre_nms_topk)
        lg_k, idx = lg.topk(k, dim=1)
        # decoding only the top-k anchors is the same arithmetic as decoding all, then picking
        sel_anchors = anchors[idx.reshape(-1)]
        sel_deltas = torch.gather(dl, 1, idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        boxes = decode_boxes(sel_deltas, sel_anchors, (1.0, 1.0, 1.0, 1.0), cfg.scale_clamp).view(n, k, 4)
        top_boxes.append(boxes)
        top_logits.append(lg_k)
        levels.append(torch.full((k,), lvl, dtype=torch.long, device=x.device))
    boxes_all, logits_all, levels = torch.cat(top_boxes, 1), torch.cat(top_logits, 1), torch.cat(levels)
    h, w = image_size
    # one mask per image (finite, and non-empty after clipping), read once: the one host sync per
    # image before NMS. Clipping is row by row, so clipping all rows and dropping the non-finite
    # ones after is the same as detectron2's dropping first.
    finite = torch.isfinite(boxes_all).all(dim=2) & torch.isfinite(logits_all)
    out = []
    for i in range(n):
        boxes = clip_boxes(boxes_all[i], h, w)
        keep = torch.nonzero(finite[i] & nonempty(boxes, cfg.rpn_min_size)).flatten()
        boxes, scores, lvl = boxes[keep], logits_all[i][keep], levels[keep]
        keep = batched_nms(boxes, scores, lvl, cfg.rpn_nms_thresh)[: cfg.rpn_post_nms_topk]
        out.append((boxes[keep], scores[keep]))
    return out
