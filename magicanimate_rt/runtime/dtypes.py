"""The one dtype table: the names the project uses for tensor dtypes and their torch dtypes.

Names are numpy's (what stage specs and engine manifests store: "float32", "float16",
...); the short forms users may type ("fp16", "bf16", ...) are aliases. Every backend
converts through here: the torch backend's ``dtype=`` argument, the ONNX Runtime backend's
I/O binding (numpy types) and the TensorRT backend's buffers (the TensorRT side of the same
names is :func:`magicanimate_rt.engines.tensorrt_plan.trt_dtypes`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

#: numpy dtype name -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
#: short names users may give for the float dtypes
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
#: the float dtypes a backend's ``dtype`` may be
FLOAT_NAMES = ("float32", "float16", "bfloat16", "float64")
_NAME_OF_TORCH = {v: k for k, v in TORCH_DTYPES.items()}


def torch_dtype(dtype) -> torch.dtype:
    """A torch dtype from a torch dtype, a numpy name or an alias (InputError otherwise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = ALIASES.get(dtype, dtype)
    if name not in TORCH_DTYPES:
        known = ", ".join([*FLOAT_NAMES, *ALIASES])
        raise InputError(f"dtype {dtype!r} is not one of {known}")
    return TORCH_DTYPES[name]


def float_torch_dtype(dtype) -> torch.dtype:
    """:func:`torch_dtype` restricted to the float dtypes a backend computes in."""
    t = torch_dtype(dtype)
    if dtype_name(t) not in FLOAT_NAMES:
        raise InputError(f"dtype {dtype!r} is not a float dtype; choose one of {', '.join(FLOAT_NAMES)}")
    return t


def dtype_name(dtype: torch.dtype) -> str:
    """The numpy name of a torch dtype ("float16", ...)."""
    try:
        return _NAME_OF_TORCH[dtype]
    except KeyError:
        raise InputError(f"dtype {dtype} has no entry in the dtype table") from None


def numpy_type(dtype: torch.dtype) -> type:
    """The numpy scalar type of a torch dtype (ONNX Runtime's I/O binding takes these)."""
    name = dtype_name(dtype)
    if name == "bfloat16":
        raise InputError("numpy has no bfloat16: ONNX graphs run in float32 or float16")
    return np.dtype(name).type
