"""Config runs: the original's ``configs/prompts/animation.yaml``, read as it is, run with
one warm pipeline (``magicanimate-rt batch CONFIG.yaml``; README "Config runs").

- :func:`load_batch` reads and checks the whole config before any model is loaded: every
  key's type and value, the refused settings (``L``, ``S``, ``fusion_blocks``,
  ``num_actual_inference_steps``, the ``inference_config`` file's values), that every
  source image and driving video exists, and that the model paths are one models
  directory in the real layout (or ``--models`` replaces them). Each problem is one
  :class:`~magicanimate_rt.errors.InputError` line naming the config and the key.
- :func:`run_batch` animates the pairs in order with one pipeline and writes the
  original's tree: ``<out>/videos/<source>_<video>.mp4``, ``<out>/videos/<source>_<video>/
  grid.mp4`` (+ ``ctrl.mp4`` and ``orig.mp4`` with ``save_individual_videos``) and
  ``<out>/config.yaml`` with the seeds used. A failing pair is one error line; the others
  still run. Only the process whose ``pipe.writes_outputs`` is True writes anything.

What each key means comes from the original's ``magicanimate/pipelines/animation.py``:

- ``seed``: one value for every pair or one per pair; -1 draws a seed (recorded in the
  written ``config.yaml`` as ``seed`` and as the original's ``random_seed``). A missing
  ``seed`` is ``[-1]``, as in the original.
- ``offset`` / ``max_length``: the original keeps driving frames
  ``[offset, offset + max_length)`` and only when ``max_length`` is set: without it
  ``offset`` is ignored (a warning says so).
- ``S`` (the stride list it zips with the pairs) and ``L`` (the 16-frame window it pads to)
  are fixed by the model; ``I``, ``clip``, ``video_type`` and ``invert_video`` are never
  read by the original (accepted, no effect), except ``video_type: "video"``, this runtime's:
  the ``video_path`` entries are ordinary videos of a person, and ``densepose_weights`` (a
  DensePose R-CNN checkpoint, ``model_final_162be9.pkl``) makes their DensePose clips first
  (:func:`prepare_person_videos`, cached by content as ``animate --densepose-weights`` caches
  them), from ``offset`` for ``max_length`` frames under the original's rule, before any
  animation model loads.
- ``savename``: the run folder's name; null: ``<config stem>-<%Y-%m-%dT%H-%M-%S>``, under
  ``samples/`` by default (the original's), ``--output-dir`` elsewhere.
- Output names: ``<source>`` is the source file name up to its first dot, ``<video>`` the
  driving file name without its extension, as the original names them.

Relative paths are looked up in the current directory first (the original runs from its
repository root, where the shipped config's paths start), then in the config's folder.

Each pair is animated and written by ``render.animate_to_files``, as ``magicanimate-rt
animate`` writes its video.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .command_line import EXIT_INTERRUPTED
from .errors import DistributedError, InputError, user_message
from .layout import MOTION_CKPT, SD_DIR, VAE_MSE_DIR, component_dirs
from .runtime.request import DEFAULT_STEPS, AnimationRequest
from .runtime.request import DEFAULTS as REQUEST_DEFAULTS

#: where runs go without --output-dir (the original writes to samples/ under its cwd)
DEFAULT_OUTPUT_DIR = Path("samples")
#: the run folder's time stamp when savename is null (the original's format)
TIME_FORMAT = "%Y-%m-%dT%H-%M-%S"
#: exit code of a batch in which some pair failed (the others were written)
EXIT_SOME_FAILED = 1

#: the defaults of keys a config leaves out: the values of the original's shipped
#: configs/prompts/animation.yaml, which are the request's defaults (runtime/request.py;
#: seed: the original's own default, [-1])
DEFAULTS: dict[str, Any] = {
    "seed": [-1], "steps": DEFAULT_STEPS, "guidance_scale": REQUEST_DEFAULTS["guidance_scale"],
    "size": REQUEST_DEFAULTS["size"], "offset": REQUEST_DEFAULTS["start_frame"],
    "max_length": REQUEST_DEFAULTS["max_frames"],
    "savename": None, "save_individual_videos": False, "L": 16, "S": 1, "fusion_blocks": "midup",
    "I": 0, "clip": 0, "video_type": "condition", "invert_video": False,
}
#: keys the original reads from the config and never uses (accepted; a warning if set)
NO_EFFECT = ("I", "clip", "video_type", "invert_video")
#: model path keys, each resolved to a part of one models directory
MODEL_KEYS = ("pretrained_model_path", "pretrained_vae_path", "pretrained_unet_path",
              "pretrained_controlnet_path", "pretrained_appearance_encoder_path", "motion_module")
KNOWN = set(DEFAULTS) | set(MODEL_KEYS) | {
    "source_image", "video_path", "inference_config", "num_actual_inference_steps",
    "random_seed",  # the seeds the original records in the config.yaml it writes: ignored on input
    "densepose_weights",  # with video_type "video" (this runtime's): the DensePose R-CNN checkpoint
}
#: video_type's value for person videos (made DensePose clips first); the original's is "condition"
PERSON_VIDEOS = "video"


# --------------------------------------------------------------------------- inference_config
#: the inference_config path of the original's shipped animation.yaml (relative to its repository)
ORIGINAL_INFERENCE_PATH = "configs/inference/inference.yaml"
#: the values of the original's shipped configs/inference/inference.yaml (this runtime's fixed
#: temporal UNet and DDIM settings; REFERENCE): used when a config names that default path and
#: the file is absent, as when animation.yaml is copied out of the original's repository
ORIGINAL_INFERENCE: dict[str, Any] = {
    "unet_additional_kwargs": {
        "unet_use_cross_frame_attention": False, "unet_use_temporal_attention": False, "use_motion_module": True,
        "motion_module_resolutions": [1, 2, 4, 8], "motion_module_mid_block": False,
        "motion_module_decoder_only": False, "motion_module_type": "Vanilla",
        "motion_module_kwargs": {
            "num_attention_heads": 8, "num_transformer_block": 1,
            "attention_block_types": ["Temporal_Self", "Temporal_Self"], "temporal_position_encoding": True,
            "temporal_position_encoding_max_len": 24, "temporal_attention_dim_div": 1},
    },
    "noise_scheduler_kwargs": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear"},
}


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()
ANY = object()  #: a key whose value cannot change the result (only read for training or unused branches)


def _inference_rules() -> dict[str, dict[str, tuple[Any, Any]]]:
    """For each section of the original's configs/inference/inference.yaml, each key ->
    (the value this runtime computes with, the value the original uses when the key is
    absent). A key the section does not list is refused; ANY accepts every value."""
    from .models.config import MotionModuleConfig
    from .runtime.ddim import DDIMSettings

    mm = MotionModuleConfig()
    ddim = DDIMSettings()
    blocks = ["Temporal_Self"] * mm.attention_blocks
    unet = {  # UNet3DConditionModel's keyword arguments; absent: its defaults
        "unet_use_cross_frame_attention": (False, None),
        "unet_use_temporal_attention": (False, None),
        "use_motion_module": (True, False),
        "motion_module_resolutions": (list(mm.resolutions), [1, 2, 4, 8]),
        "motion_module_mid_block": (mm.mid_block, False),
        "motion_module_decoder_only": (False, False),
        "motion_module_type": ("Vanilla", None),
        "motion_module_kwargs": (ANY, {}),  # checked key by key below
    }
    motion = {  # VanillaTemporalModule's keyword arguments; absent: its defaults
        "num_attention_heads": (mm.heads, 8),
        "num_transformer_block": (1, 2),
        "attention_block_types": (blocks, ["Temporal_Self", "Temporal_Self"]),
        "cross_frame_attention_mode": (None, None),
        "temporal_position_encoding": (True, False),
        "temporal_position_encoding_max_len": (mm.max_frames, 24),
        "temporal_attention_dim_div": (1, 1),
        "zero_initialize": (ANY, True),  # initialisation only; the weights are loaded over it
    }
    scheduler = {  # diffusers DDIMScheduler's keyword arguments; absent: its defaults
        "num_train_timesteps": (ddim.num_train_timesteps, 1000),
        "beta_start": (ddim.beta_start, 0.0001),
        "beta_end": (ddim.beta_end, 0.02),
        "beta_schedule": (ddim.beta_schedule, "linear"),
        "trained_betas": (None, None),
        "set_alpha_to_one": (ddim.set_alpha_to_one, True),
        "timestep_spacing": (ddim.timestep_spacing, "leading"),
        "prediction_type": (ddim.prediction_type, "epsilon"),
        "thresholding": (False, False),
        "rescale_betas_zero_snr": (False, False),
        # the original's pipeline replaces these two by steps_offset=1, clip_sample=False
        "steps_offset": (ANY, 0),
        "clip_sample": (ANY, True),
        # used only with clipping or thresholding, which are off
        "clip_sample_range": (ANY, 1.0),
        "dynamic_thresholding_ratio": (ANY, 0.995),
        "sample_max_value": (ANY, 1.0),
    }
    return {"unet_additional_kwargs": unet, "unet_additional_kwargs.motion_module_kwargs": motion,
            "noise_scheduler_kwargs": scheduler}


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return type(a) is type(b) and a == b


def check_inference_config(path: Path, data: Any) -> list[str]:
    """Refuse (InputError naming the key) an inference config whose values differ from the
    ones this runtime computes with; returns notes about values the original overrides."""
    where = f"inference_config {path}"
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    rules = _inference_rules()
    notes = []
    unknown = sorted(k for k in data if k not in ("unet_additional_kwargs", "noise_scheduler_kwargs"))
    if unknown:
        notes.append(f"{where}: unknown keys {', '.join(map(repr, unknown))} (the original does not read them)")
    for section, table in rules.items():
        head, _, sub = section.partition(".")
        values = data.get(head, ABSENT)
        if sub and isinstance(values, dict):
            values = values.get(sub, ABSENT)
        if values is ABSENT:
            values = {}
        if not isinstance(values, dict):
            raise InputError(f"{where}: {section} must be a mapping, got {type(values).__name__}")
        extra = sorted(k for k in values if k not in table)
        if extra:
            raise InputError(f"{where}: {section}.{extra[0]} is not a setting this runtime can change "
                             f"(its model and sampler are fixed: README 'Config runs')")
        for key, (fixed, default) in table.items():
            value = values.get(key, ABSENT)
            if fixed is ANY:
                continue
            used = default if value is ABSENT else value
            if not _same_value(used, fixed):
                given = f"absent (the original then uses {default!r})" if value is ABSENT else repr(value)
                raise InputError(f"{where}: {section}.{key} is {given}; this runtime computes with {fixed!r} only")
    scheduler = data.get("noise_scheduler_kwargs") or {}
    for key, forced in (("steps_offset", 1), ("clip_sample", False)):
        if key in scheduler and not _same_value(scheduler[key], forced):
            notes.append(f"{where}: noise_scheduler_kwargs.{key} {scheduler[key]!r} is replaced by {forced!r}, "
                         "as the original's pipeline replaces it")
    return notes


# --------------------------------------------------------------------------- YAML
#: exponent floats without a dot or an exponent sign ("1e-5"), which YAML 1.1 reads as
#: strings and OmegaConf (the original's reader) as floats
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file as plain Python values, read the way the original (OmegaConf) reads it:
    ``1e-5`` is a float (plain YAML 1.1 would make it a string) and a key given twice is an
    error. Problems are one InputError line."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # a copy of the resolver lists: add_implicit_resolver would otherwise extend SafeLoader's own
    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise InputError(f"{what} {path} line {key_node.start_mark.line + 1}: key {key!r} given twice")
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path}: unreadable ({e})") from None
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{what} {path}: not valid YAML ({problem}{at})") from None


# --------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class Pair:
    """One (source image, driving video) request of a config."""

    index: int  #: 1-based, in config order
    source_text: str  #: the paths as the config writes them (for messages)
    video_text: str
    source: Path  #: resolved
    video: Path
    seed: int  #: -1: drawn when the run starts
    name: str  #: "<source>_<video>", the original's output name
    clip: Optional[Path] = None  #: video_type "video": the DensePose clip of ``video`` (prepare_person_videos)

    def label(self) -> str:
        return f"pair {self.index} ({self.source_text}, {self.video_text})"


@dataclass
class Batch:
    """A checked config: everything the run needs, nothing loaded yet."""

    config_path: Path
    pairs: list[Pair]
    #: every pair's settings (its inputs and seed are the pair's); start_frame: offset where
    #: max_length is set, else 0 (the original's rule); max_frames: max_length
    request: AnimationRequest
    save_individual_videos: bool
    models: Path  #: the models directory (real layout)
    output: Path  #: <output-dir>/<savename or stem-time>
    raw: dict  #: the config as read
    inference_config: Optional[Path] = None
    warnings: list[str] = field(default_factory=list)
    #: video_type "video": the DensePose checkpoint that makes the pairs' clips (None: DensePose videos)
    densepose_weights: Optional[Path] = None

    @property
    def size(self) -> int:
        return self.request.size

    @property
    def steps(self) -> int:
        return self.request.num_steps

    @property
    def guidance_scale(self) -> float:
        return self.request.guidance_scale

    @property
    def start_frame(self) -> int:
        return self.request.start_frame

    @property
    def max_length(self) -> Optional[int]:
        return self.request.max_frames

    def resolved_config(self, seeds: list[int]) -> dict:
        """The config as run: paths resolved, the models directory's parts, the seeds used."""
        out = dict(self.raw)
        out["source_image"] = [str(p.source) for p in self.pairs]
        out["video_path"] = [str(p.video) for p in self.pairs]
        parts = component_dirs(self.models)
        out.update({
            "pretrained_model_path": str(self.models / SD_DIR),
            "pretrained_vae_path": str(parts["vae"]) if parts["vae"].parent == self.models else None,
            "pretrained_unet_path": "",
            "pretrained_controlnet_path": str(parts["controlnet"]),
            "pretrained_appearance_encoder_path": str(parts["appearance_encoder"]),
            "motion_module": str(self.models / MOTION_CKPT),
        })
        if self.inference_config is not None:
            out["inference_config"] = str(self.inference_config)
        out["seed"] = list(seeds)
        out["random_seed"] = list(seeds)  # the original's record of the seeds it used
        return out


class _Reader:
    """Checks one config's keys; every error names the config file and the key."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.folder = path.parent

    def fail(self, key: str, message: str) -> InputError:
        return InputError(f"config {self.path}: {key}: {message}")

    def get(self, key: str) -> Any:
        return self.data.get(key, DEFAULTS.get(key))

    def integer(self, key: str, minimum: Optional[int] = None, optional: bool = False) -> Optional[int]:
        value = self.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise self.fail(key, f"expected a whole number{bound}{' or null' if optional else ''}, got {value!r}")
        return value

    def fixed(self, key: str, value: Any, why: str) -> None:
        given = self.get(key)
        if not _same_value(given, value):
            raise self.fail(key, f"{given!r} is not supported: this runtime runs {value!r} only ({why})")

    def path_list(self, key: str) -> list[str]:
        value = self.data.get(key)
        if value is None:
            raise self.fail(key, "missing: the config must list the paths, one per pair")
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"expected a non-empty list of paths, got {value!r}")
        for item in value:
            if not isinstance(item, str) or not item:
                raise self.fail(key, f"expected a list of paths, got the item {item!r}")
        return value

    def existing(self, key: str, text: str, kind: str = "file") -> Path:
        """``text`` resolved: absolute as it is, relative against the current directory
        first, then the config's folder; InputError if it is in neither or not a ``kind``."""
        given = Path(os.path.expanduser(text))
        for place in self.places(text):
            if place.exists():
                found = Path(os.path.abspath(place))
                ok = found.is_dir() if kind == "directory" else found.is_file()
                if not ok:
                    raise self.fail(key, f"{text!r} is not a {kind} ({found})")
                return found
        where = "" if given.is_absolute() else f" (looked in {Path.cwd()} and {self.folder})"
        raise self.fail(key, f"{text!r} not found{where}")

    def places(self, text: str) -> list[Path]:
        """Where a path of the config is looked for, in order (:meth:`existing`)."""
        given = Path(os.path.expanduser(text))
        return [given] if given.is_absolute() else [Path.cwd() / given, self.folder / given]

    def optional_path(self, key: str) -> Optional[str]:
        value = self.data.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"expected a path or null, got {value!r}")
        return value


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _models_from_config(r: _Reader) -> Path:
    """The one models directory the config's model paths name (README 'Weights'), or an
    InputError telling the user to pass --models."""
    def required(key: str, kind: str) -> Path:
        text = r.optional_path(key)
        if text is None:
            raise r.fail(key, "missing (or pass --models DIR)")
        return r.existing(key, text, kind)

    sd = required("pretrained_model_path", "directory")
    root = sd.parent
    parts = component_dirs(root)
    hint = f"the config's model paths must be one models directory in the layout of README 'Weights' " \
           f"(here {root}); pass --models DIR"

    def expect(key: str, found: Path, wanted: Path) -> None:
        if not _same(found, wanted):
            raise r.fail(key, f"{str(found)!r} is not {wanted}: {hint}")

    expect("pretrained_model_path", sd, root / SD_DIR)
    unet = r.optional_path("pretrained_unet_path")
    if unet is not None:
        expect("pretrained_unet_path", r.existing("pretrained_unet_path", unet, "directory"), parts["unet"])
    vae = r.optional_path("pretrained_vae_path")
    if vae is None:
        if parts["vae"] != root / SD_DIR / "vae":
            raise r.fail("pretrained_vae_path", f"null (SD's own VAE) but {root / VAE_MSE_DIR} exists, which a "
                                                f"models directory always uses instead: {hint}")
    else:
        expect("pretrained_vae_path", r.existing("pretrained_vae_path", vae, "directory"), parts["vae"])
    expect("pretrained_controlnet_path", required("pretrained_controlnet_path", "directory"), parts["controlnet"])
    appearance = required("pretrained_appearance_encoder_path", "directory")
    if not (appearance / "config.json").is_file() and (appearance / "appearance_encoder").is_dir():
        appearance = appearance / "appearance_encoder"  # the original loads it with subfolder="appearance_encoder"
    expect("pretrained_appearance_encoder_path", appearance, parts["appearance_encoder"])
    expect("motion_module", required("motion_module", "file"), root / MOTION_CKPT)
    return root


def output_name(source_text: str, video_text: str) -> str:
    """The original's output name: the source's file name up to its first dot, "_", the
    driving video's file name without its extension."""
    return f"{os.path.basename(source_text).split('.')[0]}_{Path(video_text).stem}"


def _request(r: _Reader, warnings: list[str]) -> AnimationRequest:
    """Every pair's settings (size, steps, guidance_scale, offset / max_length) as one
    request, checked as every surface checks it; notes go to ``warnings``."""
    path, data = r.path, r.data
    size, steps, guidance = r.get("size"), r.get("steps"), r.get("guidance_scale")
    if isinstance(guidance, bool):
        raise r.fail("guidance_scale", f"expected a number, got {guidance!r}")
    actual = data.get("num_actual_inference_steps")
    if actual is not None and not _same_value(actual, steps):
        raise r.fail("num_actual_inference_steps", f"{actual!r} differs from steps ({steps}): skipping the first "
                     "steps needs inverted latents (the original's img2img), which this runtime does not take")
    offset = r.integer("offset", 0)
    max_length = r.integer("max_length", 1, optional=True)
    if max_length is None and offset:
        warnings.append(f"config {path}: offset {offset} is ignored without max_length, as in the original "
                        "(set max_length to use it)")
    try:
        request = AnimationRequest(size=size, steps=steps, guidance_scale=guidance,
                                   start_frame=offset if max_length is not None else 0, max_frames=max_length)
    except InputError as e:
        raise InputError(f"config {path}: {e}") from None
    return replace(request, guidance_scale=float(guidance))


def _pairs(r: _Reader, warnings: list[str]) -> list[Pair]:
    """The (source image, driving video) pairs and their seeds, every file found."""
    path = r.path
    sources, videos = r.path_list("source_image"), r.path_list("video_path")
    if len(sources) != len(videos):
        raise InputError(f"config {path}: source_image lists {len(sources)} paths but video_path {len(videos)}: "
                         "they are paired in order and must be as long")
    seeds = r.get("seed")
    seeds = [seeds] if not isinstance(seeds, list) else seeds
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise r.fail("seed", f"expected a whole number (-1 draws one) or a list of them, got {s!r}")
    if len(seeds) == 1:
        seeds = seeds * len(sources)
    elif len(seeds) != len(sources):
        raise r.fail("seed", f"{len(seeds)} seeds for {len(sources)} pairs: give one seed for all or one per pair")
    pairs = []
    for i, (s, v, seed) in enumerate(zip(sources, videos, seeds), 1):
        pairs.append(Pair(i, s, v, r.existing("source_image", s), r.existing("video_path", v), seed,
                          output_name(s, v)))
    first: dict[str, int] = {}
    for p in pairs:
        if p.name in first:
            warnings.append(f"config {path}: pairs {first[p.name]} and {p.index} both write videos/{p.name}.mp4; "
                            "the later replaces the earlier, as in the original")
        first.setdefault(p.name, p.index)
    return pairs


def _inference_config(r: _Reader, warnings: list[str]) -> Optional[Path]:
    """The inference_config file found and checked (None: none, or the original's default
    path absent: its shipped values, with a note); notes go to ``warnings``."""
    inference = r.optional_path("inference_config")
    if inference is None:
        return None
    if os.path.normpath(inference) == os.path.normpath(ORIGINAL_INFERENCE_PATH) \
            and not any(p.exists() for p in r.places(inference)):
        # animation.yaml copied out of the original's repository: its shipped file's values
        warnings.append(f"config {r.path}: inference_config {inference!r} not found; using the values of the "
                        "original's shipped file (this runtime's fixed settings)")
        warnings += check_inference_config(Path(inference), ORIGINAL_INFERENCE)
        return None
    found = r.existing("inference_config", inference)
    warnings += check_inference_config(found, read_yaml(found, "inference_config"))
    return found


def load_batch(config, models: Optional[Path] = None, output_dir: Optional[Path] = None,
               backend: str = "torch", now: Optional[datetime.datetime] = None) -> Batch:
    """Read and check a config of the original's animation.yaml format (module docstring);
    nothing is loaded or written. ``models`` replaces the config's model paths."""
    from .runtime.backends import PRETRAINED_BACKENDS
    from .runtime.stages import Stages

    path = Path(config)
    if not path.is_file():
        raise InputError(f"config {path}: {'is a directory' if path.is_dir() else 'no such file'}")
    data = read_yaml(path, "config")
    if not isinstance(data, dict):
        raise InputError(f"config {path}: expected a mapping of settings (the original's animation.yaml), "
                         f"got {type(data).__name__ if data is not None else 'an empty file'}")
    if backend not in PRETRAINED_BACKENDS:
        raise InputError(f"--backend {backend!r} cannot load a models directory; choose one of: "
                         f"{', '.join(sorted(PRETRAINED_BACKENDS))}")
    r = _Reader(path, data)
    warnings = []
    unknown = sorted(str(k) for k in data if k not in KNOWN)
    if unknown:
        warnings.append(f"config {path}: unknown keys {', '.join(map(repr, unknown))} (ignored)")

    # the settings the runtime fixes
    r.fixed("L", Stages.window, "the temporal UNet's 16-frame window")
    r.fixed("S", 1, "the original's context stride")
    r.fixed("fusion_blocks", "midup", "the reference attention of the mid and up blocks")
    densepose_weights = _densepose_weights(r)
    for key in NO_EFFECT:
        if key == "video_type" and densepose_weights is not None:
            continue
        if key in data and not _same_value(data[key], DEFAULTS[key]):
            warnings.append(f"config {path}: {key}: {data[key]!r} has no effect (the original never uses it)")

    request = _request(r, warnings)
    individual = r.get("save_individual_videos")
    if not isinstance(individual, bool):
        raise r.fail("save_individual_videos", f"expected true or false, got {individual!r}")
    savename = r.get("savename")
    if savename is not None and (not isinstance(savename, (str, int)) or isinstance(savename, bool)
                                 or str(savename) in ("", ".", "..") or Path(str(savename)).is_absolute()):
        raise r.fail("savename", f"expected a folder name or null, got {savename!r}")

    pairs = _pairs(r, warnings)
    inference_path = _inference_config(r, warnings)
    if models is not None:
        if not Path(models).is_dir():
            raise InputError(f"--models {models}: directory not found")
        root = Path(os.path.abspath(models))
    else:
        root = _models_from_config(r)

    # where the outputs go
    base = Path(output_dir) if output_dir is not None else DEFAULT_OUTPUT_DIR
    stamp = (now or datetime.datetime.now()).strftime(TIME_FORMAT)
    out = base / (str(savename) if savename is not None else f"{path.stem}-{stamp}")
    for p in (base, out, out / "videos"):
        if p.exists() and not p.is_dir():
            raise InputError(f"output {p}: exists and is not a directory")
    return Batch(config_path=path, pairs=pairs, request=request, save_individual_videos=individual, models=root, output=out, raw=dict(data),
                 inference_config=inference_path, warnings=warnings, densepose_weights=densepose_weights)


def _densepose_weights(r: _Reader) -> Optional[Path]:
    """The checkpoint of ``video_type: "video"`` (found; read when the clips are made), else None."""
    person = r.data.get("video_type") == PERSON_VIDEOS
    text = r.optional_path("densepose_weights")
    if person and text is None:
        raise r.fail("densepose_weights", f"missing: video_type {PERSON_VIDEOS!r} (person videos) needs the "
                     "DensePose R-CNN checkpoint that makes their DensePose clips (model_final_162be9.pkl)")
    if text is not None and not person:
        raise r.fail("densepose_weights", f"is for video_type {PERSON_VIDEOS!r} (person videos); the video_path "
                     "entries of this config are DensePose videos already")
    return None if text is None else r.existing("densepose_weights", text)


def prepare_person_videos(batch: Batch, device: str = "cpu", dtype: str = "float32",
                          log: Callable[[str], None] = print) -> Batch:
    """``video_type: "video"``: every pair's DensePose clip, made (or found in the cache) from
    ``offset`` for ``max_length`` frames (densepose/prepare.py); the batch then animates the
    clips whole. Any other batch as it is. A bad video or checkpoint raises InputError (one line)."""
    if batch.densepose_weights is None:
        return batch
    from .densepose.prepare import cached_driving_video, person_video_settings

    settings = person_video_settings(batch.start_frame, batch.max_length)
    pairs = []
    for pair in batch.pairs:
        try:
            clip = cached_driving_video(pair.video, batch.densepose_weights, settings, device=device, dtype=dtype,
                                        progress=True, log=log)
        except InputError as e:
            raise InputError(f"config {batch.config_path}: {pair.label()}: {e}") from None
        pairs.append(replace(pair, clip=clip))
    return replace(batch, pairs=pairs, request=replace(batch.request, start_frame=0, max_frames=None))


# --------------------------------------------------------------------------- running it
def draw_seeds(pairs: list[Pair], pipe) -> list[int]:
    """Each pair's seed; -1 draws one (0..2^32-1). Under torchrun every rank gets rank 0's
    draws, so the processes that share a clip start from the same noise."""
    seeds = [secrets.randbelow(2**32) if p.seed == -1 else p.seed for p in pairs]
    if pipe.ranks is not None:  # under torchrun: rank 0's draws on every rank, so the requests agree
        seeds = pipe.ranks.broadcast_object(seeds)
    return seeds


def read_source(path: Path, size: int) -> np.ndarray:
    """The source image; an .mp4 source is its first frame, as in the original."""
    from .runtime.media import load_source_image, read_video

    if path.name.endswith(".mp4"):
        return load_source_image(read_video(path, max_frames=1)[0], size)
    return load_source_image(path, size)


def _one_line(e: BaseException) -> Optional[str]:
    """The message of an error one pair can cause (the CLI's error tail classes), else None:
    the batch goes on after it. A failure between ranks (DistributedError) ends the batch."""
    if isinstance(e, DistributedError):
        return None
    return user_message(e, "lower size or max_length", "lower size or max_length, or use --dtype float16")


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)


def _animate_pair(batch: Batch, pair: Pair, seed: int, pipe, writer: bool, log: Callable[[str], None]) -> None:
    from .render import animate_to_files
    from .runtime.media import read_video, write_video

    source = read_source(pair.source, batch.size)
    driving = read_video(pair.clip or pair.video, size=batch.size, start_frame=batch.start_frame, max_frames=batch.max_length)
    request = replace(batch.request, source=source, driving=driving, seed=seed, start_frame=0, max_frames=None)
    videos = batch.output / "videos"
    folder = videos / pair.name
    made = writer and not folder.exists()
    if writer:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"output {folder}: cannot create it ({e.strerror or e})") from None
    try:
        animate_to_files(pipe, request, videos / f"{pair.name}.mp4", folder / "grid.mp4", log=log)
        if writer and batch.save_individual_videos:
            write_video(folder / "ctrl.mp4", driving)
            write_video(folder / "orig.mp4", np.broadcast_to(source, driving.shape))
    except BaseException:
        if made and not any(folder.iterdir()):
            folder.rmdir()
        raise


def run_batch(batch: Batch, pipe, log: Callable[[str], None] = print,
              prog: str = "magicanimate-rt") -> int:
    """Animate every pair of ``batch`` with ``pipe`` (warm, shared by all pairs) and write
    the original's tree where ``pipe.writes_outputs``; other ranks run the same requests and
    write nothing. Returns 0, EXIT_SOME_FAILED if any pair failed (each reported in one
    line on stderr, the others still run) or EXIT_INTERRUPTED after Ctrl-C."""
    writer = pipe.writes_outputs
    seeds = draw_seeds(batch.pairs, pipe)
    note = log if writer else (lambda msg: None)
    t0 = time.perf_counter()
    failed: list[Pair] = []
    done = 0
    if writer:
        try:
            (batch.output / "videos").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"output {batch.output}: cannot create it ({e.strerror or e})") from None
    try:
        for pair, seed in zip(batch.pairs, seeds):
            note(f"pair {pair.index}/{len(batch.pairs)}: {pair.source_text} + {pair.video_text} -> "
                 f"{batch.output / 'videos' / pair.name}.mp4")
            try:
                _animate_pair(batch, pair, seed, pipe, writer, note)
                done += 1
            except Exception as e:
                message = _one_line(e)
                if message is None:
                    raise
                failed.append(pair)
                if writer:
                    print(f"{prog}: error: {pair.label()}: {message}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        if writer:
            print(f"{prog}: interrupted; {done} pair(s) written to {batch.output}, the current one not",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if writer:
            _write_yaml(batch.output / "config.yaml", batch.resolved_config(seeds))
    took = time.perf_counter() - t0
    if failed:
        note(f"{done} of {len(batch.pairs)} pairs written to {batch.output} ({took:.1f} s); failed: "
             + "; ".join(p.label() for p in failed))
        return EXIT_SOME_FAILED
    note(f"{done} pair(s) written to {batch.output} ({took:.1f} s)")
    return 0
