"""Loading a model set from the real on-disk layout (REFERENCE section 1).

```
<models_dir>/
  stable-diffusion-v1-5/{unet,vae,text_encoder,tokenizer}/   (scheduler/ is not used)
  sd-vae-ft-mse/                                              (used instead of SD's vae/ when present)
  MagicAnimate/appearance_encoder/ densepose_controlnet/ temporal_attention/temporal_attention.ckpt
```

Loading runs in two passes:

1. **Plan, from headers only** (:func:`plan_model_set`; ``magicanimate-rt check-models``
   prints it). Each component's config is built into a module on the meta device (no
   memory, no random init: a config that does not match its weights fails on the shape
   check before anything is allocated). Each weights file is opened
   lazily: safetensors with ``safe_open`` (memory-mapped), pickles with
   ``torch.load(mmap=True, weights_only=True)`` (only the pickle is read; the tensors are
   views of the mapped file). Every key of every file is matched to the module's names and
   shapes; the choices (which file and why, what overrides what, what is ignored) become
   notes, and everything wrong becomes a one-line problem.
2. **Materialise, tensor by tensor** (:func:`materialise`): each tensor is copied once from
   the mapped file into a tensor of the target device and dtype, which is assigned to the
   module; the file's pages are then dropped from this process (``madvise``), so host
   memory holds the loaded weights plus about one tensor, whatever the file sizes. Buffers
   with a fixed formula (the motion modules' sinusoidal ``pos_encoder.pe`` when a file lacks
   it, CLIP's position ids) are computed (:data:`FORMULA_BUFFERS`). Weights
   that a later file overrides (SD's spatial UNet weights under a full-UNet motion
   checkpoint) are never read.

Every failure is a :class:`ModelLoadError` whose one-line message names the file and what
is wrong: a missing directory or file, a Git LFS pointer instead of the weights, a truncated
or corrupt file, a config the runtime cannot compute faithfully, a key that matches no
parameter, a missing key, a wrong shape. Weights are always read without running code
(safetensors, or ``torch.load(weights_only=True)``).

Where the original (``magicanimate/pipelines/animation.py``) is lenient, so is this: the
motion checkpoint's non-tensor entries (``epoch``, ``global_step``) are ignored, its
``module.`` prefixes stripped, a missing ``pos_encoder.pe`` keeps its formula's value, and
a checkpoint with keys that match nothing (or have another shape) falls back, as the
original's ``except`` branch does, to its motion-module keys alone over SD's spatial
weights (with a one-line warning).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ModelLoadError
from ..layout import CHOICE_REASONS, COMPONENTS, DIFFUSERS_WEIGHTS, SD_DIR, VAE_MSE_DIR
from ..layout import MOTION_CKPT as MOTION_CKPT_NAME
from ..layout import component_dirs, other_weights_files, pick_weights, unused_entries, weights_names
from .appearance import AppearanceEncoder
from .config import MotionModuleConfig, UNetConfig
from .controlnet import ControlNet
from .text import build_text_encoder, empty_prompt_embedding, tokenize_empty
from .unet import TemporalUNet
from .vae import VAE

MOTION_CKPT = Path(MOTION_CKPT_NAME)
log = logging.getLogger(__name__)

#: the start of a Git LFS pointer file (what a clone without ``git lfs`` holds instead of weights)
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def sinusoid_table(shape: Sequence[int]) -> Tensor:
    """The motion modules' ``pos_encoder.pe`` of ``shape`` (1, max_len, C): AnimateDiff's
    fixed sinusoid over frame positions (not trained)."""
    from .layers import PositionalEncoding

    return PositionalEncoding(int(shape[-1]), int(shape[1])).pe


def position_index(shape: Sequence[int]) -> Tensor:
    """CLIP's ``position_ids`` (1, 77): 0, 1, 2, ... (int64)."""
    return torch.arange(int(shape[-1])).expand(*shape).contiguous()


#: buffers with a fixed formula (not trained), by name suffix: modules are built on the
#: meta device, so these are computed when loading; a file that lacks them loses nothing
FORMULA_BUFFERS: dict[str, Callable[[Sequence[int]], Tensor]] = {
    "pos_encoder.pe": sinusoid_table,
    "position_ids": position_index,
}
#: the CLIP buffer transformers >= 4.31 recomputes and older versions saved (SD 1.5's file has it)
POSITION_IDS = ("text_model.embeddings.position_ids", "embeddings.position_ids")

_UNET_LIKE = {
    # diffusers UNet2DConditionModel options the runtime's UNets do not implement (values
    # accepted: what SD 1.5 and MagicAnimate's configs say). UNetConfig refuses the others.
    "num_class_embeds": (None,), "class_embeddings_concat": (False, None), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "time_embedding_act_fn": (None,), "time_embedding_dim": (None,),
    "resnet_out_scale_factor": (1, 1.0, None), "resnet_skip_time_act": (False, None),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "conv_in_kernel": (3, None),
    "conv_out_kernel": (3, None), "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
    "mid_block_only_cross_attention": (None, False), "attention_type": ("default", None),
    "cross_attention_norm": (None,), "addition_time_embed_dim": (None,),
}
#: config values the runtime cannot compute faithfully, refused by name: component -> key -> accepted values
UNFAITHFUL_CONFIG = {
    "unet": _UNET_LIKE,
    "appearance_encoder": _UNET_LIKE,
    # the original flips BGR conditioning images; ControlNet.embed takes them as RGB
    "controlnet": {"controlnet_conditioning_channel_order": ("rgb", None), "num_class_embeds": (None,)},
    # newer diffusers options that diffusers 0.21.4 (the original's) does not have
    "vae": {"mid_block_add_attention": (True, None), "use_quant_conv": (True, None),
            "use_post_quant_conv": (True, None)},
}


# --------------------------------------------------------------------------- files
def read_config(path: Path) -> dict[str, Any]:
    """A component's config.json as a dict."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing config file")
    _refuse_lfs_pointer(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _refuse_lfs_pointer(path: Path) -> None:
    try:
        if path.stat().st_size > 1024:
            return
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
    except OSError:
        return
    if head == LFS_POINTER:
        raise ModelLoadError(f"{path}: a Git LFS pointer ({path.stat().st_size} bytes), not the file itself: "
                             "run `git lfs pull` in the clone it came from (or download the file directly)")


def find_weights(component_dir: Path, names: Iterable[str] = DIFFUSERS_WEIGHTS) -> Path:
    """The first weights file present, in order: full precision before the fp16 variant,
    safetensors before pickles."""
    names = tuple(names)
    found = pick_weights(component_dir, names)
    if found is not None:
        return found
    raise ModelLoadError(f"{component_dir}: no weights file (looked for {', '.join(names)})")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Entry:
    """A tensor of a weights file, known from its header: name in the file, shape, dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class WeightsFile:
    """One weights file, opened lazily: its tensors' names, shapes and dtypes come from the
    header (safetensors) or the pickle (``torch.load(mmap=True, weights_only=True)``); each
    tensor is a view of the memory-mapped file, read when it is copied.

    Pickles may be a flat dict or ``{"state_dict": ...}`` (a training checkpoint); keys lose
    any ``module.`` prefix (DistributedDataParallel); entries that are not tensors (``epoch``,
    ``global_step``) are listed in :attr:`skipped` and ignored. A pickle in torch's legacy
    (non-zip) format cannot be mapped: it is read whole (:attr:`mapped` is False).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: missing weights file")
        _refuse_lfs_pointer(self.path)
        self.size = self.path.stat().st_size
        self.entries: dict[str, Entry] = {}  # name (prefix stripped) -> entry
        self.skipped: list[str] = []  # non-tensor entries
        self.wrapper: Optional[str] = None  # "state_dict" when the tensors sit under it
        self.prefixed = 0  # keys that carried "module."
        self._tensors: dict[str, Tensor] = {}
        self._handle = None
        if self.path.suffix == ".safetensors":
            self.format = "safetensors"
            self.mapped = True
            self._open_safetensors()
        else:
            with open(self.path, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
            self.format = "pickle" if zipped else "legacy pickle"
            self.mapped = zipped
            self._open_pickle(zipped)

    # ------------------------------------------------------------------ opening
    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt")
            for k in self._handle.keys():
                s = self._handle.get_slice(k)
                dtype = _SAFETENSORS_DTYPES.get(s.get_dtype())
                if dtype is None:
                    raise ModelLoadError(f"{self.path}: tensor {k!r} has dtype {s.get_dtype()}, which is not loaded")
                self.entries[k] = Entry(k, tuple(int(d) for d in s.get_shape()), dtype)
        except ModelLoadError:
            raise
        except Exception as e:  # SafetensorError, OSError, ValueError for a bad header
            raise ModelLoadError(f"{self.path}: truncated or corrupt safetensors file ({_first_line(e)})") from None

    def _open_pickle(self, mapped: bool) -> None:
        path = self.path
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mapped)
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise ModelLoadError(
                    f"{path}: refused: the pickle would run code or build objects other than tensors "
                    "(only weights_only=True checkpoints are loaded)"
                ) from None
            raise ModelLoadError(f"{path}: corrupt checkpoint ({_first_line(e)})") from None
        except Exception as e:  # zip, pickle and storage parsing fail in many ways on a damaged file
            raise ModelLoadError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            self.wrapper = "state_dict"
            self.skipped += [str(k) for k in obj if k != "state_dict"]
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ModelLoadError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ModelLoadError(f"{path}: entry {k!r} is not a named tensor")
            if not isinstance(v, Tensor):
                self.skipped.append(k)
                continue
            name = k
            while name.startswith("module."):
                name = name[len("module."):]
            self.prefixed += name != k
            if name in self.entries:
                raise ModelLoadError(f"{path}: {name!r} appears twice (with and without a 'module.' prefix)")
            self.entries[name] = Entry(k, tuple(v.shape), v.dtype)
            self._tensors[name] = v

    # ------------------------------------------------------------------ reading
    def tensor(self, name: str) -> Tensor:
        """Tensor ``name`` (a view of the mapped file: its pages are read when touched)."""
        if self._handle is not None:
            try:
                return self._handle.get_tensor(self.entries[name].key)
            except Exception as e:
                raise ModelLoadError(f"{self.path}: cannot read {name!r} ({_first_line(e)})") from None
        return self._tensors[name]

    def will_read(self) -> None:
        """Ask the kernel to read the file ahead (a cold page cache fills in large reads
        rather than page fault by page fault)."""
        if self.mapped:
            advise_file(self.path, "WILLNEED")

    def release(self, name: str, t: Tensor) -> None:
        """Done with tensor ``name`` (``t``, as :meth:`tensor` gave it): drop its pages from
        this process (a mapped file), or this file's reference to it (a legacy pickle, read
        whole: its memory is freed tensor by tensor)."""
        if self.mapped:
            _drop_pages(t)
        else:
            self._tensors.pop(name, None)

    def close(self) -> None:
        self._handle = None
        self._tensors = {}

    def __enter__(self) -> "WeightsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ describing
    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def dtypes(self) -> str:
        """The dtypes of its floating-point tensors (the others in brackets), e.g. "float32"."""
        names = {e.dtype: str(e.dtype).removeprefix("torch.") for e in self.entries.values()}
        floats = sorted(n for d, n in names.items() if d.is_floating_point)
        other = sorted(n for d, n in names.items() if not d.is_floating_point)
        return "+".join(floats or ["-"]) + (f" (+{'+'.join(other)})" if other else "")


def advise_file(path: Path, advice: str) -> None:
    """``posix_fadvise(POSIX_FADV_<advice>)`` over the whole file (WILLNEED: read it ahead;
    DONTNEED: evict it from the page cache). A hint: nothing happens where unsupported."""
    flag = getattr(os, f"POSIX_FADV_{advice}", None)
    if flag is None or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, flag)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file or a torch pickle (.bin/.ckpt/.pt), in memory.

    Pickles: a flat dict or ``{"state_dict": ...}``, keys possibly prefixed ``module.``,
    non-tensor entries (``epoch``, ``global_step``) left out. (The loader itself reads files
    tensor by tensor through :class:`WeightsFile`.)
    """
    with WeightsFile(Path(path)) as f:
        out = {}
        for name in f.entries:
            t = f.tensor(name)
            out[name] = t.clone()
            f.release(name, t)
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


_libc = None


def _c_library():
    """The C library (ctypes), or None where it cannot be loaded."""
    global _libc
    if _libc is None:
        import ctypes

        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _drop_pages(t: Tensor) -> None:
    """Drop the pages that lie wholly inside ``t``'s bytes from this process's resident set
    (``madvise(MADV_DONTNEED)``). Only for views of a file mapped privately and never
    written: such pages are read back from the file if touched again, so this never changes
    a value. A no-op where madvise is unavailable."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    libc = _c_library()
    if advice is None or libc is None or t.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        libc.madvise(first, last - first, advice)


def _trim_heap() -> None:
    """Hand the heap's free memory back to the system (glibc ``malloc_trim``): a freed
    module's many small tensors otherwise stay resident behind later allocations."""
    libc = _c_library()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# --------------------------------------------------------------------------- building
def _build(build: Callable[[], nn.Module], config_path: Path, what: str) -> nn.Module:
    try:
        with torch.device("meta"):  # no memory, no random init
            return build()
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers/transformers raise many kinds for configs they cannot build
        raise ModelLoadError(f"{config_path}: cannot build the {what} from this config ({_first_line(e)})") from None


def _refuse_unfaithful(cfg: Mapping[str, Any], component: str, path: Path) -> None:
    for key, accepted in UNFAITHFUL_CONFIG.get(component, {}).items():
        if cfg.get(key) not in accepted:
            ok = " or ".join(repr(a) for a in accepted if a is not None)
            raise ModelLoadError(f"{path}: {key}={cfg.get(key)!r} is refused: the runtime computes only "
                                 f"{ok or 'its absence'} faithfully")


# --------------------------------------------------------------------------- plans
@dataclass
class Source:
    """Where one tensor of a module comes from: a file, the name in it, and an optional
    view to apply (a 1x1 convolution weight read as a linear one)."""

    file: WeightsFile
    name: str
    view: Optional[Callable[[Tensor], Tensor]] = None


@dataclass
class ComponentPlan:
    """One component, planned from headers only: its module (parameters on the meta
    device), the source of every tensor, the notes (what was chosen and why) and the
    problems (each one line; loading raises the first)."""

    name: str
    what: str
    config_path: Path
    module: Optional[nn.Module] = None
    part: Callable[[nn.Module], nn.Module] = lambda m: m
    files: list[WeightsFile] = field(default_factory=list)
    sources: dict[str, Source] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)  # formula buffers no file provides
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def open(self, path: Path) -> Optional[WeightsFile]:
        """Open one of its weights files (None, and a problem, if it cannot be)."""
        try:
            f = WeightsFile(path)
        except ModelLoadError as e:
            self.problems.append(str(e))
            return None
        self.files.append(f)
        if f.format == "legacy pickle":
            self.notes.append(f"{f.path.name}: torch's legacy pickle format cannot be memory-mapped: read whole "
                              "(re-save it with torch.save, or as safetensors, to load it in bounded memory)")
        return f

    def check(self) -> "ComponentPlan":
        if self.problems:
            self.close()
            raise ModelLoadError(self.problems[0])
        return self

    def close(self) -> None:
        for f in self.files:
            f.close()

    @property
    def read_bytes(self) -> int:
        """Bytes of the tensors that will be read."""
        return sum(s.file.entries[s.name].nbytes for s in self.sources.values())


def _match(plan: ComponentPlan, files: Sequence[tuple[WeightsFile, Mapping[str, str]]],
           ignore: Iterable[str] = (), views: Optional[Mapping[str, Callable]] = None) -> None:
    """Match the files' tensors to the module's names and shapes, later files overriding
    earlier ones. ``files``: (file, {module name: name in the file}) pairs. Unknown keys
    (except ``ignore``), wrong shapes and missing tensors become problems; a formula buffer
    no file provides keeps its built value."""
    ignore, views = set(ignore), views or {}
    expected = {k: tuple(v.shape) for k, v in plan.part(plan.module).state_dict().items()}
    for f, names in files:
        unknown = [m for m, k in names.items() if m not in expected and k not in ignore and m not in ignore]
        shapes = [m for m in names if m in expected and _shape(f, names[m], views.get(m)) != expected[m]]
        if unknown:
            plan.problems.append(f"{f.path}: {len(unknown)} key(s) match no parameter of the {plan.what}, e.g. "
                                 f"{names[unknown[0]]!r} (is this the right file, and does config.json match it?)")
        if shapes:
            m = shapes[0]
            more = f" ({len(shapes) - 1} more key(s) have another shape)" if len(shapes) > 1 else ""
            plan.problems.append(f"{f.path}: {names[m]!r} has shape {_shape(f, names[m], views.get(m))} but the "
                                 f"{plan.what} expects {expected[m]} (does config.json match the weights?){more}")
        for m, k in names.items():
            if m in expected:
                plan.sources[m] = Source(f, k, views.get(m))
    missing = [k for k in expected if k not in plan.sources]
    plan.built = [k for k in missing if k.endswith(tuple(FORMULA_BUFFERS))]
    missing = [k for k in missing if k not in plan.built]
    if missing:
        names = ", ".join(str(f.path) for f, _ in files)
        plan.problems.append(f"{names}: missing {len(missing)} weight(s) of the {plan.what}, e.g. {missing[0]!r}")
    if plan.built:
        plan.notes.append(f"{len(plan.built)} {_tail(plan.built[0])} table(s) not in the file: built from their "
                          "formula (a fixed sinusoid / position index, not trained)")


def _shape(f: WeightsFile, name: str, view) -> tuple[int, ...]:
    shape = f.entries[name].shape
    return shape[:2] if view is not None and len(shape) == 4 else shape


def _tail(key: str) -> str:
    return next(t for t in FORMULA_BUFFERS if key.endswith(t))


def _formula(key: str, ref: Tensor) -> Tensor:
    """A formula buffer's value for the meta tensor ``ref`` it replaces."""
    for tail, formula in FORMULA_BUFFERS.items():
        if key.endswith(tail):
            return formula(ref.shape)
    raise AssertionError(f"{key!r}: a buffer with no formula (the loader knows {', '.join(FORMULA_BUFFERS)})")


def _rel(path: Path, root: Optional[Path]) -> str:
    try:
        return str(path.relative_to(root)) if root is not None else str(path)
    except ValueError:
        return str(path)


def _open_component(plan: ComponentPlan, directory: Path, component: str, root: Optional[Path],
                    build: Callable[[dict], nn.Module]) -> Optional[tuple[dict, WeightsFile]]:
    """Read the config (refusing unfaithful values), build the module, open the chosen
    weights file and note why it is the one. None (and a problem) on failure."""
    try:
        cfg = read_config(plan.config_path)
        _refuse_unfaithful(cfg, component, plan.config_path)
        plan.module = _build(lambda: build(cfg), plan.config_path, plan.what)
        names = weights_names(component)
        path = find_weights(directory, names)
    except ModelLoadError as e:
        plan.problems.append(str(e))
        return None
    plan.notes.append(f"{_rel(path, root)}: {CHOICE_REASONS[names.index(path.name)]}")
    f = plan.open(path)
    if f is None:
        return None
    by_reason: dict[str, list[str]] = {}
    for name, reason in other_weights_files(directory, path):
        by_reason.setdefault(reason, []).append(name)
    plan.notes += [f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()]
    return cfg, f


def _same_names(f: WeightsFile) -> dict[str, str]:
    return {k: k for k in f.entries}


# --------------------------------------------------------------------------- components
def _unet_config(path: Path) -> UNetConfig:
    return _unet_cfg(read_config(path), path)


def _unet_cfg(cfg: Mapping[str, Any], path: Path) -> UNetConfig:
    try:
        return UNetConfig.from_dict(cfg, str(path))
    except (TypeError, ValueError, AttributeError) as e:  # wrong value types in the JSON
        raise ModelLoadError(f"{path}: unusable UNet config ({_first_line(e)})") from None


def plan_unet(paths: "ModelPaths", motion: MotionModuleConfig = MotionModuleConfig()) -> ComponentPlan:
    """SD's UNet file and the motion checkpoint, the checkpoint winning for every key both
    hold (as the original loads it over SD's weights). A checkpoint key that matches no
    parameter or has another shape makes the original fall back to the checkpoint's
    motion-module keys alone (``unet.`` prefix stripped) over SD's spatial weights: so here,
    with a warning. SD's tensors that the checkpoint overrides are never read."""
    cfg_path = paths.unet / "config.json"
    plan = ComponentPlan("unet", "temporal UNet", cfg_path)
    opened = _open_component(plan, paths.unet, "unet", paths.root,
                             lambda c: TemporalUNet(_unet_cfg(c, cfg_path), motion))
    if not paths.motion.is_file():
        plan.problems.append(f"{paths.motion}: missing motion-module checkpoint")
        return plan
    ckpt = plan.open(paths.motion)
    if ckpt is None or opened is None:
        return plan
    _, spatial = opened
    motion_keys = sum(".motion_modules." in k for k in ckpt.entries)
    desc = [f"{_rel(ckpt.path, paths.root)}: {ckpt.format}, {len(ckpt.entries)} tensors ({motion_keys} "
            f"motion-module, {len(ckpt.entries) - motion_keys} spatial)"]
    desc += [f"under {ckpt.wrapper!r}"] if ckpt.wrapper else []
    desc += [f"{ckpt.prefixed} 'module.' prefixes stripped"] if ckpt.prefixed else []
    desc += [f"non-tensor entries ignored: {', '.join(ckpt.skipped[:6])}"] if ckpt.skipped else []
    plan.notes.append("; ".join(desc))
    expected = {k: tuple(v.shape) for k, v in plan.module.state_dict().items()}
    names = _same_names(ckpt)
    bad = [k for k in names if k not in expected or ckpt.entries[k].shape != expected[k]]
    if bad:  # the original's except branch
        kept = {k.removeprefix("unet."): k for k in names if "motion_modules" in k}
        ignored = len(names) - len(kept)
        if ignored:
            n_unknown = sum(k not in expected for k in bad)
            why = [f"{n_unknown} match no parameter of the temporal UNet"] if n_unknown else []
            why += [f"{len(bad) - n_unknown} have another shape"] if len(bad) > n_unknown else []
            plan.warnings.append(
                f"{ckpt.path}: {ignored} of its {len(names)} keys ignored ({', '.join(why)}, e.g. {bad[0]!r}): "
                f"as the original does, only its {len(kept)} motion-module keys are loaded, over the spatial "
                f"weights of {spatial.path.name}")
        names = kept
    spatial_names = {k: k for k in spatial.entries if k not in names}
    _match(plan, [(spatial, _same_names(spatial)), (ckpt, names)])
    overridden = len(spatial.entries) - len(spatial_names)
    plan.extra["overrides"] = overridden
    if overridden:
        rest = ("SD's file is not read" if not spatial_names else
                f"the other {len(spatial_names)} come from SD's file")
        plan.notes.append(f"the motion checkpoint overrides {overridden} of the {len(spatial.entries)} spatial "
                          f"weights of {_rel(spatial.path, paths.root)}: {rest}")
    return plan


def plan_appearance_encoder(paths: "ModelPaths") -> ComponentPlan:
    cfg_path = paths.appearance_encoder / "config.json"
    plan = ComponentPlan("appearance_encoder", "appearance encoder", cfg_path)
    opened = _open_component(plan, paths.appearance_encoder, "appearance_encoder", paths.root,
                             lambda c: AppearanceEncoder(_unet_cfg(c, cfg_path)))
    if opened is None:
        return plan
    _, f = opened
    pruned = plan.module.pruned_keys
    _match(plan, [(f, _same_names(f))], ignore=pruned)
    present = sum(k in f.entries for k in pruned)
    plan.notes.append(f"the {len(pruned)} weights after the last reference-bank layer are not used: "
                      + ("the file lacks them, as the released one does" if not present else
                         f"{present} in the file, ignored"))
    return plan


def plan_controlnet(paths: "ModelPaths") -> ComponentPlan:
    plan = ComponentPlan("controlnet", "ControlNet", paths.controlnet / "config.json", part=lambda m: m.net)
    opened = _open_component(plan, paths.controlnet, "controlnet", paths.root, ControlNet)
    if opened is not None:
        _match(plan, [(opened[1], _same_names(opened[1]))])
    return plan


#: the VAE mid-block attention's deprecated names -> diffusers' current ones
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _legacy_vae_name(key: str) -> str:
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in LEGACY_VAE_ATTENTION:
        return ".".join(parts[:-2] + [LEGACY_VAE_ATTENTION[parts[-2]], parts[-1]])
    return key


def _as_linear(t: Tensor) -> Tensor:
    return t[:, :, 0, 0]


def plan_vae(paths: "ModelPaths") -> ComponentPlan:
    """SD 1.5's vae/ and sd-vae-ft-mse store the mid-block attention under the deprecated
    names ``query/key/value/proj_attn`` (some conversions as 1x1 convolutions): read as
    ``to_q/to_k/to_v/to_out.0``, as diffusers does."""
    plan = ComponentPlan("vae", "VAE", paths.vae / "config.json", part=lambda m: m.vae)
    if paths.vae.name == VAE_MSE_DIR:
        plan.notes.append(f"{VAE_MSE_DIR}/ is present: used instead of {SD_DIR}/vae/, as the original's config")
    else:
        plan.notes.append(f"{VAE_MSE_DIR}/ is absent: SD's own vae/ is used (the original's config asks for "
                          f"{VAE_MSE_DIR}; its decoded frames differ)")
    opened = _open_component(plan, paths.vae, "vae", paths.root, VAE)
    if opened is None:
        return plan
    f = opened[1]
    names = {_legacy_vae_name(k): k for k in f.entries}
    views = {m: _as_linear for m, k in names.items()
             if m != k and len(f.entries[k].shape) == 4 and f.entries[k].shape[2:] == (1, 1)}
    _match(plan, [(f, names)], views=views)
    legacy = sum(m != k for m, k in names.items())
    if legacy:
        plan.notes.append(f"{legacy} mid-block attention tensors under the deprecated names query/key/value/"
                          f"proj_attn read as to_q/to_k/to_v/to_out.0" + (f" ({len(views)} 1x1 convolution "
                                                                           "weights as linear)" if views else ""))
    return plan


def plan_text_encoder(paths: "ModelPaths") -> ComponentPlan:
    """CLIP's weights are named ``text_model.*`` in the files; transformers 5's CLIPTextModel
    drops that level. ``position_ids`` (saved by transformers 4.22, recomputed by >= 4.31)
    is ignored when the built model does not hold it."""
    plan = ComponentPlan("text_encoder", "text encoder", paths.text_encoder / "config.json")
    opened = _open_component(plan, paths.text_encoder, "text_encoder", paths.root, build_text_encoder)
    if opened is None:
        return plan
    cfg, f = opened
    plan.extra["config"] = cfg
    expected = plan.module.state_dict()
    if any(k.startswith("text_model.") for k in expected):
        names = _same_names(f)
    else:
        names = {k.removeprefix("text_model."): k for k in f.entries}
    ignore = {k for k in POSITION_IDS if k not in expected}
    _match(plan, [(f, names)], ignore=ignore)
    if any(k in f.entries for k in ignore):
        plan.notes.append("text_model.embeddings.position_ids (saved by old transformers) ignored: a position "
                          "index the text encoder recomputes")
    if not paths.tokenizer.is_dir():
        plan.problems.append(f"{paths.tokenizer}: missing component directory (tokenizer); expected the layout in "
                             "README 'Weights'")
        return plan
    try:
        ids = tokenize_empty(paths.tokenizer)
        vocab = int(cfg.get("vocab_size", 0))
        if ids.min() < 0 or ids.max() >= vocab:
            raise ModelLoadError(f"{paths.tokenizer}: token ids up to {int(ids.max())} do not fit the text encoder's "
                                 f"vocabulary of {vocab} (tokenizer and text_encoder/config.json disagree)")
        plan.extra["ids"] = ids
    except ModelLoadError as e:
        plan.problems.append(str(e))
    return plan


# --------------------------------------------------------------------------- materialising
def _place(src: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The one copy of a file's tensor: into a new tensor of ``device`` and ``dtype``. To
    another device it goes as it is and is cast there, so the host never holds a converted
    copy (a copy with a cast to CUDA would convert on the host first)."""
    if device.type != "cpu" and src.dtype != dtype:
        return src.to(device).to(dtype)
    dst = torch.empty(src.shape, dtype=dtype, device=device)
    dst.copy_(src)
    return dst


@contextmanager
def _one_thread() -> Iterator[None]:
    """Copies on one intra-op thread: a copy out of a mapped file is bound by page faults,
    which do not parallelise, and waking the thread pool per tensor costs more than the
    copy of a small one (measured on 2 busy cores: SD's 1.45 GB ControlNet in 0.9-1.6 s on one
    thread, 2.5 s on two; the tiny set's 660 appearance-encoder tensors in 0.004 s against 0.47 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _dtype(ref: Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floating-point tensors take the requested dtype; the others (position ids) keep theirs."""
    return dtype if ref.is_floating_point() else ref.dtype


@torch.no_grad()
def materialise(plan: ComponentPlan, device="cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Read a checked plan's tensors, file by file in their order on disk, each copied once
    into ``device`` and ``dtype`` (floating-point tensors; others keep theirs) and assigned
    to the module, in eval mode. The files are closed afterwards, and the plan lets go of
    the module (a plan is materialised once)."""
    plan.check()
    device = torch.device(device)
    module = plan.module
    target = plan.part(module)
    expected = target.state_dict()
    tensors: dict[str, Tensor] = {}
    with _one_thread():
        try:
            for f in plan.files:
                order = {k: i for i, k in enumerate(f.entries)}
                read = sorted(((m, s) for m, s in plan.sources.items() if s.file is f),
                              key=lambda ms: order[ms[1].name])
                if read:
                    f.will_read()
                for m, s in read:
                    raw = f.tensor(s.name)
                    tensors[m] = _place(s.view(raw) if s.view else raw, device, _dtype(expected[m], dtype))
                    f.release(s.name, raw)
                    del raw
            for m in plan.built:
                tensors[m] = _place(_formula(m, expected[m]), device, _dtype(expected[m], dtype))
            target.load_state_dict(tensors, strict=True, assign=True)
        finally:
            plan.close()
    del tensors
    # buffers outside the state dict (non-persistent: CLIP's position ids) from their formula
    for prefix, mod in module.named_modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                mod._buffers[k] = _place(_formula(f"{prefix}.{k}", b), device, _dtype(b, dtype))
    meta = [k for k, v in [*module.named_parameters(), *module.named_buffers()] if v.device.type == "meta"]
    if meta and device.type != "meta":  # every parameter comes from a file: a checked plan leaves none
        raise AssertionError(f"{plan.what}: {len(meta)} tensors not loaded, e.g. {meta[0]!r}")
    plan.module, plan.sources = None, {}  # a plan is used once: the caller owns the module
    return module.eval()


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
        paths, problems = cls.find(models_dir)
        if problems:
            raise ModelLoadError(problems[0])
        return paths

    @classmethod
    def find(cls, models_dir) -> tuple["ModelPaths", list[str]]:
        """The paths, and a one-line problem for each one that is missing."""
        root = Path(models_dir)
        if not root.is_dir():
            raise ModelLoadError(f"{root}: models directory not found")
        paths = cls(root=root, motion=root / MOTION_CKPT, **component_dirs(root))
        problems = []
        for name in COMPONENTS:
            d = getattr(paths, name)
            if not d.is_dir():
                problems.append(f"{d}: missing component directory ({name}); expected the layout in README 'Weights'")
        if not paths.motion.is_file():
            problems.append(f"{paths.motion}: missing motion-module checkpoint")
        return paths, problems


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


#: the order components are planned, reported and loaded (the text encoder first: it is
#: freed once the embedding is computed, before the large ones are read)
PLANNERS: dict[str, Callable[[ModelPaths], ComponentPlan]] = {
    "text_encoder": plan_text_encoder,
    "vae": plan_vae,
    "appearance_encoder": plan_appearance_encoder,
    "controlnet": plan_controlnet,
    "unet": plan_unet,
}


@dataclass
class ModelSetPlan:
    """Every component planned (headers only), with what was chosen and every problem."""

    paths: ModelPaths
    components: dict[str, ComponentPlan]
    problems: list[str]  # the layout's own (missing directories), then each component's
    notes: list[str]  # the layout's own (what is present and never read)

    @property
    def ok(self) -> bool:
        return not self.all_problems()

    def all_problems(self) -> list[str]:
        found = self.problems + [p for c in self.components.values() for p in c.problems]
        return list(dict.fromkeys(found))  # a missing file may be reported by two components

    def check(self) -> "ModelSetPlan":
        problems = self.all_problems()
        if problems:
            self.close()
            raise ModelLoadError(problems[0])
        return self

    def close(self) -> None:
        for c in self.components.values():
            c.close()

    def log(self) -> None:
        """The choices at INFO, the fallbacks at WARNING (what ``check-models`` prints)."""
        for c in self.components.values():
            for line in c.notes:
                log.info(f"{c.name}: {line}")
        for line in self.notes:
            log.info(f"not used: {line}")
        for c in self.components.values():
            for line in c.warnings:
                log.warning(line)


def plan_model_set(models_dir) -> ModelSetPlan:
    """Plan every component of ``models_dir`` from headers and configs only (no weights are
    read): what loading would read, why, and every problem it would raise."""
    paths, problems = ModelPaths.find(models_dir)
    notes = [f"{rel}: {why}" for rel, why in unused_entries(paths.root)]
    components = {name: planner(paths) for name, planner in PLANNERS.items()
                  if getattr(paths, name).is_dir()}  # a missing directory is already a problem
    return ModelSetPlan(paths, components, problems, notes)


def load_unet(paths: ModelPaths, motion: MotionModuleConfig = MotionModuleConfig(), device="cpu",
              dtype: torch.dtype = torch.float32) -> TemporalUNet:
    plan = plan_unet(paths, motion)
    for line in plan.warnings:
        log.warning(line)
    return materialise(plan, device, dtype)


def load_appearance_encoder(paths: ModelPaths, device="cpu", dtype: torch.dtype = torch.float32) -> AppearanceEncoder:
    return materialise(plan_appearance_encoder(paths), device, dtype)


def load_controlnet(paths: ModelPaths, device="cpu", dtype: torch.dtype = torch.float32) -> ControlNet:
    return materialise(plan_controlnet(paths), device, dtype)


def load_vae(paths: ModelPaths, device="cpu", dtype: torch.dtype = torch.float32) -> VAE:
    return materialise(plan_vae(paths), device, dtype)


def _embedding(plan: ComponentPlan) -> Tensor:
    """The text embedding of "" (float32, CPU); the text encoder is freed afterwards."""
    plan.check()
    ids = plan.extra["ids"]
    enc = materialise(plan, "cpu", torch.float32)
    embedding = empty_prompt_embedding(enc, ids)
    del enc
    _trim_heap()
    return embedding


def load_text_embedding(paths: ModelPaths) -> Tensor:
    return _embedding(plan_text_encoder(paths))


@torch.no_grad()
def load_model_set(models_dir, device="cpu", dtype: torch.dtype = torch.float32) -> ModelSet:
    """Load every stage from ``models_dir`` (the real layout), in eval mode, each tensor
    read once, straight into ``device`` and ``dtype``.

    Every component is planned (and checked) from headers first, so a bad file fails before
    any weight is read; the choices are logged at INFO. The text embedding is computed in
    float32 on the CPU, then moved.
    """
    plan = plan_model_set(models_dir)
    plan.log()
    plan.check()
    c = plan.components
    text_embedding = _embedding(c["text_encoder"]).to(device=device, dtype=dtype)
    return ModelSet(
        paths=plan.paths,
        text_embedding=text_embedding,
        vae=materialise(c["vae"], device, dtype),
        appearance_encoder=materialise(c["appearance_encoder"], device, dtype),
        controlnet=materialise(c["controlnet"], device, dtype),
        unet=materialise(c["unet"], device, dtype),
    )


# --------------------------------------------------------------------------- report
def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def report_lines(plan: ModelSetPlan) -> list[str]:
    """What ``magicanimate-rt check-models`` prints: per component the file it would load,
    its format, dtype, key count and size; then the choices; then every problem."""
    root = plan.paths.root
    rows = [("component", "file", "format", "dtype", "keys", "size")]
    for c in plan.components.values():
        for f in c.files:
            label = c.name if f.path != plan.paths.motion else "motion"
            rows.append((label, _rel(f.path, root), f.format, f.dtypes(), str(len(f.entries)), _size(f.size)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"models: {root}"]
    for r in rows:
        cells = (v.rjust(w) if i >= 4 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # numbers right
        lines.append("  ".join(cells).rstrip())
    lines.append("choices:")
    for c in plan.components.values():
        lines += [f"  {c.name}: {n}" for n in c.notes]
    lines += [f"  not used: {n}" for n in plan.notes]
    warnings = [w for c in plan.components.values() for w in c.warnings]
    if warnings:
        lines.append("warnings:")
        lines += [f"  {w}" for w in warnings]
    problems = plan.all_problems()
    if problems:
        lines.append(f"problems ({len(problems)}): the set would not load")
        lines += [f"  {p}" for p in problems]
    else:
        read = sum(c.read_bytes for c in plan.components.values())
        lines.append(f"no problems: the set would load ({_size(read)} of tensors to read)")
    return lines


def check_model_set(models_dir) -> tuple[bool, list[str]]:
    """(whether the set would load, the report lines): headers only, no weights read."""
    ok, lines, _ = model_set_report(models_dir)
    return ok, lines


def model_set_report(models_dir) -> tuple[bool, list[str], list[str]]:
    """:func:`check_model_set` and the problems alone (one line each, none when it would load)."""
    plan = plan_model_set(models_dir)
    try:
        return plan.ok, report_lines(plan), plan.all_problems()
    finally:
        plan.close()


def problems_summary(problems: list[str]) -> str:
    """One line for an error message: the only problem, or the count and the first."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems, the first: {problems[0]}"
