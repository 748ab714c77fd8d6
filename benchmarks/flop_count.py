"""FLOP counts of every stage call, by :class:`torch.utils.flop_counter.FlopCounterMode`.

:class:`CountingStages` wraps a backend's stages: the first call of each stage with given
input shapes runs under the counter; later calls with the same shapes add the same count
(the models have no data-dependent control flow, so the count is a function of the
shapes). One request through it gives the FLOPs of that request per stage, and the number
of calls. Counted: matrix multiplies, convolutions and attention, 2 FLOPs per
multiply-add; elementwise work (norms, activations, adds, copies) is not counted.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from magicanimate_rt.runtime.stages import Stages

#: stage method -> the timing name the pipeline reports it under
STAGE_OF = {"encode_reference": "vae_encode", "bank": "appearance_encoder", "controlnet": "controlnet",
            "controlnet_embed": "controlnet", "controlnet_embedded": "controlnet",
            "unet_guided": "unet", "unet_cond": "unet", "decode": "vae_decode"}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """The CPU flash-attention kernel is not in torch's FLOP registry; same formula."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def _shapes(obj):
    if isinstance(obj, Tensor):
        return tuple(obj.shape)
    if isinstance(obj, (list, tuple)):
        return tuple(_shapes(o) for o in obj)
    return None


class RoutedStages(Stages):
    """Stages that delegate everything to ``inner`` and route every stage call through
    :meth:`_call` (``method``, args), which subclasses wrap with what they measure."""

    def __init__(self, inner: Stages):
        self.inner = inner
        self.name = inner.name
        self.device, self.dtype, self.window = inner.device, inner.dtype, inner.window
        self.text_embedding = inner.text_embedding
        self.capabilities = inner.capabilities  # the same plan as the inner stages get

    def __getattr__(self, name):  # anything else a caller reads of the inner stages (options, models, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def memory_model(self, width: int, height=None):
        return self.inner.memory_model(width, height)

    def check_shape(self, width: int, height: int) -> None:
        self.inner.check_shape(width, height)

    def _call(self, method: str, *args):
        return getattr(self.inner, method)(*args)

    def encode_reference(self, image: Tensor) -> Tensor:
        return self._call("encode_reference", image)

    def bank(self, ref_latent: Tensor, t: Tensor) -> list[Tensor]:
        return self._call("bank", ref_latent, t)

    def controlnet(self, latents: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        return self._call("controlnet", latents, t, cond)

    def controlnet_embed(self, cond: Tensor) -> Tensor:  # used where inner declares the two parts
        return self._call("controlnet_embed", cond)

    def controlnet_embedded(self, latents: Tensor, t: Tensor, embedding: Tensor) -> list[Tensor]:
        return self._call("controlnet_embedded", latents, t, embedding)

    def unet_guided(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]):
        return self._call("unet_guided", latents, t, residuals, bank)

    def unet_cond(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]) -> Tensor:
        return self._call("unet_cond", latents, t, residuals, bank)

    def decode(self, latents: Tensor) -> Tensor:
        return self._call("decode", latents)

    def close(self) -> None:
        """The wrapped stages belong to their pipeline; nothing to free here."""


class CountingStages(RoutedStages):
    """Stages that count FLOPs and calls per stage, delegating everything to ``inner``."""

    def __init__(self, inner: Stages):
        super().__init__(inner)
        self.flops: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._known: dict[tuple, int] = {}

    def _call(self, method: str, *args):
        key = (method, _shapes(args))
        fn = getattr(self.inner, method)
        if key in self._known:
            out = fn(*args)
        else:
            counter = FlopCounterMode(display=False, custom_mapping=CUSTOM)
            with counter:
                out = fn(*args)
            self._known[key] = counter.get_total_flops()
        stage = STAGE_OF[method]
        self.flops[stage] += self._known[key]
        self.calls[stage] += 1
        return out
