"""What users download: every quirk of the published files loads to the same values as the
clean file (written by the project's writer, ``models/writer.py`` QUIRKS, into a linked
copy of the tiny set), the original's lenient paths, its strict ones, loading in bounded
memory (each tensor read once, its file pages dropped) and ``magicanimate-rt check-models``.
"""

from __future__ import annotations

import json
import logging
import mmap
import shutil
from pathlib import Path

import pytest
import torch
from helpers import linked_copy, replace_file
from safetensors.torch import load_file

from magicanimate_rt.cli import main
from magicanimate_rt.errors import ModelLoadError
from magicanimate_rt.layout import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS
from magicanimate_rt.models import loading
from magicanimate_rt.models.appearance import AppearanceEncoder
from magicanimate_rt.models.config import UNetConfig
from magicanimate_rt.models.loading import ModelPaths, WeightsFile, load_model_set, read_state_dict
from magicanimate_rt.models.presets import preset_configs
from magicanimate_rt.models.writer import QUIRKS, save_weights, write_motion_checkpoint, write_quirks

SD = Path("stable-diffusion-v1-5")
MOTION = Path("MagicAnimate/temporal_attention/temporal_attention.ckpt")
SD_UNET = SD / "unet/diffusion_pytorch_model.bin"  # the tiny set's (a pickle)
VAE_MSE = Path("sd-vae-ft-mse/diffusion_pytorch_model.safetensors")
CONTROLNET = Path("MagicAnimate/densepose_controlnet")
LOG = "magicanimate_rt.models.loading"


@pytest.fixture
def models(tiny_models, tmp_path):
    return linked_copy(tiny_models, tmp_path / "models")


@pytest.fixture(scope="module")
def clean(tiny_models):
    """The tiny set as written (no quirks): every tensor of each loaded component."""
    ms = load_model_set(tiny_models)
    return {n: getattr(ms, n).state_dict() for n in ("vae", "appearance_encoder", "controlnet", "unet")} | {
        "text_embedding": ms.text_embedding}


def assert_same(module, reference: dict) -> None:
    got = module.state_dict()
    assert got.keys() == reference.keys()
    for k, v in reference.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def assert_same_set(ms, clean: dict) -> None:
    """Every component and the text embedding of the loaded set ``ms`` equal the clean set's."""
    for name in ("vae", "appearance_encoder", "controlnet", "unet"):
        assert_same(getattr(ms, name), clean[name])
    assert torch.equal(ms.text_embedding, clean["text_embedding"])


@pytest.fixture
def reads(monkeypatch):
    """{file path: number of tensors read from it}, counted at WeightsFile.tensor."""
    counts: dict[Path, int] = {}
    tensor = WeightsFile.tensor

    def counted(self, name):
        counts[self.path] = counts.get(self.path, 0) + 1
        return tensor(self, name)

    monkeypatch.setattr(WeightsFile, "tensor", counted)
    return counts


# --------------------------------------------------------------------------- each quirk
@pytest.mark.parametrize("quirk", ["legacy_vae_attention", "legacy_vae_attention_4d"])
def test_legacy_vae_attention_names_load_to_the_same_values(models, clean, quirk):
    write_quirks(models, [quirk])
    keys = load_file(str(models / VAE_MSE))
    old = {k: v for k, v in keys.items() if k.split(".")[-2] in ("query", "key", "value", "proj_attn")}
    assert len(old) == 16 and not any(".to_q." in k or ".to_out.0." in k for k in keys)  # 2 mid blocks x 4 x 2
    assert {v.ndim for k, v in old.items() if k.endswith("weight")} == ({4} if quirk.endswith("4d") else {2})
    plan = loading.plan_vae(ModelPaths.locate(models))
    assert any("16 mid-block attention tensors under the deprecated names" in n for n in plan.notes)
    assert_same(loading.materialise(plan), clean["vae"])


def test_position_ids_in_the_text_encoder_file_are_ignored(models, clean):
    write_quirks(models, ["position_ids"])
    f = WeightsFile(models / SD / "text_encoder/pytorch_model.bin")
    ids = f.tensor("text_model.embeddings.position_ids")
    assert ids.dtype == torch.int64 and ids.shape == (1, 77) and torch.equal(ids[0], torch.arange(77))
    plan = loading.plan_text_encoder(ModelPaths.locate(models))
    assert any("position_ids (saved by old transformers) ignored" in n for n in plan.notes)
    assert torch.equal(loading._embedding(plan), clean["text_embedding"])


def test_every_variant_and_decoy_present_loads_the_full_precision_safetensors(models, clean, reads):
    write_quirks(models, ["variants"])
    unet = models / SD / "unet"
    assert {p.name for p in unet.iterdir()} >= set(DIFFUSERS_WEIGHTS) | {
        "diffusion_pytorch_model.non_ema.bin", "diffusion_pytorch_model.non_ema.safetensors"}
    for rel in ("v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "safety_checker", "feature_extractor"):
        assert (models / SD / rel).exists()
    # the decoys hold other values, so a wrong choice cannot pass
    k = "conv_in.weight"
    assert torch.equal(read_state_dict(unet / "diffusion_pytorch_model.bin")[k], -clean["unet"][k])
    reads.clear()
    assert_same_set(load_model_set(models), clean)
    read = {p.relative_to(models).as_posix() for p in reads}
    assert all(p.endswith(("diffusion_pytorch_model.safetensors", "/model.safetensors", ".ckpt")) for p in read), read
    assert f"{SD}/text_encoder/{TRANSFORMERS_WEIGHTS[0]}" in read and not any("non_ema" in p for p in read)
    assert not any(p.startswith(f"{SD}/v1-5") or "safety_checker" in p for p in read)


def test_full_unet_ddp_checkpoint_overrides_sd_spatial_weights_which_are_never_read(models, clean, reads, monkeypatch):
    releases: dict[Path, int] = {}
    release = WeightsFile.release

    def counted(self, name, t):
        releases[self.path] = releases.get(self.path, 0) + 1
        return release(self, name, t)

    monkeypatch.setattr(WeightsFile, "release", counted)
    write_quirks(models, ["full_unet_motion"])
    raw = torch.load(models / MOTION, weights_only=True)
    assert {k for k in raw if k != "state_dict"} == {"epoch", "global_step"}
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert sum(".motion_modules." not in k for k in raw["state_dict"]) == 684  # the tiny UNet's spatial keys
    sd_file = read_state_dict(models / SD_UNET)
    assert torch.equal(sd_file["conv_in.weight"], clean["unet"]["conv_in.weight"] / 2)  # SD's own values differ
    reads.clear(), releases.clear()
    plan = loading.plan_unet(ModelPaths.locate(models))
    assert any("overrides 684 of the 684 spatial weights" in n and "SD's file is not read" in n for n in plan.notes)
    assert any("non-tensor entries ignored: epoch, global_step" in n for n in plan.notes)
    assert_same(loading.materialise(plan), clean["unet"])  # the checkpoint wins, as in the original
    assert reads.get(models / SD_UNET, 0) == 0 and reads[models / MOTION] == 684 + 560
    assert releases == reads  # each tensor read once and its pages dropped


def test_flat_checkpoint_with_non_tensor_entries_loads(models, clean):
    sd = read_state_dict(models / MOTION)
    save_weights({"global_step": 7, **sd, "epoch": 1}, models / MOTION)
    assert WeightsFile(models / MOTION).skipped == ["global_step", "epoch"]
    assert_same(loading.load_unet(ModelPaths.locate(models)), clean["unet"])


def test_missing_pos_encoder_tables_are_built_from_their_formula(models, clean):
    sd = read_state_dict(models / MOTION)
    pe = [k for k in sd if k.endswith("pos_encoder.pe")]
    assert len(pe) == 40
    save_weights({k: v for k, v in sd.items() if k not in pe}, models / MOTION)
    plan = loading.plan_unet(ModelPaths.locate(models))
    assert sorted(plan.built) == sorted(pe)
    assert any("40 pos_encoder.pe table(s) not in the file: built from their formula" in n for n in plan.notes)
    assert_same(loading.materialise(plan), clean["unet"])


@pytest.mark.parametrize("case", ["unknown-spatial-key", "misshaped-spatial-key", "unet-prefix"])
def test_unmatched_checkpoint_keys_fall_back_to_its_motion_modules_with_a_warning(models, clean, case, caplog):
    """The original's except branch: only the checkpoint's motion-module keys ('unet.'
    stripped) are loaded, over SD's spatial weights."""
    write_quirks(models, ["full_unet_motion"])  # SD's file now differs from the checkpoint's spatial weights
    sd_spatial = read_state_dict(models / SD_UNET)
    full = read_state_dict(models / MOTION)
    if case == "unknown-spatial-key":
        full["decoder.extra.weight"] = torch.ones(3)
    elif case == "misshaped-spatial-key":
        full["conv_in.weight"] = torch.ones(3, 3)
    else:
        full = {f"unet.{k}": v for k, v in full.items()}
    write_motion_checkpoint(models / MOTION, full, ddp=True)
    with caplog.at_level(logging.WARNING, logger=LOG):
        unet = load_model_set(models).unet
    ignored = 685 if case == "unknown-spatial-key" else 684
    [warning] = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert f"temporal_attention.ckpt: {ignored} of its {ignored + 560} keys ignored" in warning
    assert "only its 560 motion-module keys are loaded" in warning and "\n" not in warning
    want = {k: (sd_spatial[k] if ".motion_modules." not in k else v) for k, v in clean["unet"].items()}
    assert_same(unet, want)


def test_unknown_motion_module_key_stays_an_error_after_the_fallback(models):
    full = read_state_dict(models / MOTION) | read_state_dict(models / SD_UNET)
    full["down_blocks.0.motion_modules.0.extra.weight"] = torch.ones(3)
    write_motion_checkpoint(models / MOTION, full)
    with pytest.raises(ModelLoadError, match=r"temporal_attention\.ckpt: 1 key\(s\) match no parameter"):
        loading.load_unet(ModelPaths.locate(models))


def test_appearance_encoder_file_lacks_exactly_its_24_tail_weights(models, clean, tiny_models):
    for preset in ("tiny", "sd15"):
        with torch.device("meta"):
            encoder = AppearanceEncoder(UNetConfig.from_dict(preset_configs(preset)["appearance_encoder"]))
        assert len(encoder.pruned_keys) == 24
    f = WeightsFile(tiny_models / "MagicAnimate/appearance_encoder/diffusion_pytorch_model.safetensors")
    plan = loading.plan_appearance_encoder(ModelPaths.locate(models))
    assert not set(f.entries) & plan.module.pruned_keys
    assert any("the 24 weights after the last reference-bank layer are not used: the file lacks them" in n
               for n in plan.notes)
    assert_same(loading.materialise(plan), clean["appearance_encoder"])


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_both_pickle_formats_load(models, clean, fmt):
    if fmt == "legacy":
        write_quirks(models, ["legacy_pickles"])
    f = WeightsFile(models / MOTION)
    assert (f.format, f.mapped) == (("pickle", True) if fmt == "zip" else ("legacy pickle", False))
    assert_same_set(load_model_set(models), clean)  # the text encoder and SD's UNet are .bin files too


def test_all_quirks_at_once_load_to_the_clean_values(models, clean):
    write_quirks(models, [q for q in QUIRKS if q != "legacy_vae_attention"])
    assert_same_set(load_model_set(models), clean)


def test_writer_quirks_option_writes_the_published_forms(tmp_path):
    from magicanimate_rt.models.writer import write_random_model_set

    cfg = preset_configs("tiny")
    with pytest.raises(ValueError, match="unknown quirk"):
        write_random_model_set(cfg, tmp_path / "c", quirks=["nope"])
    assert not (tmp_path / "c").exists()
    root = write_random_model_set(cfg, tmp_path / "b", seed=4, quirks=["legacy_vae_attention_4d", "full_unet_motion"])
    vae = WeightsFile(root / VAE_MSE)
    assert vae.entries["encoder.mid_block.attentions.0.query.weight"].shape == (64, 64, 1, 1)
    assert WeightsFile(root / MOTION).wrapper == "state_dict"
    plan = loading.plan_model_set(root)
    assert plan.ok and plan.components["unet"].extra["overrides"] == 684
    plan.close()


# --------------------------------------------------------------------------- strict where it matters
def test_git_lfs_pointer_gets_its_own_message(models):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:4c2e0d2b\nsize 3438167536\n"
    for rel, loader in ((VAE_MSE, loading.load_vae), (MOTION, loading.load_unet)):
        replace_file(models / rel, pointer)
        with pytest.raises(ModelLoadError, match=rf"{rel.name}: a Git LFS pointer \(\d+ bytes\).*run `git lfs pull`"):
            loader(ModelPaths.locate(models))


@pytest.mark.parametrize("component,key,value", [
    ("controlnet", "controlnet_conditioning_channel_order", "bgr"),
    ("unet", "resnet_out_scale_factor", 2.0),
    ("vae", "mid_block_add_attention", False),
])
def test_configs_the_runtime_cannot_compute_faithfully_are_refused_by_name(models, component, key, value):
    rel = {"controlnet": CONTROLNET / "config.json", "unet": SD / "unet/config.json",
           "vae": Path("sd-vae-ft-mse/config.json")}[component]
    cfg = json.loads((models / rel).read_text())
    replace_file(models / rel, json.dumps({**cfg, key: value}).encode())
    with pytest.raises(ModelLoadError, match=rf"config\.json: {key}={value!r} is refused"):
        load_model_set(models)


def test_a_bad_file_fails_before_any_weight_is_read(models, reads):
    cfg = json.loads((models / CONTROLNET / "config.json").read_text())
    replace_file(models / CONTROLNET / "config.json",
                 json.dumps({**cfg, "controlnet_conditioning_channel_order": "bgr"}).encode())
    reads.clear()
    with pytest.raises(ModelLoadError):
        load_model_set(models)
    assert reads == {}


# --------------------------------------------------------------------------- bounded memory
def test_tensors_are_read_from_the_mapping_and_its_pages_dropped(tmp_path):
    """A file's tensor is a view of the mapped file; once copied, release() drops its pages
    from this process (the resident file-backed memory falls back), values unchanged."""
    def rss_file_kib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
        pytest.skip("no RssFile in /proc/self/status")

    if not hasattr(mmap, "MADV_DONTNEED"):
        pytest.skip("no madvise here")
    ref = torch.arange(16 * 2**20, dtype=torch.float32)  # 64 MiB
    for name in ("w.safetensors", "w.ckpt"):
        save_weights({"w": ref}, tmp_path / name)
        with WeightsFile(tmp_path / name) as f:
            before = rss_file_kib()
            t = f.tensor("w")
            copy = t.clone()  # touches every page
            assert rss_file_kib() - before > 48 * 1024
            f.release("w", t)
            assert rss_file_kib() - before < 8 * 1024, name
            assert torch.equal(t, ref) and torch.equal(copy, ref)  # read back from the file
            del t, copy  # (the check above touched the pages again)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_tensors_are_cast_straight_to_the_requested_dtype(tiny_models, clean, dtype):
    ms = load_model_set(tiny_models, dtype=dtype)
    got = ms.unet.state_dict()
    for k, v in clean["unet"].items():
        assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)), k
    assert ms.text_embedding.dtype == dtype and torch.equal(ms.text_embedding, clean["text_embedding"].to(dtype))


def test_a_load_to_another_device_casts_there(tiny_models):
    vae = loading.load_vae(ModelPaths.locate(tiny_models), device="meta", dtype=torch.float16)
    assert {(t.device.type, t.dtype) for t in vae.state_dict().values()} == {("meta", torch.float16)}


def test_loaded_weights_do_not_depend_on_the_files(models, clean):
    ms = load_model_set(models)
    shutil.rmtree(models)  # the tensors were copied out of the mapped files
    assert_same(ms.unet, clean["unet"])


# --------------------------------------------------------------------------- check-models
def test_check_models_on_a_good_set_reads_headers_only(models, reads, capsys, caplog):
    write_quirks(models, [q for q in QUIRKS if q not in ("legacy_vae_attention", "legacy_pickles")])
    reads.clear()
    assert main(["check-models", str(models)]) == 0
    out = capsys.readouterr().out
    assert reads == {}  # no tensor read
    for text in (f"{SD}/unet/diffusion_pytorch_model.safetensors", "non-EMA training weights: never read",
                 "the motion checkpoint overrides 684 of the 684 spatial weights", "sd-vae-ft-mse/ is present",
                 "position_ids (saved by old transformers) ignored", "lacks them", "not used: stable-diffusion-v1-5/"
                 "safety_checker/", "no problems: the set would load"):
        assert text in out, text
    motion_row = next(line for line in out.splitlines() if line.startswith("motion "))
    assert "pickle" in motion_row and "float32" in motion_row and " 1244 " in motion_row
    # loading logs the same choices at INFO
    with caplog.at_level(logging.INFO, logger=LOG):
        load_model_set(models)
    logged = {r.getMessage() for r in caplog.records if r.name == LOG}
    assert "unet: the motion checkpoint overrides 684 of the 684 spatial weights of " \
           f"{SD}/unet/diffusion_pytorch_model.safetensors: SD's file is not read" in logged


def test_check_models_lists_every_problem_of_a_broken_set(models, capsys):
    shutil.rmtree(models / "MagicAnimate/appearance_encoder")
    replace_file(models / CONTROLNET / "diffusion_pytorch_model.safetensors",
                 b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1445157120\n")
    shutil.rmtree(models / "sd-vae-ft-mse")  # SD's own VAE then: a note, not a problem
    replace_file(models / SD / "vae/diffusion_pytorch_model.safetensors", b"\x00" * 16)
    unet = read_state_dict(models / SD_UNET)
    save_weights({**unet, "conv_in.weight": torch.zeros(1, 1)}, models / SD_UNET)
    assert main(["check-models", str(models)]) == 2
    captured = capsys.readouterr()
    out = captured.out
    problems = out[out.index("problems (4): the set would not load"):].splitlines()[1:]
    assert len(problems) == 4, out
    assert "appearance_encoder: missing component directory" in problems[0]
    assert "truncated or corrupt safetensors file" in problems[1] and f"{SD}/vae/" in problems[1]
    assert "a Git LFS pointer" in problems[2] and "git lfs pull" in problems[2]
    assert "'conv_in.weight' has shape (1, 1) but the temporal UNet expects" in problems[3]
    assert "sd-vae-ft-mse/ is absent: SD's own vae/ is used" in out
    assert captured.err.strip().count("\n") == 0 and "would not load" in captured.err
    # stderr alone (stdout redirected) names the count and the first problem
    assert "would not load: 4 problems, the first: " in captured.err and problems[0].strip() in captured.err
    assert main(["check-models", str(models / "nope")]) == 2
    assert "models directory not found" in capsys.readouterr().err
