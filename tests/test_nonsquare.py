"""Non-square output (width x height) on every backend: the original's own non-square
output (case_g_landscape.npz) reproduced by the torch backend and by ONNX Runtime graphs
built for 192 x 128; the shape rule and its one-line errors; the specs, manifest and engine
refusals; the three ways inputs of another aspect ratio become W x H; the CLI's mp4 and grid;
the TensorRT builder and backend (fake) on a non-square directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_tensorrt import FakeTensorRT, write_fake_engine_dir

from magicanimate_rt import AnimationPipeline
from magicanimate_rt.engines.manifest import EngineManifest, build_command, load_manifest, read_manifest
from magicanimate_rt.engines.specs import ModelDims, output_shape, relative_error, stage_specs
from magicanimate_rt.engines.tensorrt_build import build_plans
from magicanimate_rt.engines.tensorrt_plan import PlanTarget
from magicanimate_rt.errors import EngineError, InputError
from magicanimate_rt.runtime.cache import ReferenceCache
from magicanimate_rt.runtime.media import (
    content_box, crop_frames, fit_image, grid_frames, load_source_image, read_video, resize_frames, write_video,
)
from magicanimate_rt.runtime.planner import LoopPlan, RequestPlan
from magicanimate_rt.runtime.sampling import initial_noise
from magicanimate_rt.runtime.stages import Stages

W, H = 192, 128  # case_g: landscape, 3:2
TINY = ModelDims(block_out_channels=(32, 64, 64, 64), layers_per_block=2, up_attention=(False, True, True, True),
                 text_tokens=77, text_dim=32)
H100 = PlanTarget("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture(scope="module")
def case_g(shared_dir):
    return dict(np.load(shared_dir / "conformance" / "case_g_landscape.npz"))


def check_case_g(result, d, latents_tol: float) -> None:
    assert result.latents.shape == d["latents"].shape == (1, 4, 32, H // 8, W // 8)
    assert relative_error(result.latents.numpy(), d["latents"])[1] < latents_tol
    assert result.frames.shape == (18, H, W, 3) and result.frames.dtype == np.uint8
    assert np.abs(result.frames.astype(np.float32) - d["video"] * 255).max() <= 2.5
    assert result.content_box == (0, 0, W, H)


# --------------------------------------------------------------------------- the original's output
def test_case_g_settings(case_g):
    d = case_g
    assert (int(d["width"]), int(d["height"]), int(d["steps"]), float(d["guidance"]), int(d["seed"])) == \
        (W, H, 2, 7.5, 4)
    assert d["source"].shape == (H, W, 3) and d["control"].shape == (18, H, W, 3)


def test_our_resize_of_the_samples_gives_case_g_inputs(shared_dir, case_g):
    """multi1_source.png (512 x 512) and multi_dancing.mp4 stretched to 192 x 128 with PIL's
    default, as the original did for case_g: the same bytes."""
    samples = shared_dir / "samples"
    source = load_source_image(samples / "source_image" / "multi1_source.png", (W, H))
    driving = read_video(samples / "driving" / "multi_dancing.mp4", size=(W, H), max_frames=18)
    assert np.array_equal(source, case_g["source"])
    assert np.array_equal(driving, case_g["control"])


def test_case_g_reproduced_with_torch(shared_dir, case_g):
    d = case_g
    with AnimationPipeline.from_pretrained(shared_dir / "conformance" / "tiny-models") as pipe:
        result = pipe.animate(d["source"], d["control"], width=int(d["width"]), height=int(d["height"]),
                              steps=int(d["steps"]), guidance_scale=float(d["guidance"]), seed=int(d["seed"]))
    check_case_g(result, d, 1e-3)


@pytest.fixture(scope="module")
def engines_192x128(tiny_models, tmp_path_factory) -> Path:
    """ONNX float32 graphs of the tiny set built for 192 x 128 (``build_engines.py --width
    192 --height 128 --onnx-only``; the graph-against-torch check is left to case_g)."""
    from magicanimate_rt.export.build import BuildSettings, build_engines

    out = tmp_path_factory.mktemp("engines") / "fp32-192x128"
    build_engines(BuildSettings(models=tiny_models, out=out, width=W, height=H, precision="fp32", onnx_only=True,
                                validate=False), log=lambda msg: None)
    return out


def test_manifest_of_a_non_square_build(engines_192x128):
    raw = json.loads((engines_192x128 / "manifest.json").read_text())
    assert (raw["width"], raw["height"], raw["latent_shape"]) == (W, H, [H // 8, W // 8])
    assert "size" not in raw and "latent_size" not in raw
    m = load_manifest(engines_192x128, width=W, height=H, precision="fp32")
    assert m.shape == (W, H) and m.size is None and m.latent_shape == (16, 24)
    assert m.spec("controlnet").shapes(frames=2)["cond"] == (2, 3, H, W)
    assert m.spec("vae_decoder").max_shapes()["images"] == (8, 3, H, W)


def test_case_g_reproduced_with_onnxruntime(engines_192x128, case_g):
    d = case_g
    with AnimationPipeline.from_engines(engines_192x128, backend="onnxruntime") as pipe:
        result = pipe.animate(d["source"], d["control"], width=W, height=H, steps=int(d["steps"]),
                              guidance_scale=float(d["guidance"]), seed=int(d["seed"]))
    check_case_g(result, d, 2e-3)


def test_engines_refuse_another_shape_with_the_rebuild_command(engines_192x128, case_g):
    with AnimationPipeline.from_engines(engines_192x128, backend="onnxruntime") as pipe:
        with pytest.raises(EngineError) as e:
            pipe.animate(case_g["source"], case_g["control"], size=128, steps=1)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1
        assert f"{engines_192x128}: built for 192x128, this request is 128x128" in msg
        assert "python build_engines.py --models" in msg and "--size 128 --precision fp32 --force" in msg
        with pytest.raises(EngineError, match="this request is 128x192; .*--width 128 --height 192 "):
            pipe.animate(case_g["source"], case_g["control"], width=128, height=192, steps=1)
    with pytest.raises(EngineError, match=r"built for 192x128, not 128x192; rebuild it: .*--width 128 --height 192"):
        load_manifest(engines_192x128, width=128, height=192)
    with pytest.raises(EngineError, match=r"built for 192x128, not size 128; rebuild it: .*--size 128 .*--force"):
        load_manifest(engines_192x128, size=128)


def test_build_up_to_date_and_refusals_name_the_shape(engines_192x128, tiny_models):
    from magicanimate_rt.export.build import BuildSettings, build_engines

    msgs = []
    report = build_engines(BuildSettings(models=tiny_models, out=engines_192x128, width=W, height=H,
                                         precision="fp32", onnx_only=True), log=msgs.append)
    assert report.up_to_date and "up to date (192x128, fp32" in msgs[0]
    with pytest.raises(EngineError, match="holds a different build \\(built for 192x128\\); pass --force"):
        build_engines(BuildSettings(models=tiny_models, out=engines_192x128, width=H, height=W, precision="fp32",
                                    onnx_only=True))


# --------------------------------------------------------------------------- the shape rule
@pytest.mark.parametrize("kwargs, message", [
    (dict(width=100, height=128), "width must be a positive multiple of 64 up to 2048, got 100"),
    (dict(width=192, height=0), "height must be a positive multiple of 64 up to 2048, got 0"),
    (dict(size=4096), "size must be a positive multiple of 64 up to 2048, got 4096"),
    (dict(width=2112, height=128), "width must be a positive multiple of 64 up to 2048, got 2112"),
    (dict(width=192), "width needs height: give both width and height, or size for a square"),
    (dict(height=192), "height needs width"),
])
def test_bad_shapes_are_one_line_input_errors(kwargs, message):
    with pytest.raises(InputError) as e:
        output_shape(**kwargs)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1
    pipe = AnimationPipeline(ShapeStages())
    with pytest.raises(InputError, match=message.split(":")[0]):
        pipe.animate(np.zeros((64, 64, 3), np.uint8), np.zeros((2, 64, 64, 3), np.uint8), **kwargs)


def test_shape_rule():
    assert output_shape() == (512, 512) and output_shape(256) == (256, 256)
    assert output_shape(512, width=512, height=768) == (512, 768)  # width/height take the place of size
    assert output_shape(width=2048, height=64) == (2048, 64)
    with pytest.raises(InputError, match="--width needs --height: give both --width and --height, or --size"):
        output_shape(width=64, names=("--size", "--width", "--height"))


# --------------------------------------------------------------------------- specs and manifests
def test_specs_follow_width_and_height():
    specs = stage_specs(TINY, None, "fp32", width=W, height=H)
    unet = specs["unet"].shapes()
    assert unet["latents"] == unet["eps_cond"] == (1, 4, 16, 16, 24)
    assert unet["down_0"] == (16, 32, 16, 24) and unet["down_3"] == (16, 32, 8, 12)
    assert unet["down_11"] == (16, 64, 2, 3) and unet["mid"] == (16, 64, 2, 3)
    # bank: mid 2x3 tokens; up1, up2, up3 at 4x6, 8x12, 16x24
    assert [unet[f"bank_{j}"] for j in range(10)] == (
        [(1, 6, 64)] + [(1, 24, 64)] * 3 + [(1, 96, 64)] * 3 + [(1, 384, 32)] * 3)
    assert specs["vae_encoder"].profile()["images"] == ((1, 3, H, W), (1, 3, H, W), (4, 3, H, W))
    assert specs["appearance_encoder"].shapes()["latent"] == (1, 4, 16, 24)
    assert TINY.latent_shape(W, H) == (16, 24) and TINY.mid_residual_shape(W, H) == (64, 2, 3)
    # the square call sites are the width = height = size case
    assert stage_specs(TINY, 128, "fp16") == stage_specs(TINY, None, "fp16", width=128, height=128)
    assert TINY.down_residual_shapes(128) == TINY.down_residual_shapes(128, 128)
    assert TINY.bank_shapes(128) == TINY.bank_shapes(128, 128)


def _manifest(**shape) -> EngineManifest:
    from magicanimate_rt.engines.manifest import FileRecord
    from magicanimate_rt.engines.specs import BatchRanges

    return EngineManifest(directory=Path("/e"), format_version=1, fingerprint="0" * 64, source="/m", window=16,
                          precision="fp16", dims=TINY, batches=BatchRanges(), stages={},
                          text_embedding_file=FileRecord("t.npy", 1, "0"), ddim={}, versions={}, **shape)


def test_manifest_shape_fields_and_square_compatibility():
    square = _manifest(size=128).to_dict()
    assert (square["size"], square["latent_size"], square["width"], square["height"]) == (128, 16, 128, 128)
    old = {k: v for k, v in square.items() if k not in ("width", "height", "latent_shape")}  # before issue 16
    m = EngineManifest.from_dict(Path("/e"), old)
    assert m.shape == (128, 128) and m.size == 128 and m.latent_size == 16
    wide = _manifest(size=None, width=W, height=H)
    assert wide.size is None and wide.latent_size is None and wide.latent_shape == (16, 24)
    again = EngineManifest.from_dict(Path("/e"), json.loads(json.dumps(wide.to_dict())))
    assert again == wide
    assert _manifest(size=None, width=256, height=256).size == 256  # a square given as width x height


def test_build_command():
    assert build_command("e", "m", 512, "fp16") == "python build_engines.py --models m --out e --size 512 --precision fp16"
    assert build_command("e", "m", None, "fp32", force=True, width=512, height=768) == \
        "python build_engines.py --models m --out e --width 512 --height 768 --precision fp32 --force"
    assert "--size 256 " in build_command("e", "m", None, "fp32", width=256, height=256)


def test_build_engines_bad_shapes_are_one_line(tmp_path, capsys):
    from magicanimate_rt.export.build import main

    for args, needle in ((["--width", "192"], "--width needs --height"),
                         (["--width", "100", "--height", "128"], "--width must be a positive multiple of 64"),
                         (["--size", "4096"], "--size must be a positive multiple of 64 up to 2048")):
        assert main(["--models", str(tmp_path), "--out", str(tmp_path / "e"), "--onnx-only", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- TensorRT (fake)
def test_tensorrt_builder_and_backend_on_a_non_square_directory(tmp_path):
    from magicanimate_rt.runtime.backends.tensorrt_backend import TensorRTStages

    d = write_fake_engine_dir(tmp_path / "e", width=128, height=64)
    trt = FakeTensorRT(H100.version)
    build_plans(d, trt=trt, target=H100, log=lambda msg: None)
    m = read_manifest(d)
    assert m.shape == (128, 64) and m.tensorrt == H100.to_dict()
    assert m.stages["controlnet"].plans["profile"] == {"latents": [[1, 4, 8, 16], [16, 4, 8, 16], [16, 4, 8, 16]],
                                                       "cond": [[1, 3, 64, 128], [16, 3, 64, 128], [16, 3, 64, 128]]}
    assert m.stages["vae_decoder"].plans["profile"]["latents"] == [[1, 4, 8, 16], [8, 4, 8, 16], [8, 4, 8, 16]]

    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    driving = rng.integers(0, 256, (20, 64, 128, 3), dtype=np.uint8)
    with TensorRTStages.from_engines(d, device="cpu", trt=FakeTensorRT(H100.version), target=H100) as st:
        pipe = AnimationPipeline(st, ddim=st.ddim)
        result = pipe.animate(source, driving, width=128, height=64, steps=2, seed=1)
        assert result.latents.shape == (1, 4, 32, 8, 16) and torch.isfinite(result.latents).all()
        assert result.frames.shape == (20, 64, 128, 3)
        with pytest.raises(EngineError, match="built for 128x64, this request is 64x128; rebuild it: .*"
                                              "--width 64 --height 128 --precision fp16 --force"):
            pipe.animate(source, driving, width=64, height=128, steps=1)
    with pytest.raises(EngineError, match="rebuild the plans on this machine: .*--width 128 --height 64 "):
        TensorRTStages.from_engines(d, device="cpu", trt=FakeTensorRT("10.9.0.34"),
                                    target=PlanTarget("10.9.0.34", H100.gpu, H100.compute_capability))


# --------------------------------------------------------------------------- fitting inputs
def test_stretch_is_a_plain_resize():
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    from PIL import Image

    assert np.array_equal(fit_image(img, (W, H)), np.array(Image.fromarray(img).resize((W, H))))
    assert fit_image(img, (70, 50), "crop") is img  # already the shape: not copied
    assert content_box(70, 50, (W, H)) == (0, 0, W, H)


def test_crop_keeps_the_centre():
    # 300 x 100 (3:1) into 128 x 128: the centre 100 x 100 square, which is all white
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255
    out = fit_image(img, (128, 128), "crop")
    assert out.shape == (128, 128, 3) and (out == 255).all()
    # a tall input into landscape output: the middle band of rows
    tall = np.zeros((300, 200, 3), np.uint8)
    tall[83:216] = 200  # rows 83..215: what a 3:2 centre crop of 200 columns keeps (133 rows)
    out = fit_image(tall, (W, H), "crop")
    assert out.shape == (H, W, 3) and np.abs(out.astype(int) - 200).max() <= 2
    assert content_box(200, 300, (W, H), "crop") == (0, 0, W, H)


def test_pad_uses_edge_values_and_the_box_crops_them_back():
    # a 64 x 64 input into 192 x 128 (3:2): padded to 96 x 64, 16 columns of edge values each side
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 0] = (255, 0, 0)  # left edge red
    img[:, -1] = (0, 0, 255)  # right edge blue
    img[:, 1:-1] = 128
    out = fit_image(img, (W, H), "pad")
    assert out.shape == (H, W, 3)
    assert (np.abs(out[:, :30].astype(int) - (255, 0, 0)) <= 2).all()  # the left padding repeats the red edge
    assert (np.abs(out[:, -30:].astype(int) - (0, 0, 255)) <= 2).all()
    box = content_box(64, 64, (W, H), "pad")
    assert box == (32, 0, 160, H)  # the 64 x 64 content scaled by 2: 128 x 128 in the middle
    back = crop_frames(out[None], box)[0]
    assert back.shape == (128, 128, 3) and np.abs(back[:, 6:-6].astype(int) - 128).max() <= 2


@pytest.mark.parametrize("in_size", [(100, 37), (37, 100), (333, 333), (1920, 1080), (5, 7)])
def test_pad_box_is_even_and_inside_the_frame(in_size):
    for out in ((W, H), (512, 768), (128, 128)):
        left, top, right, bottom = content_box(*in_size, out, "pad")
        assert 0 <= left < right <= out[0] and 0 <= top < bottom <= out[1]
        assert left % 2 == top % 2 == right % 2 == bottom % 2 == 0
        padded = np.zeros((in_size[1], in_size[0], 3), np.uint8)
        assert fit_image(padded, out, "pad").shape == (out[1], out[0], 3)


def test_fit_applies_to_source_and_driving_arrays():
    img = np.random.default_rng(1).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    frames = np.stack([img, img[::-1]])
    for fit in ("stretch", "crop", "pad"):
        want = fit_image(img, (W, H), fit)
        assert np.array_equal(load_source_image(img, (W, H), fit), want)
        assert np.array_equal(resize_frames(frames, (W, H), fit)[0], want)
    with pytest.raises(InputError, match="fit must be one of stretch, crop, pad"):
        load_source_image(img, (W, H), "zoom")


def test_grid_of_non_square_frames():
    src = np.full((H, W, 3), 10, np.uint8)
    drv = np.full((3, H, W, 3), 20, np.uint8)
    res = np.full((3, H, W, 3), 30, np.uint8)
    g = grid_frames(src, drv, res)
    assert g.shape == (3, H + 4, 3 * W + 8, 3)
    assert (g[:, 2:-2, 2 : 2 + W] == 10).all() and (g[:, 2:-2, 4 + W : 4 + 2 * W] == 20).all()
    assert (g[:, 2:-2, 6 + 2 * W : 6 + 3 * W] == 30).all()


# --------------------------------------------------------------------------- the pipeline's pieces
class ShapeStages(Stages):
    """Stand-ins that follow the request's shapes: the latent is the image's 8x8 means, and
    decoding gives back each latent pixel as an 8 x 8 block of its first channel."""

    name = "shape-fake"
    device = torch.device("cpu")
    dtype = torch.float32
    window = 16

    def __init__(self):
        self.text_embedding = torch.zeros(1, 77, 8)
        self.decoded_shapes: list[tuple[int, ...]] = []

    def encode_reference(self, image):
        return torch.nn.functional.avg_pool2d(image / 255, 8).mean(1, keepdim=True).expand(-1, 4, -1, -1)

    def bank(self, ref_latent, t):
        return [ref_latent.flatten(2).transpose(1, 2)]

    def controlnet(self, latents, t, cond):
        return [torch.nn.functional.avg_pool2d(cond, 8).mean(1, keepdim=True).expand(-1, 4, -1, -1)]

    def unet_guided(self, latents, t, residuals, bank):
        eps = self.unet_cond(latents, t, residuals, bank)
        return eps, eps

    def unet_cond(self, latents, t, residuals, bank):
        r = residuals[0].unflatten(0, (latents.shape[0], -1)).transpose(1, 2)
        return 0.1 * latents + r

    def decode(self, latents):
        self.decoded_shapes.append(tuple(latents.shape))
        x = latents[:, :1].expand(-1, 3, -1, -1).sigmoid()
        return x.repeat_interleave(8, 2).repeat_interleave(8, 3)


def test_pipeline_shapes_noise_and_plan_follow_width_and_height():
    pipe = AnimationPipeline(ShapeStages())
    src = np.zeros((H, W, 3), np.uint8)
    drv = np.zeros((5, H, W, 3), np.uint8)
    r = pipe.animate(src, drv, width=W, height=H, steps=1, seed=4)
    assert r.latents.shape == (1, 4, 16, 16, 24) and r.frames.shape == (5, H, W, 3)
    z = initial_noise(4, 32, (16, 24))
    first = torch.randn((1, 4, 16, 16, 24), generator=torch.Generator().manual_seed(4))
    assert z.shape == (1, 4, 32, 16, 24) and torch.equal(z[:, :, :16], first) and torch.equal(z[:, :, 16:], first)
    assert torch.equal(initial_noise(4, 16, 16), initial_noise(4, 16, (16, 16)))  # the square case
    # a portrait request of a landscape source: stretched (the original), other noise shape
    r = pipe.animate(src, drv, width=H, height=W, steps=1)
    assert r.frames.shape == (5, W, H, 3) and r.latents.shape[-2:] == (24, 16)


def test_pad_and_crop_output_through_the_api():
    pipe = AnimationPipeline(ShapeStages())
    src = np.full((64, 64, 3), 90, np.uint8)
    drv = np.full((3, 64, 64, 3), 200, np.uint8)
    full = pipe.animate(src, drv, width=W, height=H, fit="pad", steps=1)
    assert full.frames.shape == (3, H, W, 3) and full.content_box == (32, 0, 160, H)
    chunks = []
    cropped = pipe.animate(src, drv, width=W, height=H, fit="pad", crop_output=True, steps=1,
                           frame_sink=lambda first, frames: chunks.append((first, frames)))
    assert cropped.frames is None and cropped.content_box == (32, 0, 160, H)
    got = np.concatenate([f for _, f in chunks])
    assert got.shape == (3, H, 128, 3) and got.flags.c_contiguous
    assert np.array_equal(got, full.frames[:, :, 32:160])
    again = pipe.animate(src, drv, width=W, height=H, fit="pad", crop_output=True, steps=1)
    assert np.array_equal(again.frames, got)
    with pytest.raises(InputError, match="needs fit 'pad'"):
        pipe.animate(src, drv, width=W, height=H, crop_output=True, steps=1)


def test_decode_across_ranks_pads_chunks_to_the_frame_shape():
    class OneRank:  # the collective of a one-process group: what was sent comes back
        rank, size = 0, 1
        sent: list[tuple[int, ...]] = []

        def gather_to_root(self, padded, n):
            self.sent.append(tuple(padded.shape))
            return [padded[:n]]

    pipe = AnimationPipeline(ShapeStages(), ranks=None)
    latents = torch.randn(1, 4, 7, H // 8, W // 8)
    plan = RequestPlan(LoopPlan(decode_chunk=3))
    alone, _ = pipe._decode(latents, plan)
    pipe.ranks = OneRank()
    shared, _ = pipe._decode(latents, plan, shape=(W, H))
    assert OneRank.sent == [(3, H, W, 3)] * 3 and np.array_equal(alone, shared) and shared.shape == (7, H, W, 3)


def test_reference_cache_keys_name_the_shape():
    px = np.arange(H * W * 3, dtype=np.uint8)
    cpu = torch.device("cpu")
    landscape = ReferenceCache.key(px.reshape(H, W, 3), cpu, torch.float32)
    portrait = ReferenceCache.key(px.reshape(W, H, 3), cpu, torch.float32)
    assert landscape != portrait


def test_torch_memory_model_follows_the_shape(tiny_model_set):
    from magicanimate_rt.runtime.backends.torch_backend import TorchStages

    st = TorchStages(tiny_model_set, torch.device("cpu"), torch.float32)
    numel = sum(int(np.prod(s)) for s in TINY.down_residual_shapes(W, H)) + int(np.prod(TINY.mid_residual_shape(W, H)))
    assert st.residual_numel(W, H) == numel
    assert st.memory_model(128) == st.memory_model(128, 128)
    wide, square = st.memory_model(W, H), st.memory_model(128)
    assert wide.residuals_per_frame * 2 == square.residuals_per_frame * 3  # 1.5x the pixels
    assert wide.decode_per_frame * 2 == square.decode_per_frame * 3


# --------------------------------------------------------------------------- the command line
def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "magicanimate_rt.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from PIL import Image

    from magicanimate_rt import demo

    d = tmp_path_factory.mktemp("clip")
    Image.fromarray(demo.source_image(64)).save(d / "source.png")
    write_video(d / "driving.mp4", demo.driving_clip(3, 64))  # square: 3:2 output stretches or pads it
    return d


def test_cli_writes_a_192x128_mp4_and_grid(tiny_models, clip, tmp_path):
    out, grid = tmp_path / "wide.mp4", tmp_path / "wide-grid.mp4"
    proc = run_cli("animate", "--models", tiny_models, "--source", clip / "source.png", "--driving",
                   clip / "driving.mp4", "--output", out, "--grid", grid, "--width", W, "--height", H, "--steps", 1)
    assert proc.returncode == 0, proc.stderr
    assert "at 192x128" in proc.stdout
    assert read_video(out).shape == (3, H, W, 3)
    assert read_video(grid).shape == (3, H + 4, 3 * W + 8, 3)


def test_cli_pad_and_crop_output(tiny_models, clip, tmp_path):
    out, grid = tmp_path / "padded.mp4", tmp_path / "padded-grid.mp4"
    proc = run_cli("animate", "--models", tiny_models, "--source", clip / "source.png", "--driving",
                   clip / "driving.mp4", "--output", out, "--grid", grid, "--width", 128, "--height", 64,
                   "--fit", "pad", "--crop-output", "--steps", 1)
    assert proc.returncode == 0, proc.stderr
    assert read_video(out).shape == (3, 64, 64, 3)  # the 64 x 64 driving content, cropped back
    assert read_video(grid).shape == (3, 68, 3 * 128 + 8, 3)  # the grid keeps whole frames


@pytest.mark.parametrize("args, needle", [
    (["--width", 100, "--height", 128], "--width must be a positive multiple of 64 up to 2048, got 100"),
    (["--width", 0, "--height", 128], "--width must be a positive multiple of 64 up to 2048, got 0"),
    (["--size", 4096], "--size must be a positive multiple of 64 up to 2048, got 4096"),
    (["--width", 192], "--width needs --height: give both --width and --height, or --size for a square"),
    (["--height", 192], "--height needs --width"),
    (["--width", 192, "--height", 128, "--crop-output"], "needs fit 'pad' (--fit pad)"),
    (["--fit", "zoom"], "fit must be one of stretch, crop, pad, got 'zoom'"),
])
def test_cli_bad_shapes_are_one_line(tiny_models, clip, tmp_path, args, needle):
    out = tmp_path / "out.mp4"
    proc = run_cli("animate", "--models", tiny_models, "--source", clip / "source.png", "--driving",
                   clip / "driving.mp4", "--output", out, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not out.exists()
