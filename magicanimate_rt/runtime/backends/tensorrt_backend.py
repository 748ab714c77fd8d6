"""The TensorRT backend: the stage interface over an engine directory's TensorRT plans.

Built by ``build_engines.py`` (or ``python -m magicanimate_rt.plans DIR``) on the GPU it
runs on; loading refuses plans of another GPU or TensorRT version
(:func:`~magicanimate_rt.engines.tensorrt_plan.check_plans`). It reads only the manifest,
the specs and the plan files: no diffusers, transformers, PyTorch model or export code.

How it runs (STYLE 4: allocate once, bind once, never sync inside the loop):

- one ``trt.Runtime``; each plan deserialized once; one execution context per stage,
  created with ``ExecutionContextAllocationStrategy.USER_MANAGED``. The stages never run
  at the same time, so every context gets the **same** activation memory: one torch CUDA
  buffer of the largest ``device_memory_size_v2`` among the engines
  (``set_device_memory``). For SD 1.5 that is the UNet's alone, instead of the sum.
- every tensor is a torch CUDA tensor bound by address (``set_tensor_address``); an
  address or input shape is set again only when it changed (``set_input_shape`` re-plans
  the context, so it happens once per shape, not per call). The text embedding is bound
  once per context at load.
- the UNet's outputs (eps_uncond, eps_cond) are buffers allocated once from the spec's
  shapes and returned by every UNet call: **they hold the latest window's result until
  the next UNet call** (the sampling loop adds them into its sums right away, in stream
  order). The other stages return new tensors from torch's caching allocator (free on
  CUDA), because callers keep those across calls: the ControlNet residuals of every
  16-frame chunk are concatenated after the last chunk ran, decoded frames likewise, and
  the pipeline's reference cache keeps banks across requests.
- the backend declares one window per UNet call and each plan's largest batch (its
  profile's max, :func:`~.engine_stages.engine_capabilities`); the pipeline's plan keeps
  within them, and a call beyond a profile is an EngineError, never split here.
- all TensorRT work is enqueued on the backend's own stream (``self.stream``, a
  ``torch.cuda.Stream``: TensorRT synchronises around the legacy default stream); it is
  ordered after the caller's current stream with one event wait per call and back (no
  host synchronisation). Running the whole pipeline inside
  ``with torch.cuda.stream(stages.stream):`` puts everything on that one stream and the
  waits disappear.
- ``TensorRTOptions(cuda_graph=True)`` captures the per-window UNet call once at load
  (after one warm-up launch) into a ``torch.cuda.CUDAGraph`` over static input buffers;
  each call copies its inputs into them and replays. The UNet has no dynamic axis, so a
  call with any other shape is an EngineError, never a silent re-capture.

``unet_cond`` (guidance scale 1.0) runs the guided plan and returns its conditional half
(one plan per directory, as the ONNX Runtime backend).

:func:`magicanimate_rt.plans.validate_engines` compares every plan with ONNX Runtime on the
same random inputs (``build_engines.py --validate-plans``, ``python -m magicanimate_rt.plans DIR
--validate``).

Tests pass a fake ``tensorrt`` module (``trt=``) and may then run on ``device="cpu"``:
the fake's execute reads and writes the bound host addresses.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ...engines.manifest import EngineManifest, load_manifest
from ...engines.specs import StageSpec
from ...engines.tensorrt_plan import PlanTarget, check_plans, import_tensorrt, make_logger, trt_dtypes
from ...errors import EngineError, InputError
from ..dtypes import torch_dtype
from .engine_stages import EngineStages


@dataclass(frozen=True)
class TensorRTOptions:
    """How the TensorRT backend runs.

    Fields:
        cuda_graph: capture the per-window UNet call into a CUDA graph at load and replay
            it (saves the launch overhead of a few thousand kernels per window; costs a
            copy of the window's inputs into static buffers, about 0.2 GB for SD 1.5 at 512).
        verify_hashes: check every plan's sha256 against the manifest at load (reads them twice).
    """

    cuda_graph: bool = False
    verify_hashes: bool = False


class HostStream:
    """Stand-in for a CUDA stream when a fake TensorRT runs on the CPU (tests only)."""

    cuda_stream = 0


def plan_device(device, fake: bool = False) -> torch.device:
    """The CUDA device TensorRT plans run on (with its index), or one clear error; a fake
    ``tensorrt`` module (tests) may run on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {device}: torch sees no CUDA GPU; the tensorrt backend needs one")
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if not (fake and device.type == "cpu"):
        raise InputError(f"the tensorrt backend runs on a CUDA device, not {device} (give --device cuda)")
    return device


def run_ordered(device: torch.device, stream, enqueue: Callable[[], None]) -> None:
    """Run ``enqueue`` on ``stream``, after the caller's current stream's work and before
    its later work (event waits only, no host synchronisation); directly off CUDA."""
    if device.type != "cuda":
        enqueue()
        return
    with torch.cuda.device(device):  # TensorRT enqueues on the current device
        current = torch.cuda.current_stream(device)
        if current == stream:
            enqueue()
            return
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            enqueue()
        current.wait_stream(stream)


def _capture_graph(stream, launch: Callable[[], None]) -> Callable[[], None]:
    """Capture ``launch`` (one execute_async_v3) on ``stream`` into a CUDA graph; returns
    the graph's replay (tests replace this function to run on the CPU)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        launch()
    return graph.replay


class PlanStage:
    """One stage's engine and execution context, and what is bound to it (also what the
    DensePose estimator's TensorRT stages run, ``densepose/tensorrt_stages.py``)."""

    def __init__(self, trt, runtime, path, spec: StageSpec):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise EngineError(f"{path}: cannot read the plan ({e})") from None
        self.engine = runtime.deserialize_cuda_engine(data)
        del data
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT cannot deserialize this plan (damaged, or from another TensorRT "
                              "or GPU)")
        self.name = spec.name
        self.spec = spec
        self._check_io(trt, path)
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise EngineError(f"{path}: TensorRT could not create an execution context")
        self.memory_size = int(self.engine.device_memory_size_v2)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}

    def _check_io(self, trt, path) -> None:
        dtypes = trt_dtypes(trt)
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = sorted(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outputs = sorted(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if inputs != sorted(self.spec.input_names) or outputs != sorted(self.spec.output_names):
            raise EngineError(f"{path}: the plan's tensors (inputs {inputs}, outputs {outputs}) are not the "
                              f"manifest's stage {self.name}; the plan belongs to another build")
        for t in (*self.spec.inputs, *self.spec.outputs):
            if engine.get_tensor_dtype(t.name) != dtypes[t.dtype]:
                raise EngineError(f"{path}: tensor {t.name} is {engine.get_tensor_dtype(t.name)} in the plan, "
                                  f"{t.dtype} in the manifest; the plan belongs to another build")

    def bind(self, name: str, t: Tensor) -> None:
        """Bind ``t`` (contiguous, on the device, in the engine's dtype) by address, and its
        shape when it is an input whose shape changed."""
        if name in self.spec.input_names:
            shape = tuple(t.shape)
            if self._shapes.get(name) != shape:
                if not self.context.set_input_shape(name, shape):
                    raise EngineError(f"{self.name}: TensorRT refused shape {shape} for input {name} (outside the "
                                      f"plan's profile {self.spec.profile().get(name)})")
                self._shapes[name] = shape
        ptr = t.data_ptr()
        if self._addresses.get(name) != ptr:
            self.context.set_tensor_address(name, ptr)
            self._addresses[name] = ptr

    def check_output_shapes(self, outputs: Mapping[str, Tensor]) -> None:
        """After a shape change: TensorRT's output shapes are the spec's (host-only query)."""
        for name, t in outputs.items():
            got = tuple(self.context.get_tensor_shape(name))
            if got != tuple(t.shape):
                raise EngineError(f"{self.name}: TensorRT computes output {name} as {got}, the spec says "
                                  f"{tuple(t.shape)}")

    def close(self) -> None:
        self.context = None
        self.engine = None


class TensorRTStages(EngineStages):
    """The stages of an engine directory, run by TensorRT (see the module docstring)."""

    name = "tensorrt"

    def __init__(self, manifest: EngineManifest, device="cuda", options: Optional[TensorRTOptions] = None, *,
                 trt=None, target: Optional[PlanTarget] = None):
        self.options = options or TensorRTOptions()
        fake = trt is not None
        self.device = plan_device(device, fake)
        trt = trt if fake else import_tensorrt()
        target = target or PlanTarget.current(trt, self.device.index or 0)
        check_plans(manifest, target, verify_hashes=self.options.verify_hashes)

        self.target = target
        self._init_from_manifest(manifest)  # one window per UNet call, batches up to the profiles' max
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else HostStream()
        self._closed = False
        self._stages: dict[str, PlanStage] = {}
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        # TensorRT works on the current CUDA device: make it ours while loading and capturing
        loading = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        try:
            with loading:
                for stage, rec in manifest.stages.items():
                    path = manifest.directory / rec.plans["file"]["name"]
                    self._stages[stage] = PlanStage(trt, self._runtime, path, rec.spec)
            # one activation buffer for every context: the stages run one at a time
            size = max(s.memory_size for s in self._stages.values())
            self._activations = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            for s in self._stages.values():
                s.context.set_device_memory(self._activations.data_ptr(), size)
                if "text_embedding" in s.spec.input_names:
                    s.bind("text_embedding", self.text_embedding)
            unet = self._stages["unet"].spec
            shapes = unet.shapes()
            self._unet_out = {o.name: self._empty(shapes[o.name], o.dtype) for o in unet.outputs}
            for name, t in self._unet_out.items():
                self._stages["unet"].bind(name, t)
            self._graph_inputs: Optional[dict[str, Tensor]] = None
            self._replay: Optional[Callable[[], None]] = None
            if self.options.cuda_graph:
                with loading:
                    self._capture_unet()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_engines(cls, engine_dir, device="cuda", options: Optional[TensorRTOptions] = None, *, trt=None,
                     target: Optional[PlanTarget] = None) -> "TensorRTStages":
        """Load ``engine_dir`` (checked by :func:`~magicanimate_rt.engines.manifest.load_manifest`
        and :func:`~magicanimate_rt.engines.tensorrt_plan.check_plans`). ``trt`` and
        ``target`` are for tests (a fake tensorrt module and the GPU it pretends to be)."""
        return cls(load_manifest(engine_dir), device, options, trt=trt, target=target)

    # ------------------------------------------------------------------ helpers
    def _empty(self, shape, dtype: str) -> Tensor:
        return torch.empty(shape, dtype=torch_dtype(dtype), device=self.device)

    def _stage(self, name: str) -> PlanStage:
        if self._closed:
            raise EngineError("this tensorrt backend is closed")
        return self._stages[name]

    def _ordered(self, enqueue: Callable[[], None]) -> None:
        run_ordered(self.device, self.stream, enqueue)

    def _execute(self, s: PlanStage) -> None:
        if not s.context.execute_async_v3(self.stream.cuda_stream):
            detail = "; ".join(self._logger.errors[-3:]) or "no error message"
            raise EngineError(f"{s.name}: TensorRT failed to enqueue the plan: {detail}")

    def run_stage(self, stage: str, inputs: Mapping[str, Tensor], axes: Mapping[str, int],
                  outputs: Optional[Mapping[str, Tensor]] = None) -> list[Tensor]:
        """One plan on its spec's tensors (every stage call, and plan validation): bind
        ``inputs`` (already contiguous, on the device, in the engine's dtypes) and the
        outputs (new tensors of the spec's shapes unless given), enqueue, return the
        outputs in spec order."""
        s = self._stage(stage)
        s.spec.check_axes(**axes)
        if outputs is None:
            shapes = s.spec.shapes(**axes)
            outputs = {o.name: self._empty(shapes[o.name], o.dtype) for o in s.spec.outputs}
        shapes_before = dict(s._shapes)
        for name, t in inputs.items():
            s.bind(name, t)
        for name, t in outputs.items():
            s.bind(name, t)
        if s._shapes != shapes_before:
            s.check_output_shapes(outputs)
        self._ordered(lambda: self._execute(s))
        return [outputs[o.name] for o in s.spec.outputs]

    # ------------------------------------------------------------------ CUDA graph of the UNet
    def _capture_unet(self) -> None:
        s = self._stages["unet"]
        shapes = s.spec.shapes()
        self._graph_inputs = {t.name: torch.zeros(shapes[t.name], dtype=torch_dtype(t.dtype), device=self.device)
                              for t in s.spec.inputs if t.name != "text_embedding"}
        self._graph_inputs["timestep"].fill_(1.0)
        for name, t in self._graph_inputs.items():
            s.bind(name, t)
        s.check_output_shapes(self._unet_out)
        self._ordered(lambda: self._execute(s))  # TensorRT's lazy setup happens outside the capture
        self._replay = _capture_graph(self.stream, lambda: self._execute(s))

    def _unet_graph(self, inputs: Mapping[str, Tensor]) -> None:
        static = self._graph_inputs
        for name, x in inputs.items():
            if tuple(x.shape) != tuple(static[name].shape):
                raise EngineError(f"unet: input {name} has shape {tuple(x.shape)}, the captured CUDA graph was "
                                  f"built for {tuple(static[name].shape)}; a CUDA graph is never re-captured "
                                  "(load without cuda_graph to run other shapes)")

        def enqueue():
            for name, x in inputs.items():
                static[name].copy_(x, non_blocking=True)
            self._replay()

        self._ordered(enqueue)

    # ------------------------------------------------------------------ stages
    def encode_reference(self, image: Tensor) -> Tensor:
        (latents,) = self.run_stage("vae_encoder", {"images": self._in(image)}, {"images": image.shape[0]})
        return latents

    def bank(self, ref_latent: Tensor, t: Tensor) -> list[Tensor]:
        return self.run_stage("appearance_encoder", {"latent": self._in(ref_latent), "timestep": self._t(t)}, {})

    def controlnet(self, latents: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        inputs = {"latents": self._in(latents), "timestep": self._t(t), "cond": self._in(cond)}
        return self.run_stage("controlnet", inputs, {"frames": latents.shape[0]})

    def unet_guided(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]):
        """Both CFG halves of one window. The returned tensors are the backend's output
        buffers: valid until the next UNet call (see the module docstring)."""
        self._stage("unet")
        if self._replay is not None:
            # the graph's copies convert dtype and layout themselves: no intermediate tensors
            self._unet_graph(self._unet_inputs(latents, t.reshape(1), residuals, bank))
        else:
            inputs = self._unet_inputs(self._in(latents), self._t(t), [self._in(r) for r in residuals],
                                       [self._in(b) for b in bank])
            self.run_stage("unet", inputs, {}, outputs=self._unet_out)
        return self._unet_out["eps_uncond"], self._unet_out["eps_cond"]

    def decode(self, latents: Tensor) -> Tensor:
        (images,) = self.run_stage("vae_decoder", {"latents": self._in(latents)}, {"frames": latents.shape[0]})
        return images

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Free the contexts, engines, runtime and buffers (waits for enqueued work)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self.device.type == "cuda":
            self.stream.synchronize()
        self._replay = None
        for s in self._stages.values():
            s.close()
        self._stages = {}
        self._runtime = None
        self._activations = self._unet_out = self._graph_inputs = None

    def __del__(self):
        if not getattr(self, "_closed", True):
            warnings.warn("a TensorRTStages was never closed (use it as a context manager or call close())",
                          ResourceWarning, stacklevel=1)
            try:
                self.close()
            except Exception:  # interpreter shutdown: CUDA may be gone already
                pass
