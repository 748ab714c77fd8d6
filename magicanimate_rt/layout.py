"""The on-disk layout of a model set (REFERENCE section 1): names and which file is read;
and where the project keeps what it writes for later runs (:func:`cache_dir`).

One home for it: the PyTorch loader (``models/loading.py``) reads these files and the
engine manifest (``engines/manifest.py``) fingerprints them; this module needs only the
standard library, so ``engines/`` can use it without pulling in the PyTorch models.
"""

from __future__ import annotations

import os
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

def cache_dir() -> Path:
    """The project's cache directory: ``$MAGICANIMATE_RT_CACHE``, else
    ``$XDG_CACHE_HOME/magicanimate-rt``, else ``~/.cache/magicanimate-rt``. The demo's and
    the benchmarks' model sets go there, and the compile cache under ``compile/``."""
    if os.environ.get("MAGICANIMATE_RT_CACHE"):
        return Path(os.environ["MAGICANIMATE_RT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "magicanimate-rt"


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


# --------------------------------------------------------------------------- the published folders
#: why each weights name is the one read, by its place in the order (DIFFUSERS_WEIGHTS,
#: TRANSFORMERS_WEIGHTS): what diffusers 0.21.4 / transformers 4.32 pick without a variant
CHOICE_REASONS = (
    "full-precision safetensors (what diffusers/transformers read when a folder holds several files)",
    "full-precision pickle (there is no full-precision safetensors file)",
    "only the fp16 variant is present: its values are cast to the requested dtype "
    "(the original, asking for no variant, would find no weights)",
    "only the fp16 pickle variant is present: its values are cast to the requested dtype "
    "(the original, asking for no variant, would find no weights)",
)
#: file suffixes that hold weights (a file with one of them that is not chosen is reported)
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
#: folders and files of the published Stable Diffusion 1.5 folder that MagicAnimate does not use
SD_UNUSED = {
    "safety_checker": "the NSFW classifier of SD's own pipeline; MagicAnimate does not run it",
    "feature_extractor": "the safety checker's image preprocessing; not used",
    "scheduler": "MagicAnimate has its own DDIM settings",
}


def other_weights_files(directory: Path, chosen: Optional[Path]) -> list[tuple[str, str]]:
    """The weights files of ``directory`` that are not ``chosen``, as (name, why it is not
    read): the other formats and precisions, and ``*.non_ema.*`` (SD's non-EMA training
    weights, never read whatever else is there)."""
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.suffix not in WEIGHTS_SUFFIXES or (chosen is not None and p.name == chosen.name):
            continue
        if ".non_ema." in p.name:
            why = "non-EMA training weights: never read"
        elif chosen is not None:
            why = f"not read: {chosen.name} is preferred"
        else:
            why = "not a weights file name the loader reads"
        out.append((p.name, why))
    return out


def unused_entries(root: Path) -> list[tuple[str, str]]:
    """What the published folders hold that is never read, as (path relative to ``root``,
    why): SD's single-file checkpoints (``v1-5-pruned-emaonly.{ckpt,safetensors}``: the
    diffusers folders hold the same model), its safety checker, feature extractor and
    scheduler, and SD's own vae/ when sd-vae-ft-mse/ replaces it."""
    sd = root / SD_DIR
    out = []
    if sd.is_dir():
        for p in sorted(sd.iterdir()):
            if p.is_file() and p.suffix in WEIGHTS_SUFFIXES:
                out.append((f"{SD_DIR}/{p.name}", "SD's single-file checkpoint: the diffusers folders are read "
                                                  "instead"))
            elif p.is_dir() and p.name in SD_UNUSED:
                out.append((f"{SD_DIR}/{p.name}/", SD_UNUSED[p.name]))
        if (root / VAE_MSE_DIR).is_dir() and (sd / "vae").is_dir():
            out.append((f"{SD_DIR}/vae/", f"replaced by {VAE_MSE_DIR}/ (as the original's config)"))
    return out
