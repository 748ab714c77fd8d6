"""DensePose R-CNN as three networks behind one interface, and the one code path between them.

The networks (fixed computation, shapes known from the input's; what an engine directory holds
as ONNX graphs, see docs/ENGINES.md "DensePose stages"):

| call             | in                                     | out                                                    |
|------------------|----------------------------------------|--------------------------------------------------------|
| backbone         | image (N, 3, H, W) normalised, padded  | p2..p6, the DensePose decoder's stride-4 map, RPN objectness (N, h*w*A) and deltas (N, h*w*A, 4) per level |
| box_head         | pooled (R, 256, 7, 7)                  | class logits (R, 2) (background last), deltas (R, 4)   |
| densepose_head   | pooled (K, 256, 28, 28)                | coarse_segm (K, 2, 56, 56), fine_segm, u, v (K, 25, 56, 56) |

Everything between them has data-dependent shapes (how many proposals survive NMS, how many
detections pass the score threshold, which FPN level each box pools from) and stays here, in
torch on the backend's device, shared by every backend: anchors and proposal selection
(``rpn.find_proposals``), the multi-level RoIAlign and box inference (:func:`detect`), the DensePose
RoIAlign (:func:`densepose_lowres`). A backend (:class:`DensePoseStages`) only runs the three
networks; :data:`BACKENDS` picks one by name (as ``runtime/backends`` does for the animation).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from .config import STRIDES, DensePoseConfig
from .ops import roi_align
from .roi_heads import box_inference, pool_multilevel, rois_of
from .rpn import find_proposals

LEVELS = ("p2", "p3", "p4", "p5", "p6")
#: the backbone network's outputs in order (the graph's output names)
BACKBONE_OUTPUTS = (*LEVELS, "densepose_features", *(f"objectness_{p}" for p in LEVELS),
                    *(f"anchor_deltas_{p}" for p in LEVELS))


@dataclass(frozen=True)
class BackboneOutputs:
    """What the backbone network gives: FPN p2..p6, the decoder's map, RPN outputs per level."""

    features: list[Tensor]
    densepose_features: Tensor
    objectness: list[Tensor]  #: per level (N, h*w*A), (y, x, anchor) order
    anchor_deltas: list[Tensor]  #: per level (N, h*w*A, 4)

    @classmethod
    def from_flat(cls, outs: Sequence[Tensor]) -> "BackboneOutputs":
        """From the network's outputs in :data:`BACKBONE_OUTPUTS` order."""
        n = len(LEVELS)
        return cls(list(outs[:n]), outs[n], list(outs[n + 1:2 * n + 1]), list(outs[2 * n + 1:3 * n + 1]))


class DensePoseStages:
    """The three networks of one backend. ``dtype`` is what its networks compute in; inputs may
    come in float32 (the backend casts), outputs are float32."""

    name = "?"
    device: torch.device
    dtype: torch.dtype

    def backbone(self, x: Tensor) -> BackboneOutputs:
        raise NotImplementedError

    def box_head(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def densepose_head(self, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError


#: backends that load an engine directory, ``module:attribute`` of ``f(engine_dir, device)``,
#: imported only when asked for (the ONNX Runtime and TensorRT ones need no PyTorch model code)
BACKENDS = {
    "onnxruntime": "magicanimate_rt.densepose.onnxruntime_stages:OnnxRuntimeDensePoseStages.from_engines",
    "torch": "magicanimate_rt.densepose.model:TorchDensePoseStages.from_engines",
    "tensorrt": "magicanimate_rt.densepose.tensorrt_stages:TensorRTDensePoseStages.from_engines",
}


def engine_stages(backend: str, engine_dir, device="cpu") -> DensePoseStages:
    """The DensePose stages of ``engine_dir`` run by ``backend`` (the one place a name is resolved)."""
    if backend not in BACKENDS:
        raise InputError(f"--backend: {backend!r} cannot run the DensePose stages; choose one of: "
                         f"{', '.join(sorted(BACKENDS))}")
    module, attr = BACKENDS[backend].split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj(engine_dir, device)


# --------------------------------------------------------------------------- the glue
def box_outputs(stages: DensePoseStages, features: list[Tensor], proposal_boxes: list[Tensor],
                cfg: DensePoseConfig) -> tuple[Tensor, Tensor]:
    """The box pooler (each RoI from the FPN level its size picks) and the box head on all images'
    proposals: class logits (R, 2), deltas (R, 4), float32."""
    rois = rois_of(proposal_boxes)
    if rois.shape[0] == 0:
        dev = features[0].device
        return torch.zeros((0, 2), device=dev), torch.zeros((0, 4), device=dev)
    return stages.box_head(pool_multilevel(features[:4], rois, cfg))


def detect(stages: DensePoseStages, features: list[Tensor], props: list[tuple[Tensor, Tensor]],
           image_size: tuple[int, int], cfg: DensePoseConfig):
    """Per image: (boxes (D, 4) resized-image pixels, scores (D,), classes (D,)) after NMS."""
    boxes = [p[0] for p in props]
    logits, deltas = box_outputs(stages, features, boxes, cfg)
    out, start = [], 0
    for b in boxes:
        sl = slice(start, start + len(b))
        out.append(box_inference(logits[sl], deltas[sl], b, image_size, cfg))
        start += len(b)
    return out


def densepose_lowres(stages: DensePoseStages, densepose_features: Tensor, boxes: list[Tensor],
                     cfg: DensePoseConfig) -> tuple[Tensor, ...]:
    """The DensePose pooler (28x28 RoIAlign on the decoder's stride-4 map) and head on all images'
    detections (resized pixels): (coarse_segm (K,2,56,56), fine_segm, u, v (K,25,56,56)), float32."""
    rois = rois_of(boxes)
    if rois.shape[0] == 0:
        return tuple(torch.zeros((0, c, 56, 56), device=densepose_features.device) for c in (2, 25, 25, 25))
    pooled = roi_align(densepose_features, rois, cfg.dp_pooler_resolution, 1.0 / STRIDES[0], cfg.sampling_ratio)
    return tuple(t.float() for t in stages.densepose_head(pooled))


def infer(stages: DensePoseStages, x: Tensor, image_size: tuple[int, int], cfg: DensePoseConfig):
    """Network input -> (detections per image, the DensePose 56x56 outputs of all of them)."""
    out = stages.backbone(x)
    props = find_proposals(out.features, out.objectness, out.anchor_deltas, image_size, cfg)
    dets = detect(stages, out.features, props, image_size, cfg)
    return dets, densepose_lowres(stages, out.densepose_features, [d[0] for d in dets], cfg)
