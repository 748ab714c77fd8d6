"""Backends of the stage interface, picked by name here and nowhere else.

Each entry maps a name to ``module:attribute`` of a factory, imported only when asked for,
so that e.g. the ONNX Runtime backend runs on a machine without diffusers.
"""

from __future__ import annotations

import importlib

from ...errors import InputError

#: backends that load a model directory (PyTorch weights)
PRETRAINED_BACKENDS = {
    "torch": "magicanimate_rt.runtime.backends.torch_backend:TorchStages.from_pretrained",
}

#: backends that load an engine directory (build_engines.py output)
ENGINE_BACKENDS = {
    "onnxruntime": "magicanimate_rt.runtime.backends.onnxruntime_backend:OnnxRuntimeStages.from_engines",
    "tensorrt": "magicanimate_rt.runtime.backends.tensorrt_backend:TensorRTStages.from_engines",
}


def _resolve(table: dict[str, str], name: str, kind: str):
    if name not in table:
        raise InputError(f"backend {name!r} cannot load {kind}; choose one of: {', '.join(sorted(table))}")
    module, attr = table[name].split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def pretrained_factory(name: str):
    """The factory ``f(models_dir, device, dtype) -> Stages`` of a weights backend."""
    return _resolve(PRETRAINED_BACKENDS, name, "a models directory")


def engine_factory(name: str):
    """The factory ``f(engine_dir, device) -> Stages`` of an engine backend."""
    return _resolve(ENGINE_BACKENDS, name, "an engine directory")
