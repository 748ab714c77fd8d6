"""The stage interface: what every backend (torch, ONNX Runtime, TensorRT, torch-CUDA)
implements, and all the sampling loop knows about.

Every tensor in and out lives on the backend's ``device`` in its ``dtype`` (timesteps are
float32 tensors of shape (1,)); shapes use S = size, h = w = S/8, F = window length, N = a
batch of frames. Backends are context managers; ``close()`` frees what they hold.

Two optional attributes let the pipeline plan its batching (``runtime/sampling.py``):
``max_windows_per_call`` (windows one ``unet_guided`` call accepts; 1 when absent, as for
fixed-shape engines) and ``memory_model(size)`` (working memory per call, see
docs/PERFORMANCE.md "Memory"; without it the pipeline uses fixed chunk sizes).

A backend that can run the ControlNet in two parts also offers ``controlnet_embed(cond)``
((N, 3, S, S) in [0, 1] -> conditioning embedding (N, C_0, h, w)) and
``controlnet_embedded(latents, t, embedding)`` (-> the 13 residuals, as ``controlnet``);
the loop then embeds each driving frame once per request instead of once per step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor


class Stages(ABC):
    """One model set, ready to run, on one device and dtype."""

    #: registry name of the backend ("torch", "onnxruntime", ...)
    name: str = "?"
    device: torch.device
    dtype: torch.dtype
    #: CLIP embedding of "" (1, 77, Cx) on the device: a constant of the model set
    text_embedding: Tensor
    #: frames per UNet call (16 for MagicAnimate)
    window: int = 16

    @abstractmethod
    def encode_reference(self, image: Tensor) -> Tensor:
        """image (1, 3, S, S), pixel values 0..255 -> reference latent r (1, 4, h, w)."""

    @abstractmethod
    def bank(self, ref_latent: Tensor, t: Tensor) -> list[Tensor]:
        """r (1, 4, h, w), t (1,) -> the reference bank: tensors (1, L_j, C_j), mid then up."""

    @abstractmethod
    def controlnet(self, latents: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        """latents (N, 4, h, w), t (1,), cond (N, 3, S, S) in [0, 1] -> 13 residuals:
        12 down (N, C_i, h_i, w_i), then mid."""

    @abstractmethod
    def unet_guided(
        self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """One window: latents (1, 4, F, h, w), the window's 13 residuals (F, ...), the bank
        -> (eps_uncond, eps_cond), each (1, 4, F, h, w)."""

    @abstractmethod
    def unet_cond(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]) -> Tensor:
        """The conditional half alone (guidance scale 1.0): -> eps_cond (1, 4, F, h, w)."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """latents (N, 4, h, w) -> frames (N, 3, S, S) in [0, 1]."""

    def close(self) -> None:
        """Free what the backend holds (device memory, sessions)."""

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
