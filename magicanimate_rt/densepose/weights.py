"""Reading a DensePose R-CNN checkpoint without running anything it may contain.

Two formats, both read to ``{detectron2 state_dict name: numpy array}``:

- detectron2's model zoo ``.pkl`` (``model_final_162be9.pkl``): a pickle of
  ``{"model": {name: numpy array}, "__author__": str, ...}``. ``pickle.load`` would import and call
  whatever the file names, so it is read with an unpickler that rebuilds only numpy arrays and plain
  containers and refuses every other global before anything is called.
- a detectron2 ``.pth`` (``torch.save`` of ``{"model": state_dict, ...}`` or of the state dict itself,
  zip or legacy format): ``torch.load(weights_only=True)``, PyTorch's own restricted unpickler.

Every problem is a :class:`CheckpointError` whose message is one line naming the file: missing,
a Git LFS pointer instead of the weights, truncated, a pickle that asks for code, not a checkpoint,
no arrays in it; whether they are DensePose R-CNN weights is the model's check (``model.validate_state_dict``).
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

from magicanimate_rt.errors import ModelLoadError

# the globals a numpy-array pickle needs (numpy 1.x and 2.x spell the core module differently;
# _codecs.encode is how Python 3 writes bytes in pickle protocols <= 2): constructors of arrays,
# dtypes and bytes, none of which runs code named by the file
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}
# what a legacy (non-zip) torch.save file's first pickle holds (torch/serialization.py MAGIC_NUMBER)
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"



class CheckpointError(ModelLoadError, ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it refers to storage outside the pickle (a torch file?)")


class _Refused(pickle.UnpicklingError):
    """The pickle asks for a global a checkpoint of arrays never needs (raised before it is imported)."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_pickle(path: Path):
    try:
        with path.open("rb") as f:
            return _ArraysOnly(f, encoding="latin1").load()
    except _Refused as e:
        raise CheckpointError(f"{path}: refused: the pickle asks for {e}, which a checkpoint of arrays never "
                              f"needs (nothing was run)") from None
    except EOFError:
        raise CheckpointError(f"{path}: truncated (the pickle ends early; download the file again)") from None
    except Exception as e:  # noqa: BLE001 - only numpy's constructors can have run; any failure means unreadable
        if "truncated" in str(e):
            raise CheckpointError(f"{path}: truncated (the pickle ends early; download the file again)") from None
        raise CheckpointError(f"{path}: not a DensePose checkpoint (not a readable pickle: {_one_line(e)})") from None


def _read_torch(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # PyTorch's message is a paragraph; its line naming the global is the one that matters
        found = re.search(r"(unsupported GLOBAL [^\n]*|Unsupported global: [^\n]*)", str(e))
        what = _one_line(found.group(1)) if found else _one_line(str(e).split("\n")[0])
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {what} (nothing was run)") \
            from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: truncated or corrupt torch file ({_one_line(e, 120)})") from None


def _to_numpy(value):
    """A state dict value as a numpy array, or None if it is not an array or tensor."""
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported: a .pkl never needs it
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        return value.numpy()
    return None


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The checkpoint's state dict (detectron2's names -> numpy arrays), from a model zoo ``.pkl`` or
    a detectron2 ``.pth`` (see the module docstring). Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    with path.open("rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"{path}: empty file")
    if head.startswith(_LFS_POINTER):
        raise CheckpointError(f"{path}: a Git LFS pointer, not the weights (fetch the real file, e.g. git lfs pull)")
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        obj = _read_torch(path)
    else:
        obj = _read_pickle(path)
        if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:  # torch.save's legacy format
            obj = _read_torch(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a DensePose checkpoint (holds a {type(obj).__name__}, not a dict of "
                              f"arrays)")
    state = {}
    for key, value in obj.items():
        array = _to_numpy(value)
        if not isinstance(key, str) or array is None or array.dtype.hasobject:
            what = "an array of Python objects" if array is not None else f"a {type(value).__name__}"
            raise CheckpointError(f"{path}: not a DensePose checkpoint (entry {_one_line(repr(key), 80)} is {what}, "
                                  f"not an array of numbers)")
        state[key] = array
    if not state:
        raise CheckpointError(f"{path}: empty checkpoint (no arrays in it)")
    return state

