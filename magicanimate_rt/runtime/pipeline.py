"""The public API: one photo + a DensePose motion video -> an animation.

```python
from magicanimate_rt import AnimationPipeline

with AnimationPipeline.from_pretrained("pretrained_models") as pipe:
    result = pipe.animate("me.png", "dance.mp4", size=512, steps=25, guidance_scale=7.5, seed=0)
result.frames    # (F0, 512, 512, 3) uint8
result.latents   # (1, 4, N, 64, 64) float32, N = F0 padded to a multiple of 16
result.timings   # seconds per stage
```
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from .backends import engine_factory, pretrained_factory
from .ddim import DDIMSampler, DDIMSettings
from .media import load_source_image, read_video, resize_frames
from .sampling import denoise, initial_noise
from .stages import Stages
from .timing import StageTimer
from .windows import padded_length


@dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline batches its work; every setting gives the same frames.

    Fields:
        overlap: frames shared by consecutive 16-frame windows (4, the original's).
        controlnet_chunk: frames per ControlNet call (the original: 16).
        decode_chunk: frames per VAE decode call (the original: 1).
    """

    overlap: int = 4
    controlnet_chunk: int = 16
    decode_chunk: int = 8

    @classmethod
    def original(cls) -> "PipelineOptions":
        """The original implementation's batching."""
        return cls(controlnet_chunk=16, decode_chunk=1)

    def __post_init__(self):
        for name in ("controlnet_chunk", "decode_chunk"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.overlap < 16:
            raise InputError(f"overlap must be in 0..15, got {self.overlap!r}")


@dataclass
class AnimationResult:
    frames: np.ndarray  #: (F0, size, size, 3) uint8
    latents: Tensor  #: (1, 4, N, size/8, size/8) float32 on the CPU, before decode
    timings: dict[str, float] = field(default_factory=dict)  #: seconds per stage, and "total"


def validate_settings(size, steps, guidance_scale) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 64:
        raise InputError(f"size must be a positive multiple of 64, got {size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 1:
        raise InputError(f"guidance scale must be a number >= 1, got {guidance_scale!r}")


class AnimationPipeline:
    """Drives one backend's stages through MagicAnimate's sampling (REFERENCE 2 and 4)."""

    def __init__(self, stages: Stages, ddim: DDIMSettings = DDIMSettings(),
                 options: PipelineOptions = PipelineOptions()):
        self.stages = stages
        self.ddim = ddim
        self.options = options

    @classmethod
    def from_pretrained(cls, models_dir, backend: str = "torch", device="cpu", dtype="float32",
                        backend_options=None, options: PipelineOptions = PipelineOptions()):
        """Load a model directory in the real layout (README 'Weights'). ``backend_options``
        goes to the backend (e.g. ``TorchOptions`` for "torch")."""
        extra = {} if backend_options is None else {"options": backend_options}
        return cls(pretrained_factory(backend)(models_dir, device=device, dtype=dtype, **extra), options=options)

    @classmethod
    def from_engines(cls, engine_dir, backend: str = "onnxruntime", device="cpu", backend_options=None,
                     options: PipelineOptions = PipelineOptions()):
        """Load an engine directory written by build_engines.py."""
        extra = {} if backend_options is None else {"options": backend_options}
        stages = engine_factory(backend)(engine_dir, device=device, **extra)
        return cls(stages, ddim=getattr(stages, "ddim", DDIMSettings()), options=options)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self.stages is not None:
            self.stages.close()
            self.stages = None

    def __enter__(self) -> "AnimationPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the call
    @torch.inference_mode()
    def animate(
        self,
        source: Union[str, Path, np.ndarray, "PIL.Image.Image"],  # noqa: F821
        driving: Union[str, Path, np.ndarray],
        size: int = 512,
        steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        progress: Union[bool, Callable[[int, int], None]] = False,
        start_frame: int = 0,
        max_frames: Optional[int] = None,
    ) -> AnimationResult:
        """Animate ``source`` (a path, PIL image or HxWx3 uint8 array) with ``driving`` (a
        video path or (F, H, W, 3) uint8 DensePose frames).

        ``progress``: True for a tqdm bar over the steps, or a callback(step, steps).
        """
        if self.stages is None:
            raise InputError("this pipeline is closed")
        validate_settings(size, steps, guidance_scale)
        t_start = time.perf_counter()
        st = self.stages
        timer = StageTimer(st.device)
        sampler = DDIMSampler(steps, self.ddim, device=st.device)

        with timer.stage("read_inputs"):
            src = load_source_image(source, size)
            ctl = self._driving_frames(driving, size, start_frame, max_frames)
        f0 = ctl.shape[0]
        n = padded_length(f0, st.window)
        if n > f0:  # pad by repeating the last frame (np.pad mode="edge" in the original)
            ctl = np.concatenate([ctl, np.repeat(ctl[-1:], n - f0, axis=0)], axis=0)

        with timer.stage("prepare"):
            image = torch.from_numpy(src).to(st.device).permute(2, 0, 1)[None].to(st.dtype)
            control = torch.from_numpy(ctl).to(st.device).permute(0, 3, 1, 2).to(st.dtype) / 255.0
            latents = initial_noise(seed, n, size // 8, st.window).to(st.device, st.dtype)
        with timer.stage("vae_encode"):
            ref = st.encode_reference(image)

        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="denoising", unit="step")
            on_step = lambda i: bar.update(1)  # noqa: E731
        elif callable(progress):
            on_step = lambda i: progress(i + 1, steps)  # noqa: E731
        else:
            on_step = None
        try:
            latents = denoise(st, ref, control, latents, sampler, float(guidance_scale), self.options.overlap,
                              self.options.controlnet_chunk, timer, on_step)
        finally:
            if bar is not None:
                bar.close()

        with timer.stage("vae_decode"):
            frames = self._decode(latents[:, :, :f0])
        timings = timer.totals()
        timings["total"] = time.perf_counter() - t_start
        return AnimationResult(frames=frames, latents=latents.float().cpu(), timings=timings)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _driving_frames(driving, size, start_frame, max_frames) -> np.ndarray:
        if isinstance(driving, (str, Path)):
            return read_video(driving, size=size, start_frame=start_frame, max_frames=max_frames)
        arr = np.asarray(driving)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InputError(f"driving frames must be an (F, H, W, 3) uint8 array, got {arr.shape} {arr.dtype}")
        arr = arr[start_frame:]
        if max_frames is not None:
            arr = arr[:max_frames]
        if arr.shape[0] == 0:
            raise InputError("driving video has no frames")
        return resize_frames(arr, size)

    def _decode(self, latents: Tensor) -> np.ndarray:
        """(1, 4, F0, h, w) -> (F0, S, S, 3) uint8, decoded in chunks; the host sees the
        frames once."""
        frames = latents[0].transpose(0, 1)
        k = self.options.decode_chunk
        out = [self.stages.decode(frames[i : i + k]) for i in range(0, frames.shape[0], k)]
        video = torch.cat(out).float()
        # (video * 255) truncated to uint8, as the original saves it
        return (video * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
