"""ResNet (FrozenBatchNorm, MSRA stride-in-1x1) + FPN p2..p6, as detectron2's ``build_resnet_fpn_backbone``.

Module names mirror detectron2's state dict (``backbone.bottom_up.res2.0.conv1.norm.running_var``...),
so a checkpoint loads by name. FrozenBN is folded into the convolution after loading
(:meth:`ConvNorm.fold`): the same affine map, one pass less over every activation.

Sources (detectron2 02b5c4e): ``layers/batch_norm.py:45-66`` (FrozenBatchNorm2d),
``modeling/backbone/resnet.py`` (``BasicStem`` :344-358, ``BottleneckBlock`` :86-96 and :147, ``make_stage``
:638), ``modeling/backbone/fpn.py:140-167`` (``FPN.forward``) and :188-200 (``LastLevelMaxPool``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: ResNet depth -> bottleneck blocks in res2..res5
DEPTH_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d (eps 1e-5): fixed statistics and affine, buffers only."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) with bn(x) = x * scale + shift, computed in float64."""
        scale = self.weight.double() * (self.running_var.double() + self.eps).rsqrt()
        return scale, self.bias.double() - self.running_mean.double() * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps)


class ConvNorm(nn.Module):
    """Conv2d without bias + FrozenBN (detectron2's ``Conv2d(..., norm=FrozenBN)``); after :meth:`fold`
    a plain convolution with bias."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.zeros(cout, cin, k, k), requires_grad=False)
        self.norm = FrozenBatchNorm2d(cout)
        self.bias = None

    @torch.no_grad()
    def fold(self) -> None:
        if self.norm is None:
            return
        scale, shift = self.norm.scale_shift()
        self.weight.data = (self.weight.double() * scale.view(-1, 1, 1, 1)).to(self.weight.dtype)
        self.bias = nn.Parameter(shift.to(self.weight.dtype), requires_grad=False)
        self.norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return x if self.norm is None else self.norm(x)


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = ConvNorm(3, 64, 7, stride=2, padding=3)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, bottleneck: int, cout: int, stride: int):
        super().__init__()
        # STRIDE_IN_1X1 = True: the stride sits in conv1 (the 1x1), not in the 3x3
        self.shortcut = ConvNorm(cin, cout, 1, stride=stride) if cin != cout else None
        self.conv1 = ConvNorm(cin, bottleneck, 1, stride=stride)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, padding=1)
        self.conv3 = ConvNorm(bottleneck, cout, 1)

    def forward(self, x):
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out)


class ResNet(nn.Module):
    """Stem + res2..res5; returns [res2, res3, res4, res5]."""

    def __init__(self, blocks: tuple[int, int, int, int]):
        super().__init__()
        self.stem = Stem()
        cin = 64
        for stage, (n, bott, cout) in enumerate(zip(blocks, (64, 128, 256, 512), (256, 512, 1024, 2048)), start=2):
            first_stride = 1 if stage == 2 else 2
            layers = [Bottleneck(cin if i == 0 else cout, bott, cout, first_stride if i == 0 else 1) for i in range(n)]
            self.add_module(f"res{stage}", nn.Sequential(*layers))
            cin = cout

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for stage in (2, 3, 4, 5):
            x = getattr(self, f"res{stage}")(x)
            outs.append(x)
        return outs


class FPNBackbone(nn.Module):
    """ResNet + FPN (fuse "sum", no norm) + LastLevelMaxPool; returns [p2, p3, p4, p5, p6]."""

    def __init__(self, blocks: tuple[int, int, int, int]):
        super().__init__()
        for lvl, cin in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
            self.add_module(f"fpn_lateral{lvl}", nn.Conv2d(cin, 256, 1))
            self.add_module(f"fpn_output{lvl}", nn.Conv2d(256, 256, 3, padding=1))
        self.bottom_up = ResNet(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        res = self.bottom_up(x)
        prev = self.fpn_lateral5(res[3])
        outs = [self.fpn_output5(prev)]
        for lvl in (4, 3, 2):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = getattr(self, f"fpn_lateral{lvl}")(res[lvl - 2]) + top_down
            outs.insert(0, getattr(self, f"fpn_output{lvl}")(prev))
        # p6 = max_pool2d(p5, kernel_size=1, stride=2): a stride-2 subsample
        outs.append(outs[-1][:, :, ::2, ::2])
        return outs
