"""The PyTorch backend: the stage interface over :mod:`magicanimate_rt.models`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ...errors import InputError
from ...models import ModelSet, load_model_set
from ..stages import Stages

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class TorchStages(Stages):
    name = "torch"

    def __init__(self, models: ModelSet, device: torch.device, dtype: torch.dtype):
        self.models = models
        self.device = device
        self.dtype = dtype
        self.text_embedding = models.text_embedding

    @classmethod
    def from_pretrained(cls, models_dir, device="cpu", dtype="float32") -> "TorchStages":
        device, dtype = torch.device(device), parse_dtype(dtype)
        if device.type == "cpu" and dtype == torch.float16:
            raise InputError("dtype float16 needs a CUDA device; use float32 (or bfloat16) on the CPU")
        return cls(load_model_set(models_dir, device=device, dtype=dtype), device, dtype)

    def encode_reference(self, image: Tensor) -> Tensor:
        return self.models.vae.encode(image)

    def bank(self, ref_latent: Tensor, t: Tensor) -> list[Tensor]:
        return self.models.appearance_encoder(ref_latent, t, self.text_embedding)

    def controlnet(self, latents: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        return list(self.models.controlnet(latents, t, self.text_embedding, cond))

    def unet_guided(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]):
        return self.models.unet.guided(latents, t, self.text_embedding, residuals[:-1], residuals[-1], bank)

    def unet_cond(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]) -> Tensor:
        return self.models.unet(latents, t, self.text_embedding, residuals[:-1], residuals[-1], bank)

    def decode(self, latents: Tensor) -> Tensor:
        return self.models.vae.decode(latents)

    def close(self) -> None:
        self.models = None  # type: ignore[assignment]
