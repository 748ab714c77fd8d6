"""The sampling loop (REFERENCE section 4): DDIM over overlapping windows with CFG.

It knows only the stage interface (:class:`~.stages.Stages`); tensors stay on the
backend's device for the whole loop, and nothing here reads them back to the host.

How the work is batched never changes the result (``planner.LoopPlan``): several windows
may go through one UNet call, and the ControlNet residuals may be computed once per step
for all frames (the original; memory grows with the frame count) or per group of windows
(bounded memory, overlapping frames computed twice). The request's plan
(``runtime/planner.py``) picks these, and its next rung is the loop's out-of-memory
step-down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import InputError
from .ddim import DDIMSampler
from .modes import StepPolicy
from .planner import LoopPlan, RequestPlan, next_rung
from .stages import Stages
from .timing import StageTimer
from .windows import context_windows

if TYPE_CHECKING:
    from .distributed import Ranks

def initial_noise(seed: int, num_frames: int, latent_size: Union[int, tuple[int, int]], window: int = 16) -> Tensor:
    """z ~ N(0, 1) of shape (1, 4, window, h, w) from a CPU float32 generator seeded with
    ``seed``, tiled along frames to ``num_frames`` (a multiple of ``window``): every
    window-long segment starts from the same noise, as in the original. On the CPU so that
    a seed gives the same video on every backend. ``latent_size``: (h, w), or h = w."""
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randn((1, 4, window, h, w), generator=g, dtype=torch.float32)
    return z.repeat(1, 1, num_frames // window, 1, 1)


def control_slice(control: Tensor, frames, dtype: torch.dtype) -> Tensor:
    """ControlNet conditioning of some frames, in [0, 1] and ``dtype``.

    ``control`` is (N, 3, H, W): either already in [0, 1], or the uint8 driving frames
    (4x less memory), converted here per call with the same arithmetic as up front
    (``x.to(dtype) / 255``), so the values are identical. ``frames`` is a slice or an index
    tensor."""
    part = control[frames] if isinstance(frames, slice) else control.index_select(0, frames)
    return part.to(dtype) / 255.0 if control.dtype == torch.uint8 else part


def _in_chunks(call: Callable[[int, int], Sequence[Tensor]], n: int, chunk: int,
               needed: Optional[Tensor] = None) -> list[Tensor]:
    """Run ``call(i, j)`` on frames [i, j) for every chunk and gather the outputs into
    tensors of all ``n`` frames, written in place as the chunks come (no concatenation,
    so the gathered residuals are never held twice). ``needed`` (a boolean (n,) mask):
    only the chunks holding a needed frame run, at the same offsets as without it (so a
    frame's values do not depend on the mask); the other rows are left unwritten."""
    starts = list(range(0, n, chunk))
    if needed is not None:
        starts = [i for i in starts if bool(needed[i : i + chunk].any())]
    if not starts:
        return []
    first = call(starts[0], min(starts[0] + chunk, n))
    if n <= chunk:
        return list(first)
    out = [r.new_empty((n, *r.shape[1:])) for r in first]
    for o, r in zip(out, first):
        o[starts[0] : starts[0] + r.shape[0]].copy_(r)
    del first
    for i in starts[1:]:
        for o, r in zip(out, call(i, min(i + chunk, n))):
            o[i : i + r.shape[0]].copy_(r)
    return out


def _controlnet_call(stages: Stages, embedded: bool, skips: Optional[int] = None):
    """The ControlNet call on (latents, t, control part): from the driving frames, or from
    their conditioning embedding when ``embedded`` (see :func:`embed_control`); with
    ``skips``, only the first ``skips`` down residuals (deep-feature reuse's shallow steps)."""
    if skips is not None:
        return lambda lat, t, ctl: stages.controlnet_shallow(lat, t, ctl, skips, embedded)
    return stages.controlnet_embedded if embedded else stages.controlnet


def controlnet_all_frames(stages: Stages, latents: Tensor, t: Tensor, control: Tensor, chunk: int,
                          embedded: bool = False, needed: Optional[Tensor] = None,
                          skips: Optional[int] = None) -> list[Tensor]:
    """ControlNet residuals of every frame, computed in chunks of ``chunk`` frames (the
    batching changes nothing else). latents (1, 4, N, h, w), control (N, 3, H, W) (or its
    embedding (N, C_0, h, w) when ``embedded``) -> 13 tensors (N, C_i, h_i, w_i).
    ``needed``: only the chunks with a needed frame (see :func:`_in_chunks`); ``skips``:
    only the first down residuals."""
    frames = latents[0].transpose(0, 1)  # (N, 4, h, w)
    call = _controlnet_call(stages, embedded, skips)
    return _in_chunks(lambda i, j: call(frames[i:j], t, control_slice(control, slice(i, j), latents.dtype)),
                      frames.shape[0], chunk, needed)


def controlnet_frames(stages: Stages, latents: Tensor, t: Tensor, control: Tensor, frames: Tensor,
                      chunk: int, embedded: bool = False, skips: Optional[int] = None) -> list[Tensor]:
    """ControlNet residuals of the frames ``frames`` (1-D index tensor, no repeats), in
    chunks of ``chunk`` -> 13 tensors (len(frames), C_i, h_i, w_i). Per frame, so the same
    values as :func:`controlnet_all_frames` gives for those frames (``skips`` as there)."""
    x = latents[0].transpose(0, 1).index_select(0, frames)  # (n, 4, h, w)
    call = _controlnet_call(stages, embedded, skips)
    return _in_chunks(lambda i, j: call(x[i:j], t, control_slice(control, frames[i:j], latents.dtype)),
                      x.shape[0], chunk)


def embed_control(stages: Stages, control: Tensor, chunk: int, dtype: torch.dtype,
                  needed: Optional[Tensor] = None) -> Tensor:
    """The ControlNet conditioning embedding of every driving frame, (N, C_0, h, w), in
    chunks of ``chunk`` frames. It depends on the frames only, so one request computes it
    once instead of once per step (the original). ``needed`` as in :func:`_in_chunks`."""
    n = control.shape[0]
    return _in_chunks(lambda i, j: (stages.controlnet_embed(control_slice(control, slice(i, j), dtype)),), n, chunk,
                      needed)[0]


# --------------------------------------------------------------------------- the loop
def empty_device_cache(device: torch.device) -> None:
    """Return the caching allocator's free blocks to the device (CUDA), so that a retry
    after an out-of-memory error starts from unfragmented memory."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


BankFn = Callable[[int, Tensor], Sequence[Tensor]]


def check_deep_cache(stages: Stages, cache_interval: int, cache_depth: int,
                     ranks: Optional["Ranks"] = None) -> Optional[int]:
    """InputError unless deep-feature reuse at these settings can run here (a backend that
    offers it, one process, a depth the UNet has); returns the shallow part's skip count
    (None when reuse is off)."""
    if cache_interval <= 1:
        return None
    if not stages.capabilities.deep_cache:
        raise InputError(f"deep-feature reuse (cache_interval {cache_interval}) needs the torch backend; the "
                         f"{stages.name} backend runs whole UNet calls only")
    if ranks is not None:
        raise InputError("deep-feature reuse (cache_interval > 1) runs in one process; drop it or run without torchrun")
    return stages.shallow_skips(cache_depth)


def call_windows(num_windows: int, windows_per_call: int, share: Optional[Sequence[int]] = None) -> list[list[int]]:
    """The UNet calls of every step: each call's windows (indices into the request's
    windows, consecutive and in order), ``windows_per_call`` at a time over this process's
    ``share`` of them (all when None). The same every step; a plan that steps down
    regroups them."""
    mine = list(range(num_windows) if share is None else share)
    return [mine[g : g + windows_per_call] for g in range(0, len(mine), windows_per_call)]


@dataclass(frozen=True)
class Call:
    """One UNet call of a step. Fields: windows (indices into the request's windows);
    members (their frame indices, device tensors, in order); rows (the members
    concatenated, B*F indices: a frame of two windows of one call appears twice); with
    per-window residuals, distinct (the call's frames, each once) and where (where each row
    finds its residual among them)."""

    windows: tuple[int, ...]
    members: tuple[Tensor, ...]
    rows: Tensor
    distinct: Optional[Tensor] = None
    where: Optional[Tensor] = None


class WindowSchedule:
    """The windows of one request (``runtime/windows.py``) on the loop's device: each
    window's frame indices, each frame's visit count, and the UNet calls that run them."""

    def __init__(self, num_frames: int, window: int, overlap: int, device: torch.device, dtype: torch.dtype):
        self.lists = context_windows(num_frames, window, overlap)
        self.frames = len(self.lists[0])  # F: frames per window
        self.windows = [torch.tensor(w, device=device) for w in self.lists]
        counts = torch.zeros(num_frames, device=device, dtype=dtype)
        for idx in self.windows:
            counts.index_add_(0, idx, torch.ones(len(idx), device=device, dtype=dtype))
        self.counts = counts.view(1, 1, num_frames, 1, 1)
        self.num_frames = num_frames

    def needed(self, share: Sequence[int]) -> Tensor:
        """The frames the windows ``share`` read, a boolean (N,) mask on the host (choosing
        ControlNet chunks from it never syncs the device)."""
        mask = torch.zeros(self.num_frames, dtype=torch.bool)
        for k in share:
            mask[self.lists[k]] = True
        return mask

    def calls(self, plan: LoopPlan, share: Optional[Sequence[int]] = None) -> list[Call]:
        """This process's UNet calls under ``plan`` (see :func:`call_windows`)."""
        out = []
        for ks in call_windows(len(self.windows), plan.windows_per_call, share):
            members = tuple(self.windows[k] for k in ks)
            rows = torch.cat(members)
            distinct, where = (torch.unique(rows, return_inverse=True)
                               if plan.controlnet_residuals == "per_window" else (None, None))
            out.append(Call(tuple(ks), members, rows, distinct, where))
        return out


class OneProcess:
    """Execution in one process: every window here, each call's predictions added into the
    running sums window by window as the call returns them."""

    ranks = None
    share = None
    needed = None

    def add(self, call: Call, eps_u: Optional[Tensor], eps_c: Tensor, sum_u: Optional[Tensor], sum_c: Tensor):
        for k, idx in enumerate(call.members):
            if sum_u is not None:
                sum_u.index_add_(2, idx, eps_u[k : k + 1].to(sum_u.dtype))
            sum_c.index_add_(2, idx, eps_c[k : k + 1].to(sum_c.dtype))

    def gather(self, sum_u: Optional[Tensor], sum_c: Tensor, like: Tensor, timer: StageTimer) -> None:
        """Nothing to gather: the sums are complete."""

    def settle(self, latents: Tensor, timer: StageTimer) -> Tensor:
        return latents


class SplitOverRanks:
    """Execution over several processes (:class:`~.distributed.Ranks`): this rank runs its
    contiguous share of the windows and keeps their predictions; after the calls every
    rank's are all-gathered and added on every rank in window order, one window at a time,
    as one process adds them; after the update rank 0's latents are kept on every rank."""

    def __init__(self, ranks: "Ranks", schedule: WindowSchedule):
        self.ranks, self.schedule = ranks, schedule
        self.share = ranks.share(len(schedule.windows))
        self.needed = schedule.needed(self.share)  # the ControlNet runs on these frames only
        self.local: list[Tensor] = []  # this step's predictions, (halves, 4, F, h, w) per window

    def add(self, call: Call, eps_u: Optional[Tensor], eps_c: Tensor, sum_u: Optional[Tensor], sum_c: Tensor):
        for k in range(len(call.members)):
            self.local.append(torch.cat([eps_u[k : k + 1], eps_c[k : k + 1]]) if sum_u is not None else eps_c[k : k + 1])

    def gather(self, sum_u: Optional[Tensor], sum_c: Tensor, like: Tensor, timer: StageTimer) -> None:
        halves = 2 if sum_u is not None else 1
        with timer.stage("gather"):
            c, (h, w) = like.shape[1], like.shape[3:]
            mine = torch.stack(self.local) if self.local else like.new_empty((0, halves, c, self.schedule.frames, h, w))
            everyone = self.ranks.gather_windows(mine, len(self.schedule.windows))
        for k, idx in enumerate(self.schedule.windows):  # window order, one window at a time
            if sum_u is not None:
                sum_u.index_add_(2, idx, everyone[k, 0:1].to(sum_u.dtype))
            sum_c.index_add_(2, idx, everyone[k, halves - 1 : halves].to(sum_c.dtype))
        self.local = []

    def settle(self, latents: Tensor, timer: StageTimer) -> Tensor:
        with timer.stage("gather"):
            return self.ranks.broadcast(latents)


class DenoiseLoop:
    """One request's loop state: the stages, the window schedule and its calls under the
    current plan, the execution (one process or split over ranks), the mode's per-step
    decisions (:class:`~.modes.StepPolicy`) and, with deep-feature reuse, each call's kept
    deep feature. :meth:`step` runs one step; :meth:`step_down` regroups after an
    out-of-memory error. Built once per request: nothing is planned per step."""

    def __init__(self, stages: Stages, control: Tensor, stage_dtype: torch.dtype, schedule: WindowSchedule,
                 sampler: DDIMSampler, guidance_scale: float, plan: RequestPlan, bank_fn: BankFn,
                 policy: StepPolicy, execution: Union[OneProcess, SplitOverRanks], timer: StageTimer):
        self.stages, self.stage_dtype, self.schedule = stages, stage_dtype, schedule
        self.sampler, self.guidance_scale, self.plan, self.bank_fn = sampler, guidance_scale, plan, bank_fn
        self.policy, self.execution, self.timer = policy, execution, timer
        self.guided = guidance_scale != 1.0
        self.shallow = check_deep_cache(stages, policy.cache_interval, policy.cache_depth, execution.ranks)
        self.kept: dict[int, Tensor] = {}  # deep-feature reuse: each call's deep feature
        self.calls = schedule.calls(plan.loop, execution.share)
        self.stepped = False
        needed = execution.needed
        self.embedded = plan.loop.embed_control_once and stages.capabilities.controlnet_in_two_parts
        if self.embedded and (needed is None or bool(needed.any())):  # the driving frames' embedding, once
            with timer.stage("controlnet"):
                control = embed_control(stages, control, plan.loop.controlnet_chunk, stage_dtype, needed)
        self.control = control

    def residuals(self, call: Call, latents: Tensor, t: Tensor, every: Optional[list[Tensor]],
                  skips: Optional[int]) -> list[Tensor]:
        """The ControlNet residuals of ``call``'s rows: picked from ``every`` frame's, or
        (per-window residuals) computed now for the call's distinct frames."""
        if every is not None:
            return [r.index_select(0, call.rows) for r in every]
        with self.timer.stage("controlnet"):
            own = controlnet_frames(self.stages, latents, t, self.control, call.distinct,
                                    self.plan.loop.controlnet_chunk, self.embedded, skips)
            return [r.index_select(0, call.where) for r in own]

    def unet(self, c: int, call: Call, latents: Tensor, t: Tensor, res: list[Tensor], bank: Sequence[Tensor],
             guided: bool, whole: bool) -> tuple[Optional[Tensor], Tensor]:
        """Call ``c``'s UNet predictions (eps_u or None, eps_c), each (B, 4, F, h, w)."""
        # (1, 4, B*F, h, w) -> (B, 4, F, h, w): window k of the call is batch row k
        lat = latents.index_select(2, call.rows)[0].unflatten(1, (len(call.members), self.schedule.frames))
        lat = lat.transpose(0, 1)
        if self.policy.reuses_deep_features:
            eps_u, eps_c, self.kept[c] = self.stages.unet_cached(
                lat, t, res, bank, self.policy.cache_depth, None if whole else self.kept[c], guided)
            return eps_u, eps_c
        if guided:
            return self.stages.unet_guided(lat, t, res, bank)
        return None, self.stages.unet_cond(lat, t, res, bank)

    def step(self, i: int, t: Tensor, latents: Tensor) -> Tensor:
        """Step i on ``latents`` -> the next latents (the input is left as it was, so a step
        that fails for lack of memory can run again)."""
        timer, execution = self.timer, self.execution
        guided = self.guided and self.policy.guided(i)
        whole = self.policy.whole(i)
        skips = None if whole else self.shallow  # the shallow steps need only the first residuals
        with timer.stage("appearance_encoder"):
            bank = self.bank_fn(i, t)
        stage_latents = latents.to(self.stage_dtype)  # the stages' inputs, cast once per step
        every = None
        if self.plan.loop.controlnet_residuals != "per_window" and self.calls:
            with timer.stage("controlnet"):
                every = controlnet_all_frames(self.stages, stage_latents, t, self.control,
                                              self.plan.loop.controlnet_chunk, self.embedded, execution.needed, skips)
        sum_c = torch.zeros_like(latents)
        sum_u = torch.zeros_like(latents) if guided else None
        for c, call in enumerate(self.calls):
            res = self.residuals(call, stage_latents, t, every, skips)
            with timer.stage("unet"):
                eps_u, eps_c = self.unet(c, call, stage_latents, t, res, bank, guided, whole)
                execution.add(call, eps_u, eps_c, sum_u, sum_c)
        del every
        execution.gather(sum_u, sum_c, stage_latents, timer)
        with timer.stage("scheduler"):
            eps = sum_c / self.schedule.counts
            if guided:
                eps_u = sum_u / self.schedule.counts
                eps = eps_u + self.guidance_scale * (eps - eps_u)
            latents = self.sampler.step(i, latents, eps)
        return execution.settle(latents, timer)

    def step_down(self, on_plan_change: Optional[Callable[[RequestPlan, RequestPlan], None]] = None) -> bool:
        """After an out-of-memory error: the plan's next rung (``planner.next_rung``), its
        calls and lean UNet settings; False when there is none to go to. Once per request;
        not with several ranks (the others would wait in a gather), nor with deep-feature
        reuse (its kept features belong to the old calls)."""
        if self.stepped or self.execution.ranks is not None or self.policy.reuses_deep_features:
            return False
        lean = next_rung(self.plan, self.stages.capabilities)
        if lean is None:
            return False
        self.stepped = True
        self.kept.clear()
        empty_device_cache(self.schedule.counts.device)
        if on_plan_change is not None:
            on_plan_change(self.plan, lean)
        self.plan = lean
        self.stages.follow_plan(lean)
        self.calls = self.schedule.calls(lean.loop, self.execution.share)
        return True


def denoise(
    stages: Stages,
    ref_latent: Tensor,
    control: Tensor,
    latents: Tensor,
    sampler: DDIMSampler,
    guidance_scale: float,
    overlap: int = 4,
    controlnet_chunk: int = 16,
    timer: Optional[StageTimer] = None,
    on_step: Optional[Callable[[int], None]] = None,
    plan: Optional[RequestPlan] = None,
    bank_fn: Optional[BankFn] = None,
    ranks: Optional["Ranks"] = None,
    guided_steps: Optional[int] = None,
    cache_interval: int = 1,
    cache_depth: int = 1,
    on_plan_change: Optional[Callable[[RequestPlan, RequestPlan], None]] = None,
) -> Tensor:
    """Run every DDIM step on ``latents`` (1, 4, N, h, w), N a multiple of the window, in
    the stages' dtype; returns the final latents in float32 (float64 for float64 stages).

    Per step t (:meth:`DenoiseLoop.step`): (1) the bank from the reference latent
    (``bank_fn(i, t)`` when given, e.g. a cache lookup); (2) ControlNet residuals for all
    frames; (3) for each window the UNet's two CFG halves (one guided call), added into
    per-frame running sums, then divided by each frame's visit count; (4) guidance
    eps = eps_u + g (eps_c - eps_u); (5) one DDIM update. With g == 1 only the conditional
    half is computed (the guidance formula then gives eps_c).

    ``control`` (N, 3, H, W) is in [0, 1] or uint8 (see :func:`control_slice`). ``plan``
    (``planner.RequestPlan``) batches the work (default: one window per call, residuals of
    all frames, chunks of ``controlnet_chunk``); every plan gives the same sums: each window's predictions are
    added in window order, one window at a time, whatever call computed them.

    ``ranks`` (:class:`~.distributed.Ranks`, several processes on one clip): the loop runs
    :class:`SplitOverRanks` instead of :class:`OneProcess` (same sums, same latents).

    Opt-in approximations (``runtime/modes.py``, :class:`~.modes.StepPolicy`; at their
    defaults the loop is exactly the path above): ``guided_steps``: only the first that many
    steps use guidance; ``cache_interval`` > 1: steps ``i % cache_interval != 0`` run the
    UNet's shallow part (depth ``cache_depth``) on each call's deep feature kept from the
    last whole step, and the ControlNet only up to the residuals it reads. ``sampler`` may
    be any object with DDIMSampler's ``timestep_tensors`` and ``step``.

    Out of device memory (``torch.OutOfMemoryError``) in a step, the loop steps the plan
    down to its next rung once (:meth:`DenoiseLoop.step_down`), tells ``on_plan_change(old, new)`` and runs
    the step again; a second one propagates.
    """
    timer = timer or StageTimer(latents.device)
    # The step state (latents, running sums, guidance) is at least float32 whatever the
    # stages' dtype: guidance multiplies (eps_c - eps_u) by g, which would amplify
    # half-precision rounding. Only the stage inputs are cast.
    stage_dtype = latents.dtype
    latents = latents.to(torch.promote_types(stage_dtype, torch.float32))
    schedule = WindowSchedule(latents.shape[2], stages.window, overlap, latents.device, latents.dtype)
    if bank_fn is None:
        def bank_fn(i: int, t: Tensor) -> Sequence[Tensor]:
            return stages.bank(ref_latent, t)

    loop = DenoiseLoop(stages, control, stage_dtype, schedule, sampler, guidance_scale,
                       plan or RequestPlan(LoopPlan(controlnet_chunk=controlnet_chunk)), bank_fn,
                       StepPolicy(guided_steps, cache_interval, cache_depth),
                       OneProcess() if ranks is None else SplitOverRanks(ranks, schedule), timer)
    for i, t in enumerate(sampler.timestep_tensors):
        try:
            latents = loop.step(i, t, latents)
        except torch.OutOfMemoryError:
            if not loop.step_down(on_plan_change):
                raise
            latents = loop.step(i, t, latents)  # same function, leaner plan: the step again
        if on_step is not None:
            on_step(i)
    return latents  # the step state's dtype (float32, or float64 for float64 stages)
