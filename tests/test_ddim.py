"""DDIM sampler: against diffusers' DDIMScheduler and the original's recorded stage."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from magicanimate_rt.errors import InputError
from magicanimate_rt.runtime import ddim
from magicanimate_rt.runtime.ddim import DDIMSampler, DDIMSettings, ddim_timesteps


def reference_scheduler(steps: int, beta_schedule: str = "linear") -> DDIMScheduler:
    """diffusers' DDIM configured as MagicAnimate's inference config."""
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=beta_schedule,
        steps_offset=1,
        set_alpha_to_one=True,
        clip_sample=False,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(steps)
    return scheduler


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_25_steps_are_961_down_to_1():
    assert ddim_timesteps(25) == list(range(961, 0, -40))


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps", [1, 3, 7, 25, 50])
def test_matches_diffusers(steps, beta_schedule):
    reference = reference_scheduler(steps, beta_schedule)
    sampler = DDIMSampler(steps, DDIMSettings(beta_schedule=beta_schedule))
    assert sampler.timesteps == reference.timesteps.tolist()
    assert [int(t.item()) for t in sampler.timestep_tensors] == sampler.timesteps

    generator = torch.Generator().manual_seed(steps)
    sample = torch.randn(1, 4, 3, 8, 8, generator=generator)
    eps = torch.randn(1, 4, 3, 8, 8, generator=generator)
    # Every step, including the last one (which lands on alpha = 1).
    for i, t in enumerate(sampler.timesteps):
        expected = reference.step(eps, t, sample).prev_sample
        actual = sampler.step(i, sample, eps)
        assert actual.dtype == torch.float32
        assert relative_l2(actual, expected) < 1e-6, (steps, i, t)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    expected = reference_scheduler(1, beta_schedule).alphas_cumprod
    assert torch.equal(ddim.alphas_cumprod(DDIMSettings(beta_schedule=beta_schedule)), expected)


def test_last_step_lands_on_clean_sample():
    # set_alpha_to_one: with a_prev = 1, x_prev is exactly the predicted x0.
    sampler = DDIMSampler(25)
    a_1 = reference_scheduler(25).alphas_cumprod[1]
    sample = torch.randn(2, 3)
    eps = torch.randn(2, 3)
    x0 = (sample - (1 - a_1) ** 0.5 * eps) / a_1**0.5
    torch.testing.assert_close(sampler.step(24, sample, eps), x0, rtol=1e-6, atol=1e-6)


def test_matches_original_stage(shared_dir):
    stages = np.load(shared_dir / "conformance" / "stages.npz")
    assert ddim_timesteps(25) == stages["ddim_timesteps_25"].tolist()

    sampler = DDIMSampler(25)
    i = sampler.timesteps.index(int(stages["ddim_t"]))
    prev = sampler.step(i, torch.from_numpy(stages["ddim_sample"]), torch.from_numpy(stages["ddim_eps"]))
    assert relative_l2(prev, torch.from_numpy(stages["ddim_prev"])) < 1e-6


def test_half_precision_sample_is_updated_in_float32():
    sampler = DDIMSampler(25)
    sample = torch.randn(1, 4, 2, 8, 8)
    eps = torch.randn(1, 4, 2, 8, 8)
    half = sampler.step(0, sample.half(), eps.half())
    assert half.dtype == torch.float16
    # The update of the rounded inputs, computed in float32 then rounded once.
    expected = sampler.step(0, sample.half().float(), eps.half().float()).half()
    assert torch.equal(half, expected)


def test_timestep_tensor_dtypes():
    assert all(t.dtype == torch.float32 and t.shape == (1,) for t in DDIMSampler(5).timestep_tensors)
    int_sampler = DDIMSampler(5, dtype=torch.int64)
    assert [int(t) for t in int_sampler.timestep_tensors] == int_sampler.timesteps
    with pytest.raises(InputError, match="exactly"):
        DDIMSampler(25, dtype=torch.bfloat16)  # 961 is not a bfloat16


def test_settings_round_trip_through_json():
    settings = DDIMSettings(beta_schedule="scaled_linear")
    assert DDIMSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert DDIMSettings.from_dict({}) == DDIMSettings()
    assert DDIMSettings().to_dict()["beta_schedule"] == "linear"


@pytest.mark.parametrize(
    "change",
    [
        {"eta": 0.5},
        {"prediction_type": "v_prediction"},
        {"clip_sample": True},
        {"timestep_spacing": "trailing"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_start": 0.02},
        {"num_train_timesteps": 0},
    ],
)
def test_unsupported_settings_are_refused(change):
    with pytest.raises(InputError):
        DDIMSettings(**change)


def test_unknown_settings_key_is_refused():
    with pytest.raises(InputError, match="unknown keys"):
        DDIMSettings.from_dict({"betas": [0.1]})


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_step_counts(steps):
    with pytest.raises(InputError, match="steps"):
        DDIMSampler(steps)


def test_1000_steps_would_need_timestep_1000():
    # diffusers itself fails here (IndexError in step); we refuse at construction.
    with pytest.raises(InputError, match="timestep 1000"):
        ddim_timesteps(1000)
    assert ddim_timesteps(1000, DDIMSettings(steps_offset=0))[0] == 999


def test_runtime_module_does_not_import_diffusers():
    # The runtime stands alone (STYLE.md 2); a static look at the imports is enough, and
    # avoids paying for a second interpreter start.
    tree = ast.parse(Path(ddim.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "dataclasses", "torch", "magicanimate_rt.errors"}, imported
