"""The on-disk layout of a model set (REFERENCE section 1): names and which file is read.

One home for it: the PyTorch loader (``models/loading.py``) reads these files and the
engine manifest (``engines/manifest.py``) fingerprints them; this module needs only the
standard library, so ``engines/`` can use it without pulling in the PyTorch models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

SD_DIR = "stable-diffusion-v1-5"
VAE_MSE_DIR = "sd-vae-ft-mse"  # used instead of SD's vae/ when present
MA_DIR = "MagicAnimate"
MOTION_CKPT = f"{MA_DIR}/temporal_attention/temporal_attention.ckpt"

#: weights file names, in the order they are looked for: full precision before the fp16
#: variant, safetensors before pickles
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")

#: the components' directory names as the loader knows them (``ModelPaths`` fields)
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "appearance_encoder", "controlnet")


def component_dirs(root: Path) -> dict[str, Path]:
    """Each component's directory in the models directory ``root`` (keys: COMPONENTS). The
    fine-tuned VAE (sd-vae-ft-mse) replaces SD's own when present, as the original's demo
    configures it."""
    sd = root / SD_DIR
    return {
        "unet": sd / "unet",
        "vae": root / VAE_MSE_DIR if (root / VAE_MSE_DIR).is_dir() else sd / "vae",
        "text_encoder": sd / "text_encoder",
        "tokenizer": sd / "tokenizer",
        "appearance_encoder": root / MA_DIR / "appearance_encoder",
        "controlnet": root / MA_DIR / "densepose_controlnet",
    }


def weights_names(component: str) -> tuple[str, ...]:
    """The weights file names a component is read from, in order of preference."""
    return TRANSFORMERS_WEIGHTS if component == "text_encoder" else DIFFUSERS_WEIGHTS


def pick_weights(directory: Path, names: Iterable[str]) -> Optional[Path]:
    """The first of ``names`` present in ``directory`` (None if none is)."""
    return next((directory / n for n in names if (directory / n).is_file()), None)
