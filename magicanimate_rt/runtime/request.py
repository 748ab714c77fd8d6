"""One animation request: its settings, their defaults and their validation, in one place.

:class:`AnimationRequest` is what every surface makes and the pipeline runs: the Python
API (``AnimationPipeline.animate``'s keywords build one; ``AnimationPipeline.run`` takes
one), the command line (``animate`` and ``compare`` flags are declared from its fields:
``cli.py`` :func:`~magicanimate_rt.cli.add_request_arguments`), config runs
(``config_run.py``), ``compare`` (``compare.py``), the HTTP service's form (a pydantic
model made from the same fields: ``serve/app.py``) and the Ray executor (the request
itself, not a dict). A default or a rule changed here changes on every surface, and
``--help``, the service's OpenAPI schema and ``AnimationPipeline.animate``'s signature
read their defaults from here (tests/test_request.py).

A frozen dataclass rather than a pydantic model: pydantic is not a dependency of the
command line and the Python API (it comes with the service's extra, FastAPI), and the
service needs a model of its form fields only, which it derives from these declarations.

Every bad value is one :class:`RequestError` line naming the field (its ``field``), the
words the command line prints and the service returns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from ..engines.specs import output_shape
from ..errors import InputError
from .media import FITS, load_source_image
from .modes import DEFAULT_STEPS, PRESETS, SAMPLERS, SamplingMode

__all__ = ["AnimationRequest", "RequestError", "DEFAULTS", "DEFAULT_STEPS", "PRESET_NOTES"]


#: what each preset (``runtime/modes.py``) is and costs, for ``--help``, the schema and the page
PRESET_NOTES = {
    "exact": "the original's function (DDIM, 25 steps, guidance throughout)",
    "fast": "DPM-Solver++(2M) at 15 steps, deep features reused on 2 of every 3 steps, guidance for the first "
            "half: measured at 0.25x the exact time on a CPU, frames about 27 dB PSNR from the exact ones on random "
            "weights (docs/PERFORMANCE.md 'Faster, approximately'; judge it on yours with compare)",
}
assert set(PRESET_NOTES) == set(PRESETS)


class RequestError(InputError):
    """A request's bad value: one line naming it; ``field`` is the request field it is about."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


def _setting(default: Any, help: str, *, flag: Optional[str] = None, form: Optional[str] = None,
             choices: Optional[tuple] = None, shows: Optional[str] = None, cli: bool = True):
    """A field with what its surfaces need: ``help`` (the text after which ``--help`` and the
    schema say the default), ``flag`` (the command line's name, default ``--<field>``),
    ``form`` (the service's name, default the field's), ``choices``, ``shows`` (how the
    default is said when it is not the value itself) and ``cli`` (False: the command line
    declares it its own way)."""
    return field(default=default, metadata={"help": help, "flag": flag, "form": form, "choices": choices,
                                            "shows": shows, "cli": cli})


@dataclass(frozen=True)
class AnimationRequest:
    """One animation: what to animate, at which shape, with which sampling, and which
    outputs. Constructing one checks every value (:class:`RequestError`)."""

    #: the photo: a path, a PIL image or an (H, W, 3) uint8 array (None: given later)
    source: Any = field(default=None, compare=False, repr=False)
    #: the DensePose motion: a video path or (F, H, W, 3) uint8 frames (None: given later)
    driving: Any = field(default=None, compare=False, repr=False)
    size: int = _setting(512, "output side of a square video in pixels, a multiple of 64 up to 2048")
    width: Optional[int] = _setting(None, "output width in pixels, with height, instead of size (e.g. portrait: "
                                          "width 512, height 768)")
    height: Optional[int] = _setting(None, "output height in pixels, with width")
    fit: str = _setting("stretch", "inputs of another aspect ratio: stretch (resize, the original), crop (the "
                                   "centre, resized) or pad (with edge values, resized)", choices=FITS)
    crop_output: bool = _setting(False, "with fit pad: crop the output back to where the driving video's "
                                        "content lies")
    steps: Optional[int] = _setting(None, "denoising steps", shows=f"{DEFAULT_STEPS}, or the preset's")
    guidance_scale: float = _setting(7.5, "classifier-free guidance scale >= 1", flag="--guidance", form="guidance")
    seed: int = _setting(0, "noise seed")
    start_frame: int = _setting(0, "first driving frame to use")
    max_frames: Optional[int] = _setting(None, "use at most this many driving frames", shows="all")
    preset: Optional[str] = _setting(
        None, "sampling preset: " + "; ".join(f"{k}: {v}" for k, v in PRESET_NOTES.items())
              + ". A knob given overrides the preset's", choices=tuple(PRESETS), shows="exact")
    sampler: Optional[str] = _setting(None, "ddim (the original) or dpmpp-2m", choices=SAMPLERS,
                                      shows="the preset's: ddim")
    cache_interval: Optional[int] = _setting(None, "every N-th step runs the whole UNet, the others reuse its deep "
                                                   "features", shows="the preset's: 1, off")
    cache_depth: Optional[int] = _setting(None, "how many of the UNet's last up blocks the reusing steps run",
                                          shows="the preset's: 1")
    guidance_until: Optional[float] = _setting(None, "guidance for this fraction of the steps, then the "
                                                     "conditional half alone", shows="the preset's: 1.0")
    grid: bool = _setting(False, "also write the original's [source | driving | result] grid video", cli=False)

    def __post_init__(self):
        self.shape  # noqa: B018 - checks size, width and height
        if self.fit not in FITS:
            raise RequestError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}", "fit")
        if not isinstance(self.crop_output, bool):
            raise RequestError(f"crop_output must be true or false, got {self.crop_output!r}", "crop_output")
        if self.crop_output and self.fit != "pad":
            raise RequestError(f"cropping the output back needs fit 'pad' (--fit pad), not {self.fit!r}",
                               "crop_output")
        if self.steps is not None and not _whole(self.steps, 1):
            raise RequestError(f"steps must be an integer >= 1, got {self.steps!r}", "steps")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 1:
            raise RequestError(f"guidance scale must be a number >= 1, got {g!r}", "guidance_scale")
        if not _whole(self.seed):
            raise RequestError(f"seed must be a whole number, got {self.seed!r}", "seed")
        if not _whole(self.start_frame, 0):
            raise RequestError(f"start_frame must be a whole number >= 0, got {self.start_frame!r}", "start_frame")
        if self.max_frames is not None and not _whole(self.max_frames, 1):
            raise RequestError(f"max_frames must be >= 1, got {self.max_frames!r}", "max_frames")
        if not isinstance(self.grid, bool):
            raise RequestError(f"grid must be true or false, got {self.grid!r}", "grid")
        self.mode  # noqa: B018 - checks the preset and the knobs

    # ------------------------------------------------------------------ derived
    @property
    def shape(self) -> tuple[int, int]:
        """The output (width, height): ``size`` x ``size``, or ``width`` x ``height`` when given."""
        try:
            return output_shape(self.size, self.width, self.height)
        except InputError as e:
            raise RequestError(str(e), next((n for n in ("width", "height") if str(e).startswith(n)), "size")) \
                from None

    @property
    def mode(self) -> SamplingMode:
        """The sampling mode: the preset (default exact) with each knob given overriding it
        (``runtime/modes.py``)."""
        if self.preset is not None and self.preset not in PRESETS:
            raise RequestError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}", "preset")
        knobs = {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}
        try:
            return replace(PRESETS[self.preset or "exact"], **knobs)
        except InputError as e:
            raise RequestError(str(e), next((k for k in KNOBS if str(e).startswith(k)), None)) from None

    @property
    def num_steps(self) -> int:
        """The steps it runs: its own, else its preset's, else :data:`DEFAULT_STEPS`."""
        return self.mode.request_steps(self.steps)

    @property
    def is_exact(self) -> bool:
        return self.mode.is_exact

    # ------------------------------------------------------------------ making one
    @classmethod
    def with_mode(cls, mode, **settings) -> "AnimationRequest":
        """A request whose sampling is ``mode``: a preset name, a :class:`SamplingMode` or
        None (exact). A mode that is no preset becomes its knobs (and its step count the
        request's, unless ``steps`` is given)."""
        if mode is None or isinstance(mode, str):
            return cls(preset=mode, **settings)
        if not isinstance(mode, SamplingMode):
            raise RequestError(f"mode must be a preset name or a SamplingMode, got {type(mode).__name__}", "preset")
        for name, preset in PRESETS.items():
            if mode == preset:
                return cls(preset=name, **settings)
        if settings.get("steps") is None and mode.steps is not None:
            settings["steps"] = mode.steps
        return cls(**settings, **{k: getattr(mode, k) for k in KNOBS})

    def read_inputs(self) -> "AnimationRequest":
        """The request with its source and driving frames read and made its shape (the
        frames it animates: ``start_frame`` and ``max_frames`` applied, so they become 0 and
        None); the same request for the pipeline, but bad inputs fail here, before any model
        is loaded. ``content_box`` of the driving frames: :meth:`content_box`."""
        return self._read()[0]

    def read_inputs_and_box(self):
        """:meth:`read_inputs` and the driving frames' content box (``runtime/media.py``)."""
        return self._read()

    def _read(self):
        from .media import driving_frames

        shape = self.shape
        src = load_source_image(self.source, shape, self.fit)
        ctl, box = driving_frames(self.driving, shape, self.start_frame, self.max_frames, self.fit)
        return replace(self, source=src, driving=ctl, start_frame=0, max_frames=None), box

    def crop_box(self, box) -> Optional[tuple[int, int, int, int]]:
        """What the output is cropped to, of the driving content's ``box`` (as
        :meth:`read_inputs_and_box` gives it): the box with ``crop_output`` when it is not
        the whole frame, else None."""
        return box if self.crop_output and tuple(box) != (0, 0, *self.shape) else None

    def exact(self) -> "AnimationRequest":
        """The same request with the original's sampling (no preset, no knob)."""
        return replace(self, preset=None, **{k: None for k in KNOBS})

    def settings(self) -> dict[str, Any]:
        """The settings as plain values (the inputs left out; the shape resolved to width and
        height, the steps to the count it runs): what the service records and reports."""
        width, height = self.shape
        out = {"width": width, "height": height, "steps": self.num_steps}
        for f in fields(self):
            if f.name not in ("source", "driving", "size", "width", "height", "steps"):
                out[f.metadata.get("form") or f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_settings(cls, values: dict[str, Any], **inputs) -> "AnimationRequest":
        """The request of :meth:`settings`' values (unknown keys ignored)."""
        names = {(f.metadata.get("form") or f.name): f.name for f in fields(cls) if f.name not in ("source", "driving")}
        return cls(**inputs, **{names[k]: v for k, v in values.items() if k in names})


#: the sampling knobs, each None: the preset's value
KNOBS = ("sampler", "cache_interval", "cache_depth", "guidance_until")


def _whole(value, minimum: Optional[int] = None) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and (minimum is None or value >= minimum)


def settings_fields() -> list[dataclasses.Field]:
    """The request's settings (every field but the inputs), in declaration order: what the
    command line's flags, the service's form and the defaults test are made from."""
    return [f for f in fields(AnimationRequest) if f.name not in ("source", "driving")]


def default_text(f: dataclasses.Field) -> str:
    """How a field's default is said (``--help``, the schema): its ``shows``, or the value."""
    shows = f.metadata.get("shows")
    if shows is not None:
        return shows
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return "none" if f.default is None else str(f.default)


#: each setting's default, by field name
DEFAULTS: dict[str, Any] = {f.name: f.default for f in settings_fields()}
