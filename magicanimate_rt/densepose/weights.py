"""Reading a DensePose R-CNN checkpoint without running anything it may contain.

detectron2's model zoo ships ``.pkl`` files: a pickle of ``{"model": {name: numpy array}, ...}``.
``pickle.load`` would import and call whatever the file names, so we read it with an unpickler that
rebuilds only numpy arrays and plain containers and refuses every other global.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

# the globals a numpy-array pickle needs (numpy 1.x and 2.x spell the core module differently)
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a checkpoint of arrays never needs")


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The checkpoint's state dict (detectron2's names -> numpy arrays)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable DensePose checkpoint ({e})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no state dict of arrays in this file")
    return {k: np.asarray(v) for k, v in state.items()}
