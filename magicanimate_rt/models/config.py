"""Typed views of the model-set config files.

The UNet-shaped models (SD's UNet inflated to video, the appearance encoder) are built
from diffusers' ``UNet2DConditionModel`` config dicts; :class:`UNetConfig` keeps the
fields our modules read and rejects the variants MagicAnimate never uses, so a config we
cannot reproduce fails at load time instead of computing something else.

The motion modules have no config file in the release (their shapes follow from the UNet's
channels); :class:`MotionModuleConfig` holds the settings of MagicAnimate's inference
config (AnimateDiff v1 "Vanilla" modules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ModelLoadError

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers UNet2DConditionModel config that our UNets use.

    ``heads`` is per down block; diffusers' legacy ``attention_head_dim`` means the number
    of heads for SD 1.5 (8), which is how the original reads it too.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    use_linear_projection: bool = False

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], source: str = "config") -> "UNetConfig":
        def bad(what: str) -> ModelLoadError:
            return ModelLoadError(f"{source}: unsupported UNet config: {what}")

        n = len(cfg.get("block_out_channels", cls.block_out_channels))
        down = tuple(cfg.get("down_block_types", cls.down_block_types))
        up = tuple(cfg.get("up_block_types", cls.up_block_types))
        if len(down) != n or len(up) != n:
            raise bad("down/up block type lists must match block_out_channels")
        if any(t not in DOWN_TYPES for t in down) or any(t not in UP_TYPES for t in up):
            raise bad(f"block types {down} / {up}")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (int(heads),) * n
        lpb = cfg.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            raise bad("per-block layers_per_block")
        tlpb = cfg.get("transformer_layers_per_block", 1)
        if tlpb not in (1, None) and tlpb != [1] * n:
            raise bad("transformer_layers_per_block != 1")
        for key, ok in (
            ("only_cross_attention", (False, None)),
            ("upcast_attention", (False, None)),
            ("class_embed_type", (None,)),
            ("addition_embed_type", (None,)),
            ("resnet_time_scale_shift", ("default", None)),
            ("time_embedding_type", ("positional", None)),
            ("center_input_sample", (False, None)),
            ("dual_cross_attention", (False, None)),
            ("act_fn", ("silu", None)),
        ):
            if cfg.get(key) not in ok:
                raise bad(f"{key}={cfg.get(key)!r}")
        return cls(
            in_channels=int(cfg.get("in_channels", 4)),
            out_channels=int(cfg.get("out_channels", 4)),
            block_out_channels=tuple(int(c) for c in cfg.get("block_out_channels", cls.block_out_channels)),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=int(lpb),
            heads=heads,
            cross_attention_dim=int(cfg.get("cross_attention_dim", 768)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=int(cfg.get("freq_shift", 0)),
            downsample_padding=int(cfg.get("downsample_padding", 1)),
            mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        )

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def num_down_residuals(self) -> int:
        """Skip features the down path produces (12 for SD 1.5): conv_in, each resnet,
        each downsampler. ControlNet emits one residual per skip feature."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + (n - 1)


@dataclass(frozen=True)
class MotionModuleConfig:
    """AnimateDiff v1 motion modules as MagicAnimate's inference config sets them."""

    heads: int = 8
    max_frames: int = 24  # temporal_position_encoding_max_len
    attention_blocks: int = 2  # ("Temporal_Self", "Temporal_Self")
    resolutions: tuple[int, ...] = field(default=(1, 2, 4, 8))  # every level of SD's UNet
    mid_block: bool = False
