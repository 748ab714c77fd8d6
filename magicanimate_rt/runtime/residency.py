"""What stays on the device, and how lean the loop runs, to fit a request in a memory budget
that counts the weights too (``--memory-gb``, ``PipelineOptions.memory_gb``).

A request has three phases, each needing some stages' weights and some working memory:

| phase     | stages                         | working memory                                           |
|-----------|--------------------------------|----------------------------------------------------------|
| reference | VAE (encode), appearance enc.  | one appearance-encoder call; the banks computed so far   |
| loop      | UNet, ControlNet               | banks, step state, driving frames, the loop's calls      |
| decode    | VAE                            | the latents, one decode call, the uint8 frames           |

The text encoder never reaches the device: its one output, the embedding of "", is a
constant of the model set computed at load (``models/loading.py`` frees it at once).

:func:`plan_residency` tries, in order of cost, until the predicted peak fits:

1. everything resident, the reference bank computed per step (the default; what the
   original does);
2. the bank of every timestep computed at the start of the request (exact: each depends on
   the reference latent and t only; ~14 MB per step at 512 px in fp16), so the appearance
   encoder leaves the device before the loop (1.7 GB of SD 1.5's 5.4 GB in fp16);
3. every idle stage off the device (pinned host memory, copies queued asynchronously): the
   VAE during the loop, the UNet and ControlNet during the decode;

and within each, the loop's own batching (``sampling.plan_loop``: windows per call,
residuals of all frames or per window, the decode chunk), then the UNet's lean settings
where the backend offers them (``Stages.set_unet_memory``: the CFG halves one after the
other, then chunked feed-forwards). Every plan computes the same function.

Estimates come from the backend's :class:`~.stages.MemoryModel` and ``weight_bytes``; a
CUDA out-of-memory error in a step still steps the loop down once
(:meth:`~.sampling.LoopPlan.stepped_down`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

from ..errors import InputError
from ..stage_names import PHASE_WEIGHTS, WEIGHTS
from .sampling import LoopPlan, lean_unet_rungs, loop_working_bytes, plan_loop
from .stages import MemoryModel

#: the stages whose weights live on the device, and the phases that need each (the
#: weights of ``stage_names.py``)
PHASE_STAGES = PHASE_WEIGHTS
ALL_STAGES = WEIGHTS
GIB = 2**30
#: the share of ``--memory-gb`` the plan's predicted tensors may take: the rest is for
#: what the prediction does not see (the caching allocator's rounding and fragmentation,
#: cuBLAS/cuDNN workspaces), so that the measured peak stays under the figure given
HEADROOM = 0.9
#: frames per ControlNet call when the plan must be lean (16 by default: at SD 1.5 and
#: 512 px a 16-frame call's working memory is about that of a guided UNet window)
LEAN_CONTROLNET_CHUNK = 4


@dataclass(frozen=True)
class RequestShape:
    """What the planner needs to know of one request.

    Fields:
        num_frames: padded frames N (a multiple of the window).
        num_windows: windows of the request.
        steps: denoising steps (the banks of all of them are kept with ``banks_up_front``).
        width, height: output size in pixels.
        state_bytes: the loop's step state on the device (latents, running sums, the
            driving frames, the noise): see :func:`state_bytes`.
        frames_bytes: the decoded uint8 frames held on the device until the end (0 when
            they go to a frame sink chunk by chunk).
        cache_bytes: what the pipeline's reference cache holds on the device during the
            request (its entries so far plus this request's banks, up to its bound).
    """

    num_frames: int
    num_windows: int
    steps: int
    width: int
    height: int
    state_bytes: int = 0
    frames_bytes: int = 0
    cache_bytes: int = 0


def state_bytes(num_frames: int, width: int, height: int, stage_item: int, control_item: int = 1,
                guided: bool = True) -> int:
    """The denoising loop's step state: float32 latents, the two running sums (one
    without guidance), the guided eps and the next latents (5 tensors of N x 4 x h x w),
    their cast to the stages' dtype, and the driving frames (uint8, or the stages' dtype
    when converted up front)."""
    lat = num_frames * 4 * (height // 8) * (width // 8)
    return lat * 4 * (5 if guided else 4) + lat * stage_item + num_frames * 3 * height * width * control_item


@dataclass(frozen=True)
class ResidencyPlan:
    """Where the weights live in each phase of a request, and the loop's batching.

    Fields:
        loop: the loop's batching and lean UNet settings.
        banks_up_front: the bank of every timestep is computed before the loop.
        offload: stages whose weights leave the device while their phase is not running
            (the appearance encoder after the banks; with more, every idle stage).
        budget_bytes: the memory the request may use, weights included (None: no budget).
        weights_bytes: the device bytes of each stage's weights.
        phase_bytes: predicted peak of each phase (weights resident then + working memory).
    """

    loop: LoopPlan
    banks_up_front: bool = False
    offload: tuple[str, ...] = ()
    budget_bytes: Optional[float] = None
    weights_bytes: Mapping[str, int] = field(default_factory=dict)
    phase_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def predicted_peak(self) -> int:
        return max(self.phase_bytes.values(), default=0)

    def resident(self, phase: str) -> tuple[str, ...]:
        """The stages on the device while ``phase`` runs: the phase's own, and every stage
        not offloaded (an offloaded stage comes back for its phase)."""
        own = PHASE_STAGES[phase]
        if phase != "reference" and self.banks_up_front:
            gone = set(self.offload)
        else:
            gone = set(self.offload) - {"appearance_encoder"}  # the bank is computed per step
        return tuple(s for s in ALL_STAGES if s in own or s not in gone)

    def describe(self) -> str:
        """One line for the log."""
        where = "everything on the device"
        if self.offload:
            where = "off the device when idle: " + ", ".join(self.offload)
        head = f"plan: {self.loop.describe()}; banks {'up front' if self.banks_up_front else 'per step'}; {where}"
        if self.budget_bytes is not None:
            head += f"; predicted peak {self.predicted_peak / GIB:.2f} of {self.budget_bytes / GIB:.2f} GiB"
        return head


def _bank_bytes(plan: ResidencyPlan, memory: MemoryModel, shape: RequestShape) -> int:
    """The banks on the device while the request runs: every timestep's (up front) or the
    current one's, or what the reference cache holds, whichever is more (the cache keeps
    this request's banks too, up to its bound)."""
    own = memory.bank_per_step * (shape.steps if plan.banks_up_front else 1)
    return max(own, shape.cache_bytes)


def _loop_fixed_bytes(plan: ResidencyPlan, memory: MemoryModel, shape: RequestShape) -> int:
    """The loop phase's bytes that its batching does not change: the weights resident
    then, the banks kept, the step state and deep-feature reuse's kept features."""
    weights = sum(plan.weights_bytes.get(s, 0) for s in plan.resident("loop"))
    return weights + _bank_bytes(plan, memory, shape) + shape.state_bytes + plan.loop.deep_cache_bytes


def phase_bytes(plan: ResidencyPlan, memory: MemoryModel, shape: RequestShape, window: int = 16) -> dict[str, int]:
    """Predicted peak bytes of each phase of ``plan`` (see the module's table)."""
    m, loop = memory, plan.loop

    def weights(phase: str) -> int:
        return sum(plan.weights_bytes.get(s, 0) for s in plan.resident(phase))

    latents_f32 = shape.num_frames * 4 * (shape.height // 8) * (shape.width // 8) * 4
    return {
        "reference": weights("reference") + _bank_bytes(plan, m, shape) + m.appearance_call,
        "loop": _loop_fixed_bytes(plan, m, shape) + loop_working_bytes(loop, m, shape.num_frames, window),
        "decode": weights("decode") + shape.cache_bytes + latents_f32 + loop.decode_chunk * m.decode_per_frame
        + shape.frames_bytes,
    }


def plan_residency(
    budget_bytes: Optional[float],
    memory: Optional[MemoryModel],
    weights: Mapping[str, int],
    shape: RequestShape,
    can_offload: bool = False,
    lean_unet: bool = False,
    window: int = 16,
    **loop_settings,
) -> ResidencyPlan:
    """The cheapest plan whose predicted peak fits ``budget_bytes`` (weights included); see
    the module doc for the order tried. ``loop_settings`` go to ``sampling.plan_loop``
    (explicit batching settings, the backend's maxima). ``can_offload``: the backend can
    move stages off the device (``Capabilities.residency``); ``lean_unet``: it offers
    ``set_unet_memory``. Without a budget or a memory model: everything resident, the
    loop planned without a budget.

    InputError when even the leanest plan does not fit, with the least it needs."""
    deep = loop_settings.pop("deep_cache_bytes", 0)
    if budget_bytes is None or memory is None:
        loop = plan_loop(shape.num_frames, shape.num_windows, None, memory, window=window, **loop_settings)
        return ResidencyPlan(replace(loop, deep_cache_bytes=deep), budget_bytes=budget_bytes,
                             weights_bytes=dict(weights))
    # the rungs, cheapest first: (banks up front, offloaded stages, CFG halves one after the
    # other, feed-forward chunk, ControlNet chunk). The appearance encoder leaving after the
    # banks costs nothing; smaller ControlNet calls a little (each frame is its own: only the
    # batching changes); every idle stage off the device one round of copies per phase; the
    # UNet's lean settings (where the backend offers them) more kernels per step.
    chunk = loop_settings.pop("controlnet_chunk", 16)
    small = min(chunk, LEAN_CONTROLNET_CHUNK)
    some = (True, ("appearance_encoder",)) if can_offload else (False, ())
    every = (True, ALL_STAGES) if can_offload else (False, ())
    rungs = [(False, (), False, None, chunk), (*some, False, None, chunk), (*some, False, None, small)]
    rungs += [(*every, *unet, small) for unet in lean_unet_rungs(lean_unet)]
    best = None
    for banks_up_front, offload, cfg_sequential, ff_chunk, cn_chunk in dict.fromkeys(rungs):
        plan = ResidencyPlan(LoopPlan(deep_cache_bytes=deep), banks_up_front, offload, budget_bytes,
                             dict(weights))
        fixed = _loop_fixed_bytes(plan, memory, shape)
        lean_memory = replace(memory, unet_per_window=memory.unet_window(cfg_sequential, ff_chunk is not None))
        loop = plan_loop(shape.num_frames, shape.num_windows, max(budget_bytes - fixed, 0.0), lean_memory,
                         window=window, controlnet_chunk=cn_chunk, **loop_settings)
        loop = replace(loop, cfg_sequential=cfg_sequential, ff_chunk=ff_chunk, deep_cache_bytes=deep)
        plan = replace(plan, loop=loop)
        plan = replace(plan, phase_bytes=phase_bytes(plan, memory, shape, window))
        if plan.predicted_peak <= budget_bytes:
            return plan
        if best is None or plan.predicted_peak < best.predicted_peak:
            best = plan
    phase = max(best.phase_bytes, key=best.phase_bytes.get)
    held = sum(weights.get(s, 0) for s in best.resident(phase))
    raise InputError(
        f"the request does not fit in {budget_bytes / GIB:.2f} GiB of device memory: its leanest plan needs about "
        f"{best.predicted_peak / GIB:.2f} GiB (its {phase} phase, {held / GIB:.2f} GiB of it weights); raise "
        "--memory-gb, or lower the size or the frames")
