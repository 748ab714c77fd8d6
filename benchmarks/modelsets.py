"""Benchmark model sets: written once, in the real layout, by the project's writer, into a
cache directory, and reused by every later run.

- ``tiny`` and ``mid`` come from :func:`magicanimate_rt.models.presets.preset_configs`;
- ``sd15`` from ``shared/conformance/sd15-configs`` (SD 1.5's real configs) when that
  directory is there, else from the preset (the same architecture).

Weights are random (no downloads): speed and memory depend on the shapes only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from magicanimate_rt.layout import cache_dir
from magicanimate_rt.models.loading import MOTION_CKPT
from magicanimate_rt.models.presets import PRESETS, preset_configs

CONFIGS = tuple(PRESETS)  # tiny, mid, sd15
#: bump when the writer's output for the same config would change
VERSION = "v1"
SD15_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "sd15-configs"

#: default output size per config and device type: the sizes at which each config is
#: meaningful there (sd15 at 512 px takes minutes per UNet call on a 2-core CPU)
DEFAULT_SIZES = {
    "cpu": {"tiny": 128, "mid": 128, "sd15": 256},
    "cuda": {"tiny": 128, "mid": 256, "sd15": 512},
}


def config_source(name: str):
    """What the model set is written from: a config directory or a preset's dicts."""
    if name == "sd15" and SD15_CONFIGS.is_dir():
        return SD15_CONFIGS
    return preset_configs(name)


def model_set(name: str, root: Optional[Path] = None) -> Path:
    """The directory of config ``name``'s random model set, written on first use
    (atomically, by :func:`~magicanimate_rt.models.writer.write_random_model_set`)."""
    from magicanimate_rt.models.writer import write_random_model_set

    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    path = Path(root or cache_dir()) / f"bench-{name}-{VERSION}"
    if not (path / MOTION_CKPT).is_file():
        write_random_model_set(config_source(name), path, seed=0, overwrite=True)
    return path
