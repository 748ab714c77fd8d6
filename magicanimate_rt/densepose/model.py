"""DensePose R-CNN (FPN ResNet backbone) as one module with a method per stage, and loading
detectron2's state dict into it by detectron2's names.

Stages (explicit tensors in, tensors out; image sizes are the resized, unpadded (h, w);
activations are channels-last):
``features`` -> ``proposals`` -> ``box_outputs`` -> ``detect`` -> ``densepose_lowres``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .backbone import DEPTH_BLOCKS, ConvNorm, FPNBackbone
from .config import STRIDES, DensePoseConfig
from .head import Decoder, DensePoseHead, DensePosePredictor
from .ops import roi_align
from .roi_heads import BoxHead, BoxPredictor, box_inference, pool_multilevel, rois_of
from .rpn import RPN
from .weights import CheckpointError

#: keys older detectron2 checkpoints carry that today's model ignores (detectron2 loads them with a
#: warning): the pixel normalisation buffers (the config's values are used) and the cell anchors
#: (recomputed from the config)
_IGNORED = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+)$")
_BLOCK_KEY = re.compile(r"^backbone\.bottom_up\.res([2-5])\.(\d+)\.conv1\.weight$")


class ROIHeads(nn.Module):
    def __init__(self, cfg: DensePoseConfig):
        super().__init__()
        self.box_head = BoxHead(cfg.box_pooler_resolution)
        self.box_predictor = BoxPredictor()
        self.decoder = Decoder()
        self.densepose_head = DensePoseHead()
        self.densepose_predictor = DensePosePredictor()


class DensePoseRCNN(nn.Module):
    def __init__(self, cfg: DensePoseConfig = DensePoseConfig(), blocks: tuple[int, int, int, int] = DEPTH_BLOCKS[50]):
        super().__init__()
        self.cfg = cfg
        self.blocks = tuple(blocks)
        self.backbone = FPNBackbone(self.blocks)
        self.proposal_generator = RPN(cfg)
        self.roi_heads = ROIHeads(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.roi_heads.box_head.fc1.weight.dtype

    # ------------------------------------------------------------------ stages
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H', W') normalised, padded BGR -> [p2, p3, p4, p5, p6] (N, 256, H'/s, W'/s)."""
        return self.backbone(x.to(self.dtype).contiguous(memory_format=torch.channels_last))

    def proposals(self, features: list[torch.Tensor], image_size: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (boxes (P, 4), objectness logits (P,)) float32, sorted by logit."""
        return self.proposal_generator(features, image_size)

    def box_outputs(self, features: list[torch.Tensor], proposal_boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Box head on all images' proposals: class logits (R, 2) (background last), deltas (R, 4), float32."""
        pooled = pool_multilevel(features[:4], rois_of(proposal_boxes), self.cfg)
        return self.roi_heads.box_predictor(self.roi_heads.box_head(pooled.to(self.dtype)))

    def detect(self, features, proposals, image_size):
        """Per image: (boxes (D, 4) resized-image pixels, scores (D,), classes (D,)) after NMS."""
        boxes = [p[0] for p in proposals]
        logits, deltas = self.box_outputs(features, boxes)
        out, start = [], 0
        for b in boxes:
            sl = slice(start, start + len(b))
            out.append(box_inference(logits[sl], deltas[sl], b, image_size, self.cfg))
            start += len(b)
        return out

    def densepose_lowres(self, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """DensePose branch on all images' detections (resized pixels): (coarse_segm (K,2,56,56),
        fine_segm, u, v (K,25,56,56)), the ConvTranspose outputs before the x2 upsampling, float32."""
        rh = self.roi_heads
        rois = rois_of(boxes)
        if rois.shape[0] == 0:
            return tuple(torch.zeros((0, c, 56, 56)) for c in (2, 25, 25, 25))
        dec = rh.decoder(features[:4])
        pooled = roi_align(dec, rois, self.cfg.dp_pooler_resolution, 1.0 / STRIDES[0], self.cfg.sampling_ratio)
        pooled = pooled.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return tuple(t.float() for t in rh.densepose_predictor(rh.densepose_head(pooled)))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_state_dict(cls, state: Mapping[str, object], source: str | Path, cfg: DensePoseConfig = DensePoseConfig()) -> "DensePoseRCNN":
        """A float32 model with detectron2's weights (FrozenBN folded); ``source`` names the file in errors."""
        state, blocks = validate_state_dict(state, source, cfg)
        tensors = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).float() for k, v in state.items()}
        model = cls(cfg, blocks)
        model.load_state_dict(tensors, strict=True)
        for m in model.modules():
            if isinstance(m, ConvNorm):
                m.fold()
        # channels last: oneDNN's (and cuDNN's) fast convolution layout, ~25% less CPU time here
        return model.to(memory_format=torch.channels_last).eval().requires_grad_(False)


#: ResNet depth by blocks per stage res2..res5 (detectron2 resnet.py: R-50, R-101)
RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}


def resnet_depth(blocks: tuple[int, ...]) -> str:
    """"R-50", "R-101", or the blocks per stage of another depth (which loads as well)."""
    depth = RESNET_DEPTHS.get(tuple(blocks))
    return f"R-{depth}" if depth else "ResNet with " + "/".join(map(str, blocks)) + " blocks"


def validate_state_dict(state: Mapping[str, object], source: str | Path, cfg: DensePoseConfig = DensePoseConfig()):
    """(the state dict under the model's names, ResNet blocks per stage), checked against a
    meta-device model before any weight is read: a checkpoint of another model, missing or unexpected
    keys and wrong shapes each raise one-line :class:`CheckpointError` naming the file and the first keys."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _IGNORED.match(k)}
    if not any(k.startswith("roi_heads.densepose_predictor.") for k in state):
        kind = "a Mask R-CNN" if any(k.startswith("roi_heads.mask_head.") for k in state) else \
            "a detector without a DensePose head" if any(k.startswith("roi_heads.box_") for k in state) else "not a detectron2 model"
        raise CheckpointError(f"{source}: not a DensePose R-CNN checkpoint ({kind}: no roi_heads.densepose_predictor.* weights)")
    blocks = [0, 0, 0, 0]
    for k in state:
        m = _BLOCK_KEY.match(k)
        if m:
            blocks[int(m.group(1)) - 2] = max(blocks[int(m.group(1)) - 2], int(m.group(2)) + 1)
    if not all(blocks):
        raise CheckpointError(f"{source}: no ResNet FPN backbone weights (backbone.bottom_up.res2..res5) in this checkpoint")
    with torch.device("meta"):  # the expected names and shapes, without allocating 64M floats
        expected = DensePoseRCNN(cfg, tuple(blocks)).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(np.shape(state[k]))} (model: {tuple(expected[k].shape)})" for k in expected
             if k in state and tuple(np.shape(state[k])) != tuple(expected[k].shape)]

    def first(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    if missing:
        raise CheckpointError(f"{source}: missing keys: {first(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys: {first(unexpected)}")
    if wrong:
        raise CheckpointError(f"{source}: wrong shapes: {first(wrong)}")
    return state, tuple(blocks)
