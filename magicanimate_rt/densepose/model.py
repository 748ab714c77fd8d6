"""DensePose R-CNN (FPN ResNet backbone) as one module with a method per stage, and loading
detectron2's state dict into it by detectron2's names.

Stages (explicit tensors in, tensors out; image sizes are the resized, unpadded (h, w);
activations are channels-last):
``features`` -> ``proposals`` -> ``box_outputs`` -> ``detect`` -> ``densepose_lowres``.

The three networks an engine directory exports (``BackboneNetwork``, ``BoxNetwork``,
``DensePoseNetwork``) are views of this model's modules (no weights copied), run through
stages.py's interface by :class:`TorchDensePoseStages`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from . import stages
from .backbone import DEPTH_BLOCKS, ConvNorm, FPNBackbone
from .config import DensePoseConfig
from .head import Decoder, DensePoseHead, DensePosePredictor
from .roi_heads import BoxHead, BoxPredictor
from .rpn import RPN, RPNHead, find_proposals
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


class BackboneNetwork(nn.Module):
    """Graph (a): image -> p2..p6, the DensePose decoder's stride-4 map, RPN objectness and deltas
    per level (``stages.BACKBONE_OUTPUTS`` order). The decoder is here rather than in the DensePose
    head because it is a dense convolution of whole feature maps, fixed in shape like the backbone."""

    def __init__(self, backbone: FPNBackbone, rpn_head: RPNHead, decoder: Decoder):
        super().__init__()
        self.backbone, self.rpn_head, self.decoder = backbone, rpn_head, decoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.backbone(x)
        objectness, deltas = self.rpn_head(feats)
        return (*feats, self.decoder(feats[:4]), *objectness, *deltas)


class BoxNetwork(nn.Module):
    """Graph (b): pooled RoI features (R, 256, 7, 7) -> class logits (R, 2), box deltas (R, 4)."""

    def __init__(self, box_head: BoxHead, box_predictor: BoxPredictor):
        super().__init__()
        self.box_head, self.box_predictor = box_head, box_predictor

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box_predictor(self.box_head(pooled))


class DensePoseNetwork(nn.Module):
    """Graph (c): pooled RoI features (K, 256, 28, 28) -> the chart predictor's 56x56 outputs."""

    def __init__(self, head: DensePoseHead, predictor: DensePosePredictor):
        super().__init__()
        self.head, self.predictor = head, predictor

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.predictor(self.head(pooled))


class DensePoseRCNN(nn.Module):
    def __init__(self, cfg: DensePoseConfig = DensePoseConfig(), blocks: tuple[int, int, int, int] = DEPTH_BLOCKS[50]):
        super().__init__()
        self.cfg = cfg
        self.blocks = tuple(blocks)
        self.backbone = FPNBackbone(self.blocks)
        self.proposal_generator = RPN(cfg)
        self.roi_heads = ROIHeads(cfg)

    def networks(self) -> dict[str, nn.Module]:
        """The three exported networks by stage name (views of this model's modules)."""
        rh = self.roi_heads
        return {"densepose_backbone": BackboneNetwork(self.backbone, self.proposal_generator.rpn_head, rh.decoder),
                "densepose_box_head": BoxNetwork(rh.box_head, rh.box_predictor),
                "densepose_head": DensePoseNetwork(rh.densepose_head, rh.densepose_predictor)}

    @property
    def dtype(self) -> torch.dtype:
        return self.roi_heads.box_head.fc1.weight.dtype

    # ------------------------------------------------------------------ stages
    # The glue between the networks is stages.py's, shared with the engine backends; these methods
    # run it on this model's own networks (the conformance tests check each step).
    def stages(self) -> "TorchDensePoseStages":
        return TorchDensePoseStages(self)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H', W') normalised, padded BGR -> [p2, p3, p4, p5, p6] (N, 256, H'/s, W'/s)."""
        return self.backbone(x.to(self.dtype).contiguous(memory_format=torch.channels_last))

    def proposals(self, features: list[torch.Tensor], image_size: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (boxes (P, 4), objectness logits (P,)) float32, sorted by logit."""
        return find_proposals(features, *self.proposal_generator.rpn_head(features), image_size, self.cfg)

    def box_outputs(self, features: list[torch.Tensor], proposal_boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Box head on all images' proposals: class logits (R, 2) (background last), deltas (R, 4), float32."""
        return stages.box_outputs(self.stages(), features, proposal_boxes, self.cfg)

    def detect(self, features, proposals, image_size):
        """Per image: (boxes (D, 4) resized-image pixels, scores (D,), classes (D,)) after NMS."""
        return stages.detect(self.stages(), features, proposals, image_size, self.cfg)

    def densepose_lowres(self, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """DensePose branch on all images' detections (resized pixels): (coarse_segm (K,2,56,56),
        fine_segm, u, v (K,25,56,56)), the ConvTranspose outputs before the x2 upsampling, float32."""
        return stages.densepose_lowres(self.stages(), self.roi_heads.decoder(features[:4]), boxes, self.cfg)

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


class TorchDensePoseStages(stages.DensePoseStages):
    """The stages interface on the PyTorch networks (in the model's device and dtype)."""

    name = "torch"

    def __init__(self, model: DensePoseRCNN):
        self.model = model
        nets = model.networks()
        self._backbone, self._box, self._dp = (nets[k] for k in ("densepose_backbone", "densepose_box_head", "densepose_head"))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.roi_heads.box_head.fc1.weight.device

    @classmethod
    def from_engines(cls, engine_dir, device="cpu") -> "TorchDensePoseStages":
        """``--backend torch`` on an engine directory: the weights it was built from, in PyTorch."""
        from ..engines.densepose import read_densepose
        from .weights import read_checkpoint

        m = read_densepose(engine_dir)
        path = m.weights_path()
        cfg = DensePoseConfig(min_size=m.min_size, max_size=m.max_size)
        return cls(DensePoseRCNN.from_state_dict(read_checkpoint(path), path, cfg).to(device))

    def backbone(self, x: torch.Tensor) -> stages.BackboneOutputs:
        return stages.BackboneOutputs.from_flat(self._backbone(x.to(self.dtype).contiguous(memory_format=torch.channels_last)))

    def box_head(self, pooled: torch.Tensor):
        return tuple(t.float() for t in self._box(pooled.to(self.dtype)))

    def densepose_head(self, pooled: torch.Tensor):
        return tuple(t.float() for t in self._dp(pooled.to(self.dtype).contiguous(memory_format=torch.channels_last)))
