"""Writing random model sets in the real on-disk layout.

Demos, tests and benchmarks need complete model sets on a machine with no downloads: this
writes one from a set of config files (the tiny conformance configs, SD 1.5's real sizes,
or anything between), every weight random and none zero-initialised (ControlNet's zero
convolutions and the motion modules' ``proj_out`` included, so every component visibly
changes the output), deterministic from a seed. The layout is exactly what
:func:`~magicanimate_rt.models.loading.load_model_set` reads (REFERENCE section 1).

The files users download differ from this writer's clean output in ways the loader must
handle (README "Weights"); :data:`QUIRKS` names each, and :func:`write_quirks` (or
``write_random_model_set(..., quirks=...)``) rewrites a model set's files that way, so
that a test can check that the quirky set loads to the same values as the clean one.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

from ..errors import ModelLoadError
from .appearance import AppearanceEncoder
from .config import MotionModuleConfig, UNetConfig
from .controlnet import ControlNet
from .presets import write_byte_tokenizer
from ..layout import MA_DIR, SD_DIR, VAE_MSE_DIR, pick_weights, weights_names
from .loading import LEGACY_VAE_ATTENTION, MOTION_CKPT, read_config, read_state_dict, sinusoid_table
from .text import build_text_encoder
from .unet import TemporalUNet
from .vae import VAE

#: component name -> config path relative to a model-set root
CONFIG_FILES = {
    "unet": f"{SD_DIR}/unet/config.json",
    "vae": f"{SD_DIR}/vae/config.json",
    "vae_mse": f"{VAE_MSE_DIR}/config.json",
    "text_encoder": f"{SD_DIR}/text_encoder/config.json",
    "appearance_encoder": f"{MA_DIR}/appearance_encoder/config.json",
    "controlnet": f"{MA_DIR}/densepose_controlnet/config.json",
}
TOKENIZER_DIR = f"{SD_DIR}/tokenizer"
EXTRA_FILES = (f"{SD_DIR}/model_index.json", f"{SD_DIR}/scheduler/scheduler_config.json")


def read_config_set(root) -> dict[str, dict[str, Any]]:
    """The config dicts of a model-set directory (weights need not be there)."""
    root = Path(root)
    cfgs = {name: read_config(root / rel) for name, rel in CONFIG_FILES.items() if name != "vae_mse"}
    if (root / CONFIG_FILES["vae_mse"]).is_file():
        cfgs["vae_mse"] = read_config(root / CONFIG_FILES["vae_mse"])
    return cfgs


def _shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def _component_shapes(name: str, cfg: Mapping[str, Any], motion: MotionModuleConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of a component, built on the meta device (no memory)."""
    with torch.device("meta"):
        if name == "unet":
            return _shapes(TemporalUNet(UNetConfig.from_dict(cfg), motion))
        if name == "appearance_encoder":
            return _shapes(AppearanceEncoder(UNetConfig.from_dict(cfg)))
        if name == "controlnet":
            return _shapes(ControlNet(cfg).net)
        if name in ("vae", "vae_mse"):
            return _shapes(VAE(cfg).vae)
        if name == "text_encoder":
            shapes = _shapes(build_text_encoder(cfg))
            # checkpoints name CLIP's weights "text_model.*" whatever the library version
            return {k if k.startswith("text_model.") else f"text_model.{k}": s for k, s in shapes.items()
                    if not k.endswith("position_ids")}
    raise ValueError(name)


def random_tensor(key: str, shape: torch.Size, seed: int, component: str) -> Tensor:
    """A deterministic random tensor for one parameter, independent of the order in which
    parameters are generated. Weights ~ N(0, 1/fan_in) (activations keep their scale),
    norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2), embedding tables ~ N(0, 0.5^2);
    nothing is zero."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{component}/{key}".encode())) % 2**63)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    x[x == 0] = 1e-3  # torch's sampler does return exact zeros now and then
    is_norm = any(s in key for s in ("norm", "layer_norm", "ln_"))
    if key.endswith("embedding.weight"):
        return x * 0.5
    if key.endswith("weight") and len(shape) == 1 and is_norm:
        return 1.0 + 0.1 * x
    if key.endswith("bias") or len(shape) == 1:
        return 0.05 * x
    fan_in = shape[1:].numel() if len(shape) > 1 else shape[0]
    return x / fan_in**0.5


def random_state_dict(name: str, cfg: Mapping[str, Any], seed: int,
                      motion: MotionModuleConfig = MotionModuleConfig()) -> dict[str, Tensor]:
    sd = {}
    for k, shape in _component_shapes(name, cfg, motion).items():
        if k.endswith("pos_encoder.pe"):  # the motion modules' sinusoidal table, not a weight
            sd[k] = sinusoid_table(shape)
        else:
            sd[k] = random_tensor(k, shape, seed, name)
    return sd


def _save_safetensors(sd: Mapping[str, Tensor], path: Path, dtype: torch.dtype) -> None:
    save_weights({k: v.to(dtype) for k, v in sd.items()}, path)


def write_random_model_set(
    configs,
    out_dir,
    seed: int = 0,
    tokenizer_dir: Optional[Path] = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    quirks: Iterable[str] = (),
) -> Path:
    """Write a complete random model set to ``out_dir`` in the real layout.

    ``configs`` is a model-set directory to take the config files (and tokenizer) from, or
    a dict as returned by :func:`read_config_set` or
    :func:`~magicanimate_rt.models.presets.preset_configs` (then the tokenizer is
    ``tokenizer_dir`` or, by default, a generated byte-level CLIP tokenizer).
    The set is written into a temporary directory beside ``out_dir`` and renamed into place
    when complete, so an interrupted write leaves nothing behind. ``quirks`` (names of
    :data:`QUIRKS`): write the files the way the published ones are (:func:`write_quirks`);
    the set loads to the same values as without them.
    """
    quirks = _check_quirks(quirks)
    out_dir = Path(out_dir)
    src_root: Optional[Path] = None
    if not isinstance(configs, Mapping):
        src_root = Path(configs)
        configs = read_config_set(src_root)
        tokenizer_dir = tokenizer_dir or src_root / TOKENIZER_DIR
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise ModelLoadError(f"{tokenizer_dir}: tokenizer directory not found")
    if out_dir.exists():
        if not overwrite:
            raise ModelLoadError(f"{out_dir}: already exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_layout(configs, tmp, seed, Path(tokenizer_dir) if tokenizer_dir else None, src_root, dtype)
        write_quirks(tmp, quirks)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_layout(configs, root: Path, seed: int, tokenizer_dir: Optional[Path], src_root: Optional[Path], dtype) -> None:
    def write_json(rel: str, obj) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj, indent=2) + "\n")
        return p.parent

    for rel in EXTRA_FILES:  # not used by us; present in the real layout
        if src_root is not None and (src_root / rel).is_file():
            write_json(rel, json.loads((src_root / rel).read_text()))
    if tokenizer_dir is None:
        write_byte_tokenizer(root / TOKENIZER_DIR)
    else:
        shutil.copytree(tokenizer_dir, root / TOKENIZER_DIR)

    weights = "diffusion_pytorch_model.safetensors"
    for i, name in enumerate(("vae", "vae_mse", "appearance_encoder", "controlnet")):
        if name not in configs:
            continue
        d = write_json(CONFIG_FILES[name], configs[name])
        _save_safetensors(random_state_dict(name, configs[name], seed + 101 * (i + 1)), d / weights, dtype)

    d = write_json(CONFIG_FILES["text_encoder"], configs["text_encoder"])
    _save_safetensors(random_state_dict("text_encoder", configs["text_encoder"], seed + 7), d / "model.safetensors", dtype)

    # SD's UNet file holds the spatial weights; the motion checkpoint the motion modules.
    unet = random_state_dict("unet", configs["unet"], seed + 11)
    d = write_json(CONFIG_FILES["unet"], configs["unet"])
    _save_safetensors({k: v for k, v in unet.items() if ".motion_modules." not in k}, d / weights, dtype)
    save_weights({k: v.to(dtype) for k, v in unet.items() if ".motion_modules." in k}, root / MOTION_CKPT)


# --------------------------------------------------------------------------- the published files' quirks
#: how the files users download differ from this writer's default output (read against
#: diffusers 0.21.4 / transformers 4.32 and the published files); each loads to the same
#: values as the clean set
QUIRKS = {
    "legacy_vae_attention": "SD 1.5's vae/ and sd-vae-ft-mse store the VAE mid-block attention under the deprecated "
                            "names query/key/value/proj_attn (2-D weights)",
    "legacy_vae_attention_4d": "the same names, with the weights as 1x1 convolutions (C, C, 1, 1), as some "
                               "conversions store them",
    "position_ids": "the CLIP text encoder file carries text_model.embeddings.position_ids (int64, (1, 77), saved "
                    "by transformers 4.22)",
    "full_unet_motion": "temporal_attention.ckpt holds the whole temporal UNet (spatial + motion-module weights), "
                        "wrapped as {'epoch', 'global_step', 'state_dict': {'module.' + key: ...}}; its spatial "
                        "weights override SD's UNet file, which then holds other values (half of them)",
    "variants": "every component folder also holds the other published files (.bin, .fp16.safetensors, "
                ".fp16.bin; unet/ also *.non_ema.*), each with other values (negated) than the full-precision "
                "safetensors the loader must choose, plus SD's safety_checker/, feature_extractor/ and "
                "v1-5-pruned-emaonly.{ckpt,safetensors}",
    "legacy_pickles": "every pickle in torch's legacy (non-zip) format, which cannot be memory-mapped",
}
#: the order quirks are applied in (variants copy whatever the earlier ones wrote)
_QUIRK_ORDER = ("legacy_vae_attention", "legacy_vae_attention_4d", "position_ids", "full_unet_motion", "variants",
                "legacy_pickles")
_DECOY_CKPTS = ("v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors")
_NON_EMA = ("diffusion_pytorch_model.non_ema.safetensors", "diffusion_pytorch_model.non_ema.bin")


def _check_quirks(quirks: Iterable[str]) -> tuple[str, ...]:
    quirks = tuple(quirks)
    unknown = [q for q in quirks if q not in QUIRKS]
    if unknown:
        raise ValueError(f"unknown quirk(s) {', '.join(unknown)}; choose from {', '.join(QUIRKS)}")
    if "legacy_vae_attention" in quirks and "legacy_vae_attention_4d" in quirks:
        raise ValueError("legacy_vae_attention and legacy_vae_attention_4d exclude each other")
    return quirks


def save_weights(sd: Mapping[str, Any], path: Path, legacy_pickle: bool = False) -> None:
    """Write ``sd`` to ``path`` (replacing a file or a symlink there, never writing through
    it): safetensors by the suffix, else a torch pickle (zip format, or torch's legacy one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(dict(sd), path, _use_new_zipfile_serialization=not legacy_pickle)


def write_motion_checkpoint(path: Path, tensors: Mapping[str, Tensor], ddp: bool = True) -> None:
    """A motion checkpoint as training writes it: ``{"epoch", "global_step", "state_dict":
    {"module." + key: tensor}}`` (``ddp``), else the flat dict."""
    sd = {f"module.{k}": v for k, v in tensors.items()} if ddp else dict(tensors)
    save_weights({"epoch": 29, "global_step": 100_000, "state_dict": sd} if ddp else sd, path)


def _weights_file(root: Path, directory: str, component: str) -> Optional[Path]:
    return pick_weights(root / directory, weights_names(component))


def _rewrite(path: Path, change: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> None:
    save_weights(change(read_state_dict(path)), path)


def _to_legacy_vae(sd: dict[str, Tensor], conv: bool) -> dict[str, Tensor]:
    old = {new: name for name, new in LEGACY_VAE_ATTENTION.items()}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if "attentions" in parts:
            for new, name in old.items():
                n = len(new.split("."))
                if ".".join(parts[-1 - n:-1]) == new:
                    k = ".".join(parts[:-1 - n] + [name, parts[-1]])
                    if conv and v.ndim == 2:
                        v = v[:, :, None, None]
                    break
        out[k] = v
    return out


def _negated(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: -v if v.is_floating_point() else v for k, v in sd.items()}


def write_quirks(root, quirks: Iterable[str]) -> None:
    """Rewrite the files of the model set at ``root`` the way the published files are, one
    option per quirk of :data:`QUIRKS`; the set still loads to the same values. Works on any
    set in the layout (a linked copy too: a symlinked file is replaced, never written
    through)."""
    root = Path(root)
    quirks = _check_quirks(quirks)
    for q in sorted(quirks, key=_QUIRK_ORDER.index):
        {"legacy_vae_attention": lambda: _quirk_legacy_vae(root, conv=False),
         "legacy_vae_attention_4d": lambda: _quirk_legacy_vae(root, conv=True),
         "position_ids": lambda: _quirk_position_ids(root),
         "full_unet_motion": lambda: _quirk_full_unet(root),
         "variants": lambda: _quirk_variants(root),
         "legacy_pickles": lambda: _quirk_legacy_pickles(root)}[q]()


def _quirk_legacy_vae(root: Path, conv: bool) -> None:
    for d in (f"{SD_DIR}/vae", VAE_MSE_DIR):
        f = _weights_file(root, d, "vae")
        if f is not None:
            _rewrite(f, lambda sd: _to_legacy_vae(sd, conv))


def _quirk_position_ids(root: Path) -> None:
    f = _weights_file(root, f"{SD_DIR}/text_encoder", "text_encoder")
    n = int(read_config(root / CONFIG_FILES["text_encoder"]).get("max_position_embeddings", 77))
    _rewrite(f, lambda sd: {"text_model.embeddings.position_ids": torch.arange(n)[None], **sd})


def _quirk_full_unet(root: Path) -> None:
    spatial_file = _weights_file(root, f"{SD_DIR}/unet", "unet")
    spatial = read_state_dict(spatial_file)
    motion = read_state_dict(root / MOTION_CKPT)
    order = _component_shapes("unet", read_config(root / CONFIG_FILES["unet"]), MotionModuleConfig())
    full = {**spatial, **motion}
    write_motion_checkpoint(root / MOTION_CKPT, {k: full[k] for k in order if k in full})
    save_weights({k: v / 2 for k, v in spatial.items()}, spatial_file)  # SD's own, not MagicAnimate's


def _quirk_variants(root: Path) -> None:
    dirs = {"unet": f"{SD_DIR}/unet", "vae": f"{SD_DIR}/vae", "vae_mse": VAE_MSE_DIR,
            "text_encoder": f"{SD_DIR}/text_encoder", "appearance_encoder": f"{MA_DIR}/appearance_encoder",
            "controlnet": f"{MA_DIR}/densepose_controlnet"}
    for name, d in dirs.items():
        component = "vae" if name == "vae_mse" else name
        names = weights_names(component)
        chosen = _weights_file(root, d, component)
        if chosen is None:
            continue
        sd = read_state_dict(chosen)
        decoy = _negated(sd)
        half = {k: v.half() if v.is_floating_point() else v for k, v in decoy.items()}
        extra = _NON_EMA if name == "unet" else ()
        for n in names[1:] + extra:
            save_weights(half if ".fp16." in n else decoy, root / d / n)
        save_weights(sd, root / d / names[0])
    probe = {"model.diffusion_model.conv_in.weight": torch.ones(4, 4)}  # never to be read
    for n in _DECOY_CKPTS:
        save_weights({"state_dict": probe} if n.endswith(".ckpt") else probe, root / SD_DIR / n)
    save_weights(probe, root / SD_DIR / "safety_checker" / "model.safetensors")
    for rel, cfg in ((f"{SD_DIR}/safety_checker/config.json", {"_class_name": "StableDiffusionSafetyChecker"}),
                     (f"{SD_DIR}/feature_extractor/preprocessor_config.json", {"crop_size": 224})):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(cfg) + "\n")


def _quirk_legacy_pickles(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".bin", ".ckpt"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            p.unlink()
            torch.save(obj, p, _use_new_zipfile_serialization=False)
