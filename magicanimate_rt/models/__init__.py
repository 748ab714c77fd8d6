"""PyTorch definitions of every MagicAnimate stage and the loader for the real layout."""

from .appearance import AppearanceEncoder
from .config import MotionModuleConfig, UNetConfig
from .controlnet import ControlNet
from .loading import ModelPaths, ModelSet, load_model_set, read_state_dict
from .unet import TemporalUNet
from .vae import VAE

__all__ = [
    "AppearanceEncoder",
    "ControlNet",
    "ModelPaths",
    "ModelSet",
    "MotionModuleConfig",
    "TemporalUNet",
    "UNetConfig",
    "VAE",
    "load_model_set",
    "read_state_dict",
]
