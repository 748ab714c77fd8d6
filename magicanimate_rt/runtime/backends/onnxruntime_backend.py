"""The ONNX Runtime backend: the stage interface over an engine directory's ONNX graphs.

It reads only the manifest, the specs and the ONNX files (no diffusers, transformers or
PyTorch model code), so it runs wherever onnxruntime does: on the CPU, and on CUDA where
onnxruntime-gpu is installed. It is also how a machine without TensorRT proves that the
exported graphs compute the reference function.

Tensors stay torch tensors on the backend's device: every call binds its inputs and
outputs by data pointer (ONNX Runtime I/O binding), so nothing is copied through numpy and
the sampling loop keeps working on the backend's buffers. Input bindings point at the
caller's tensors (made contiguous, in the engine's dtype, if they are not); the text
embedding is bound once per session. Output tensors are allocated with ``torch.empty`` from
the spec's shapes for each call rather than reused, because callers keep results across
calls (the ControlNet residuals of several chunks are concatenated after all of them ran);
on CUDA that allocation comes from torch's caching allocator and costs nothing.

On CUDA, ONNX Runtime is given torch's current stream as its compute stream and told not
to synchronise at the end of a run, so the loop never waits on the host.

``unet_cond`` (guidance scale 1.0) runs the guided graph and returns its conditional half:
one graph per engine directory, at the price of the unconditional half's work from the mid
block on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ...engines.manifest import EngineManifest, load_manifest
from ...errors import EngineError
from ..dtypes import numpy_type, torch_dtype
from .engine_stages import EngineStages



def open_session(ort, path: Path, providers):
    """An ONNX Runtime session with all graph optimisations; one-line EngineError when it cannot load."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise EngineError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]})") from None


class _Session:
    """One stage's ONNX Runtime session and I/O binding."""

    def __init__(self, ort, path: Path, spec, providers, device: torch.device, run_options):
        self.session = open_session(ort, path, providers)
        self.spec = spec
        self.device = device
        self.binding = self.session.io_binding()
        self.run_options = run_options
        self._ort_device = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0
        self._kept: dict[str, Tensor] = {}  # tensors bound once (the text embedding)

    def _bind(self, bind, name: str, t: Tensor) -> None:
        bind(name, self._ort_device, self._device_id, numpy_type(t.dtype), tuple(t.shape), t.data_ptr())

    def bind_constant(self, name: str, t: Tensor) -> None:
        """Bind an input that never changes (kept alive here)."""
        self._kept[name] = t
        self._bind(self.binding.bind_input, name, t)

    def run(self, inputs: Mapping[str, Tensor], axes: Mapping[str, int]) -> list[Tensor]:
        """Bind ``inputs`` (already in the right dtype, contiguous, on the device), run, and
        return the outputs in spec order as new tensors."""
        for name, t in inputs.items():
            self._bind(self.binding.bind_input, name, t)
        shapes = self.spec.shapes(**axes)
        outputs = []
        for o in self.spec.outputs:
            t = torch.empty(shapes[o.name], dtype=torch_dtype(o.dtype), device=self.device)
            self._bind(self.binding.bind_output, o.name, t)
            outputs.append(t)
        self.session.run_with_iobinding(self.binding, self.run_options)
        return outputs


class OnnxRuntimeStages(EngineStages):
    """The stages of an engine directory, run by ONNX Runtime (see the module docstring)."""

    name = "onnxruntime"

    def __init__(self, manifest: EngineManifest, device="cpu"):
        import onnxruntime as ort

        self.device = torch.device(device)
        providers, run_options = self._providers(ort)  # may pin the CUDA device index
        self._init_from_manifest(manifest)
        self._sessions: dict[str, _Session] = {}
        for stage in manifest.stages:
            s = _Session(ort, manifest.onnx_path(stage), manifest.spec(stage), providers, self.device, run_options)
            if "text_embedding" in s.spec.input_names:
                s.bind_constant("text_embedding", self.text_embedding)
            self._sessions[stage] = s

    @classmethod
    def from_engines(cls, engine_dir, device="cpu") -> "OnnxRuntimeStages":
        """Load ``engine_dir`` (checked by :func:`~magicanimate_rt.engines.manifest.load_manifest`)."""
        return cls(load_manifest(engine_dir), device)

    def _providers(self, ort):
        if self.device.type == "cpu":
            return ["CPUExecutionProvider"], None
        if self.device.type != "cuda":
            raise EngineError(f"the onnxruntime backend runs on cpu or cuda, not {self.device}")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError(f"device {self.device} needs onnxruntime-gpu (pip install onnxruntime-gpu); this "
                              f"onnxruntime offers {', '.join(ort.get_available_providers())}")
        if not torch.cuda.is_available():
            raise EngineError(f"device {self.device}: torch sees no CUDA device")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        options = {"device_id": str(index), "user_compute_stream": str(stream), "has_user_compute_stream": "1"}
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"], run_options

    # ------------------------------------------------------------------ helpers
    def _session(self, stage: str) -> _Session:
        if not self._sessions:
            raise EngineError("this onnxruntime backend is closed")
        return self._sessions[stage]

    # ------------------------------------------------------------------ stages
    def encode_reference(self, image: Tensor) -> Tensor:
        (latents,) = self._session("vae_encoder").run({"images": self._in(image)}, {"images": image.shape[0]})
        return latents

    def bank(self, ref_latent: Tensor, t: Tensor) -> list[Tensor]:
        return self._session("appearance_encoder").run({"latent": self._in(ref_latent), "timestep": self._t(t)}, {})

    def controlnet(self, latents: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        inputs = {"latents": self._in(latents), "timestep": self._t(t), "cond": self._in(cond)}
        return self._session("controlnet").run(inputs, {"frames": latents.shape[0]})

    def unet_guided(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]):
        s = self._session("unet")
        inputs = self._unet_inputs(self._in(latents), self._t(t), [self._in(r) for r in residuals],
                                   [self._in(b) for b in bank])
        eps_uncond, eps_cond = s.run(inputs, {})
        return eps_uncond, eps_cond

    def decode(self, latents: Tensor) -> Tensor:
        (images,) = self._session("vae_decoder").run({"latents": self._in(latents)}, {"frames": latents.shape[0]})
        return images

    def close(self) -> None:
        self._sessions = {}
