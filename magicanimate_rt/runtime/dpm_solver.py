"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models"): multistep, second order, data prediction, for epsilon
models. An opt-in sampler (``runtime/modes.py``); DDIM stays the default.

It runs on the DDIM settings' noise schedule (MagicAnimate's linear betas) and on DDIM's
timesteps ("leading" spacing, steps_offset 1: 961, 921, ..., 1 for 25 steps), and lands
on the clean sample after the last (final sigma 0), so at a step count it visits the same
timesteps as DDIM and only the update differs. The arithmetic is diffusers'
``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_order=2``,
``solver_type="midpoint"``, ``final_sigmas_type="zero"`` and the timesteps passed in
(``tests/test_fast_modes.py`` checks every step against it in float64): the first step and
the last are first order (the last because its target sigma is 0), the others second order.
Its coefficients are computed here on the host in float64 from diffusers' float32 sigmas,
and the update runs in the sample's dtype promoted to at least float32.

State: the previous step's data prediction, kept for the second-order update; a sampler
serves one request (the pipeline makes one per request), and steps must be taken in order.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from .ddim import DDIMSettings, alphas_cumprod, ddim_timesteps


class DPMSolverPP2M:
    """Same interface as :class:`~.ddim.DDIMSampler`: ``timesteps``, ``timestep_tensors``,
    ``step(i, sample, eps)``."""

    def __init__(self, steps: int, settings: DDIMSettings = DDIMSettings(), device="cpu",
                 dtype: torch.dtype = torch.float32):
        self.settings = settings
        self.steps = steps
        self.device = torch.device(device)
        self.timesteps = ddim_timesteps(steps, settings)
        self.timestep_tensors = [torch.tensor([t], dtype=dtype, device=self.device) for t in self.timesteps]
        a = alphas_cumprod(settings)
        # diffusers: sigmas = ((1 - a) / a) ** 0.5 in float32, read at the timesteps, a 0 appended
        sig = ((1 - a) / a) ** 0.5
        sigmas = [float(sig[t]) for t in self.timesteps] + [0.0]
        self.sigmas = sigmas
        self._alpha = [1.0 / math.sqrt(s * s + 1.0) for s in sigmas]
        self._sigma = [s * al for s, al in zip(sigmas, self._alpha)]
        self._lambda = [math.log(al) - math.log(s) if s > 0 else math.inf for s, al in zip(self._sigma, self._alpha)]
        self._prev_x0 = None
        self._next = 0

    def __len__(self) -> int:
        return self.steps

    def order(self, i: int) -> int:
        """1 for the first and the last step, else 2."""
        return 1 if i == 0 or i == self.steps - 1 else 2

    def step(self, i: int, sample: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t (timesteps[i]) and the model's noise prediction -> the sample at the next
        timestep (the clean sample after the last)."""
        if i != self._next:
            raise InputError(f"DPM-Solver++ steps must run in order: expected step {self._next}, got {i}")
        self._next += 1
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x, e = sample.to(dtype), eps.to(dtype)
        alpha_s, sigma_s = self._alpha[i], self._sigma[i]
        alpha_t, sigma_t = self._alpha[i + 1], self._sigma[i + 1]
        x0 = (x - sigma_s * e) / alpha_s  # data prediction
        h = self._lambda[i + 1] - self._lambda[i]
        phi = math.exp(-h) - 1.0  # exp(-inf) = 0 at the last step
        if self.order(i) == 1:
            prev = (sigma_t / sigma_s) * x - (alpha_t * phi) * x0
        else:
            r0 = (self._lambda[i] - self._lambda[i - 1]) / h
            d1 = (1.0 / r0) * (x0 - self._prev_x0)
            prev = (sigma_t / sigma_s) * x - (alpha_t * phi) * x0 - 0.5 * (alpha_t * phi) * d1
        self._prev_x0 = x0
        return prev.to(sample.dtype)
