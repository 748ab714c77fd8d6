"""Writing random model sets in the real on-disk layout.

Demos, tests and benchmarks need complete model sets on a machine with no downloads: this
writes one from a set of config files (the tiny conformance configs, SD 1.5's real sizes,
or anything between), every weight random and none zero-initialised (ControlNet's zero
convolutions and the motion modules' ``proj_out`` included, so every component visibly
changes the output), deterministic from a seed. The layout is exactly what
:func:`~magicanimate_rt.models.loading.load_model_set` reads (REFERENCE section 1).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ..errors import ModelLoadError
from .appearance import AppearanceEncoder
from .config import MotionModuleConfig, UNetConfig
from .controlnet import ControlNet
from .layers import PositionalEncoding
from .presets import write_byte_tokenizer
from ..layout import MA_DIR, SD_DIR, VAE_MSE_DIR
from .loading import MOTION_CKPT, read_config
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
            sd[k] = PositionalEncoding(shape[-1], shape[1]).pe.clone()
        else:
            sd[k] = random_tensor(k, shape, seed, name)
    return sd


def _save_safetensors(sd: Mapping[str, Tensor], path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path))


def write_random_model_set(
    configs,
    out_dir,
    seed: int = 0,
    tokenizer_dir: Optional[Path] = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a complete random model set to ``out_dir`` in the real layout.

    ``configs`` is a model-set directory to take the config files (and tokenizer) from, or
    a dict as returned by :func:`read_config_set` or
    :func:`~magicanimate_rt.models.presets.preset_configs` (then the tokenizer is
    ``tokenizer_dir`` or, by default, a generated byte-level CLIP tokenizer).
    The set is written into a temporary directory beside ``out_dir`` and renamed into place
    when complete, so an interrupted write leaves nothing behind.
    """
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
    motion_path = root / MOTION_CKPT
    motion_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(dtype) for k, v in unet.items() if ".motion_modules." in k}, motion_path)
