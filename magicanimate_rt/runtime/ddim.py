"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models"), deterministic.

This is the scheduler MagicAnimate samples with (REFERENCE.md section 4): 1000 training
steps, betas *linear* from 0.00085 to 0.012, ``set_alpha_to_one=True``, ``steps_offset=1``,
"leading" timestep spacing, eta 0, epsilon prediction, no sample clipping. It computes the
same numbers as diffusers' ``DDIMScheduler`` with that configuration, without importing
diffusers (the runtime stands alone, STYLE.md 2).

Only what the reference uses is supported: eta 0, epsilon prediction, no clipping,
"leading" spacing. Anything else is refused rather than approximated.

Notation (the paper's): ``a_t`` is alpha-bar, the cumulative product of ``1 - beta`` up to
timestep ``t``; ``a_prev`` is the same at the timestep the step lands on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from magicanimate_rt.errors import InputError

_BETA_SCHEDULES = ("linear", "scaled_linear")


@dataclass(frozen=True)
class DDIMSettings:
    """The DDIM configuration; the defaults are MagicAnimate's. Stored in JSON manifests.

    Fields:
        num_train_timesteps: length of the training noise schedule (timesteps 0..N-1).
        beta_start, beta_end: first and last beta of the training schedule.
        beta_schedule: "linear" (MagicAnimate: betas evenly spaced) or "scaled_linear"
            (Stable Diffusion: square roots evenly spaced). Supported for completeness.
        steps_offset: added to every inference timestep ("leading" spacing starts at 0).
        set_alpha_to_one: the step that lands before timestep 0 uses a_prev = 1.0 (a clean
            sample) instead of a_0.
        timestep_spacing: only "leading" (t = k * (N // steps) + steps_offset).
        eta: only 0.0 (deterministic DDIM).
        prediction_type: only "epsilon" (the model predicts the added noise).
        clip_sample: only False.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = True
    timestep_spacing: str = "leading"
    eta: float = 0.0
    prediction_type: str = "epsilon"
    clip_sample: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise InputError(
                f"DDIM num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}"
            )
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"DDIM {name} must be a number, got {value!r}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise InputError(
                f"DDIM betas must satisfy 0 < beta_start <= beta_end < 1, "
                f"got {self.beta_start!r}, {self.beta_end!r}"
            )
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise InputError(
                f"DDIM beta_schedule must be one of {_BETA_SCHEDULES}, got {self.beta_schedule!r}"
            )
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise InputError(
                f"DDIM steps_offset must be a non-negative integer, got {self.steps_offset!r}"
            )
        if not isinstance(self.set_alpha_to_one, bool):
            raise InputError(f"DDIM set_alpha_to_one must be a bool, got {self.set_alpha_to_one!r}")
        # The rest are fixed by the reference; refusing other values is better than
        # silently running a different sampler.
        if self.timestep_spacing != "leading":
            raise InputError(
                f"DDIM timestep_spacing: only 'leading' is supported, got {self.timestep_spacing!r}"
            )
        if self.eta != 0.0:
            raise InputError(f"DDIM eta: only 0.0 is supported, got {self.eta!r}")
        if self.prediction_type != "epsilon":
            raise InputError(
                f"DDIM prediction_type: only 'epsilon' is supported, got {self.prediction_type!r}"
            )
        if self.clip_sample is not False:
            raise InputError(f"DDIM clip_sample: only False is supported, got {self.clip_sample!r}")

    def to_dict(self) -> dict:
        """All fields as a JSON-serialisable dict (field name -> value)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DDIMSettings":
        """Inverse of :meth:`to_dict`. Unknown keys are an error; missing keys take the
        defaults (which are the reference's values)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"DDIM settings: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def ddim_timesteps(steps: int, settings: DDIMSettings = DDIMSettings()) -> list[int]:
    """The inference timesteps, first (noisiest) to last.

    "Leading" spacing: ``t_k = k * (N // steps) + steps_offset`` for k = steps-1 .. 0.
    With the defaults, 25 steps give 961, 921, ..., 41, 1.

    Raises InputError when ``steps`` is not in 1..num_train_timesteps, or when the offset
    pushes a timestep past the schedule (steps == N with steps_offset >= 1 would need
    t = N, which has no alpha; diffusers fails there with an IndexError).
    """
    n = settings.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n:
        raise InputError(f"DDIM steps must be an integer in 1..{n}, got {steps!r}")
    ratio = n // steps
    timesteps = [k * ratio + settings.steps_offset for k in reversed(range(steps))]
    if timesteps[0] >= n:
        raise InputError(
            f"DDIM steps={steps} with steps_offset={settings.steps_offset} needs timestep "
            f"{timesteps[0]}, outside the {n}-step training schedule; use fewer steps"
        )
    return timesteps


def alphas_cumprod(settings: DDIMSettings = DDIMSettings()) -> torch.Tensor:
    """a_t for t = 0..N-1, shape (N,), float32 on the CPU.

    Computed in float32 with torch's linspace and cumprod, exactly as diffusers does, so the
    coefficients match it bit for bit.
    """
    n = settings.num_train_timesteps
    if settings.beta_schedule == "linear":
        betas = torch.linspace(settings.beta_start, settings.beta_end, n, dtype=torch.float32)
    else:  # "scaled_linear": Stable Diffusion's schedule
        betas = torch.linspace(settings.beta_start**0.5, settings.beta_end**0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class DDIMSampler:
    """Deterministic DDIM over a fixed number of steps, coefficients precomputed on a device.

    Args:
        steps: number of denoising steps (1..num_train_timesteps).
        settings: the scheduler configuration (defaults: MagicAnimate's).
        device: where the per-step tensors live (the device the latents live on).
        dtype: dtype of ``timestep_tensors`` (default float32). It must represent every
            timestep exactly: float32, float16, int32 and int64 do; bfloat16 does not
            (961 -> 960) and is refused. The update itself always runs in float32,
            whatever this is.

    Attributes:
        timesteps: list[int], the ``steps`` timesteps, noisiest first.
        timestep_tensors: list of tensors of shape (1,), dtype ``dtype``, on ``device``, one
            per step, holding ``timesteps[i]``. Shape (1,) so it binds directly as an
            engine input.

    All per-step coefficients are built once here, so :meth:`step` only does device
    arithmetic: no CPU indexing, no host-device copies, no synchronisation.
    """

    def __init__(
        self,
        steps: int,
        settings: DDIMSettings = DDIMSettings(),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.settings = settings
        self.steps = steps
        self.device = torch.device(device)
        self.dtype = dtype
        self.timesteps = ddim_timesteps(steps, settings)
        as_dtype = torch.tensor(self.timesteps, dtype=torch.float64).to(dtype)
        if not torch.equal(as_dtype.to(torch.float64), torch.tensor(self.timesteps, dtype=torch.float64)):
            raise InputError(f"DDIMSampler dtype {dtype} cannot hold the timesteps exactly; use float32")

        a = alphas_cumprod(settings)
        final_alpha = torch.tensor(1.0) if settings.set_alpha_to_one else a[0]
        ratio = settings.num_train_timesteps // steps

        def on_device(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=self.device, dtype=torch.float32)

        self.timestep_tensors: list[torch.Tensor] = []
        self._sqrt_a_t: list[torch.Tensor] = []
        self._sqrt_one_minus_a_t: list[torch.Tensor] = []
        self._sqrt_a_prev: list[torch.Tensor] = []
        self._sqrt_one_minus_a_prev: list[torch.Tensor] = []
        for t in self.timesteps:
            # The step lands on t - N // steps (the next timestep of the schedule); below 0
            # it lands on the clean sample, whose alpha is final_alpha (1.0 by default).
            t_prev = t - ratio
            a_t = a[t]
            a_prev = a[t_prev] if t_prev >= 0 else final_alpha
            # The square roots are taken in float32 on the CPU as diffusers takes them, so
            # every backend gets the same coefficients.
            self.timestep_tensors.append(torch.tensor([t], dtype=dtype, device=self.device))
            self._sqrt_a_t.append(on_device(a_t**0.5))
            self._sqrt_one_minus_a_t.append(on_device((1 - a_t) ** 0.5))
            self._sqrt_a_prev.append(on_device(a_prev**0.5))
            self._sqrt_one_minus_a_prev.append(on_device((1 - a_prev) ** 0.5))

    def __len__(self) -> int:
        return self.steps

    def step(self, i: int, sample: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """One DDIM update from timestep ``timesteps[i]`` to the next (eta 0).

        Args:
            i: step index, 0..steps-1 (a Python int).
            sample: x_t, any shape, floating dtype, on ``device``.
            eps: the model's noise prediction for x_t, same shape as ``sample``.

        Returns:
            x_prev, same shape and dtype as ``sample``. Computed in float32 whatever the
            sample dtype: (1) divides by sqrt(a_t), which is small at high t (about 0.05 at
            t = 961), and would amplify half-precision rounding of the subtraction.
        """
        x = sample.float()
        e = eps.float()
        # (1) predicted clean sample: x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
        x0 = (x - self._sqrt_one_minus_a_t[i] * e) / self._sqrt_a_t[i]
        # (2) direction pointing to x_t (eta 0, so no sigma term): sqrt(1 - a_prev) * eps
        direction = self._sqrt_one_minus_a_prev[i] * e
        # (3) x_prev = sqrt(a_prev) * x0 + direction
        prev = self._sqrt_a_prev[i] * x0 + direction
        return prev.to(sample.dtype)
