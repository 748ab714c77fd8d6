"""One request, one plan: where the weights live, how the work is batched and how lean the
UNet runs, to fit a request in one memory budget that counts the weights too
(``--memory-gb``, ``PipelineOptions.memory_gb``).

A request has three phases, each needing some stages' weights and some working memory:

| phase     | stages                         | working memory                                           |
|-----------|--------------------------------|----------------------------------------------------------|
| reference | VAE (encode), appearance enc.  | one appearance-encoder call; the banks computed so far   |
| loop      | UNet, ControlNet               | banks, step state, driving frames, the loop's calls      |
| decode    | VAE                            | the latents, one decode call, the uint8 frames           |

The text encoder never reaches the device: its one output, the embedding of "", is a
constant of the model set computed at load (``models/loading.py`` frees it at once).

:func:`plan_request` climbs a ladder of rungs, cheapest first, until the predicted peak
fits:

1. everything resident, the reference bank computed per step (the default; what the
   original does);
2. the bank of every timestep computed at the start of the request (exact: each depends on
   the reference latent and t only; ~14 MB per step at 512 px in fp16), so the appearance
   encoder leaves the device before the loop (1.7 GB of SD 1.5's 5.4 GB in fp16);
3. 4-frame ControlNet calls;
4. every idle stage off the device (pinned host memory, copies queued asynchronously): the
   VAE during the loop, the UNet and ControlNet during the decode;

and within each, the loop's own batching (:func:`plan_loop`: windows per call, residuals
of all frames or per window, the decode chunk), then the UNet's lean settings where the
backend offers them (``Capabilities.lean_unet``: the CFG halves one after the other, then
chunked feed-forwards). Past the ladder, a CUDA out-of-memory error in a step or a decode
call takes :func:`next_rung`: the same plan one step leaner (one window per call,
residuals per window, the leanest UNet, a quarter of the chunks). Every plan computes the
same function.

Estimates come from the backend's :class:`~.stages.MemoryModel` and ``weight_bytes``;
without a memory model the plan is the unbudgeted one (residuals "all", the most windows
allowed, the device's decode chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

from ..errors import InputError
from ..stage_names import PHASE_WEIGHTS, WEIGHTS
from .stages import FF_CHUNK_TOKENS, Capabilities, MemoryModel

#: how ``LoopPlan.controlnet_residuals`` may be set
RESIDUAL_MODES = ("all", "per_window")
#: the most windows per UNet call and frames per decode call that "auto" picks, per device
#: type (``plan_loop``'s defaults are CUDA's): larger calls do not pay on the CPU, where one
#: window already fills both cores and bigger working sets fall out of the caches
#: (docs/PERFORMANCE.md)
AUTO_LIMITS = {"cpu": (1, 4), "cuda": (4, 16)}


@dataclass(frozen=True)
class LoopPlan:
    """How one request's work is batched (every plan gives the same result).

    Fields:
        windows_per_call: windows per UNet call (the last call may hold fewer).
        controlnet_residuals: "all": residuals of every frame computed once per step and
            kept for the step (the original; memory grows with the frame count);
            "per_window": computed for each UNet call's windows just before it (bounded
            memory; frames shared by windows of different calls are computed again).
        controlnet_chunk: frames per ControlNet call.
        decode_chunk: frames per VAE decode call.
        embed_control_once: the driving frames' ControlNet conditioning embedding is
            computed once for the request and kept (with residuals "all" only: it grows
            with the frame count) instead of once per step, as the original.
        deep_cache_bytes: with deep-feature reuse (``runtime/modes.py``), the memory of the
            features kept for every window between whole steps, taken from the budget
            before the rest was planned (0 without it).
        cfg_sequential: the guided UNet call runs its two CFG halves' mid/up path one
            after the other (about half its working memory; the backend applies it from the plan).
        ff_chunk: tokens per feed-forward chunk in the UNet (None: whole).
    """

    windows_per_call: int = 1
    controlnet_residuals: str = "all"
    controlnet_chunk: int = 16
    decode_chunk: int = 1
    embed_control_once: bool = False
    deep_cache_bytes: int = 0
    cfg_sequential: bool = False
    ff_chunk: Optional[int] = None

    def __post_init__(self):
        for name in ("windows_per_call", "controlnet_chunk", "decode_chunk"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.controlnet_residuals not in RESIDUAL_MODES:
            raise InputError(f"controlnet_residuals must be one of {RESIDUAL_MODES}, got {self.controlnet_residuals!r}")
        if self.ff_chunk is not None and self.ff_chunk < 1:
            raise InputError(f"ff_chunk must be >= 1 (or None), got {self.ff_chunk!r}")

    def describe(self) -> str:
        """One line: e.g. '2 windows per UNet call, ControlNet residuals of all frames, ...'."""
        parts = [f"{self.windows_per_call} window{'s' if self.windows_per_call > 1 else ''} per UNet call",
                 "ControlNet residuals " + ("of all frames" if self.controlnet_residuals == "all" else "per window"),
                 f"{self.decode_chunk} frame{'s' if self.decode_chunk > 1 else ''} per decode call"]
        if self.cfg_sequential:
            parts.append("CFG halves one after the other")
        if self.ff_chunk is not None:
            parts.append(f"feed-forward in chunks of {self.ff_chunk} tokens")
        return ", ".join(parts)


def lean_unet_rungs(lean_unet: bool) -> list[tuple[bool, Optional[int]]]:
    """The UNet's settings (``cfg_sequential``, ``ff_chunk``), cheapest first, on a backend
    with lean UNet settings (``Capabilities.lean_unet``) or not: the rungs the ladder ends
    with, and whose last the out-of-memory step-down (:func:`next_rung`) takes."""
    return [(False, None)] + ([(True, None), (True, FF_CHUNK_TOKENS)] if lean_unet else [])


def loop_working_bytes(plan: LoopPlan, memory: MemoryModel, num_frames: int, window: int = 16,
                       embed_control: Optional[bool] = None) -> int:
    """Predicted working memory of the denoising loop under ``plan``: the residual store
    ("all": every frame's residuals, and their conditioning embeddings when kept; "per
    window": one call's frames), plus the larger of one UNet call (its windows, with the
    plan's lean settings) and one ControlNet call. Weights, the bank and the step state
    are counted by :func:`phase_bytes`."""
    m = memory
    embed = plan.embed_control_once if embed_control is None else embed_control
    cn_call = m.controlnet_per_frame * plan.controlnet_chunk
    unet = plan.windows_per_call * m.unet_window(plan.cfg_sequential, plan.ff_chunk is not None)
    if plan.controlnet_residuals == "all":
        store = (m.residuals_per_frame + (m.control_embedding_per_frame if embed else 0)) * num_frames
    else:
        store = m.residuals_per_frame * min(plan.windows_per_call * window, num_frames)
    return store + max(unet, cn_call)


def plan_loop(
    num_frames: int,
    num_windows: int,
    budget_bytes: Optional[float],
    memory: Optional[MemoryModel],
    windows_per_call: Optional[int] = None,
    controlnet_residuals: str = "auto",
    controlnet_chunk: int = 16,
    decode_chunk: Optional[int] = None,
    max_windows_per_call: Optional[int] = None,
    window: int = 16,
    max_auto_windows: int = AUTO_LIMITS["cuda"][0],
    max_auto_decode: int = AUTO_LIMITS["cuda"][1],
    embed_control: bool = False,
    max_controlnet_chunk: Optional[int] = None,
    max_decode_chunk: Optional[int] = None,
) -> LoopPlan:
    """Choose the batching of one request within a working-memory budget.

    Explicit settings are kept; ``None`` / "auto" ones are chosen in this order:

    1. ControlNet residuals: "all" if keeping every frame's residuals plus one one-window
       UNet call fits the budget, else "per_window".
    2. Windows per UNet call: the most (at most ``max_auto_windows``, the backend's
       ``max_windows_per_call`` and the number of windows) whose UNet working memory, plus
       the residual store of step 1 (or the call's own residuals), fits.
    3. Decode chunk: the most frames (at most ``max_auto_decode``) whose decode working
       memory fits both the budget and the loop's own working memory (the loop's memory is
       free by then). So the decode never sets the request's peak: on an H200 at 512 px,
       16 frames per decode call took 8.2 GB for 0.21 s against 2.0 GB and 0.24 s for 4,
       when the loop needed about 2.4 GB (docs/PERFORMANCE.md, "GPU").

    ``embed_control`` (asked for and offered by the backend) keeps every frame's
    ControlNet conditioning embedding with the residuals "all" store (counted in it); with
    "per_window" residuals the embedding is computed per call, as the original.

    Without a budget (``budget_bytes`` None) or without a memory model, "auto" means
    residuals "all", the most windows allowed and decode chunks of ``max_auto_decode``.
    Whatever the budget, at least one window per call and one frame per decode call.

    The backend's declared maxima (:class:`~.stages.Capabilities`: ``max_windows_per_call``,
    ``max_controlnet_chunk``, ``max_decode_chunk``; None: no limit) bound every choice,
    explicit ones included, so no backend has to split a call the plan made.
    """
    cap = num_windows if max_windows_per_call is None else max(1, min(num_windows, max_windows_per_call))
    if windows_per_call is not None:
        windows_per_call = max(1, min(windows_per_call, cap))
    if max_controlnet_chunk is not None:
        controlnet_chunk = max(1, min(controlnet_chunk, max_controlnet_chunk))
    if max_decode_chunk is not None:
        max_auto_decode = max(1, min(max_auto_decode, max_decode_chunk))
        if decode_chunk is not None:
            decode_chunk = max(1, min(decode_chunk, max_decode_chunk))
    if controlnet_residuals not in ("auto",) + RESIDUAL_MODES:
        raise InputError(f"controlnet_residuals must be 'auto', 'all' or 'per_window', got {controlnet_residuals!r}")
    if budget_bytes is None or memory is None:
        residuals = "all" if controlnet_residuals == "auto" else controlnet_residuals
        return LoopPlan(
            windows_per_call=windows_per_call or min(cap, max_auto_windows),
            controlnet_residuals=residuals,
            controlnet_chunk=controlnet_chunk,
            decode_chunk=decode_chunk or max_auto_decode,
            embed_control_once=embed_control and residuals == "all",
        )
    return _plan_within(budget_bytes, memory, num_frames, min(cap, max_auto_windows), max_auto_decode, window,
                        windows_per_call, controlnet_residuals, controlnet_chunk, decode_chunk, embed_control)


def _plan_within(budget_bytes: float, m: MemoryModel, num_frames: int, max_windows: int, max_decode: int,
                 window: int, windows_per_call: Optional[int], controlnet_residuals: str, controlnet_chunk: int,
                 decode_chunk: Optional[int], embed_control: bool) -> LoopPlan:
    """:func:`plan_loop`'s choices within a budget (its steps 1 to 3), the explicit settings
    and the maxima already bounded by the backend's."""
    store_all = (m.residuals_per_frame + (m.control_embedding_per_frame if embed_control else 0)) * num_frames
    cn_call = m.controlnet_per_frame * controlnet_chunk
    if controlnet_residuals == "auto":
        fits = store_all + max(m.unet_per_window, cn_call) <= budget_bytes
        controlnet_residuals = "all" if fits else "per_window"

    def loop_bytes(b: int) -> float:
        return loop_working_bytes(LoopPlan(b, controlnet_residuals, controlnet_chunk), m, num_frames, window,
                                  embed_control)

    if windows_per_call is None:
        windows_per_call = 1
        for b in range(2, max_windows + 1):
            if loop_bytes(b) <= budget_bytes:
                windows_per_call = b
    if decode_chunk is None:
        allowed = min(budget_bytes, loop_bytes(windows_per_call))
        decode_chunk = max(1, min(max_decode, int(allowed // max(m.decode_per_frame, 1))))
    return LoopPlan(windows_per_call, controlnet_residuals, controlnet_chunk, decode_chunk,
                    embed_control_once=embed_control and controlnet_residuals == "all")


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
class RequestPlan:
    """One request's plan, whole: where the weights live in each phase, the loop's batching
    and the UNet's lean settings (``loop``), and what it was planned for. The backend gets it
    whole (``Stages.begin_request``); ``AnimationResult.plan`` is the one that ran.

    Fields:
        loop: the loop's batching (windows per call, ControlNet residual policy and chunk,
            decode chunk, embed-once, deep-cache bytes) and lean UNet settings.
        banks_up_front: the bank of every timestep is computed before the loop.
        offload: stages whose weights leave the device while their phase is not running
            (the appearance encoder after the banks; with more, every idle stage).
        budget_bytes: the memory the request may use, weights included (None: no budget).
        weights_bytes: the device bytes of each stage's weights.
        phase_bytes: predicted peak of each phase (weights resident then + working memory).
        rung: the ladder's rung the plan is on (0: everything resident, the cheapest; see
            the module doc).
        steps_down: out-of-memory steps taken from the planned rung (:func:`next_rung`).
    """

    loop: LoopPlan = LoopPlan()
    banks_up_front: bool = False
    offload: tuple[str, ...] = ()
    budget_bytes: Optional[float] = None
    weights_bytes: Mapping[str, int] = field(default_factory=dict)
    phase_bytes: Mapping[str, int] = field(default_factory=dict)
    rung: int = 0
    steps_down: int = 0

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
        head += f"; rung {self.rung}"
        return head + (f", {self.steps_down} step(s) down after running out of memory" if self.steps_down else "")


def _bank_bytes(plan: RequestPlan, memory: MemoryModel, shape: RequestShape) -> int:
    """The banks on the device while the request runs: every timestep's (up front) or the
    current one's, or what the reference cache holds, whichever is more (the cache keeps
    this request's banks too, up to its bound)."""
    own = memory.bank_per_step * (shape.steps if plan.banks_up_front else 1)
    return max(own, shape.cache_bytes)


def _loop_fixed_bytes(plan: RequestPlan, memory: MemoryModel, shape: RequestShape) -> int:
    """The loop phase's bytes that its batching does not change: the weights resident
    then, the banks kept, the step state and deep-feature reuse's kept features."""
    weights = sum(plan.weights_bytes.get(s, 0) for s in plan.resident("loop"))
    return weights + _bank_bytes(plan, memory, shape) + shape.state_bytes + plan.loop.deep_cache_bytes


def phase_bytes(plan: RequestPlan, memory: MemoryModel, shape: RequestShape, window: int = 16) -> dict[str, int]:
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


def plan_request(
    budget_bytes: Optional[float],
    memory: Optional[MemoryModel],
    weights: Mapping[str, int],
    shape: RequestShape,
    capabilities: Capabilities = Capabilities(),
    window: int = 16,
    deep_cache_bytes: int = 0,
    cfg_sequential: bool = False,
    ff_chunk: Optional[int] = None,
    **loop_settings,
) -> RequestPlan:
    """The cheapest plan whose predicted peak fits ``budget_bytes`` (weights included); see
    the module doc for the rungs tried. ``capabilities``: what the backend declares (its
    largest calls bound the batching; ``residency``: stages can leave the device;
    ``lean_unet``: the UNet's lean settings; ``controlnet_in_two_parts``: the driving frames
    can be embedded once). ``loop_settings`` go to :func:`plan_loop` (explicit batching
    settings, "auto" limits, ``embed_control`` asked for). ``cfg_sequential``/``ff_chunk``:
    lean UNet settings asked for whatever the budget (every rung is at least that lean).
    Without a budget or a memory model: everything resident, the loop planned without a
    budget.

    InputError when even the leanest plan does not fit, with the least it needs."""
    caps = capabilities
    if (cfg_sequential or ff_chunk is not None) and not caps.lean_unet:
        raise InputError("cfg_sequential and ff_chunk need a backend with lean UNet settings (the torch backend)")
    loop_settings.update(max_windows_per_call=caps.max_windows_per_call,
                         max_controlnet_chunk=caps.max_controlnet_frames, max_decode_chunk=caps.max_decode_frames,
                         embed_control=loop_settings.get("embed_control", False) and caps.controlnet_in_two_parts)
    forced = dict(deep_cache_bytes=deep_cache_bytes, cfg_sequential=cfg_sequential, ff_chunk=ff_chunk)
    if budget_bytes is None or memory is None:
        loop = plan_loop(shape.num_frames, shape.num_windows, None, memory, window=window, **loop_settings)
        return RequestPlan(replace(loop, **forced), budget_bytes=budget_bytes, weights_bytes=dict(weights))
    best = None
    for rung, (banks, offload, cfg, ff, cn_chunk) in enumerate(_rungs(caps, loop_settings.pop("controlnet_chunk", 16))):
        plan = RequestPlan(LoopPlan(deep_cache_bytes=deep_cache_bytes), banks, offload, budget_bytes, dict(weights),
                           rung=rung)
        cfg, ff = cfg or cfg_sequential, _leaner_ff(ff, ff_chunk)
        lean_memory = replace(memory, unet_per_window=memory.unet_window(cfg, ff is not None))
        loop = plan_loop(shape.num_frames, shape.num_windows,
                         max(budget_bytes - _loop_fixed_bytes(plan, memory, shape), 0.0), lean_memory,
                         window=window, controlnet_chunk=cn_chunk, **loop_settings)
        plan = replace(plan, loop=replace(loop, cfg_sequential=cfg, ff_chunk=ff, deep_cache_bytes=deep_cache_bytes))
        plan = replace(plan, phase_bytes=phase_bytes(plan, memory, shape, window))
        if plan.predicted_peak <= budget_bytes:
            return plan
        if best is None or plan.predicted_peak < best.predicted_peak:
            best = plan
    _does_not_fit(best, budget_bytes)


def _leaner_ff(a: Optional[int], b: Optional[int]) -> Optional[int]:
    """The smaller of two feed-forward chunks (None: whole)."""
    return b if a is None else a if b is None else min(a, b)


def _rungs(caps: Capabilities, chunk: int) -> list[tuple[bool, tuple[str, ...], bool, Optional[int], int]]:
    """The ladder, cheapest first, without repeats: (banks up front, offloaded stages, CFG
    halves one after the other, feed-forward chunk, ControlNet chunk). The appearance
    encoder leaving after the banks costs nothing; smaller ControlNet calls a little (each
    frame is its own: only the batching changes); every idle stage off the device one round
    of copies per phase; the UNet's lean settings (where the backend offers them) more
    kernels per step."""
    small = min(chunk, LEAN_CONTROLNET_CHUNK)
    some = (True, ("appearance_encoder",)) if caps.residency else (False, ())
    every = (True, ALL_STAGES) if caps.residency else (False, ())
    rungs = [(False, (), False, None, chunk), (*some, False, None, chunk), (*some, False, None, small)]
    rungs += [(*every, *unet, small) for unet in lean_unet_rungs(caps.lean_unet)]
    return list(dict.fromkeys(rungs))


def _does_not_fit(best: RequestPlan, budget_bytes: float) -> None:
    """InputError naming what the leanest plan ``best`` needs, and in which phase."""
    phase = max(best.phase_bytes, key=best.phase_bytes.get)
    held = sum(best.weights_bytes.get(s, 0) for s in best.resident(phase))
    raise InputError(
        f"the request does not fit in {budget_bytes / GIB:.2f} GiB of device memory: its leanest plan needs about "
        f"{best.predicted_peak / GIB:.2f} GiB (its {phase} phase, {held / GIB:.2f} GiB of it weights); raise "
        "--memory-gb, or lower the size or the frames")


def next_rung(plan: RequestPlan, capabilities: Capabilities) -> Optional[RequestPlan]:
    """The plan one step leaner, after a CUDA out-of-memory error (in a step of the loop, or
    a decode call): one window per UNet call, ControlNet residuals per window, the leanest
    UNet settings the backend offers, and a quarter of the ControlNet and decode chunks;
    None when ``plan`` is that already. The same function, less memory."""
    loop = plan.loop
    cfg, ff = lean_unet_rungs(capabilities.lean_unet)[-1]  # the leanest
    down = replace(loop, windows_per_call=1, controlnet_residuals="per_window",
                   decode_chunk=max(1, loop.decode_chunk // 4), controlnet_chunk=max(1, loop.controlnet_chunk // 4),
                   cfg_sequential=loop.cfg_sequential or cfg, ff_chunk=_leaner_ff(loop.ff_chunk, ff))
    return None if down == loop else replace(plan, loop=down, steps_down=plan.steps_down + 1)
