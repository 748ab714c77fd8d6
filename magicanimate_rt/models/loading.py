"""Loading a model set from the real on-disk layout (REFERENCE section 1).

```
<models_dir>/
  stable-diffusion-v1-5/{unet,vae,text_encoder,tokenizer}/   (scheduler/ is not used)
  sd-vae-ft-mse/                                              (used instead of SD's vae/ when present)
  MagicAnimate/appearance_encoder/ densepose_controlnet/ temporal_attention/temporal_attention.ckpt
```

Every failure is a :class:`ModelLoadError` whose one-line message names the file and what
is wrong: a missing directory or file, a truncated or corrupt file, a key that matches no
parameter, a missing key, a wrong shape. Weights are always read without running code
(safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import ModelLoadError
from ..layout import COMPONENTS, DIFFUSERS_WEIGHTS
from ..layout import MOTION_CKPT as MOTION_CKPT_NAME
from ..layout import component_dirs, pick_weights, weights_names
from .appearance import AppearanceEncoder
from .config import MotionModuleConfig, UNetConfig
from .controlnet import ControlNet
from .text import build_text_encoder, empty_prompt_embedding, tokenize_empty
from .unet import TemporalUNet
from .vae import VAE

MOTION_CKPT = Path(MOTION_CKPT_NAME)


# --------------------------------------------------------------------------- files
def read_config(path: Path) -> dict[str, Any]:
    """A component's config.json as a dict."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing config file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def find_weights(component_dir: Path, names: Iterable[str] = DIFFUSERS_WEIGHTS) -> Path:
    """The first weights file present, in order: full precision before the fp16 variant,
    safetensors before pickles."""
    names = tuple(names)
    found = pick_weights(component_dir, names)
    if found is not None:
        return found
    raise ModelLoadError(f"{component_dir}: no weights file (looked for {', '.join(names)})")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a torch pickle (.bin/.ckpt/.pt).

    Pickles: a flat dict or ``{"state_dict": ...}``, keys possibly prefixed ``module.``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # SafetensorError, OSError, ValueError for a bad header
            raise ModelLoadError(f"{path}: truncated or corrupt safetensors file ({_first_line(e)})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise ModelLoadError(
                    f"{path}: refused: the pickle would run code or build objects other than tensors "
                    "(only weights_only=True checkpoints are loaded)"
                ) from None
            raise ModelLoadError(f"{path}: corrupt checkpoint ({_first_line(e)})") from None
        except Exception as e:  # zip, pickle and storage parsing fail in many ways on a damaged file
            raise ModelLoadError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise ModelLoadError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
        sd = {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ModelLoadError(f"{path}: entry {bad[0]!r} is not a named tensor")
    return dict(sd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def check_weights(
    expected: Mapping[str, torch.Size],
    sources: Mapping[Path, Mapping[str, Tensor]],
    what: str,
    ignore: Iterable[str] = (),
) -> dict[str, Tensor]:
    """Match the tensors of one or more files to a module's parameter/buffer shapes.

    ``sources`` maps each file to its tensors; a later file overrides an earlier one for
    the same key. Any key that matches no parameter or buffer (except ``ignore``), any
    parameter or buffer that no file provides, any shape mismatch raises ModelLoadError
    naming the file. Returns the tensors to load, by name.
    """
    ignore = set(ignore)
    merged: dict[str, Tensor] = {}
    for path, sd in sources.items():
        for k, v in sd.items():
            if k in ignore:
                continue
            if k not in expected:
                n_bad = sum(1 for kk in sd if kk not in expected and kk not in ignore)
                raise ModelLoadError(
                    f"{path}: {n_bad} key(s) match no parameter of the {what}, e.g. {k!r} "
                    "(is this the right file, and does config.json match it?)"
                )
            if tuple(v.shape) != tuple(expected[k]):
                raise ModelLoadError(
                    f"{path}: {k!r} has shape {tuple(v.shape)} but the {what} expects "
                    f"{tuple(expected[k])} (does config.json match the weights?)"
                )
            merged[k] = v
    missing = [k for k in expected if k not in merged]
    if missing:
        files = ", ".join(str(p) for p in sources)
        raise ModelLoadError(f"{files}: missing {len(missing)} weight(s) of the {what}, e.g. {missing[0]!r}")
    return merged


def load_component(build, config_path: Path, sources: Mapping[Path, Mapping[str, Tensor]], what: str,
                   ignore: Iterable[str] = (), part=lambda m: m) -> nn.Module:
    """Build a module with ``build()``, check every weight of ``sources`` against
    ``part(module)`` and load them, in eval mode.

    The module is first built on the meta device (no memory, no random init), so a config
    that does not match its weights fails on the shape check before anything is allocated;
    then it gets uninitialised storage (or, if it has non-persistent buffers that loading
    would not fill, a normal build) and every weight is copied in.
    """
    try:
        with torch.device("meta"):
            module = build()
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers/transformers raise many kinds for configs they cannot build
        raise ModelLoadError(f"{config_path}: cannot build the {what} from this config ({_first_line(e)})") from None
    expected = part(module).state_dict()
    merged = check_weights({k: v.shape for k, v in expected.items()}, sources, what, ignore)
    if any(name not in expected for name, _ in part(module).named_buffers()):
        module = build()
    else:
        module = module.to_empty(device="cpu")
    with torch.no_grad():
        for k, t in part(module).state_dict().items():
            t.copy_(merged[k].to(t.dtype))
    return module.eval()


def _convert_legacy_vae_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old AutoencoderKL checkpoints name the mid-block attention query/key/value/proj_attn
    (and some store them as 1x1 convs); diffusers' current names are to_q/to_k/to_v/to_out.0."""
    rename = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in rename:
            k = ".".join(parts[:-2] + [rename[parts[-2]], parts[-1]])
            if v.ndim == 4:
                v = v[:, :, 0, 0]
        out[k] = v
    return out


# --------------------------------------------------------------------------- model set
@dataclass
class ModelPaths:
    """Where each component of a model set lives (checked to exist)."""

    root: Path
    unet: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    appearance_encoder: Path
    controlnet: Path
    motion: Path

    @classmethod
    def locate(cls, models_dir) -> "ModelPaths":
        root = Path(models_dir)
        if not root.is_dir():
            raise ModelLoadError(f"{root}: models directory not found")
        paths = cls(root=root, motion=root / MOTION_CKPT, **component_dirs(root))
        for name in COMPONENTS:
            d = getattr(paths, name)
            if not d.is_dir():
                raise ModelLoadError(f"{d}: missing component directory ({name}); expected the layout in README 'Weights'")
        if not paths.motion.is_file():
            raise ModelLoadError(f"{paths.motion}: missing motion-module checkpoint")
        return paths


@dataclass
class ModelSet:
    """Every stage of MagicAnimate, loaded, in eval mode, on one device and dtype."""

    paths: ModelPaths
    text_embedding: Tensor  # (1, 77, Cx)
    vae: VAE
    appearance_encoder: AppearanceEncoder
    controlnet: ControlNet
    unet: TemporalUNet

    def to(self, device=None, dtype=None) -> "ModelSet":
        for m in (self.vae, self.appearance_encoder, self.controlnet, self.unet):
            m.to(device=device, dtype=dtype)
        self.text_embedding = self.text_embedding.to(device=device, dtype=dtype)
        return self


def _unet_config(path: Path) -> UNetConfig:
    try:
        return UNetConfig.from_dict(read_config(path), str(path))
    except (TypeError, ValueError, AttributeError) as e:  # wrong value types in the JSON
        raise ModelLoadError(f"{path}: unusable UNet config ({_first_line(e)})") from None


def load_unet(paths: ModelPaths, motion: MotionModuleConfig = MotionModuleConfig()) -> TemporalUNet:
    cfg_path = paths.unet / "config.json"
    cfg = _unet_config(cfg_path)
    spatial = find_weights(paths.unet)
    sources = {spatial: read_state_dict(spatial), paths.motion: read_state_dict(paths.motion)}
    return load_component(lambda: TemporalUNet(cfg, motion), cfg_path, sources, "temporal UNet")


def load_appearance_encoder(paths: ModelPaths) -> AppearanceEncoder:
    cfg_path = paths.appearance_encoder / "config.json"
    cfg = _unet_config(cfg_path)
    w = find_weights(paths.appearance_encoder)
    with torch.device("meta"):
        pruned = AppearanceEncoder(cfg).pruned_keys
    return load_component(lambda: AppearanceEncoder(cfg), cfg_path, {w: read_state_dict(w)},
                          "appearance encoder", ignore=pruned)


def load_controlnet(paths: ModelPaths) -> ControlNet:
    cfg_path = paths.controlnet / "config.json"
    cfg = read_config(cfg_path)
    w = find_weights(paths.controlnet)
    return load_component(lambda: ControlNet(cfg), cfg_path, {w: read_state_dict(w)}, "ControlNet",
                          part=lambda m: m.net)


def load_vae(paths: ModelPaths) -> VAE:
    cfg_path = paths.vae / "config.json"
    cfg = read_config(cfg_path)
    w = find_weights(paths.vae)
    return load_component(lambda: VAE(cfg), cfg_path, {w: _convert_legacy_vae_keys(read_state_dict(w))}, "VAE",
                          part=lambda m: m.vae)


def load_text_embedding(paths: ModelPaths) -> Tensor:
    cfg_path = paths.text_encoder / "config.json"
    cfg = read_config(cfg_path)
    w = find_weights(paths.text_encoder, weights_names("text_encoder"))
    sd = read_state_dict(w)
    with torch.device("meta"):
        try:
            names = build_text_encoder(cfg).state_dict()
        except Exception as e:
            raise ModelLoadError(f"{cfg_path}: cannot build the text encoder from this config ({_first_line(e)})") from None
    # Checkpoints name CLIP's weights "text_model.*"; transformers 5's CLIPTextModel drops
    # that level. position_ids is a buffer older versions saved and newer ones recompute.
    if not any(k.startswith("text_model.") for k in names):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    enc = load_component(lambda: build_text_encoder(cfg), cfg_path, {w: sd}, "text encoder",
                         ignore={"text_model.embeddings.position_ids", "embeddings.position_ids"})
    ids = tokenize_empty(paths.tokenizer)
    vocab = int(cfg.get("vocab_size", 0))
    if ids.min() < 0 or ids.max() >= vocab:
        raise ModelLoadError(f"{paths.tokenizer}: token ids up to {int(ids.max())} do not fit the text encoder's "
                             f"vocabulary of {vocab} (tokenizer and text_encoder/config.json disagree)")
    return empty_prompt_embedding(enc, ids)


@torch.no_grad()
def load_model_set(models_dir, device="cpu", dtype: torch.dtype = torch.float32) -> ModelSet:
    """Load every stage from ``models_dir`` (the real layout), in eval mode.

    Weights are loaded in float32 (whatever their file's precision) and then moved to
    ``device`` and ``dtype``; the text embedding is computed in float32 first.
    """
    paths = ModelPaths.locate(models_dir)
    ms = ModelSet(
        paths=paths,
        text_embedding=load_text_embedding(paths),
        vae=load_vae(paths),
        appearance_encoder=load_appearance_encoder(paths),
        controlnet=load_controlnet(paths),
        unet=load_unet(paths),
    )
    return ms.to(device=device, dtype=dtype)
