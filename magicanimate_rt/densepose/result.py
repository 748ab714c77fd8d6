"""What the estimator returns per frame: detectron2's instances after ``DensePoseResultExtractor``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class DensePoseResult:
    """One frame's detections, in the frame's own pixels.

    ``boxes`` (K, 4) float32 XYXY as detectron2's ``pred_boxes``; ``scores`` (K,) float32;
    ``labels`` K arrays (h_k, w_k) uint8, part index 0..24 over the box truncated to integers
    (x, y, w, h = ``box_xywh[k]``); ``uv`` K arrays (2, h_k, w_k) float32 (U, V). Detections are in
    detectron2's order (score descending after NMS), which is also the painting order.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[np.ndarray] = field(default_factory=list)
    uv: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def box_xywh(self) -> np.ndarray:
        """(K, 4) int64: the extractor's integer boxes (x, y, w, h), XYXY -> XYWH then truncated."""
        xywh = self.boxes.astype(np.float32).copy()
        xywh[:, 2:] -= xywh[:, :2]
        return xywh.astype(np.int64)
