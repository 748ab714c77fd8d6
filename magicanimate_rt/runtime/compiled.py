"""Compiled stage calls and their on-disk compile cache (the torch backend's
``TorchOptions.compile_mode``).

- :class:`CompiledCall`: one stage's call through ``torch.compile`` (``dynamic=False``: each
  shape the plan uses is compiled for exactly that shape), with the eager call as its
  fallback. A compile that fails costs one warning per stage and the stage runs eager from
  then on, so a missing compiler or an unsupported op never fails a request; an error the
  eager call raises too is the call's own and propagates, and running out of memory is
  never swallowed (the caller steps its plan down on it).
- :class:`CompileKey` and :class:`CompileCache`: what ``torch.compiler.save_cache_artifacts``
  returns (inductor's compiled graphs and autotuning results) kept in one file per key
  under the cache directory, so a second process at the same shapes starts warm
  (``magicanimate-rt warmup`` fills it). The key is a digest of everything that changes
  the compiled code: torch and triton versions, the device model, dtype, compile mode and
  backend, the backend options, the model set's architecture and the request's shapes.

The key only decides which file a process reads: inductor checks its own keys on every
lookup, so a stale or foreign file costs a cold compile, never a wrong result. Nothing here
imports the models: the torch backend computes the model-set fingerprint and hands it in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ..layout import cache_dir
from ..stage_names import CALLS

log = logging.getLogger(__name__)

#: the modes ``TorchOptions.compile_mode`` accepts (None: eager)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")

#: the stages a torch backend can compile (``TorchOptions.compile_stages``): every call of
#: ``stage_names.py``
STAGES = CALLS

#: the cache file format's version (part of every key)
FORMAT = 1
#: a cache file: this line, the payload's sha256 (32 bytes), then the payload (what
#: ``torch.compiler.save_cache_artifacts`` returned). The checksum turns a truncated or
#: damaged file into one warning here, before torch's own unpickling sees it.
MAGIC = b"magicanimate-rt compile cache v1\n"


class CompileFallbackWarning(RuntimeWarning):
    """Compiling fell back: a stage's ``torch.compile`` failed and it runs eager, or a cache
    file could not be read (a cold compile) or written (the next process compiles cold)."""


def _out_of_memory(e: Optional[BaseException]) -> Optional[BaseException]:
    """The out-of-memory error ``e`` is or was raised from, if any (torch.compile wraps a
    backend's errors, e.g. one hit while autotuning)."""
    for _ in range(16):
        if e is None or isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    return None


class CompiledCall:
    """``fn`` through ``torch.compile(fn, mode=mode, backend=backend, dynamic=False)``.

    The first call compiles. If compiling (or running the compiled graph) raises, the call
    runs ``fn`` eager: when that succeeds, the stage gives one
    :class:`CompileFallbackWarning` and this call stays eager (``failed`` says why); when
    eager raises too, that error propagates (it is the call's own, e.g. a bad input) and the
    next call tries the compiled path again. Out-of-memory errors always propagate, as
    themselves (not torch.compile's wrapper of them).
    """

    def __init__(self, stage: str, fn: Callable, mode: str, backend: Union[str, Callable] = "inductor",
                 warned: Optional[set] = None):
        self.stage = stage
        self.eager = fn
        #: stages that have warned, shared by a backend's calls so that a stage with several
        #: calls (the ControlNet's) warns once
        self.warned = set() if warned is None else warned
        self.compiled = torch.compile(fn, mode=mode, backend=backend, dynamic=False)
        #: why the compiled path was given up (None: still compiled)
        self.failed: Optional[str] = None

    def __call__(self, *args, **kwargs):
        if self.failed is not None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (decided below, after the eager call)
            oom = _out_of_memory(e)
            if oom is e:
                raise
            if oom is not None:
                raise oom  # itself, not torch.compile's wrapper: callers step their plan down on it
            why = _describe(e)  # only the text: the traceback would keep the failed run's tensors
        # outside the except block, so an eager error is reported as itself, not "during
        # handling" of the compile error
        result = self.eager(*args, **kwargs)
        self.failed = why
        if self.stage not in self.warned:
            self.warned.add(self.stage)
            warnings.warn(CompileFallbackWarning(
                f"torch.compile of the {self.stage} stage failed ({self.failed[:300]}); it runs eager"), stacklevel=2)
        return result


def _describe(error: BaseException) -> str:
    """One line for a compile failure: its type and the first line of its innermost cause
    (torch.compile wraps a backend's error, as ``inner_exception`` or the cause:
    "BackendCompilerFailed: RuntimeError: ...")."""
    root = error
    for _ in range(16):
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if not isinstance(inner, BaseException):
            break
        root = inner
    lines = str(root).strip().splitlines()
    what = f"{type(root).__name__}: {lines[0] if lines else ''}"
    return what if root is error else f"{type(error).__name__}: {what}"


def detached_from_graph(out):
    """``out`` (a tensor, or a tuple / list of them) with every tensor copied: under CUDA
    graphs a compiled call's outputs live in the graph pool, which the next graph step may
    overwrite; the copies are the caller's to keep."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(detached_from_graph(o) for o in out)
    return out


# --------------------------------------------------------------------------- the key
def default_cache_dir() -> Path:
    """``compile/`` under the project's cache directory (``$MAGICANIMATE_RT_CACHE``, else
    ``$XDG_CACHE_HOME/magicanimate-rt``, else ``~/.cache/magicanimate-rt``;
    :func:`~magicanimate_rt.layout.cache_dir`)."""
    return cache_dir() / "compile"


def _cpu_model() -> str:
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu-{platform.machine()}-{name}"


def device_model(device: torch.device) -> str:
    """What the compiled kernels were built for: the GPU's name (and compute capability), or
    "cpu-" + the machine and processor model."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return _cpu_model()


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


def backend_name(backend: Union[str, Callable]) -> str:
    """A compile backend as the key names it: its name, or a callable's qualified name."""
    if isinstance(backend, str):
        return backend
    return f"{getattr(backend, '__module__', '?')}.{getattr(backend, '__qualname__', type(backend).__name__)}"


@dataclass(frozen=True)
class CompileKey:
    """Everything a cache file's compiled code depends on; :meth:`digest` names the file.

    Fields:
        torch_version, triton_version ("none" without triton), device_model (see
        :func:`device_model`), dtype, mode, backend: the compiler and its target.
        options: the backend options that change the traced graphs, as text.
        model_set: the model set's architecture fingerprint (its tensors' names, shapes and
            dtypes and its configs: the graphs take the weights as inputs, so other weights
            of the same architecture share the compiled code).
        width, height: the output shape; windows_per_call, controlnet_chunk, decode_chunk,
            controlnet_residuals, embed_control_once: the plan, which sets each call's
            batch (the frame count only adds the shorter last chunks, saved with the key's
            file when a request compiles them); cfg_sequential, ff_chunk: the plan's lean
            UNet settings (``runtime/planner.py``), which change the UNet's graphs.
    """

    torch_version: str
    triton_version: str
    device_model: str
    dtype: str
    mode: str
    backend: str
    options: str
    model_set: str
    width: int
    height: int
    windows_per_call: int
    controlnet_chunk: int
    decode_chunk: int
    controlnet_residuals: str = "all"
    embed_control_once: bool = False
    cfg_sequential: bool = False
    ff_chunk: Optional[int] = None

    def digest(self) -> str:
        """sha256 (24 hex digits) of the format version and every field."""
        return hashlib.sha256(repr((FORMAT, astuple(self))).encode()).hexdigest()[:24]

    @property
    def file_name(self) -> str:
        return f"{self.width}x{self.height}-{self.digest()}.bin"


def _artifact_keys(info) -> frozenset:
    """The (type, key) pairs a ``torch.compiler`` CacheInfo lists."""
    if info is None:
        return frozenset()
    return frozenset((kind, key) for kind, keys in info.artifacts.items() for key in keys)


def _write_atomically(path: Path, blob: bytes) -> None:
    """``path`` holds ``blob`` or is as it was: written to a temporary file beside it, then
    renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # as a plain file would be (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _payload(blob: bytes) -> bytes:
    """The artifacts of a cache file's bytes; ValueError when the file is not one or is
    damaged."""
    head, digest = blob[: len(MAGIC)], blob[len(MAGIC) : len(MAGIC) + 32]
    data = blob[len(MAGIC) + 32 :]
    if head != MAGIC:
        raise ValueError("not a magicanimate-rt compile cache file")
    if hashlib.sha256(data).digest() != digest:
        raise ValueError("checksum mismatch (truncated or damaged)")
    return data


class CompileCache:
    """The compile cache files in ``directory``, one per :class:`CompileKey`.

    :meth:`load` hot-loads a key's file once per process (``torch.compiler.
    load_cache_artifacts``); :meth:`save` writes the process's artifacts into the key's file
    when they hold any the file lacks (a temporary file renamed over it: never half a file).
    An unreadable or corrupt file gives one warning and a cold compile; its key's next save
    replaces it. A file that cannot be written is one warning too: the request goes on.
    ``loaded`` and ``saved`` record what happened (path -> artifact count / bytes) for
    reports.
    """

    def __init__(self, directory: Union[str, Path]):
        self.directory = Path(directory)
        self.loaded: dict[Path, int] = {}
        self.saved: dict[Path, int] = {}
        self._known: dict[Path, frozenset] = {}  # artifacts each file holds, as far as we know

    def path(self, key: CompileKey) -> Path:
        return self.directory / key.file_name

    def load(self, key: CompileKey) -> int:
        """Load ``key``'s file if there is one and this cache has not read it yet; returns
        the number of artifacts loaded (0: none, or already loaded)."""
        path = self.path(key)
        if path in self._known:
            return 0
        self._known[path] = frozenset()
        if not path.is_file():
            return 0
        try:
            info = torch.compiler.load_cache_artifacts(_payload(path.read_bytes()))
            if info is None:
                raise ValueError("torch.compiler could not read its artifacts")
        except Exception as e:  # noqa: BLE001 (any unreadable file: a cold compile, not a failure)
            warnings.warn(CompileFallbackWarning(f"compile cache {path} is unreadable ({type(e).__name__}: {e}); "
                                                 "compiling cold"), stacklevel=2)
            return 0
        self._known[path] = _artifact_keys(info)
        self.loaded[path] = len(self._known[path])
        log.info("loaded %d compile artifacts from %s", self.loaded[path], path)
        return self.loaded[path]

    def save(self, key: CompileKey) -> Optional[Path]:
        """Write the process's compile artifacts into ``key``'s file when it lacks some of
        them; returns the path written (None: nothing new)."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        data, info = saved
        path = self.path(key)
        keys = _artifact_keys(info)
        if keys <= self._known.get(path, frozenset()):
            return None
        try:
            _write_atomically(path, MAGIC + hashlib.sha256(data).digest() + data)
        except OSError as e:  # a read-only or full disk costs the next process a cold start, not this request
            warnings.warn(CompileFallbackWarning(f"could not write compile cache {path} ({e}); later processes "
                                                 "compile cold"), stacklevel=2)
            self._known[path] = keys  # one warning, not one per request
            return None
        self._known[path] = keys
        self.saved[path] = path.stat().st_size
        log.info("wrote %d compile artifacts (%d bytes) to %s", len(keys), len(data), path)
        return path


def graph_cache_counts() -> dict[str, int]:
    """How many compiled graphs this process took from inductor's caches ("hit") and
    compiled ("miss") so far: torch's own counters (FX graph cache and AOTAutograd cache,
    the larger of the two for each), for reports; empty where this torch has none."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    inductor, aot = counters.get("inductor", {}), counters.get("aot_autograd", {})
    return {"hit": max(inductor.get("fxgraph_cache_hit", 0), aot.get("autograd_cache_hit", 0)),
            "miss": max(inductor.get("fxgraph_cache_miss", 0), aot.get("autograd_cache_miss", 0))}


def environment(device: torch.device) -> dict[str, Any]:
    """The key fields of the compiler and its target on ``device``."""
    return {"torch_version": torch.__version__, "triton_version": triton_version(),
            "device_model": device_model(device)}
