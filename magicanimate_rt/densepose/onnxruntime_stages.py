"""The DensePose stages run by ONNX Runtime from an engine directory (``--backend onnxruntime``).

Reads only the manifest's DensePose section and the ONNX files (no PyTorch model code): the CPU
execution provider here, CUDA where onnxruntime-gpu is installed. Inputs are bound by data
pointer from the caller's (contiguous, float32) torch tensors; outputs are allocated by ONNX
Runtime, because their shapes follow from the input's size (the spec names those axes but does
not profile them), and handed back as torch tensors on the backend's device: zero-copy views of
ONNX Runtime's buffers on the CPU, a copy through the host on CUDA (the glue between the graphs
reads data-dependent counts on the host anyway; a device-side hand-over is issue 28 item 3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..engines.densepose import DENSEPOSE_STAGES, DensePoseManifest, read_densepose
from ..errors import EngineError
from ..runtime.backends.onnxruntime_backend import open_session
from ..runtime.dtypes import numpy_type, torch_dtype
from .stages import BackboneOutputs, DensePoseStages


class _Graph:
    def __init__(self, ort, path: Path, spec, providers, device: torch.device):
        self.session = open_session(ort, path, providers)
        self.spec = spec
        self.device = device
        self._ort_device = "cuda" if device.type == "cuda" else "cpu"
        self._dtype = torch_dtype(spec.inputs[0].dtype)

    def run(self, x: Tensor) -> list[Tensor]:
        x = x.to(self.device, self._dtype).contiguous()
        binding = self.session.io_binding()
        t = self.spec.inputs[0]
        binding.bind_input(t.name, self._ort_device, self.device.index or 0, numpy_type(x.dtype), tuple(x.shape),
                           x.data_ptr())
        for o in self.spec.outputs:
            binding.bind_output(o.name, self._ort_device, self.device.index or 0)
        self.session.run_with_iobinding(binding)
        if self._ort_device == "cpu":
            return [torch.from_numpy(np.asarray(v.numpy())).float() for v in binding.get_outputs()]
        return [torch.from_numpy(a).to(self.device).float() for a in binding.copy_outputs_to_cpu()]


class OnnxRuntimeDensePoseStages(DensePoseStages):
    name = "onnxruntime"

    def __init__(self, manifest: DensePoseManifest, device="cpu"):
        import onnxruntime as ort

        self.manifest = manifest
        self.device = torch.device(device)
        self.dtype = torch_dtype(manifest.spec(DENSEPOSE_STAGES[0]).inputs[0].dtype)
        if self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        elif self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": str(self.device.index or 0)}), "CPUExecutionProvider"]
        else:
            raise EngineError(f"--device {self.device}: the onnxruntime backend runs on cpu, or on cuda with "
                              f"onnxruntime-gpu; this onnxruntime offers {', '.join(ort.get_available_providers())}")
        self._graphs = {s: _Graph(ort, manifest.onnx_path(s), manifest.spec(s), providers, self.device)
                        for s in DENSEPOSE_STAGES}

    @classmethod
    def from_engines(cls, engine_dir, device="cpu") -> "OnnxRuntimeDensePoseStages":
        return cls(read_densepose(engine_dir), device)

    def backbone(self, x: Tensor) -> BackboneOutputs:
        return BackboneOutputs.from_flat(self._graphs["densepose_backbone"].run(x))

    def box_head(self, pooled: Tensor):
        return tuple(self._graphs["densepose_box_head"].run(pooled))

    def densepose_head(self, pooled: Tensor):
        return tuple(self._graphs["densepose_head"].run(pooled))
