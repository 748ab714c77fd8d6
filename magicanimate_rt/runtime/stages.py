"""The stage interface: what every backend (torch, ONNX Runtime, TensorRT, torch-CUDA)
implements, and all the sampling loop knows about.

Every tensor in and out lives on the backend's ``device`` in its ``dtype`` (timesteps are
float32 tensors of shape (1,)); shapes use W x H = the output width and height (W = H = size
for a square), (h, w) = (H, W) / 8, F = window length, N = a batch of frames. Backends are
context managers; ``close()`` frees what they hold.

What the planner (``runtime/planner.py``) may ask of a backend is declared,
with defaults, not probed: :attr:`Stages.capabilities` (:class:`Capabilities`: windows per
UNet call, the two-part ControlNet, each stage's largest batch),
:meth:`Stages.memory_model` (working memory per call, see docs/PERFORMANCE.md "Memory";
None: the pipeline uses fixed chunk sizes) and :meth:`Stages.check_shape` (the output shapes
it runs: fixed-shape engines one). The plan keeps within the declared maxima, so a backend
never re-chunks a call behind the plan's back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Capabilities:
    """What a backend's stages accept, as the planner needs to know it (``None``: no limit).

    Fields:
        max_windows_per_call: windows one ``unet_guided`` / ``unet_cond`` call takes
            (fixed-shape engines: 1; the torch backend: any).
        controlnet_in_two_parts: the backend offers ``controlnet_embed`` and
            ``controlnet_embedded``, so the loop can embed each driving frame once per
            request instead of once per step.
        max_controlnet_frames: frames one ``controlnet`` call takes (an engine's profile max).
        max_decode_frames: frames one ``decode`` call takes.
        max_encode_images: images one ``encode_reference`` call takes.
        deep_cache: the backend offers ``unet_cached`` and ``controlnet_shallow``, the two
            calls of deep-feature reuse (``runtime/modes.py``; the torch backend).
        lean_unet: the backend follows a plan's lean UNet settings
            (:meth:`Stages.follow_plan`): the guided call's two CFG halves one after the
            other, and feed-forwards in chunks of tokens (the torch backend).
        residency: the backend offers :meth:`Stages.set_resident`: stages can leave the
            device while idle (the torch backend on CUDA: to pinned host memory).
    """

    max_windows_per_call: Optional[int] = 1
    controlnet_in_two_parts: bool = False
    deep_cache: bool = False
    lean_unet: bool = False
    residency: bool = False
    max_controlnet_frames: Optional[int] = None
    max_decode_frames: Optional[int] = None
    max_encode_images: Optional[int] = None


@dataclass(frozen=True)
class MemoryModel:
    """Working memory of the loop's parts in bytes, as a backend estimates them for one
    output shape (``TorchStages.memory_model``). Only the residual size is exact (it follows
    from the shapes); the others are measured peaks of this runtime's calls, rounded up
    (see docs/PERFORMANCE.md, "Memory").

    Fields:
        residuals_per_frame: the 13 ControlNet residuals of one frame.
        unet_per_window: peak working memory of one guided UNet call per window in it.
        controlnet_per_frame: peak working memory of a ControlNet call per frame in it.
        decode_per_frame: peak working memory of a VAE decode call per frame in it.
        control_embedding_per_frame: one frame's ControlNet conditioning embedding (kept
            for the request when the plan embeds the driving frames once).
        bank_per_step: one timestep's reference bank (exact: it follows from the shapes).
        appearance_call: peak working memory of one appearance-encoder call.
        unet_per_window_sequential: ``unet_per_window`` with the guided call's two CFG
            halves one after the other (0: the backend cannot).
        ff_chunk_saving: what feed-forwards in chunks of ``FF_CHUNK_TOKENS`` tokens take
            off a window's UNet working memory (0: the backend cannot).
    """

    residuals_per_frame: int
    unet_per_window: int
    controlnet_per_frame: int
    decode_per_frame: int
    control_embedding_per_frame: int = 0
    bank_per_step: int = 0
    appearance_call: int = 0
    unet_per_window_sequential: int = 0
    ff_chunk_saving: int = 0

    def unet_window(self, cfg_sequential: bool = False, ff_chunk: bool = False) -> int:
        """A window's UNet working memory with the lean settings asked for (those the
        backend does not offer change nothing). One half at a time also halves the rows
        whose feed-forward the chunking shrinks."""
        sequential = cfg_sequential and self.unet_per_window_sequential > 0
        base = self.unet_per_window_sequential if sequential else self.unet_per_window
        if not ff_chunk or not self.ff_chunk_saving:
            return base
        return max(base - self.ff_chunk_saving // (2 if sequential else 1), base // 4)


#: tokens of each row per feed-forward chunk of the lean UNet (``LoopPlan.ff_chunk``):
#: at SD 1.5's top level at 512 px a row has 64 x 64 = 4096 tokens, whose GEGLU activations
#: (12 x 320 channels) for the 32 rows of a guided window take 1 GB in fp16; in chunks of
#: 1024 tokens a quarter of that
FF_CHUNK_TOKENS = 1024


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
    #: what the planner may ask of these stages (see :class:`Capabilities`)
    capabilities: Capabilities = Capabilities()

    def memory_model(self, width: int, height: Optional[int] = None) -> Optional[MemoryModel]:
        """Working-memory estimates of this backend's calls at output shape ``width`` x
        ``height`` (``height`` None: a square); None when the backend has none (the
        pipeline then plans without a budget)."""
        return None

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of each stage's weights on the device ("vae", "appearance_encoder",
        "controlnet", "unet"); empty when the backend cannot say (the residency planner
        then counts no weights)."""
        return {}

    def set_resident(self, stages: Sequence[str]) -> None:
        """Where ``capabilities.residency``: keep exactly ``stages`` (names as in
        :meth:`weight_bytes`) on the device and move the others' weights off it (copies
        queued without a host sync). Default: nothing moves."""

    def follow_plan(self, plan) -> None:
        """The calls that follow run as ``plan`` (``planner.RequestPlan``) says: at the start
        of a request (:meth:`begin_request`) and after an out-of-memory step-down to the
        plan's next rung. Where ``capabilities.lean_unet``: the UNet's lean settings (same
        function): the guided call's two CFG halves one after the other
        (``plan.loop.cfg_sequential``), feed-forwards ``plan.loop.ff_chunk`` tokens at a time
        (None: whole). Default: a plan with lean settings is refused."""
        if plan.loop.cfg_sequential or plan.loop.ff_chunk is not None:
            raise NotImplementedError(f"the {self.name} backend has no lean UNet settings")

    def check_shape(self, width: int, height: int) -> None:
        """Raise (with how to fix it) when these stages cannot produce ``width`` x ``height``
        output; the pipeline asks before any work. Default: any shape."""

    def begin_request(self, width: int, height: int, plan) -> None:
        """The pipeline calls this once a request's output shape and its whole plan
        (``planner.RequestPlan``) are known, before the request's first stage call: the
        backend follows the plan (:meth:`follow_plan`; the torch backend also loads its
        compile cache for those shapes)."""
        self.follow_plan(plan)

    def end_request(self) -> None:
        """The pipeline calls this after a request's last stage call, or when it failed or
        was stopped (in ``finally``): the backend's per-request state is a fresh one's again
        (the torch backend: its own UNet settings; it saves what the request compiled).
        Default: nothing."""

    @abstractmethod
    def encode_reference(self, image: Tensor) -> Tensor:
        """image (B, 3, H, W), pixel values 0..255 -> reference latents (B, 4, h, w); the
        pipeline encodes one source (B = 1 <= ``capabilities.max_encode_images``)."""

    @abstractmethod
    def bank(self, ref_latent: Tensor, t: Tensor) -> list[Tensor]:
        """r (1, 4, h, w), t (1,) -> the reference bank: tensors (1, L_j, C_j), mid then up."""

    @abstractmethod
    def controlnet(self, latents: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        """latents (N, 4, h, w), t (1,), cond (N, 3, H, W) in [0, 1] -> 13 residuals:
        12 down (N, C_i, h_i, w_i), then mid. N <= ``capabilities.max_controlnet_frames``."""

    def controlnet_embed(self, cond: Tensor) -> Tensor:
        """The ControlNet's first part (where ``capabilities.controlnet_in_two_parts``):
        cond (N, 3, H, W) in [0, 1] -> conditioning embedding (N, C_0, h, w)."""
        raise NotImplementedError(f"the {self.name} backend runs the ControlNet in one part")

    def controlnet_embedded(self, latents: Tensor, t: Tensor, embedding: Tensor) -> list[Tensor]:
        """The ControlNet's second part: latents (N, 4, h, w), t, the frames' embedding ->
        the 13 residuals, as :meth:`controlnet`."""
        raise NotImplementedError(f"the {self.name} backend runs the ControlNet in one part")

    @abstractmethod
    def unet_guided(
        self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """B windows, B <= ``capabilities.max_windows_per_call``: latents (B, 4, F, h, w),
        the windows' 13 residuals (B*F, ...) (window k's frames are rows k*F .. k*F+F-1),
        the bank -> (eps_uncond, eps_cond), each (B, 4, F, h, w)."""

    @abstractmethod
    def unet_cond(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]) -> Tensor:
        """The conditional half alone (guidance scale 1.0): -> eps_cond (B, 4, F, h, w)."""

    def unet_cached(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor],
                    depth: int, deep: Optional[Tensor], guided: bool) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """Deep-feature reuse (where ``capabilities.deep_cache``): ``deep`` None: the whole
        UNet (13 residuals) -> (eps_uncond or None, eps_cond, the feature entering the last
        ``depth`` up blocks); ``deep`` given: only the shallow part, with the first
        ``shallow_skips(depth)`` down residuals."""
        raise NotImplementedError(f"the {self.name} backend has no deep-feature reuse")

    def deep_feature_bytes(self, width: int, height: int, depth: int) -> int:
        """Bytes of the feature deep-feature reuse keeps for one window (both CFG halves)."""
        raise NotImplementedError(f"the {self.name} backend has no deep-feature reuse")

    def shallow_skips(self, depth: int) -> int:
        """The down residuals the shallow part of depth ``depth`` reads."""
        raise NotImplementedError(f"the {self.name} backend has no deep-feature reuse")

    def controlnet_shallow(self, latents: Tensor, t: Tensor, control: Tensor, skips: int, embedded: bool) -> list[Tensor]:
        """The first ``skips`` down residuals only (``control``: the conditioning in [0, 1],
        or its embedding when ``embedded``)."""
        raise NotImplementedError(f"the {self.name} backend has no deep-feature reuse")

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """latents (N, 4, h, w) -> frames (N, 3, H, W) in [0, 1].
        N <= ``capabilities.max_decode_frames``."""

    def close(self) -> None:
        """Free what the backend holds (device memory, sessions)."""

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
