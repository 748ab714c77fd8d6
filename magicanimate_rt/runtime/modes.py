"""Opt-in fast sampling (README "Faster, approximately"): what a request may trade for speed.

Every default reproduces the original (``SamplingMode()`` is "exact"). The other settings
change the function, each by a known kind of approximation, and each is off at its
default value, where the loop runs exactly today's path:

- ``sampler="dpmpp-2m"``: DPM-Solver++(2M) (Lu et al. 2022, multistep, second order) on
  the same model, noise schedule and timesteps, instead of DDIM (first order). Good at
  fewer steps (15-20 instead of 25). ``runtime/dpm_solver.py``.
- ``cache_interval=N`` (1 = off): DeepCache-style reuse (Ma et al. 2024). Every N-th step
  runs the whole UNet and keeps, per window and CFG half, the feature entering its last
  ``cache_depth`` up blocks; the steps between run only the shallow part (conv_in, the
  down blocks up to the skips those up blocks read, those up blocks, the output head) on
  that kept feature, and the ControlNet only up to the residuals the shallow part adds.
- ``guidance_until=f`` (1.0 = always): classifier-free guidance for the first fraction f
  of the steps (``ceil(f * steps)`` of them), then the conditional half alone (the
  guidance formula with g = 1).

Presets: "exact" (the default) and "fast" (DPM-Solver++(2M) at 15 steps, deep-feature
reuse every 3rd step at depth 1, guidance for the first half), measured in
docs/PERFORMANCE.md "Faster, approximately".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

from ..errors import InputError

SAMPLERS = ("ddim", "dpmpp-2m")
#: the original's step count, when neither a request nor its mode names one (here, beside
#: the presets' own counts; ``runtime/request.py`` declares the request's steps with it)
DEFAULT_STEPS = 25


@dataclass(frozen=True)
class SamplingMode:
    """Fields:
        sampler: "ddim" (the original, exact) or "dpmpp-2m".
        cache_interval: every N-th step runs the whole UNet, the others its shallow part on
            kept deep features (1: every step whole, the original).
        cache_depth: how many of the UNet's last up blocks the shallow part runs (1 .. the
            number of up blocks - 1).
        guidance_until: the fraction of the steps (from the first) that use classifier-free
            guidance; the rest run the conditional half only (1.0: all, the original).
        steps: the step count this mode is meant for (None: the request's, default 25); a
            request's explicit ``steps`` wins.
    """

    sampler: str = "ddim"
    cache_interval: int = 1
    cache_depth: int = 1
    guidance_until: float = 1.0
    steps: Optional[int] = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        for name in ("cache_interval", "cache_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        g = self.guidance_until
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0:
            raise InputError(f"guidance_until must be a number in 0..1, got {g!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise InputError(f"steps must be an integer >= 1, got {self.steps!r}")

    @classmethod
    def preset(cls, name: str) -> "SamplingMode":
        try:
            return PRESETS[name]
        except KeyError:
            raise InputError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}") from None

    @property
    def is_exact(self) -> bool:
        """Whether this computes the original's function (the step count aside)."""
        return self.sampler == "ddim" and self.cache_interval == 1 and self.guidance_until == 1.0

    def with_steps(self, steps: Optional[int]) -> "SamplingMode":
        return replace(self, steps=steps)

    def request_steps(self, steps: Optional[int]) -> int:
        """The step count of a request: its own, else this mode's, else the original's
        (:data:`DEFAULT_STEPS`)."""
        return steps if steps is not None else (self.steps if self.steps is not None else DEFAULT_STEPS)

    def guided_steps(self, steps: int) -> int:
        """How many of the first steps use guidance: ceil(guidance_until * steps)."""
        return steps if self.guidance_until >= 1.0 else math.ceil(self.guidance_until * steps - 1e-9)

    def policy(self, steps: int) -> "StepPolicy":
        """What this mode decides at each of a request's ``steps`` steps."""
        return StepPolicy(guided_steps=self.guided_steps(steps) if self.guidance_until < 1.0 else None,
                          cache_interval=self.cache_interval, cache_depth=self.cache_depth)

    def describe(self) -> str:
        if self.is_exact and self.steps is None:
            return "exact (DDIM, every step whole, guidance throughout)"
        parts = [self.sampler]
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.cache_interval > 1:
            parts.append(f"deep features reused {self.cache_interval - 1} of every {self.cache_interval} steps "
                         f"(depth {self.cache_depth})")
        if self.guidance_until < 1.0:
            parts.append(f"guidance for the first {self.guidance_until:g} of the steps")
        return ", ".join(parts)


@dataclass(frozen=True)
class StepPolicy:
    """A mode's decisions per step of the loop (``sampling.denoise`` asks them; at the
    defaults every step is guided and whole: the exact path).

    Fields:
        guided_steps: steps 0 .. guided_steps - 1 use guidance, the rest the conditional
            half alone (None: every step; partial guidance, ``guidance_until``).
        cache_interval: steps ``i % cache_interval == 0`` run the whole UNet and keep each
            call's deep feature; the others run its shallow part on it (deep-feature reuse).
        cache_depth: the up blocks the shallow part runs.
    """

    guided_steps: Optional[int] = None
    cache_interval: int = 1
    cache_depth: int = 1

    @property
    def reuses_deep_features(self) -> bool:
        return self.cache_interval > 1

    def guided(self, i: int) -> bool:
        """Whether step ``i`` uses guidance (when the request's guidance is not 1)."""
        return self.guided_steps is None or i < self.guided_steps

    def whole(self, i: int) -> bool:
        """Whether step ``i`` runs the whole UNet (else the shallow part on kept features)."""
        return self.cache_interval <= 1 or i % self.cache_interval == 0


PRESETS = {
    "exact": SamplingMode(),
    "fast": SamplingMode(sampler="dpmpp-2m", cache_interval=3, cache_depth=1, guidance_until=0.5, steps=15),
}


def resolve_mode(mode: Union[str, SamplingMode, None]) -> SamplingMode:
    """A preset name, a SamplingMode or None (exact) -> a SamplingMode."""
    if mode is None:
        return PRESETS["exact"]
    if isinstance(mode, SamplingMode):
        return mode
    if isinstance(mode, str):
        return SamplingMode.preset(mode)
    raise InputError(f"mode must be a preset name or a SamplingMode, got {type(mode).__name__}")


def make_sampler(name: str, steps: int, settings, device, dtype=None):
    """The sampler of ``name`` over ``steps`` steps of the DDIM settings' schedule."""
    import torch

    from .ddim import DDIMSampler
    from .dpm_solver import DPMSolverPP2M

    kind = DDIMSampler if name == "ddim" else DPMSolverPP2M
    return kind(steps, settings, device=device, dtype=dtype or torch.float32)
