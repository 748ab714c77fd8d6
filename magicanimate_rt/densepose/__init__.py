"""DensePose R-CNN (detectron2's ``densepose_rcnn_R_50_FPN_s1x`` and ``_R_101_FPN_s1x``) on our own stack.

Turns an ordinary video of a person into the DensePose driving video MagicAnimate animates with,
computing what detectron2's ``DefaultPredictor`` + ``DensePoseResultExtractor`` +
``DensePoseResultsFineSegmentationVisualizer`` compute (vid2densepose's recipe), without detectron2.
"""

from .estimator import DensePoseEstimator
from .result import DensePoseResult
from .weights import CheckpointError

__all__ = ["CheckpointError", "DensePoseEstimator", "DensePoseResult"]
