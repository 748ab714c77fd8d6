"""Loading the real layout: accepted variants, and every way a file can be wrong giving one
ModelLoadError that names the file (plus a seeded, time-bounded fuzz of each loader)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch
from helpers import linked_copy, replace_file
from safetensors.torch import load_file, save_file

from magicanimate_rt.errors import ModelLoadError
from magicanimate_rt.models import loading
from magicanimate_rt.models.loading import ModelPaths, load_model_set, read_state_dict
from magicanimate_rt.models.presets import preset_configs
from magicanimate_rt.models.writer import write_random_model_set

MOTION = Path("MagicAnimate/temporal_attention/temporal_attention.ckpt")
AE = Path("MagicAnimate/appearance_encoder/diffusion_pytorch_model.safetensors")
VAE = Path("sd-vae-ft-mse/diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def tiny(shared_dir):
    return shared_dir / "conformance" / "tiny-models"


@pytest.fixture
def models(tiny, tmp_path):
    return linked_copy(tiny, tmp_path / "models")


def motion_state(tiny):
    return torch.load(tiny / MOTION, weights_only=True)


def test_motion_checkpoint_variants_load(models, tiny):
    """{"state_dict": ...} wrapping and "module." prefixes are accepted."""
    sd = motion_state(tiny)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    (models / MOTION).unlink()
    torch.save(wrapped, models / MOTION)
    unet = loading.load_unet(ModelPaths.locate(models))
    k = next(iter(sd))
    assert torch.equal(unet.state_dict()[k], sd[k])


def test_unknown_key_in_motion_checkpoint(models, tiny):
    sd = motion_state(tiny)
    sd["down_blocks.0.motion_modules.0.temporal_transformer.extra.weight"] = torch.zeros(3)
    (models / MOTION).unlink()
    torch.save(sd, models / MOTION)
    with pytest.raises(ModelLoadError, match=r"temporal_attention\.ckpt: 1 key\(s\) match no parameter.*extra\.weight"):
        loading.load_unet(ModelPaths.locate(models))


def test_misshaped_key_in_motion_checkpoint(models, tiny):
    sd = motion_state(tiny)
    k = next(k for k in sd if k.endswith("proj_in.weight"))
    sd[k] = torch.zeros(3, 3)
    (models / MOTION).unlink()
    torch.save(sd, models / MOTION)
    with pytest.raises(ModelLoadError, match=r"temporal_attention\.ckpt: .*proj_in\.weight.* has shape \(3, 3\)"):
        loading.load_unet(ModelPaths.locate(models))


def test_missing_motion_key(models, tiny):
    sd = motion_state(tiny)
    sd.pop(next(iter(sd)))
    (models / MOTION).unlink()
    torch.save(sd, models / MOTION)
    with pytest.raises(ModelLoadError, match="missing 1 weight"):
        loading.load_unet(ModelPaths.locate(models))


def test_pickle_that_would_run_code_is_refused(models):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    (models / MOTION).unlink()
    torch.save({"x": Evil()}, models / MOTION)
    with pytest.raises(ModelLoadError, match="refused: the pickle would run code"):
        read_state_dict(models / MOTION)


def test_truncated_safetensors(models):
    f = models / VAE
    replace_file(f, f.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"{f}: truncated or corrupt safetensors"):
        loading.load_vae(ModelPaths.locate(models))


def test_missing_component_and_missing_dir(models, tmp_path):
    with pytest.raises(ModelLoadError, match="models directory not found"):
        ModelPaths.locate(tmp_path / "nope")
    (models / MOTION).unlink()
    with pytest.raises(ModelLoadError, match="missing motion-module checkpoint"):
        ModelPaths.locate(models)


def test_sd_vae_used_when_mse_vae_absent(models, tiny):
    import shutil

    shutil.rmtree(models / "sd-vae-ft-mse")
    assert ModelPaths.locate(models).vae == models / "stable-diffusion-v1-5" / "vae"


def test_fp16_variant_file_loads(models, tiny):
    f = models / VAE
    sd = load_file(str(f))
    f.unlink()
    save_file({k: v.half() for k, v in sd.items()}, str(f.with_name("diffusion_pytorch_model.fp16.safetensors")))
    vae = loading.load_vae(ModelPaths.locate(models))
    loaded = vae.vae.state_dict()
    for k in sd:  # every weight is its fp16 value, widened exactly to float32
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], sd[k].half().float()), k
    assert any(not torch.equal(loaded[k], sd[k]) for k in sd)  # the fp16 file, not the original, was read


def test_appearance_encoder_accepts_exactly_its_pruned_tail(models, tiny):
    f = models / AE
    sd = load_file(str(f))
    full = dict(sd, **{"conv_out.weight": torch.ones(4, 32, 3, 3), "conv_out.bias": torch.ones(4)})
    f.unlink()
    save_file(full, str(f))
    loading.load_appearance_encoder(ModelPaths.locate(models))  # tail keys ignored
    sd.pop("up_blocks.3.attentions.2.transformer_blocks.0.norm1.weight")  # the last bank layer
    f.unlink()
    save_file(sd, str(f))
    with pytest.raises(ModelLoadError, match="missing 1 weight.*norm1.weight"):
        loading.load_appearance_encoder(ModelPaths.locate(models))


def test_config_that_does_not_match_weights_fails_before_allocating(models):
    cfg = models / "MagicAnimate/densepose_controlnet/config.json"
    text = cfg.read_text().replace("[\n    32,\n    64,\n    64,\n    64\n  ]", "[\n    32,\n    64,\n    64,\n    64000\n  ]")
    replace_file(cfg, text.encode())
    with pytest.raises(ModelLoadError, match="has shape .* but the ControlNet expects"):
        loading.load_controlnet(ModelPaths.locate(models))


def test_bad_config_json(models):
    cfg = models / "stable-diffusion-v1-5/unet/config.json"
    replace_file(cfg, b"{ not json")
    with pytest.raises(ModelLoadError, match="config.json: not valid JSON"):
        loading.load_unet(ModelPaths.locate(models))


def test_writer_is_deterministic_and_has_no_zero_weights(tmp_path):
    a = write_random_model_set(preset_configs("tiny"), tmp_path / "a", seed=5)
    b = write_random_model_set(preset_configs("tiny"), tmp_path / "b", seed=5)
    for rel in (VAE, AE, Path("stable-diffusion-v1-5/unet/diffusion_pytorch_model.safetensors")):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        for k, v in load_file(str(a / rel)).items():
            assert bool((v != 0).all()), k  # nothing zero-initialised
    ms = load_model_set(a)  # the writer's layout loads through the real loader
    assert ms.unet.num_bank == 10 and ms.text_embedding.shape == (1, 77, 32)
    assert not list(tmp_path.glob(".*tmp*"))


# --------------------------------------------------------------------------- fuzz
FUZZ_SECONDS = float(os.environ.get("MAGICANIMATE_FUZZ_SECONDS", "40"))
#: damaged files each loader reads before the time-bounded runs: seeded, so the same
#: inputs on every machine, whatever its speed
SEEDED_RUNS = 40

TARGETS = {
    # file relative to the model set -> loader that reads it
    "vae safetensors": (VAE, lambda p: loading.load_vae(p)),
    "text encoder .bin": (Path("stable-diffusion-v1-5/text_encoder/pytorch_model.bin"), loading.load_text_embedding),
    "unet config.json": (Path("stable-diffusion-v1-5/unet/config.json"), lambda p: loading._unet_config(p.unet / "config.json")),
    "controlnet config.json": (Path("MagicAnimate/densepose_controlnet/config.json"), loading.load_controlnet),
    "tokenizer vocab.json": (Path("stable-diffusion-v1-5/tokenizer/vocab.json"), loading.load_text_embedding),
    "motion .ckpt": (MOTION, lambda p: read_state_dict(p.motion)),
}

#: ModelLoadErrors each loader must give among its SEEDED_RUNS damaged files: about 80% of
#: what was measured (vae 37, text encoder 37, unet config 40, controlnet config 37,
#: tokenizer 38, motion 34 of 40; the rest loaded), so the damage reaches the loaders'
#: error paths rather than only files they accept
MIN_ERRORS = {"vae safetensors": 30, "text encoder .bin": 30, "unet config.json": 32,
              "controlnet config.json": 30, "tokenizer vocab.json": 30, "motion .ckpt": 27}


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A damaged copy of ``data`` and what was done to it."""
    if rng.random() < 0.4:
        n = rng.randrange(len(data))
        return data[:n], f"truncated to {n} of {len(data)} bytes"
    b = bytearray(data)
    flips = []
    for _ in range(rng.randint(1, 8)):
        # bias flips towards the start, where headers and structure live
        i = min(len(b) - 1, int(rng.expovariate(1 / 2000))) if rng.random() < 0.7 else rng.randrange(len(b))
        bit = rng.randrange(8)
        b[i] ^= 1 << bit
        flips.append(f"{i}:{bit}")
    return bytes(b), f"bits flipped (byte:bit) {', '.join(flips)}"


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_loaders(target, tiny, tmp_path):
    """Damaged files give a ModelLoadError (one line, naming the file) or a successful
    load, never any other exception; and the damage does reach the error paths."""
    rel, loader = TARGETS[target]
    models = linked_copy(tiny, tmp_path / "models")
    original = (tiny / rel).read_bytes()
    rng = random.Random(f"{target}-0")
    deadline = time.monotonic() + FUZZ_SECONDS / len(TARGETS)
    runs = 0
    errors = {"seeded": 0, "all": 0}
    while runs < SEEDED_RUNS or time.monotonic() < deadline:
        data, damage = mutate(original, rng)
        replace_file(models / rel, data)
        try:
            loader(ModelPaths.locate(models))
        except ModelLoadError as e:
            assert "\n" not in str(e) and str(models / rel.parts[0]) in str(e), (damage, str(e))
            errors["all"] += 1
            errors["seeded"] += runs < SEEDED_RUNS
        except Exception as e:  # anything else escaped the loader
            pytest.fail(f"{target}, run {runs} ({damage}): {type(e).__name__}: {e}")
        runs += 1
    assert errors["seeded"] >= MIN_ERRORS[target], (errors, runs)
