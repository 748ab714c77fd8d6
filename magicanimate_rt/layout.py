"""The on-disk layout of a model set (REFERENCE section 1), as plain names.

One home for it: the PyTorch loader (``models/loading.py``) reads these files and the
engine manifest (``engines/manifest.py``) fingerprints them; this module imports nothing,
so ``engines/`` can use it without pulling in the PyTorch models.
"""

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
