"""detectron2's ``DefaultPredictor`` preprocessing: ResizeShortestEdge with PIL, BGR, mean, padding.

Sources (detectron2 02b5c4e): ``engine/defaults.py:322-352`` (``DefaultPredictor.__call__``),
``data/transforms/augmentation_impl.py:181-200`` (``get_output_shape``), ``data/transforms/transform.py:117-123``
(``ResizeTransform.apply_image``), ``modeling/meta_arch/rcnn.py:228`` (normalisation),
``structures/image_list.py:100-129`` (``ImageList.from_tensors`` padding).

The resize is Pillow's own ``Image.resize(BILINEAR)`` (detectron2's ``ResizeTransform`` calls it):
an antialiased triangle filter in fixed-point uint8 arithmetic that no torch/cv2 resize reproduces,
and Pillow is already our dependency, so we call it rather than imitate it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import DensePoseConfig


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``ResizeShortestEdge.get_output_shape``: short side to ``min_size``, long side at most
    ``max_size``, each side rounded with ``int(x + 0.5)``."""
    scale = min_size * 1.0 / min(height, width)
    if height < width:
        new_h, new_w = min_size, scale * width
    else:
        new_h, new_w = scale * height, min_size
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_frames(frames: np.ndarray, cfg: DensePoseConfig) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, h, w, 3) uint8 resized as detectron2 does (channel order kept)."""
    n, h, w, _ = frames.shape
    new_h, new_w = resized_shape(h, w, cfg.min_size, cfg.max_size)
    if (new_h, new_w) == (h, w):
        return frames.copy()
    return np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), Image.BILINEAR)) for f in frames])


def network_input(resized_bgr: "np.ndarray | torch.Tensor", cfg: DensePoseConfig, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """(N, h, w, 3) uint8 BGR -> (N, 3, h', w') normalised, zero-padded bottom/right to a multiple of
    ``size_divisibility`` (after normalisation, as ``ImageList.from_tensors``). A uint8 tensor in
    pinned memory is copied to the device without a host synchronisation (``non_blocking``)."""
    n, h, w, _ = resized_bgr.shape
    d = cfg.size_divisibility
    ph, pw = -(-h // d) * d, -(-w // d) * d
    if not isinstance(resized_bgr, torch.Tensor):
        resized_bgr = torch.from_numpy(np.ascontiguousarray(resized_bgr))
    x = resized_bgr.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    out = x.new_zeros((n, 3, ph, pw))
    out[:, :, :h, :w] = x
    return out.to(dtype)
