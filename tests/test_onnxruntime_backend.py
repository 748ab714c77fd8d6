"""The ONNX Runtime backend over an engine directory: the whole pipeline against the
original's output (case_c.npz, fp32 and fp16), each stage's I/O binding, its refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from magicanimate_rt import AnimationPipeline
from magicanimate_rt.errors import EngineError
from magicanimate_rt.runtime.backends.onnxruntime_backend import OnnxRuntimeStages
from magicanimate_rt.runtime.ddim import DDIMSettings

def rel_l2(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def case_c(shared_dir):
    return dict(np.load(shared_dir / "conformance" / "case_c.npz"))


@pytest.fixture(scope="module")
def ort32(engines_fp32):
    with OnnxRuntimeStages.from_engines(engines_fp32[0]) as s:
        yield s


def test_case_c_through_engines(engines_fp32, case_c):
    d = case_c
    with AnimationPipeline.from_engines(engines_fp32[0], backend="onnxruntime") as pipe:
        assert pipe.stages.name == "onnxruntime" and pipe.ddim == DDIMSettings()
        result = pipe.animate(d["source"], d["control"], size=int(d["size"]), steps=int(d["steps"]),
                              guidance_scale=float(d["guidance"]), seed=int(d["seed"]))
    ref = torch.from_numpy(d["latents"])
    assert result.latents.shape == ref.shape == (1, 4, 32, 16, 16)
    assert rel_l2(result.latents, ref) < 1e-4
    assert result.frames.shape == (24, 128, 128, 3) and result.frames.dtype == np.uint8
    assert np.abs(result.frames.astype(np.float32) - d["video"] * 255).max() <= 2.0


def test_attributes(ort32, tiny_model_set):
    assert ort32.name == "onnxruntime" and ort32.device == torch.device("cpu") and ort32.dtype == torch.float32
    assert ort32.window == 16 and ort32.ddim == DDIMSettings()
    assert torch.equal(ort32.text_embedding, tiny_model_set.text_embedding)


def test_every_stage_runs_its_graph(ort32, engines_fp32):
    # The graphs themselves are checked against the torch stages in test_export.py; here
    # the backend's binding of torch tensors (views, other dtypes, dynamic batches) must
    # give what ONNX Runtime gives for the same numpy inputs.
    import onnxruntime as ort

    d = engines_fp32[0]

    def direct(stage, **feeds):
        sess = ort.InferenceSession(str(d / f"{stage}.onnx"), providers=["CPUExecutionProvider"])
        return sess.run(None, {k: v.contiguous().numpy() for k, v in feeds.items()})

    def same(got, want):
        # the same graph and session settings on the same values: measured bitwise equal
        # (1 and 2 threads); the tolerance only allows for kernels that depend on alignment
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert isinstance(a, torch.Tensor) and a.shape == b.shape
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-6)

    g = torch.Generator().manual_seed(0)
    t = torch.tensor([321.0])
    e = ort32.text_embedding
    image = torch.randint(0, 256, (1, 128, 128, 3), generator=g).to(torch.uint8).permute(0, 3, 1, 2)  # a view
    r = ort32.encode_reference(image)
    same([r], direct("vae_encoder", images=image.float()))

    bank = ort32.bank(r, t)
    same(bank, direct("appearance_encoder", latent=r, timestep=t, text_embedding=e))

    latents = torch.randn(1, 4, 16, 16, 16, generator=g)
    cond = torch.rand(16, 3, 128, 128, generator=g)
    frames = latents[0].transpose(0, 1)  # (16, 4, h, w), not contiguous
    for n in (16, 5):
        res = ort32.controlnet(frames[:n], t, cond[:n])
        same(res, direct("controlnet", latents=frames[:n], timestep=t, text_embedding=e, cond=cond[:n]))

    res = ort32.controlnet(frames, t, cond)
    eps = ort32.unet_guided(latents, t, res, bank)
    feeds = {"latents": latents, "timestep": t, "text_embedding": e, "mid": res[-1],
             **{f"down_{i}": x for i, x in enumerate(res[:-1])}, **{f"bank_{j}": b for j, b in enumerate(bank)}}
    same(eps, direct("unet", **feeds))
    assert torch.equal(ort32.unet_cond(latents, t, res, bank), eps[1])

    for n in (8, 3):
        out = ort32.decode(frames[:n])
        assert out.shape == (n, 3, 128, 128) and 0 <= out.min() and out.max() <= 1
        same([out], direct("vae_decoder", latents=frames[:n]))


def test_outputs_are_fresh_tensors_on_the_device(ort32):
    t = torch.tensor([500.0])
    latent = torch.randn(1, 4, 16, 16)
    a = ort32.bank(latent, t)
    a0 = a[0].clone()
    b = ort32.bank(latent * 2, t)
    assert a[0].data_ptr() != b[0].data_ptr() and torch.equal(a[0], a0)
    assert all(x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() for x in b)
    # a timestep as int64 or shape () is accepted (made float32 (1,))
    assert torch.equal(ort32.bank(latent, torch.tensor(500))[0], a[0])


def test_fp16_engines_reproduce_case_c(engines_fp16, case_c):
    d = case_c
    with AnimationPipeline.from_engines(engines_fp16, backend="onnxruntime") as pipe:
        assert pipe.stages.dtype == torch.float16 and pipe.stages.text_embedding.dtype == torch.float16
        result = pipe.animate(d["source"], d["control"], size=128, steps=3, guidance_scale=7.5, seed=3)
    assert torch.isfinite(result.latents).all()
    assert rel_l2(result.latents, torch.from_numpy(d["latents"])) < 1e-2
    assert np.abs(result.frames.astype(np.float32) - d["video"] * 255).max() <= 4.0


def test_closed_backend_refuses(engines_fp32):
    s = OnnxRuntimeStages.from_engines(engines_fp32[0])
    s.close()
    with pytest.raises(EngineError, match="closed"):
        s.decode(torch.zeros(1, 4, 16, 16))


def test_cuda_without_onnxruntime_gpu_is_a_clear_error(engines_fp32):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        OnnxRuntimeStages.from_engines(engines_fp32[0], device="cuda")


def test_runtime_imports_no_model_code(engines_fp32):
    code = ("import sys\n"
            "from magicanimate_rt.runtime.backends import engine_factory\n"
            f"s = engine_factory('onnxruntime')({str(engines_fp32[0])!r}, device='cpu')\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'magicanimate_rt.models', "
            "'magicanimate_rt.export.onnx_export', 'magicanimate_rt.export.build') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
