"""The DensePose stages run by TensorRT plans (``--backend tensorrt``).

The plans are built per GPU from the engine directory's DensePose graphs by
``python -m magicanimate_rt.plans DIR`` (recorded in the manifest's ``"densepose"`` section with
the TensorRT version and GPU they serve; loading refuses others, as the animation's backend does).
It reads only that section and the plan files (no PyTorch model code) and reuses the animation
backend's plan handling (:class:`~magicanimate_rt.runtime.backends.tensorrt_backend.PlanStage`:
the context, binding by address, shapes set only when they change).

How a call runs: the input is cast to the plan's dtype (float16 plans from fp16 graphs), bound,
and its shape set (``set_input_shape``); the output shapes are then the engine's own
(``get_tensor_shape``, TensorRT's shape inference: the backbone's level sizes and anchor counts
follow from the padded image size, which the spec names but does not profile). Outputs are new
torch tensors on the device (the glue between the graphs keeps the backbone's maps across the
head calls). The three contexts share one activation buffer (they never run at once). Work is
enqueued on the backend's own CUDA stream, ordered after the caller's; the glue reads
data-dependent counts on the host between the calls anyway.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..engines.densepose import DENSEPOSE_STAGES, DensePoseManifest, read_densepose
from ..engines.tensorrt_plan import PLAN_TOOL, PlanTarget, check_plans, import_tensorrt, make_logger
from ..errors import EngineError
from ..runtime.backends.tensorrt_backend import HostStream, PlanStage, plan_device, run_ordered
from ..runtime.dtypes import torch_dtype
from .stages import BackboneOutputs, DensePoseStages


def plan_hint(directory) -> str:
    return f"build them on this machine: {PLAN_TOOL} {directory}"


class TensorRTDensePoseStages(DensePoseStages):
    name = "tensorrt"

    def __init__(self, manifest: DensePoseManifest, device="cuda", *, trt=None,
                 target: Optional[PlanTarget] = None):
        fake = trt is not None
        self.device = plan_device(device, fake)
        trt = trt if fake else import_tensorrt()
        target = target or PlanTarget.current(trt, self.device.index or 0)
        if manifest.tensorrt is None:
            raise EngineError(f"{manifest.directory}: no TensorRT plans of the DensePose stages; "
                              f"{plan_hint(manifest.directory)}")
        check_plans(manifest, target, stages=DENSEPOSE_STAGES, hint=plan_hint(manifest.directory))
        self.manifest = manifest
        self.dtype = torch_dtype(manifest.spec(DENSEPOSE_STAGES[0]).inputs[0].dtype)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else HostStream()
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        loading = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with loading:
            plans = {s: manifest.directory / manifest.stages[s].plans["file"]["name"] for s in DENSEPOSE_STAGES}
            self._stages = {s: PlanStage(trt, self._runtime, p, manifest.spec(s)) for s, p in plans.items()}
        size = max(s.memory_size for s in self._stages.values())
        self._activations = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        for s in self._stages.values():
            s.context.set_device_memory(self._activations.data_ptr(), size)

    @classmethod
    def from_engines(cls, engine_dir, device="cuda", *, trt=None,
                     target: Optional[PlanTarget] = None) -> "TensorRTDensePoseStages":
        """``trt`` and ``target`` are for tests (a fake tensorrt module and the GPU it pretends to be)."""
        return cls(read_densepose(engine_dir), device, trt=trt, target=target)

    def run(self, stage: str, x: Tensor) -> list[Tensor]:
        """One plan on one input: the outputs in spec order, float32, on the device."""
        s = self._stages[stage]
        spec = s.spec
        (t,) = spec.inputs
        x = x.to(self.device, torch_dtype(t.dtype)).contiguous()
        for a, d in zip(t.shape, x.shape):
            if isinstance(a, str) and not spec.axes[a].min <= d <= spec.axes[a].max:
                r = spec.axes[a]
                raise EngineError(f"{stage}: {a}={d} is outside the plan's profile {r.min}..{r.max} "
                                  f"(input {t.name} {tuple(x.shape)})")
        s.bind(t.name, x)
        outputs = {}
        for o in spec.outputs:
            shape = tuple(int(d) for d in s.context.get_tensor_shape(o.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{stage}: TensorRT left output {o.name} of shape {shape} unresolved after "
                                  f"input {t.name} was set to {tuple(x.shape)}")
            outputs[o.name] = torch.empty(shape, dtype=torch_dtype(o.dtype), device=self.device)
            s.bind(o.name, outputs[o.name])

        def enqueue():
            if not s.context.execute_async_v3(self.stream.cuda_stream):
                detail = "; ".join(self._logger.errors[-3:]) or "no error message"
                raise EngineError(f"{stage}: TensorRT failed to enqueue the plan: {detail}")

        run_ordered(self.device, self.stream, enqueue)
        return [outputs[o.name].float() for o in spec.outputs]

    def backbone(self, x: Tensor) -> BackboneOutputs:
        return BackboneOutputs.from_flat(self.run("densepose_backbone", x))

    def box_head(self, pooled: Tensor):
        return tuple(self.run("densepose_box_head", pooled))

    def densepose_head(self, pooled: Tensor):
        return tuple(self.run("densepose_head", pooled))
