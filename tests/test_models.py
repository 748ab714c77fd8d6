"""Per-stage conformance of the PyTorch models against the original's outputs
(../shared/conformance/stages.npz on the tiny random model set), and the guided call.

Conformance (against stages.npz) is float32 at TOL; where two computations of ours are
compared ("same function": the guided call, shared projections, the original's
arithmetic, ...) both run in float64 on the same inputs, at equality.F64_TOL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from equality import F64_TOL, assert_same

from magicanimate_rt.models import load_model_set
from magicanimate_rt.models.layers import ORIGINAL, Arithmetic, attention

TOL = 1e-4  # relative L2, float32 on the CPU (issue 2)


def rel_l2(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def stages(shared_dir):
    return np.load(shared_dir / "conformance" / "stages.npz")


@pytest.fixture(scope="module")
def models(shared_dir):
    return load_model_set(shared_dir / "conformance" / "tiny-models")


@pytest.fixture(scope="module")
def models64(shared_dir):
    return load_model_set(shared_dir / "conformance" / "tiny-models", dtype=torch.float64)


def T(stages, key) -> torch.Tensor:
    return torch.from_numpy(stages[key])


def test_text_embedding(models, stages):
    assert models.text_embedding.shape == stages["text_embedding"].shape
    assert rel_l2(models.text_embedding, stages["text_embedding"]) < TOL


@torch.no_grad()
def test_vae_encode_uses_mse_vae(models, stages):
    images = T(stages, "vae_in_uint8").permute(0, 3, 1, 2).float()
    assert rel_l2(models.vae.encode(images), stages["vae_latent"]) < TOL


@torch.no_grad()
def test_vae_decode(models, stages):
    raw = models.vae.decode_raw(T(stages, "vae_decode_in"))
    assert rel_l2(raw, stages["vae_decode_out"]) < TOL
    # decode() is the clamp(y/2 + 0.5) of the raw output
    expected = np.clip(stages["vae_decode_out"] / 2 + 0.5, 0, 1)
    assert rel_l2(models.vae.decode(T(stages, "vae_decode_in")), expected) < TOL


@torch.no_grad()
def test_reference_bank(models, stages):
    bank = models.appearance_encoder(T(stages, "vae_latent"), torch.tensor([501.0]), models.text_embedding)
    assert len(bank) == int(stages["bank_count"]) == models.unet.num_bank
    for i, b in enumerate(bank):
        assert b.shape == stages[f"bank_{i}"].shape, i
        assert rel_l2(b, stages[f"bank_{i}"]) < TOL, i


@torch.no_grad()
def test_controlnet_residuals(models, stages):
    frames = T(stages, "cn_latents")[0].transpose(0, 1)  # (16, 4, h, w)
    res = models.controlnet(frames, torch.tensor([501.0]), models.text_embedding, T(stages, "cn_cond"))
    assert len(res) == 13
    for i in range(12):
        assert rel_l2(res[i], stages[f"cn_down_{i}"]) < TOL, i
    assert rel_l2(res[12], stages["cn_mid"]) < TOL


def unet_inputs(models, stages):
    """The recorded UNet inputs, in the models' dtype (the timestep stays float32)."""
    dt = models.text_embedding.dtype
    return (
        T(stages, "unet_latents").to(dt),
        torch.tensor([501.0]),
        models.text_embedding,
        [T(stages, f"cn_down_{i}").to(dt) for i in range(12)],
        T(stages, "cn_mid").to(dt),
        [T(stages, f"bank_{i}").to(dt) for i in range(int(stages["bank_count"]))],
    )


@torch.no_grad()
def test_temporal_unet_full_forward_each_half(models, stages):
    lat, t, e, down, mid, bank = unet_inputs(models, stages)
    eps_u = models.unet(lat, t, e, down, mid)  # uncond: no reference attention
    eps_c = models.unet(lat, t, e, down, mid, bank)
    assert rel_l2(eps_u, stages["unet_eps_uncond"]) < TOL
    assert rel_l2(eps_c, stages["unet_eps_cond"]) < TOL
    # the halves really differ (the reference attention is exercised)
    assert rel_l2(eps_u, eps_c) > 1e-2


@torch.no_grad()
def test_guided_call_equals_two_full_forwards(models, models64, stages):
    lat, t, e, down, mid, bank = unet_inputs(models, stages)
    g_u, g_c = models.unet.guided(lat, t, e, down, mid, bank)
    assert rel_l2(g_u, stages["unet_eps_uncond"]) < TOL
    assert rel_l2(g_c, stages["unet_eps_cond"]) < TOL
    lat, t, e, down, mid, bank = unet_inputs(models64, stages)
    g_u, g_c = models64.unet.guided(lat, t, e, down, mid, bank)
    f_u = models64.unet(lat, t, e, down, mid)
    f_c = models64.unet(lat, t, e, down, mid, bank)
    assert_same(g_u, f_u, F64_TOL, "eps_uncond")
    assert_same(g_c, f_c, F64_TOL, "eps_cond")


@torch.no_grad()
def test_resnet_groupnorm_spans_frames(models, stages):
    """The ResNet GroupNorm shares statistics across the window's frames: running the
    frames as separate 1-frame clips (per-frame statistics) must change the output."""
    lat, t, e, down, mid, bank = unet_inputs(models, stages)
    joint = models.unet(lat[:, :, :2], t, e, [d[:2] for d in down], mid[:2])
    split = torch.cat([models.unet(lat[:, :, i : i + 1], t, e, [d[i : i + 1] for d in down], mid[i : i + 1])
                       for i in range(2)], dim=2)
    assert rel_l2(split, joint) > 1e-3


@torch.no_grad()
def test_bank_projected_once_equals_per_frame_projection(models, models64, stages):
    """The saving 'bank K/V projected once per block' is the same function as the
    original's per-frame projection of concat([frame, bank])."""
    per_frame_arithmetic = Arithmetic(bank_kv_per_frame=True)
    lat, t, e, down, mid, bank = unet_inputs(models, stages)
    per_frame = models.unet(lat, t, e, down, mid, bank, arithmetic=per_frame_arithmetic)
    assert rel_l2(per_frame, stages["unet_eps_cond"]) < TOL
    lat, t, e, down, mid, bank = unet_inputs(models64, stages)
    once = models64.unet(lat, t, e, down, mid, bank)
    per_frame = models64.unet(lat, t, e, down, mid, bank, arithmetic=per_frame_arithmetic)
    assert_same(once, per_frame, F64_TOL, "eps_cond")


@torch.no_grad()
def test_original_arithmetic_is_the_same_function(models, models64, stages):
    """The original's arrangement (bank and text K/V per frame, materialised temporal
    attention) matches the conformance outputs, as ours does, in both CFG halves."""
    lat, t, e, down, mid, bank = unet_inputs(models, stages)
    for half, b in (("unet_eps_uncond", None), ("unet_eps_cond", bank)):
        orig = models.unet(lat, t, e, down, mid, b, arithmetic=ORIGINAL)
        assert rel_l2(orig, stages[half]) < TOL
    lat, t, e, down, mid, bank = unet_inputs(models64, stages)
    for half, b in (("eps_uncond", None), ("eps_cond", bank)):
        ours = models64.unet(lat, t, e, down, mid, b)
        orig = models64.unet(lat, t, e, down, mid, b, arithmetic=ORIGINAL)
        assert_same(orig, ours, F64_TOL, half)


@torch.no_grad()
def test_controlnet_in_two_parts_equals_diffusers(models64):
    """Our ControlNet (embedding, then the rest) against diffusers' own forward (float64)."""
    models = models64
    g = torch.Generator().manual_seed(5)
    lat, cond = torch.randn(3, 4, 16, 16, generator=g).double(), torch.rand(3, 3, 128, 128, generator=g).double()
    t, e = torch.tensor([501.0]), models.text_embedding
    ours = models.controlnet(lat, t, e, cond)
    down, mid = models.controlnet.net(lat, t.expand(3), encoder_hidden_states=e.expand(3, -1, -1),
                                      controlnet_cond=cond, return_dict=False)
    assert len(ours) == len(down) + 1 and ours[0].dtype == torch.float64
    assert_same(list(ours), [*down, mid], F64_TOL, "13 residuals")
    # the same operations on the same values: bitwise equal
    split = models.controlnet.forward_embedded(lat, t, e, models.controlnet.embed(cond))
    assert all(torch.equal(a, b) for a, b in zip(split, ours))


def test_frame_group_norm_keeps_channels_last_and_its_values():
    """NHWC input (TorchOptions.channels_last) gives the NCHW result, still NHWC, and both
    match an independent float64 computation over (group, F, H, W).

    float32 against the exact value: 4 channels x 3 frames x 5 x 5 = 300 values per group
    (well conditioned), so the error is float32 rounding (measured 4e-8); 1e-5 is 250x."""
    from magicanimate_rt.models.layers import FrameGroupNorm

    g = torch.Generator().manual_seed(7)
    norm = FrameGroupNorm(4, 16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
        norm.bias.copy_(torch.randn(16, generator=g))
    x = torch.randn(2 * 3, 16, 5, 5, generator=g)  # B=2 windows of F=3 frames
    nchw = norm(x, 3)
    nhwc = norm(x.contiguous(memory_format=torch.channels_last), 3)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    xd = x.double().reshape(2, 3, 4, 4, 5, 5)
    mean, var = xd.mean(dim=(1, 3, 4, 5), keepdim=True), xd.var(dim=(1, 3, 4, 5), keepdim=True, unbiased=False)
    want = ((xd - mean) / (var + 1e-5).sqrt()).reshape(6, 16, 5, 5) * norm.weight.double()[:, None, None] \
        + norm.bias.double()[:, None, None]
    assert_same(nchw, want, 1e-5, "NCHW")
    assert_same(nhwc, want, 1e-5, "NHWC")


def test_materialised_attention_equals_fused():
    """The original's baddbmm/softmax/bmm attention against SDPA, and both against an
    independent computation, all in float64."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, n, 64, generator=g, dtype=torch.float64) for n in (16, 40, 40))
    fused, mat = attention(q, k, v, 8), attention(q, k, v, 8, fused=False)
    qd, kd, vd = (x.reshape(6, -1, 8, 8).transpose(1, 2) for x in (q, k, v))
    want = (torch.softmax(qd @ kd.transpose(-1, -2) / 8**0.5, -1) @ vd).transpose(1, 2).reshape(6, 16, 64)
    assert fused.dtype == mat.dtype == torch.float64
    assert_same(fused, want, F64_TOL, "fused")
    assert_same(mat, want, F64_TOL, "materialised")


@torch.no_grad()
def test_guided_batches_several_windows(models64, stages):
    """Two windows in one guided call equal two one-window calls (residuals per row)."""
    models = models64
    lat, t, e, down, mid, bank = unet_inputs(models, stages)
    lat2 = torch.cat([lat, lat.flip(2)])  # a second window: the frames in reverse order
    down2 = [torch.cat([d, d.flip(0)]) for d in down]
    mid2 = torch.cat([mid, mid.flip(0)])
    u2, c2 = models.unet.guided(lat2, t, e, down2, mid2, bank)
    u_a, c_a = models.unet.guided(lat, t, e, down, mid, bank)
    u_b, c_b = models.unet.guided(lat.flip(2), t, e, [d.flip(0) for d in down], mid.flip(0), bank)
    assert_same(u2, torch.cat([u_a, u_b]), F64_TOL, "eps_uncond")
    assert_same(c2, torch.cat([c_a, c_b]), F64_TOL, "eps_cond")
    assert rel_l2(u_b.flip(2), u_a) > 1e-3  # the two windows differ: rows cannot be mixed up unseen
