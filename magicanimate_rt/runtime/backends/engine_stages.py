"""What the two engine-directory backends (ONNX Runtime, TensorRT) share: how a manifest
becomes a backend's dtype, window, DDIM settings, text embedding and declared capabilities,
and how the loop's arguments become a stage's named inputs.

The capabilities come from the manifest's stage specs: one window per UNet call (the UNet
graph is built for one 16-frame window) and, for every stage with a dynamic batch axis,
its profile's maximum, so the planner never asks for more than a plan was built for. The
graphs are built for one output shape (the manifest's width x height): a request of
another is refused before any work, with the command that builds it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ...engines.manifest import EngineManifest
from ...engines.specs import float_dtype, shape_label
from ...errors import EngineError
from ..ddim import DDIMSettings
from ..dtypes import torch_dtype
from ..stages import Capabilities, Stages


def engine_capabilities(manifest: EngineManifest) -> Capabilities:
    """One window per UNet call; each dynamic stage's largest batch from its spec's axis."""

    def batch_max(stage: str) -> Optional[int]:
        axes = manifest.spec(stage).axes
        return min(r.max for r in axes.values()) if axes else None

    return Capabilities(max_windows_per_call=1, controlnet_in_two_parts=False,
                        max_controlnet_frames=batch_max("controlnet"), max_decode_frames=batch_max("vae_decoder"),
                        max_encode_images=batch_max("vae_encoder"))


class EngineStages(Stages):
    """Base of the backends that run an engine directory's graphs or plans."""

    def _init_from_manifest(self, manifest: EngineManifest) -> None:
        """Set what follows from the manifest alone (``self.device`` must be set)."""
        self.manifest = manifest
        self.dtype = torch_dtype(float_dtype(manifest.precision))
        self.window = manifest.window
        self.ddim = DDIMSettings.from_dict(dict(manifest.ddim))
        self.capabilities = engine_capabilities(manifest)
        self.text_embedding = torch.from_numpy(manifest.text_embedding()).to(self.device, self.dtype).contiguous()

    def check_shape(self, width: int, height: int) -> None:
        """EngineError unless the graphs were built for ``width`` x ``height``."""
        m = self.manifest
        if (width, height) != m.shape:
            raise EngineError(f"{m.directory}: built for {shape_label(*m.shape)}, this request is "
                              f"{shape_label(width, height)}; {m.rebuild_hint(width=width, height=height)}")

    def _in(self, t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """A stage input: on the device, in the engine's dtype (or ``dtype``), contiguous."""
        return t.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def _t(self, t: Tensor) -> Tensor:
        """The timestep input: float32 (1,) in every precision."""
        return self._in(t.reshape(1), torch.float32)

    def _unet_inputs(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor],
                     bank: Sequence[Tensor]) -> dict[str, Tensor]:
        """The UNet graph's inputs by name: ``down_i`` from the first residuals, ``mid``
        from the last, ``bank_j`` from the bank (EngineError when the counts differ)."""
        names = self.manifest.spec("unet").input_names
        downs = [n for n in names if n.startswith("down_")]
        banks = [n for n in names if n.startswith("bank_")]
        if len(residuals) != len(downs) + 1 or len(bank) != len(banks):
            raise EngineError(f"unet: expected {len(downs) + 1} residuals and {len(banks)} bank tensors, "
                              f"got {len(residuals)} and {len(bank)}")
        return {"latents": latents, "timestep": t, **dict(zip(downs, residuals[:-1])), "mid": residuals[-1],
                **dict(zip(banks, bank))}

    def unet_cond(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]) -> Tensor:
        """The guided graph's conditional half: one UNet graph per engine directory, at the
        price of the unconditional half's work from the mid block on."""
        return self.unet_guided(latents, t, residuals, bank)[1]
