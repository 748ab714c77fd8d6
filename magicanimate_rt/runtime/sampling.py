"""The sampling loop (REFERENCE section 4): DDIM over overlapping windows with CFG.

It knows only the stage interface (:class:`~.stages.Stages`); tensors stay on the
backend's device for the whole loop, and nothing here reads them back to the host.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .ddim import DDIMSampler
from .stages import Stages
from .timing import StageTimer
from .windows import context_windows


def initial_noise(seed: int, num_frames: int, latent_size: int, window: int = 16) -> Tensor:
    """z ~ N(0, 1) of shape (1, 4, window, h, w) from a CPU float32 generator seeded with
    ``seed``, tiled along frames to ``num_frames`` (a multiple of ``window``): every
    window-long segment starts from the same noise, as in the original. On the CPU so that
    a seed gives the same video on every backend."""
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randn((1, 4, window, latent_size, latent_size), generator=g, dtype=torch.float32)
    return z.repeat(1, 1, num_frames // window, 1, 1)


def controlnet_all_frames(stages: Stages, latents: Tensor, t: Tensor, control: Tensor, chunk: int) -> list[Tensor]:
    """ControlNet residuals of every frame, computed in chunks of ``chunk`` frames (the
    batching changes nothing else). latents (1, 4, N, h, w), control (N, 3, S, S)
    -> 13 tensors (N, C_i, h_i, w_i)."""
    frames = latents[0].transpose(0, 1)  # (N, 4, h, w)
    n = frames.shape[0]
    parts = [stages.controlnet(frames[i : i + chunk], t, control[i : i + chunk]) for i in range(0, n, chunk)]
    if len(parts) == 1:
        return parts[0]
    return [torch.cat(rs, dim=0) for rs in zip(*parts)]


def denoise(
    stages: Stages,
    ref_latent: Tensor,
    control: Tensor,
    latents: Tensor,
    sampler: DDIMSampler,
    guidance_scale: float,
    overlap: int = 4,
    controlnet_chunk: int = 16,
    timer: Optional[StageTimer] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> Tensor:
    """Run every DDIM step on ``latents`` (1, 4, N, h, w), N a multiple of the window.

    Per step t: (1) the bank from the reference latent; (2) ControlNet residuals for all
    frames; (3) for each window the UNet's two CFG halves (one guided call), added into
    per-frame running sums, then divided by each frame's visit count; (4) guidance
    eps = eps_u + g (eps_c - eps_u); (5) one DDIM update. With g == 1 only the
    conditional half is computed (the guidance formula then gives eps_c).
    """
    timer = timer or StageTimer(latents.device)
    n = latents.shape[2]
    device = latents.device
    windows = [torch.tensor(w, device=device) for w in context_windows(n, stages.window, overlap)]
    counts = torch.zeros(n, device=device, dtype=latents.dtype)
    for idx in windows:
        counts.index_add_(0, idx, torch.ones(len(idx), device=device, dtype=latents.dtype))
    counts = counts.view(1, 1, n, 1, 1)
    guided = guidance_scale != 1.0

    for i, t in enumerate(sampler.timestep_tensors):
        with timer.stage("appearance_encoder"):
            bank = stages.bank(ref_latent, t)
        with timer.stage("controlnet"):
            residuals = controlnet_all_frames(stages, latents, t, control, controlnet_chunk)
        sum_c = torch.zeros_like(latents)
        sum_u = torch.zeros_like(latents) if guided else None
        with timer.stage("unet"):
            for idx in windows:
                lat_w = latents.index_select(2, idx)
                res_w = [r.index_select(0, idx) for r in residuals]
                if guided:
                    eps_u, eps_c = stages.unet_guided(lat_w, t, res_w, bank)
                    sum_u.index_add_(2, idx, eps_u)
                else:
                    eps_c = stages.unet_cond(lat_w, t, res_w, bank)
                sum_c.index_add_(2, idx, eps_c)
        with timer.stage("scheduler"):
            eps = sum_c / counts
            if guided:
                eps_u = sum_u / counts
                eps = eps_u + guidance_scale * (eps - eps_u)
            latents = sampler.step(i, latents, eps)
        if on_step is not None:
            on_step(i)
    return latents
