"""Stage specs: the one description of every exported stage, read by export, build and run.

A :class:`StageSpec` declares a stage's tensors (names, shapes with named dynamic axes,
dtypes), how to fill sample inputs, the TensorRT optimisation profile of each dynamic axis
(min/opt/max) and the runtime buffer shapes (after NVIDIA TensorRT ``demo/Diffusion``'s
``BaseModel``: ``get_input_names``, ``get_dynamic_axes``, ``get_sample_input``,
``get_input_profile``, ``get_shape_dict``). Specs are built by the functions in
:data:`SPEC_BUILDERS` from a model set's sizes (:class:`ModelDims`), the output shape
(width and height) and the precision, and are stored in every engine manifest
(:meth:`StageSpec.to_dict`), so a runtime rebuilds them from the manifest alone.

This module is pure data (numpy only): the engine loader and the runtime import it on
machines without the PyTorch models, diffusers or transformers.

| stage              | inputs                                                   | outputs                   |
|--------------------|----------------------------------------------------------|---------------------------|
| vae_encoder        | images (B, 3, H, W) pixel values 0..255                  | latents (B, 4, h, w)      |
| appearance_encoder | latent (1, 4, h, w), timestep (1,), text_embedding        | bank_0 .. bank_{n-1}      |
| controlnet         | latents (N, 4, h, w), timestep, text_embedding, cond (N, 3, H, W) in [0, 1] | down_0 .. down_11, mid |
| unet               | latents (1, 4, F, h, w), timestep, text_embedding, down_i (F, ...), mid (F, ...), bank_j | eps_uncond, eps_cond (1, 4, F, h, w) |
| vae_decoder        | latents (B, 4, h, w)                                      | images (B, 3, H, W) in [0, 1] |

W x H = the output width and height (a square: W = H = size), (h, w) = (H, W) / 8, F = the
window (16), B and N dynamic (axes ``images``, ``frames``).
``timestep`` is float32 (1,) in every precision (the timestep embedding runs in float32);
every other tensor is float32 (``fp32``) or float16 (``fp16``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import InputError, ModelLoadError
from ..stage_names import ENGINES

PRECISIONS = ("fp32", "fp16")
#: the stages in the order a build exports them (the engine files of ``stage_names.py``)
STAGE_NAMES = ENGINES
TIMESTEP_DTYPE = "float32"

Dim = Union[int, str]


def float_dtype(precision: str) -> str:
    """numpy dtype name of a precision's float tensors."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "float16" if precision == "fp16" else "float32"


#: output sides must divide by this: the VAE's 8 x the UNet's 2 ** 3 downsamplings (SD 1.5;
#: :meth:`ModelDims.size_step` derives it from a model set's configs)
SIZE_STEP = 64


#: the largest output side. SD 1.5 was trained at 512; 2048 already has 16x its pixels, and
#: the self-attention's cost grows with the square of the (H/8 x W/8) token count
MAX_SIZE = 2048


def check_size(size, name: str = "size", step: int = SIZE_STEP) -> int:
    """The one size rule: ``size`` must be a positive integer multiple of ``step``, at
    most :data:`MAX_SIZE` (InputError naming ``name`` otherwise); returns it."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % step or size > MAX_SIZE:
        raise InputError(f"{name} must be a positive multiple of {step} up to {MAX_SIZE}, got {size!r}")
    return size


def output_shape(size=512, width=None, height=None, names: tuple[str, str, str] = ("size", "width", "height"),
                 step: int = SIZE_STEP) -> tuple[int, int]:
    """The one output-shape rule: ``(width, height)`` of a request or a build.

    ``width`` and ``height`` go together and, when given, take the place of ``size`` (the
    square shorthand, width = height = size); each is checked by :func:`check_size`.
    ``names`` are how the three are called in messages (e.g. ``--size``, ``--width``,
    ``--height`` on a command line). Width without height (or the reverse) is an
    InputError naming both."""
    size_name, width_name, height_name = names
    if width is None and height is None:
        s = check_size(size, size_name, step)
        return s, s
    if width is None or height is None:
        given, missing = (width_name, height_name) if height is None else (height_name, width_name)
        raise InputError(f"{given} needs {missing}: give both {width_name} and {height_name}, "
                         f"or {size_name} for a square")
    return check_size(width, width_name, step), check_size(height, height_name, step)


def shape_label(width: int, height: int) -> str:
    """How a shape is named in messages and reports: ``192x128``."""
    return f"{width}x{height}"


# --------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class AxisRange:
    """A dynamic axis' TensorRT profile: smallest, tuned-for and largest value."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (isinstance(self.min, int) and isinstance(self.opt, int) and isinstance(self.max, int)
                and 1 <= self.min <= self.opt <= self.max):
            raise InputError(f"axis range needs integers 1 <= min <= opt <= max, "
                             f"got {self.min}, {self.opt}, {self.max}")

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


#: how :meth:`StageSpec.sample_inputs` fills a tensor of each kind
SAMPLERS: dict[str, Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]] = {
    "normal": lambda rng, shape: rng.standard_normal(shape),
    "timestep": lambda rng, shape: rng.integers(1, 1000, shape).astype(np.float64),
    "pixels": lambda rng, shape: rng.integers(0, 256, shape).astype(np.float64),
    "unit": lambda rng, shape: rng.random(shape),
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``shape`` holds ints and names of dynamic axes."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str  # numpy dtype name
    sample: str = "normal"  # a key of SAMPLERS

    def resolve(self, axes: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape for the given dynamic-axis values."""
        try:
            return tuple(d if isinstance(d, int) else int(axes[d]) for d in self.shape)
        except KeyError as e:
            raise InputError(f"tensor {self.name}: no value for dynamic axis {e.args[0]!r}") from None

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "sample": self.sample}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), tuple(d["shape"]), str(d["dtype"]), str(d.get("sample", "normal")))


@dataclass(frozen=True)
class StageSpec:
    """Everything export, build and run need to know about one stage's graph."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: dynamic axis name -> its profile; every other dimension is static
    axes: Mapping[str, AxisRange] = field(default_factory=dict)

    # -- names and axes ----------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def tensors(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in (*self.inputs, *self.outputs)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {dim: axis name}}`` (``torch.onnx.export``'s ``dynamic_axes``)."""
        out: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            dyn = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if dyn:
                out[t.name] = dyn
        return out

    def _axis_values(self, which: str, given: Mapping[str, int]) -> dict[str, int]:
        unknown = sorted(set(given) - set(self.axes))
        if unknown:
            raise InputError(f"stage {self.name}: unknown dynamic axes {unknown}; it has {sorted(self.axes)}")
        values = {a: getattr(r, which) for a, r in self.axes.items()}
        values.update(given)
        return values

    # -- shapes --------------------------------------------------------------------------
    def shapes(self, **axes: int) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input and output; axes not given take their opt value.
        These are the runtime's buffer shapes for a call with those axis values."""
        values = self._axis_values("opt", axes)
        return {name: t.resolve(values) for name, t in self.tensors.items()}

    def max_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes at every axis' max: what a runtime allocates once to serve any call."""
        return {name: t.resolve(self._axis_values("max", {})) for name, t in self.tensors.items()}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``{input: (min shape, opt shape, max shape)}``: the TensorRT optimisation profile."""
        lo, opt, hi = (self._axis_values(w, {}) for w in ("min", "opt", "max"))
        return {t.name: (t.resolve(lo), t.resolve(opt), t.resolve(hi)) for t in self.inputs}

    def check_axes(self, **axes: int) -> None:
        """Raise InputError when an axis value lies outside its profile."""
        for a, v in self._axis_values("opt", axes).items():
            r = self.axes[a]
            if not r.min <= v <= r.max:
                raise InputError(f"stage {self.name}: {a}={v} is outside the built range {r.min}..{r.max}")

    # -- samples -------------------------------------------------------------------------
    def sample_inputs(self, seed: int = 0, **axes: int) -> dict[str, np.ndarray]:
        """Random inputs of the right shapes and dtypes (axes not given take their opt
        value), deterministic from ``seed``."""
        rng = np.random.default_rng(seed)
        values = self._axis_values("opt", axes)  # inputs only: outputs may have derived, unprofiled axes
        return {t.name: SAMPLERS[t.sample](rng, t.resolve(values)).astype(t.np_dtype) for t in self.inputs}

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "axes": {a: r.to_list() for a, r in self.axes.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageSpec":
        return cls(
            name=str(d["name"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            axes={a: AxisRange(*r) for a, r in d.get("axes", {}).items()},
        )


# --------------------------------------------------------------------------- model sizes
@dataclass(frozen=True)
class ModelDims:
    """The sizes of a model set that the specs derive shapes from.

    Fields:
        block_out_channels: channels per UNet level (SD 1.5: 320, 640, 1280, 1280); the
            ControlNet and the appearance encoder have the same.
        layers_per_block: resnets per down block (2); up blocks have one more.
        up_attention: per up block, whether it has transformers (their norm1 outputs, with
            the mid block's, form the reference bank).
        text_tokens, text_dim: the text embedding's (77, Cx).
        latent_channels: 4. image_channels: 3.
        vae_scale: image pixels per latent pixel (8 = 2 ** (VAE levels - 1)).
        window: frames per temporal-UNet call (16).
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    up_attention: tuple[bool, ...]
    text_tokens: int
    text_dim: int
    latent_channels: int = 4
    image_channels: int = 3
    vae_scale: int = 8
    window: int = 16

    @classmethod
    def from_configs(
        cls,
        unet: Mapping[str, Any],
        vae: Mapping[str, Any],
        controlnet: Optional[Mapping[str, Any]] = None,
        appearance_encoder: Optional[Mapping[str, Any]] = None,
        text_tokens: int = 77,
        window: int = 16,
    ) -> "ModelDims":
        """From the diffusers config dicts of a model set (the ``config.json`` contents).

        The ControlNet's residuals are added to the UNet's skip features and the appearance
        encoder's bank feeds the UNet's mid/up blocks, so their configs must agree with the
        UNet's on the sizes that matter; a disagreement is a ModelLoadError.
        """

        def key(cfg: Mapping[str, Any], name: str) -> tuple:
            ch = tuple(int(c) for c in cfg["block_out_channels"])
            ups = tuple(str(t).startswith("CrossAttn") for t in cfg.get("up_block_types", ()))
            return ch, int(cfg.get("layers_per_block", 2)), ups

        ch, lpb, ups = key(unet, "unet")
        for other, name in ((controlnet, "ControlNet"), (appearance_encoder, "appearance encoder")):
            if other is None:
                continue
            och, olpb, oups = key(other, name)
            if (och, olpb) != (ch, lpb) or (name == "appearance encoder" and oups != ups):
                raise ModelLoadError(
                    f"the {name} config (channels {och}, layers per block {olpb}) does not match the "
                    f"UNet's (channels {ch}, layers per block {lpb})"
                )
        cx = unet.get("cross_attention_dim", 768)
        return cls(
            block_out_channels=ch,
            layers_per_block=lpb,
            up_attention=ups,
            text_tokens=int(text_tokens),
            text_dim=int(cx),
            latent_channels=int(unet.get("in_channels", 4)),
            image_channels=int(vae.get("in_channels", 3)),
            vae_scale=2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1),
            window=int(window),
        )

    @property
    def size_step(self) -> int:
        """What output sides must divide by: h = size / vae_scale, which the UNet halves
        (levels - 1) times (64 for SD 1.5)."""
        return self.vae_scale * 2 ** (len(self.block_out_channels) - 1)

    def latent_size(self, size: int) -> int:
        """h = w = size / vae_scale (size checked by :func:`check_size`)."""
        return check_size(size, step=self.size_step) // self.vae_scale

    def latent_shape(self, width: int, height: Optional[int] = None) -> tuple[int, int]:
        """(h, w) = (height, width) / vae_scale; ``height`` None: a square of side ``width``."""
        return self.latent_size(width if height is None else height), self.latent_size(width)

    def down_residual_shapes(self, width: int, height: Optional[int] = None) -> list[tuple[int, int, int]]:
        """(C, h_i, w_i) of the 12 (SD 1.5) ControlNet down residuals: conv_in's output,
        each down resnet's, each downsampler's (``height`` None: square)."""
        h, w = self.latent_shape(width, height)
        ch = self.block_out_channels
        shapes = [(ch[0], h, w)]
        for i, c in enumerate(ch):
            shapes += [(c, h, w)] * self.layers_per_block
            if i < len(ch) - 1:
                h, w = h // 2, w // 2
                shapes.append((c, h, w))
        return shapes

    def _mid_latent(self, width: int, height: Optional[int]) -> tuple[int, int]:
        """(h, w) at the UNet's lowest level (the mid block)."""
        scale = 2 ** (len(self.block_out_channels) - 1)
        h, w = self.latent_shape(width, height)
        return h // scale, w // scale

    def mid_residual_shape(self, width: int, height: Optional[int] = None) -> tuple[int, int, int]:
        return (self.block_out_channels[-1], *self._mid_latent(width, height))

    def bank_shapes(self, width: int, height: Optional[int] = None) -> list[tuple[int, int]]:
        """(L_j, C_j) of the reference bank: the mid block's transformer, then every
        transformer of the up blocks, in module order (10 for SD 1.5); L_j = h_j * w_j."""
        h, w = self._mid_latent(width, height)
        rch = list(reversed(self.block_out_channels))
        shapes = [(h * w, rch[0])]
        for i, has_attention in enumerate(self.up_attention):
            if has_attention:
                shapes += [(h * w * 4**i, rch[i])] * (self.layers_per_block + 1)
        return shapes

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "up_attention": list(self.up_attention),
            "text_tokens": self.text_tokens,
            "text_dim": self.text_dim,
            "latent_channels": self.latent_channels,
            "image_channels": self.image_channels,
            "vae_scale": self.vae_scale,
            "window": self.window,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelDims":
        return cls(**{**d, "block_out_channels": tuple(d["block_out_channels"]),
                      "up_attention": tuple(bool(x) for x in d["up_attention"])})


@dataclass(frozen=True)
class BatchRanges:
    """Profiles of the dynamic batch axes. The defaults cover the pipeline's defaults: the
    reference image is encoded alone, ControlNet runs 16 frames a call, decoding 8."""

    vae_encoder: AxisRange = AxisRange(1, 1, 4)
    controlnet: AxisRange = AxisRange(1, 16, 16)
    vae_decoder: AxisRange = AxisRange(1, 8, 8)

    def to_dict(self) -> dict[str, list[int]]:
        return {k: getattr(self, k).to_list() for k in ("vae_encoder", "controlnet", "vae_decoder")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[int]]) -> "BatchRanges":
        return cls(**{k: AxisRange(*v) for k, v in d.items()})


# --------------------------------------------------------------------------- the specs
def _text(d: ModelDims, fp: str) -> TensorSpec:
    return TensorSpec("text_embedding", (1, d.text_tokens, d.text_dim), fp)


def _timestep() -> TensorSpec:
    return TensorSpec("timestep", (1,), TIMESTEP_DTYPE, "timestep")


def vae_encoder_spec(d: ModelDims, width: int, height: int, fp: str, b: BatchRanges) -> StageSpec:
    h, w = d.latent_shape(width, height)
    return StageSpec(
        "vae_encoder",
        inputs=(TensorSpec("images", ("images", d.image_channels, height, width), fp, "pixels"),),
        outputs=(TensorSpec("latents", ("images", d.latent_channels, h, w), fp),),
        axes={"images": b.vae_encoder},
    )


def appearance_encoder_spec(d: ModelDims, width: int, height: int, fp: str, b: BatchRanges) -> StageSpec:
    h, w = d.latent_shape(width, height)
    return StageSpec(
        "appearance_encoder",
        inputs=(TensorSpec("latent", (1, d.latent_channels, h, w), fp), _timestep(), _text(d, fp)),
        outputs=tuple(TensorSpec(f"bank_{j}", (1, tokens, c), fp)
                      for j, (tokens, c) in enumerate(d.bank_shapes(width, height))),
    )


def controlnet_spec(d: ModelDims, width: int, height: int, fp: str, b: BatchRanges) -> StageSpec:
    h, w = d.latent_shape(width, height)
    downs = d.down_residual_shapes(width, height)
    return StageSpec(
        "controlnet",
        inputs=(
            TensorSpec("latents", ("frames", d.latent_channels, h, w), fp),
            _timestep(),
            _text(d, fp),
            TensorSpec("cond", ("frames", d.image_channels, height, width), fp, "unit"),
        ),
        outputs=(
            *(TensorSpec(f"down_{i}", ("frames", *s), fp) for i, s in enumerate(downs)),
            TensorSpec("mid", ("frames", *d.mid_residual_shape(width, height)), fp),
        ),
        axes={"frames": b.controlnet},
    )


def unet_spec(d: ModelDims, width: int, height: int, fp: str, b: BatchRanges) -> StageSpec:
    h, w = d.latent_shape(width, height)
    f = d.window
    window = (1, d.latent_channels, f, h, w)
    return StageSpec(
        "unet",
        inputs=(
            TensorSpec("latents", window, fp),
            _timestep(),
            _text(d, fp),
            *(TensorSpec(f"down_{i}", (f, *s), fp) for i, s in enumerate(d.down_residual_shapes(width, height))),
            TensorSpec("mid", (f, *d.mid_residual_shape(width, height)), fp),
            *(TensorSpec(f"bank_{j}", (1, tokens, c), fp)
              for j, (tokens, c) in enumerate(d.bank_shapes(width, height))),
        ),
        outputs=(TensorSpec("eps_uncond", window, fp), TensorSpec("eps_cond", window, fp)),
    )


def vae_decoder_spec(d: ModelDims, width: int, height: int, fp: str, b: BatchRanges) -> StageSpec:
    h, w = d.latent_shape(width, height)
    return StageSpec(
        "vae_decoder",
        inputs=(TensorSpec("latents", ("frames", d.latent_channels, h, w), fp),),
        outputs=(TensorSpec("images", ("frames", d.image_channels, height, width), fp),),
        axes={"frames": b.vae_decoder},
    )


#: stage name -> spec builder ``f(dims, width, height, float dtype name, batch ranges)``
SPEC_BUILDERS: dict[str, Callable[[ModelDims, int, int, str, BatchRanges], StageSpec]] = {
    "vae_encoder": vae_encoder_spec,
    "appearance_encoder": appearance_encoder_spec,
    "controlnet": controlnet_spec,
    "unet": unet_spec,
    "vae_decoder": vae_decoder_spec,
}
assert tuple(SPEC_BUILDERS) == STAGE_NAMES


def stage_specs(dims: ModelDims, size: Optional[int], precision: str, batches: BatchRanges = BatchRanges(),
                width: Optional[int] = None, height: Optional[int] = None) -> dict[str, StageSpec]:
    """Every stage's spec for a model set at ``size`` (a square) or ``width`` x ``height``
    (:func:`output_shape`) and ``precision``, in build order."""
    fp = float_dtype(precision)
    w, h = output_shape(size, width, height, step=dims.size_step)
    return {name: build(dims, w, h, fp, batches) for name, build in SPEC_BUILDERS.items()}


# --------------------------------------------------------------------------- validation
#: relative L2 error above which a built artifact fails its check, per (what is checked,
#: precision): "graph" an exported ONNX graph against its torch stage (``build_engines.py``,
#: ONNX Runtime on the CPU); "plan" a TensorRT plan against ONNX Runtime on its graph
#: (``python -m magicanimate_rt.plans DIR --validate``). fp32 plans run matmuls and
#: convolutions in TF32 (TensorRT's default), hence 5e-3 rather than 1e-3.
VALIDATION_TOLERANCE: dict[tuple[str, str], float] = {
    ("graph", "fp32"): 1e-3,
    ("graph", "fp16"): 3e-2,
    ("plan", "fp32"): 5e-3,
    ("plan", "fp16"): 3e-2,
}


def validation_tolerance(kind: str, precision: str) -> float:
    """The entry of :data:`VALIDATION_TOLERANCE` for ``kind`` ("graph" or "plan")."""
    float_dtype(precision)  # validates the precision
    return VALIDATION_TOLERANCE[(kind, precision)]


def relative_error(got, want) -> tuple[float, float]:
    """(largest absolute difference, ||got - want|| / ||want||) in float64 (the plain
    difference norm when ``want`` is all zeros)."""
    a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"shape {a.shape} differs from the reference's {b.shape}")
    if a.size == 0:
        return 0.0, 0.0
    diff = np.linalg.norm(a - b)
    denom = np.linalg.norm(b)
    return float(np.max(np.abs(a - b))), float(diff / denom) if denom > 0 else float(diff)
