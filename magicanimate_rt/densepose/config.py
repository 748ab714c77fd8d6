"""detectron2's settings for ``densepose_rcnn_R_{50,101}_FPN_s1x`` as vid2densepose runs them.

Every number the port needs, in one place, with where detectron2 sets it
(``Base-DensePose-RCNN-FPN.yaml`` + ``densepose_rcnn_R_50_FPN_s1x.yaml`` over detectron2's defaults
and ``add_densepose_config``; see ``shared/conformance/densepose/PORTING.md``). Only the two input
sizes are meant to change (the conformance data's small variant uses 256/427).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DensePoseConfig:
    #: INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST (ResizeShortestEdge, PIL bilinear)
    min_size: int = 800
    max_size: int = 1333
    #: MODEL.PIXEL_MEAN (BGR) and PIXEL_STD
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: backbone.size_divisibility of the FPN
    size_divisibility: int = 32
    #: ANCHOR_GENERATOR: one size per level p2..p6, aspect ratios h/w, OFFSET 0.0
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    #: RPN (test)
    rpn_pre_nms_topk: int = 1000
    rpn_post_nms_topk: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 0.0
    #: ROI_HEADS / ROI_BOX_HEAD (test)
    score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_image: int = 100
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    box_pooler_resolution: int = 7
    #: ROI_DENSEPOSE_HEAD
    dp_pooler_resolution: int = 28
    #: both poolers: ROIAlign (aligned=False), sampling ratio 2
    sampling_ratio: int = 2
    #: Box2BoxTransform's clamp of dw, dh (``_DEFAULT_SCALE_CLAMP``)
    scale_clamp: float = math.log(1000.0 / 16)
    #: FPN levels the box pooler reads (p2..p5) and its canonical box (ROIPooler)
    canonical_box_size: int = 224
    canonical_level: int = 4

    def __post_init__(self):
        if not (isinstance(self.min_size, int) and isinstance(self.max_size, int)) or not 0 < self.min_size <= self.max_size:
            raise ValueError(f"min_size/max_size: need 0 < min_size <= max_size, got {self.min_size}/{self.max_size}")


#: FPN strides of p2..p6
STRIDES = (4, 8, 16, 32, 64)
#: DensePose chart predictor outputs (name in detectron2's state dict, channels)
PREDICTOR_OUTPUTS = (("ann_index_lowres", 2), ("index_uv_lowres", 25), ("u_lowres", 25), ("v_lowres", 25))
