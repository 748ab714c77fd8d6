"""The DensePose branch: Panoptic-FPN decoder, DensePoseV1ConvXHead and DensePoseChartPredictor
(``projects/DensePose/densepose/modeling``), module names as in detectron2's state dict.

Sources (detectron2 02b5c4e, ``projects/DensePose/densepose/``): ``modeling/roi_heads/roi_head.py:28-86``
(``Decoder``), :111-123 (the pooler) and :172-186 (``_forward_densepose``), ``modeling/roi_heads/v1convx.py``,
``modeling/predictors/chart.py:50-95``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PREDICTOR_OUTPUTS, STRIDES


class ConvReLU(nn.Conv2d):
    """detectron2's ``Conv2d(..., activation=F.relu)``: one module, so the state-dict indices match."""

    def forward(self, x):
        return F.relu(super().forward(x))


class Upsample2x(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class Decoder(nn.Module):
    """p2..p5 -> one stride-4 map: per level max(1, log2(stride) - 2) x [3x3 conv + ReLU (+ x2 bilinear
    unless stride 4)], summed, then a 1x1 conv."""

    def __init__(self, channels: int = 256, common_stride: int = 4):
        super().__init__()
        for lvl, stride in zip((2, 3, 4, 5), STRIDES):
            n = max(1, stride.bit_length() - common_stride.bit_length())
            ops = []
            for _ in range(n):
                ops.append(ConvReLU(channels, channels, 3, padding=1))
                if stride != common_stride:
                    ops.append(Upsample2x())
            self.add_module(f"p{lvl}", nn.Sequential(*ops))
        self.predictor = nn.Conv2d(channels, channels, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.p2(features[0])
        for lvl, f in zip((3, 4, 5), features[1:4]):
            x = x + getattr(self, f"p{lvl}")(f)
        return self.predictor(x)


class DensePoseHead(nn.Module):
    """DensePoseV1ConvXHead: ``n`` x [3x3 conv 512 + ReLU]."""

    def __init__(self, n: int = 8, cin: int = 256, dim: int = 512):
        super().__init__()
        self.n = n
        for i in range(1, n + 1):
            self.add_module(f"body_conv_fcn{i}", ConvReLU(cin if i == 1 else dim, dim, 3, padding=1))

    def forward(self, x):
        for i in range(1, self.n + 1):
            x = getattr(self, f"body_conv_fcn{i}")(x)
        return x


class DensePosePredictor(nn.Module):
    """DensePoseChartPredictor: four ConvTranspose2d(512, C, 4, stride 2, padding 1) -> 56x56
    (coarse_segm 2, fine_segm 25, u 25, v 25); :func:`upsample` gives the 112x112 outputs."""

    def __init__(self, dim: int = 512):
        super().__init__()
        for name, c in PREDICTOR_OUTPUTS:
            self.add_module(name, nn.ConvTranspose2d(dim, c, 4, stride=2, padding=1))

    def forward(self, x) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name)(x) for name, _ in PREDICTOR_OUTPUTS)


def upsample(lowres: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The predictor's ``interpolate(scale_factor=2, bilinear, align_corners=False)``, in float32,
    contiguous NCHW as detectron2's (torch's channels-last resampling kernel is another code path)."""
    return tuple(F.interpolate(t.float().contiguous(), scale_factor=2, mode="bilinear", align_corners=False)
                 for t in lowres)
