"""The engine directory and its ``manifest.json``.

```
<engine_dir>/
  manifest.json              what was built, from what, with what (below)
  text_embedding.npy         CLIP embedding of "" (1, 77, Cx) float32: a model-set constant
  vae_encoder.onnx  appearance_encoder.onnx  controlnet.onnx  unet.onnx  vae_decoder.onnx
  <stage>.onnx.data          external weights, only for graphs over 2 GB
  <stage>.plan               TensorRT engines (written by the TensorRT builder, listed under "plans")
```

``manifest.json`` fields:

| field | meaning |
|---|---|
| format_version | :data:`FORMAT_VERSION`; a runtime refuses any other |
| model_set | ``fingerprint`` (:func:`model_set_fingerprint`) and ``source`` (the models dir it was built from, informational) |
| width, height | the output shape W x H the graphs are built for |
| size, latent_size | S and S/8, for a square build only (W = H = S) |
| window, precision | frames per UNet call, "fp32" or "fp16" |
| dims | :class:`~magicanimate_rt.engines.specs.ModelDims` the specs derive from |
| batches | the dynamic batch profiles (:class:`~magicanimate_rt.engines.specs.BatchRanges`) |
| stages.<name> | ``onnx`` (file name), ``files`` (name, bytes, sha256 of each file), ``signature`` (the stage's spec: names, shapes, dtypes, profiles), ``validation`` (max abs / relative L2 error against the torch stage), ``plans`` ({} until TensorRT plans are built) |
| constants | ``text_embedding`` (file record) and ``ddim`` (``DDIMSettings.to_dict()``) |
| versions | torch, onnx, onnxruntime, diffusers, transformers, magicanimate_rt, python at build time |
| exporter | the torch.onnx exporter that traced the graphs ("torchscript" or "dynamo") |
| tensorrt | null, or {version, gpu, compute_capability} of the plans (the TensorRT builder fills it) |
| created | UTC time of the build |
| densepose | the DensePose estimator's stages, when built (engines/densepose.py) |

This module reads only the specs and the directory (never the PyTorch models, diffusers or
the export code): a deployment machine loads engines with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ..errors import EngineError, InputError, ModelLoadError
from .specs import PRECISIONS, BatchRanges, ModelDims, StageSpec, STAGE_NAMES, output_shape, shape_label
from ..layout import COMPONENTS, MOTION_CKPT, component_dirs, pick_weights, weights_names  # shared with the loader

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEXT_EMBEDDING = "text_embedding.npy"


# --------------------------------------------------------------------------- the build command
def build_command(out, models: Optional[str] = None, size: Optional[int] = None, precision: Optional[str] = None,
                  force: bool = False, width: Optional[int] = None, height: Optional[int] = None) -> str:
    """The ``build_engines.py`` command that (re)builds the engine directory ``out``: the one
    source of every build and rebuild hint (placeholders where a value is unknown). A
    non-square ``width`` x ``height`` is ``--width W --height H``, a square ``--size S``."""
    if width is not None and height is not None and width != height:
        shape = f"--width {width} --height {height}"
    else:
        shape = f"--size {size or width or 'SIZE'}"
    cmd = (f"python build_engines.py --models {models or 'MODELS_DIR'} --out {out} {shape} "
           f"--precision {precision or 'fp16|fp32'}")
    return cmd + " --force" if force else cmd


def describe_shape(width: int, height: int) -> str:
    """A build's or a request's shape in messages: ``size 128`` for a square (as a square
    build is asked for), ``192x128`` otherwise."""
    return f"size {width}" if width == height else shape_label(width, height)


# --------------------------------------------------------------------------- model sets
def model_set_files(models_dir) -> list[Path]:
    """The files of a model set that determine the engines: each component's config and
    the weights file the loader picks, the tokenizer's files, the motion checkpoint."""
    root = Path(models_dir)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: models directory not found")
    dirs = component_dirs(root)
    files = []
    for name in COMPONENTS:
        if name == "tokenizer":
            continue
        d = dirs[name]
        weights = pick_weights(d, weights_names(name))
        if not (d / "config.json").is_file() or weights is None:
            raise ModelLoadError(f"{d}: missing config.json or weights; expected the layout in README 'Weights'")
        files += [d / "config.json", weights]
    tok = dirs["tokenizer"]
    if not tok.is_dir():
        raise ModelLoadError(f"{tok}: missing tokenizer directory")
    files += sorted(p for p in tok.iterdir() if p.is_file())
    if not (root / MOTION_CKPT).is_file():
        raise ModelLoadError(f"{root / MOTION_CKPT}: missing motion-module checkpoint")
    files.append(root / MOTION_CKPT)
    return files


def _sha256(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h


def model_set_fingerprint(models_dir) -> str:
    """sha256 over a model set's config, tokenizer and weight files (their paths relative
    to ``models_dir`` and contents): equal fingerprints mean equal engines."""
    root = Path(models_dir)
    h = hashlib.sha256()
    for p in model_set_files(root):
        rel = p.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(8, "little") + rel + p.stat().st_size.to_bytes(8, "little"))
        _sha256(p, h)
    return h.hexdigest()


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class FileRecord:
    """A file of the engine directory: its name (relative), size and sha256."""

    name: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, directory: Path, name: str) -> "FileRecord":
        p = Path(directory) / name
        return cls(name, p.stat().st_size, _sha256(p).hexdigest())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FileRecord":
        return cls(str(d["name"]), int(d["bytes"]), str(d["sha256"]))


@dataclass(frozen=True)
class StageRecord:
    """One stage of an engine directory."""

    name: str
    onnx: str  #: the graph's file name
    files: tuple[FileRecord, ...]  #: the graph and its external data, if any
    spec: StageSpec  #: its I/O signature ("signature" in the JSON)
    validation: Mapping[str, float] = field(default_factory=dict)  #: errors against the torch stage
    #: TensorRT plans (filled by the TensorRT builder), e.g. {"file": FileRecord dict, "profile": ...}
    plans: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "files": [f.to_dict() for f in self.files], "signature": self.spec.to_dict(),
                "validation": dict(self.validation), "plans": dict(self.plans)}

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> "StageRecord":
        return cls(name=name, onnx=str(d["onnx"]), files=tuple(FileRecord.from_dict(f) for f in d["files"]),
                   spec=StageSpec.from_dict(d["signature"]), validation=dict(d.get("validation", {})),
                   plans=dict(d.get("plans", {})))


@dataclass(frozen=True)
class EngineManifest:
    """The parsed ``manifest.json`` of an engine directory (see the module docstring)."""

    directory: Path
    format_version: int
    fingerprint: str
    source: str
    #: the output side of a square build (W = H = size); None for a non-square one
    size: Optional[int]
    window: int
    precision: str
    dims: ModelDims
    batches: BatchRanges
    stages: Mapping[str, StageRecord]
    text_embedding_file: FileRecord
    ddim: Mapping[str, Any]
    versions: Mapping[str, str]
    tensorrt: Optional[Mapping[str, Any]] = None
    created: str = ""
    exporter: str = ""
    #: the output shape the graphs are built for (default: ``size`` x ``size``)
    width: Optional[int] = None
    height: Optional[int] = None
    #: the DensePose stages' section (engines/densepose.py), kept as read when the manifest is rewritten
    densepose: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        width, height = output_shape(self.size, self.width, self.height)
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)
        object.__setattr__(self, "size", width if width == height else None)

    @property
    def shape(self) -> tuple[int, int]:
        """(width, height) of the output the graphs are built for."""
        return self.width, self.height

    @property
    def latent_size(self) -> Optional[int]:
        """S/8 of a square build (None for a non-square one: see :attr:`latent_shape`)."""
        return None if self.size is None else self.dims.latent_size(self.size)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(h, w) = (height, width) / 8."""
        return self.dims.latent_shape(self.width, self.height)

    def spec(self, stage: str) -> StageSpec:
        return self.stages[stage].spec

    def onnx_path(self, stage: str) -> Path:
        return self.directory / self.stages[stage].onnx

    def text_embedding(self) -> np.ndarray:
        """The (1, 77, Cx) float32 text embedding."""
        path = self.directory / self.text_embedding_file.name
        try:
            e = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise EngineError(f"{path}: unreadable text embedding ({err}); {self.rebuild_hint()}") from None
        want = (1, self.dims.text_tokens, self.dims.text_dim)
        if e.shape != want:
            raise EngineError(f"{path}: text embedding has shape {e.shape}, expected {want}; {self.rebuild_hint()}")
        return e.astype(np.float32)

    def all_files(self) -> list[FileRecord]:
        return [self.text_embedding_file] + [f for s in self.stages.values() for f in s.files]

    def rebuild_hint(self, size: Optional[int] = None, precision: Optional[str] = None,
                     models: Optional[str] = None, width: Optional[int] = None,
                     height: Optional[int] = None) -> str:
        """The command that rebuilds this directory, for another shape (``size``, or
        ``width`` and ``height``), precision or model set where given."""
        w, h = (width, height) if width is not None and height is not None else \
            (size, size) if size is not None else self.shape
        return "rebuild it: " + build_command(self.directory, models or self.source, w if w == h else None,
                                              precision or self.precision, force=True, width=w, height=h)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model_set": {"fingerprint": self.fingerprint, "source": self.source},
            **({"size": self.size, "latent_size": self.latent_size} if self.size is not None else {}),
            "width": self.width,
            "height": self.height,
            "latent_shape": list(self.latent_shape),
            "window": self.window,
            "precision": self.precision,
            "dims": self.dims.to_dict(),
            "batches": self.batches.to_dict(),
            "stages": {name: s.to_dict() for name, s in self.stages.items()},
            "constants": {"text_embedding": self.text_embedding_file.to_dict(), "ddim": dict(self.ddim)},
            "versions": dict(self.versions),
            "exporter": self.exporter,
            "tensorrt": None if self.tensorrt is None else dict(self.tensorrt),
            "created": self.created,
            **({"densepose": dict(self.densepose)} if self.densepose is not None else {}),
        }

    @classmethod
    def from_dict(cls, directory: Path, d: Mapping[str, Any]) -> "EngineManifest":
        """Manifests of square builds before ``width``/``height`` were recorded have ``size``
        only: their shape is ``size`` x ``size``."""
        if d.get("size") is None and d.get("width") is None:
            raise KeyError("size")
        return cls(
            directory=Path(directory),
            format_version=int(d["format_version"]),
            fingerprint=str(d["model_set"]["fingerprint"]),
            source=str(d["model_set"].get("source", "")),
            size=None if d.get("size") is None else int(d["size"]),
            width=None if d.get("width") is None else int(d["width"]),
            height=None if d.get("height") is None else int(d["height"]),
            window=int(d["window"]),
            precision=str(d["precision"]),
            dims=ModelDims.from_dict(d["dims"]),
            batches=BatchRanges.from_dict(d["batches"]),
            stages={name: StageRecord.from_dict(name, s) for name, s in d["stages"].items()},
            text_embedding_file=FileRecord.from_dict(d["constants"]["text_embedding"]),
            ddim=dict(d["constants"]["ddim"]),
            versions=dict(d.get("versions", {})),
            tensorrt=d.get("tensorrt"),
            created=str(d.get("created", "")),
            exporter=str(d.get("exporter", "")),
            densepose=d.get("densepose"),
        )

    def write(self) -> Path:
        """Write ``manifest.json`` (atomically: a temporary file renamed into place)."""
        path = self.directory / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


# --------------------------------------------------------------------------- loading
def read_manifest(engine_dir) -> EngineManifest:
    """Parse ``manifest.json`` without checking what it was built for (EngineError when it
    is missing or damaged)."""
    d = Path(engine_dir)
    path = d / MANIFEST
    how = f"build it with: {build_command(d)}"
    rebuild = f"build it with: {build_command(d, force=True)}"
    if not d.is_dir():
        raise EngineError(f"{d}: engine directory not found; {how}")
    if not path.is_file():
        raise EngineError(f"{d}: no {MANIFEST} (not an engine directory, or its build did not finish); "
                          f"{rebuild}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path}: damaged manifest, not valid JSON ({e}); {rebuild}") from None
    if not isinstance(raw, dict):
        raise EngineError(f"{path}: damaged manifest (expected a JSON object); {rebuild}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        hint = rebuild
        if isinstance(raw.get("model_set"), dict) and (raw.get("size") or raw.get("width")) and raw.get("precision"):
            hint = "rebuild it: " + build_command(d, raw["model_set"].get("source"), raw.get("size"),
                                                  raw["precision"], force=True, width=raw.get("width"),
                                                  height=raw.get("height"))
        raise EngineError(f"{d}: engine format version {version!r}, this runtime reads version "
                          f"{FORMAT_VERSION}; {hint}")
    if "stages" not in raw and "densepose" in raw:
        raise EngineError(f"{d}: holds the DensePose stages only; build the animation's into it with: "
                          f"{build_command(d)}")
    try:
        m = EngineManifest.from_dict(d, raw)
    except (KeyError, TypeError, ValueError, AttributeError, InputError) as e:
        what = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise EngineError(f"{path}: damaged manifest ({what}); {rebuild}") from None
    if m.precision not in PRECISIONS:
        raise EngineError(f"{path}: damaged manifest (precision {m.precision!r}); {rebuild}")
    missing = [s for s in STAGE_NAMES if s not in m.stages]
    if missing:
        raise EngineError(f"{path}: damaged manifest (no stage {missing[0]!r}); {m.rebuild_hint()}")
    return m


def check_files(m: EngineManifest, hashes: bool = False) -> None:
    """Every file the manifest lists exists with its recorded size (and sha256 when
    ``hashes``); EngineError naming the first that does not."""
    for rec in m.all_files():
        p = m.directory / rec.name
        if not p.is_file():
            raise EngineError(f"{m.directory}: {rec.name} is missing; {m.rebuild_hint()}")
        size = p.stat().st_size
        if size != rec.bytes:
            raise EngineError(f"{m.directory}: {rec.name} is {size} bytes, the manifest says {rec.bytes} "
                              f"(truncated or replaced); {m.rebuild_hint()}")
        if hashes and _sha256(p).hexdigest() != rec.sha256:
            raise EngineError(f"{m.directory}: {rec.name} does not match its recorded sha256 (corrupt); "
                              f"{m.rebuild_hint()}")


def load_manifest(engine_dir, size: Optional[int] = None, precision: Optional[str] = None,
                  model_set: Optional[str] = None, verify_hashes: bool = False, width: Optional[int] = None,
                  height: Optional[int] = None) -> EngineManifest:
    """Read and check an engine directory.

    Refuses, with one EngineError naming the directory, what differs and how to rebuild:
    a missing or damaged manifest, another format version, a build for another shape
    (``size`` for a square, or ``width`` and ``height``), ``precision`` or model set
    (``model_set`` is a :func:`model_set_fingerprint`), a missing or truncated file (any
    changed file when ``verify_hashes``). Arguments left None are not checked.
    """
    m = read_manifest(engine_dir)
    if size is not None or width is not None or height is not None:
        w, h = output_shape(size, width, height)
        if m.shape != (w, h):
            want = str(w) if w == h and m.size is not None else describe_shape(w, h)  # "size 128, not 256"
            raise EngineError(f"{m.directory}: built for {describe_shape(*m.shape)}, not {want}; "
                              f"{m.rebuild_hint(width=w, height=h)}")
    if precision is not None and m.precision != precision:
        raise EngineError(f"{m.directory}: built for precision {m.precision}, not {precision}; "
                          f"{m.rebuild_hint(precision=precision)}")
    if model_set is not None and m.fingerprint != model_set:
        raise EngineError(f"{m.directory}: built from another model set (fingerprint {m.fingerprint[:12]}, "
                          f"this one {model_set[:12]}); {m.rebuild_hint(models='MODELS_DIR')}")
    check_files(m, hashes=verify_hashes)
    return m
