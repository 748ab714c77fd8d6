"""The public API: one photo + a DensePose motion video -> an animation.

```python
from magicanimate_rt import AnimationPipeline

with AnimationPipeline.from_pretrained("pretrained_models") as pipe:
    result = pipe.animate("me.png", "dance.mp4", size=512, steps=25, guidance_scale=7.5, seed=0)
result.frames    # (F0, 512, 512, 3) uint8
result.latents   # (1, 4, N, 64, 64) float32, N = F0 padded to a multiple of 16
result.timings   # seconds per stage
```

``width=W, height=H`` instead of ``size`` gives W x H output (portrait 512 x 768: frames
(F0, 768, 512, 3), latents (1, 4, N, 96, 64)); ``fit`` says how inputs of another aspect
ratio become W x H (runtime/media.py ``fit_image``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, MagicAnimateError
from ..unet_memory import check_unet_memory
from .backends import engine_factory, pretrained_factory
from .ddim import DDIMSettings
from .distributed import Ranks, request_digest
from .media import Box, crop_frames
from .modes import SamplingMode, make_sampler
from .cache import ReferenceCache
from .request import DEFAULTS, AnimationRequest
from . import planner
from .planner import ALL_STAGES, AUTO_LIMITS, GIB, HEADROOM, LoopPlan, RequestPlan, RequestShape, next_rung, state_bytes
from .sampling import check_deep_cache, denoise, empty_device_cache, initial_noise
from .stages import Stages
from .timing import StageTimer
from .windows import context_windows, padded_length


@dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline batches its work and what it keeps between requests; every setting
    gives the same frames (up to float rounding where the batching changes).

    Fields:
        overlap: frames shared by consecutive 16-frame windows (4, the original's).
        controlnet_chunk: frames per ControlNet call (the original: 16).
        decode_chunk: frames per VAE decode call (the original: 1); None: as many as the
            memory budget allows, up to the device's limit (``AUTO_LIMITS``).
        windows_per_call: windows per UNet call (the original: 1); None: as many as the
            memory budget allows, up to the device's limit (``AUTO_LIMITS``) and what the
            backend accepts (fixed-shape engines: 1).
        controlnet_residuals: "all": ControlNet residuals of every frame computed once per
            step and kept through it (the original; memory grows with the frame count);
            "per_window": computed for each UNet call's windows (bounded memory, frames in
            two calls computed twice); "auto": "all" if it fits ``memory_gb``.
        memory_gb: memory, in GiB, a request may use on its device, weights included
            (``--memory-gb``; ``--gpu-memory-gb`` is its old name): the planner
            (``runtime/planner.py``) decides which stages stay on the device, whether the
            banks of all timesteps are computed up front, the loop's batching and the UNet's
            lean settings so that the predicted peak fits ``HEADROOM`` of it. None: what the
            device has (CUDA: free memory plus this process's allocations, times
            ``HEADROOM``; CPU: the weights plus half of ``MemAvailable``). Estimates come
            from the backend's ``memory_model`` (docs/PERFORMANCE.md, "Memory"); a backend
            without one gets the unbudgeted choices (residuals "all", one window per call
            unless it says more).
        embed_control_once: compute the ControlNet conditioning embedding of each driving
            frame once per request instead of once per step (the original), when the
            backend offers it and the residuals of all frames are kept (it is kept with
            them: C_0 x h x w per frame).
        control_uint8: keep the driving frames on the device as uint8 (4x smaller than
            float32) and convert each ControlNet call's frames (same arithmetic, same
            values). False: convert all frames up front, as the original.
        reference_cache_entries: source images whose reference latent and banks are kept
            for later requests (``runtime/cache.py``); 0 disables the cache (the original).
        reference_cache_mb: bound, in MiB, on the cache's tensors.
        cfg_sequential, ff_chunk: the UNet's lean settings asked for whatever the budget (the
            guided call's CFG halves one after the other; feed-forwards that many tokens at
            a time), where the backend has them (``Capabilities.lean_unet``): every plan is at
            least that lean (``models/layers.py`` ``Arithmetic`` says what each does and
            checks it). Default: as lean as the budget needs.
    """

    overlap: int = 4
    controlnet_chunk: int = 16
    decode_chunk: Optional[int] = None
    windows_per_call: Optional[int] = None
    controlnet_residuals: str = "auto"
    memory_gb: Optional[float] = None
    embed_control_once: bool = True
    control_uint8: bool = True
    reference_cache_entries: int = 4
    reference_cache_mb: float = 512.0
    cfg_sequential: bool = False
    ff_chunk: Optional[int] = None

    @classmethod
    def original(cls) -> "PipelineOptions":
        """The original implementation's batching, and no reference cache."""
        return cls(controlnet_chunk=16, decode_chunk=1, windows_per_call=1, controlnet_residuals="all",
                   embed_control_once=False, control_uint8=False, reference_cache_entries=0)

    def __post_init__(self):
        for name in ("controlnet_chunk", "decode_chunk", "windows_per_call"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.overlap < 16:
            raise InputError(f"overlap must be in 0..15, got {self.overlap!r}")
        if self.controlnet_residuals not in ("auto", "all", "per_window"):
            raise InputError(f"controlnet_residuals must be 'auto', 'all' or 'per_window', "
                             f"got {self.controlnet_residuals!r}")
        if self.reference_cache_entries < 0 or self.reference_cache_mb < 0:
            raise InputError("reference_cache_entries and reference_cache_mb must be >= 0")
        try:
            check_unet_memory(self.cfg_sequential, self.ff_chunk)
        except ValueError as e:
            raise InputError(str(e)) from None
        if self.memory_gb is not None and (isinstance(self.memory_gb, bool) or not self.memory_gb > 0):
            raise InputError(f"--memory-gb must be a number of GiB > 0, got {self.memory_gb!r}")


#: receives the decoded video chunk by chunk: (index of the chunk's first frame, (n, H, W, 3) uint8)
FrameSink = Callable[[int, np.ndarray], None]


@dataclass
class AnimationResult:
    frames: Optional[np.ndarray]  #: (F0, H, W, 3) uint8; None when they went to a ``frame_sink``
    latents: Tensor  #: (1, 4, N, H/8, W/8) float32 on the CPU, before decode
    timings: dict[str, float] = field(default_factory=dict)  #: seconds per stage, and "total"
    #: the plan that ran (``runtime/planner.py``): where the weights were in each phase, how
    #: the work was batched, the UNet's lean settings, the predicted peak and its rung
    plan: Optional[RequestPlan] = None
    reference_cached: bool = False  #: the source's latent came from the reference cache
    #: (left, top, right, bottom) of the W x H output that shows the driving frames' own
    #: content: the whole frame unless ``fit="pad"`` padded them (then the frames were
    #: cropped to it if ``crop_output``)
    content_box: Optional[Box] = None
    #: the sampling mode it ran (``runtime/modes.py``): "exact" reproduces the original
    mode: SamplingMode = SamplingMode()
    #: the plan as planned and as it ran after out-of-memory step-downs (``planner.next_rung``;
    #: None: none happened)
    stepped_down: Optional[tuple[RequestPlan, RequestPlan]] = None


class AnimationPipeline:
    """Drives one backend's stages through MagicAnimate's sampling (REFERENCE 2 and 4).

    Under torchrun (``WORLD_SIZE > 1``) every process builds the same pipeline and calls
    :meth:`animate` with the same request; each runs a share of every step's windows on its
    own device (``cuda:LOCAL_RANK``) and rank 0 gets the frames (``runtime/distributed.py``).
    ``ranks``: "auto" (from the environment), None (this process alone) or a
    :class:`~.distributed.Ranks`.
    """

    def __init__(self, stages: Stages, ddim: DDIMSettings = DDIMSettings(),
                 options: PipelineOptions = PipelineOptions(), ranks: Union[str, Ranks, None] = "auto"):
        self.stages = stages
        self.ddim = ddim
        self.options = options
        if ranks == "auto":
            ranks = Ranks.from_environment(stages.device)
        self.ranks: Optional[Ranks] = ranks
        #: reference latents and banks of recent sources (see runtime/cache.py)
        self.reference_cache = ReferenceCache(options.reference_cache_entries,
                                              int(options.reference_cache_mb * 2**20))

    @classmethod
    def from_pretrained(cls, models_dir, backend: str = "torch", device="cpu", dtype="float32",
                        backend_options=None, options: PipelineOptions = PipelineOptions(),
                        ranks: Union[str, Ranks, None] = "auto"):
        """Load a model directory in the real layout (README 'Weights'). ``backend_options``
        goes to the backend (e.g. ``TorchOptions`` for "torch"). Under torchrun each rank
        loads onto its own device (``cuda`` -> ``cuda:LOCAL_RANK``). ``ranks``: "auto" (from
        the environment), None, or a joined :class:`~.distributed.Ranks` (``Ranks.join``),
        which the pipeline then owns (it loads onto its device; ``close`` leaves its group)."""
        extra = {} if backend_options is None else {"options": backend_options}
        ranks = Ranks.from_environment(device) if ranks == "auto" else ranks
        device = ranks.device if ranks is not None else device
        try:
            stages = pretrained_factory(backend)(models_dir, device=device, dtype=dtype, **extra)
        except BaseException:
            if ranks is not None:
                ranks.close()
            raise
        return cls(stages, options=options, ranks=ranks)

    @classmethod
    def from_engines(cls, engine_dir, backend: str = "onnxruntime", device="cpu", backend_options=None,
                     options: PipelineOptions = PipelineOptions(), ranks: Union[str, Ranks, None] = "auto"):
        """Load an engine directory written by build_engines.py (under torchrun: each rank
        on its own device; ``ranks`` as :meth:`from_pretrained`)."""
        extra = {} if backend_options is None else {"options": backend_options}
        ranks = Ranks.from_environment(device) if ranks == "auto" else ranks
        device = ranks.device if ranks is not None else device
        try:
            stages = engine_factory(backend)(engine_dir, device=device, **extra)
        except BaseException:
            if ranks is not None:
                ranks.close()
            raise
        return cls(stages, ddim=getattr(stages, "ddim", DDIMSettings()), options=options, ranks=ranks)

    # ------------------------------------------------------------------ ranks
    @property
    def rank(self) -> int:
        """This process's rank when one clip is split across processes (torchrun); 0 alone."""
        return 0 if self.ranks is None else self.ranks.rank

    @property
    def world_size(self) -> int:
        """Processes sharing each clip's work (1 without torchrun)."""
        return 1 if self.ranks is None else self.ranks.size

    @property
    def writes_outputs(self) -> bool:
        """Whether this process writes outputs: rank 0 (every rank gets the same latents,
        only rank 0 the frames)."""
        return self.rank == 0

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self.stages is not None:
            self.stages.close()
            self.stages = None
        self.reference_cache.clear()
        if self.ranks is not None:
            self.ranks.close()

    def __enter__(self) -> "AnimationPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the call
    def animate(
        self,
        source: Union[str, Path, np.ndarray, "PIL.Image.Image"],  # noqa: F821
        driving: Union[str, Path, np.ndarray],
        size: int = DEFAULTS["size"],
        steps: Optional[int] = DEFAULTS["steps"],
        guidance_scale: float = DEFAULTS["guidance_scale"],
        seed: int = DEFAULTS["seed"],
        progress: Union[bool, Callable[[int, int], None]] = False,
        start_frame: int = DEFAULTS["start_frame"],
        max_frames: Optional[int] = DEFAULTS["max_frames"],
        frame_sink: Optional[FrameSink] = None,
        width: Optional[int] = DEFAULTS["width"],
        height: Optional[int] = DEFAULTS["height"],
        fit: str = DEFAULTS["fit"],
        crop_output: bool = DEFAULTS["crop_output"],
        mode: Union[str, SamplingMode, None] = None,
        densepose_weights: Union[str, Path, None] = None,
    ) -> AnimationResult:
        """Animate ``source`` (a path, PIL image or HxWx3 uint8 array) with ``driving`` (a
        video path or (F, H, W, 3) uint8 DensePose frames): :meth:`run` of the
        :class:`~.request.AnimationRequest` these keywords make (its fields say each one's
        meaning and default).

        The output is ``size`` x ``size`` (default 512, the original's square), or
        ``width`` x ``height`` when both are given (multiples of 64 up to 2048, e.g.
        portrait 512 x 768); the source and every driving frame are made that shape as
        ``fit`` says: "stretch" (resized whatever their aspect ratio, the original),
        "crop" (the centre of the output's aspect ratio, resized) or "pad" (padded to it
        with edge values, resized). ``crop_output`` (with "pad"): the frames are cropped
        back to where the driving frames' content lies (``result.content_box``, even
        width and height).

        ``steps``: DDIM steps (default 25, the original's; or the mode's own count).
        ``mode``: "exact" (default: the original's function), "fast", or a
        :class:`~.modes.SamplingMode` (opt-in approximations: another sampler, deep-feature
        reuse, guidance for part of the steps; README "Faster, approximately").
        ``progress`` and ``frame_sink``: as :meth:`run`.

        ``densepose_weights``: ``driving`` is an ordinary video of a person (a path), made a
        DensePose clip first with this DensePose R-CNN checkpoint on the pipeline's device and
        dtype, at its own size and 25 fps, from ``start_frame`` (the person video's frames) for
        ``max_frames`` frames, cached by content in the cache directory so a rerun skips it
        (``densepose/prepare.py``). Default None: ``driving`` is already DensePose.
        """
        if densepose_weights is not None:
            driving = self._densepose_clip(driving, densepose_weights, start_frame, max_frames)
            start_frame, max_frames = 0, None
        settings = dict(source=source, driving=driving, size=size, steps=steps, guidance_scale=guidance_scale,
                        seed=seed, start_frame=start_frame, max_frames=max_frames, width=width, height=height,
                        fit=fit, crop_output=crop_output)
        return self._run(lambda: AnimationRequest.with_mode(mode, **settings), progress, frame_sink)

    def _densepose_clip(self, video, weights, start_frame, max_frames) -> Path:
        """The cached DensePose clip of the person video ``video`` (``densepose/prepare.py``)."""
        from ..densepose.prepare import cached_driving_video, person_video_settings

        if not isinstance(video, (str, Path)):
            raise InputError("driving: with densepose_weights it must be the path of a person video, got "
                             f"{type(video).__name__}")
        if self.stages is None:
            raise InputError("this pipeline is closed")
        settings = person_video_settings(start_frame, max_frames)
        return cached_driving_video(video, weights, settings, device=str(self.stages.device),
                                    dtype=self.stages.dtype)

    def run(self, request: AnimationRequest, progress: Union[bool, Callable[[int, int], None]] = False,
            frame_sink: Optional[FrameSink] = None) -> AnimationResult:
        """Animate one :class:`~.request.AnimationRequest` (its ``source`` and ``driving``
        given). ``request.grid`` is for the writers of files (``render.py``); it changes
        nothing here.

        ``progress``: True for a tqdm bar over the steps, or a callback(step, steps), which
        may raise to stop the request at that step boundary. ``frame_sink``: called with
        each decoded chunk of frames, in order, as soon as it is decoded (e.g. a
        :class:`~.media.VideoWriter`'s ``write``); the result then holds no frames, so the
        decoded video is never in memory whole (long clips).

        A request that fails or is stopped at any point leaves the pipeline as a fresh one
        (the backend's per-request state is restored in ``finally``: :meth:`_end_request`);
        the reference cache keeps only complete latents and banks.

        Under torchrun every rank must call this with the same request (checked before any
        work: a rank whose inputs fail, or that was given another request, stops every rank
        with one line); rank 0 gets the frames (and calls ``frame_sink``), the others the
        same latents and ``frames=None``.
        """
        return self._run(lambda: request, progress, frame_sink)

    @torch.inference_mode()
    def _run(self, make_request: Callable[[], AnimationRequest], progress, frame_sink) -> AnimationResult:
        if self.stages is None:
            raise InputError("this pipeline is closed")
        t_start = time.perf_counter()
        st = self.stages
        timer = StageTimer(st.device)
        request, box = self._read_request(make_request, timer)
        m, steps, shape = request.mode, request.num_steps, request.shape
        src, ctl = request.source, request.driving
        crop = request.crop_output and box != (0, 0, *shape)  # else the frames are the driving content whole
        if crop and frame_sink is not None:
            sink = frame_sink
            frame_sink = lambda first, frames: sink(first, np.ascontiguousarray(crop_frames(frames, box)))  # noqa: E731
        sampler = make_sampler(m.sampler, steps, self.ddim, device=st.device)
        f0 = ctl.shape[0]
        n = padded_length(f0, st.window)
        if n > f0:  # pad by repeating the last frame (np.pad mode="edge" in the original)
            ctl = np.concatenate([ctl, np.repeat(ctl[-1:], n - f0, axis=0)], axis=0)

        with timer.stage("prepare"):
            image = torch.from_numpy(src).to(st.device).permute(2, 0, 1)[None].to(st.dtype)
            control = torch.from_numpy(ctl).to(st.device).permute(0, 3, 1, 2)
            if not self.options.control_uint8:
                control = control.to(st.dtype) / 255.0
            latents = initial_noise(request.seed, n, (shape[1] // 8, shape[0] // 8), st.window).to(st.device,
                                                                                                    st.dtype)
            planned = self.plan_request(shape, n, m, steps, request.guidance_scale != 1.0, frame_sink is not None)
        done = False
        try:
            latents, plan, cached = self._sample(request, image, control, latents, sampler, planned, timer, progress)
            self._place(plan, "decode")
            with timer.stage("vae_decode"):
                frames, plan = self._decode(latents[:, :, :f0], plan, frame_sink, shape)
                if frames is not None and crop:
                    frames = np.ascontiguousarray(crop_frames(frames, box))
            done = True
        finally:
            self._end_request(failed=not done)
        timings = timer.totals()
        timings["total"] = time.perf_counter() - t_start
        return AnimationResult(frames=frames, latents=latents.float().cpu(), timings=timings, plan=plan,
                               reference_cached=cached, content_box=box, mode=m,
                               stepped_down=(planned, plan) if plan is not planned else None)

    def _read_request(self, make_request, timer: StageTimer) -> tuple[AnimationRequest, Box]:
        """The request with its inputs read and checked, and the driving content's box; under
        torchrun, after every rank has agreed it has the same request (or every rank stops)."""
        st, error, request, box = self.stages, None, None, None
        try:
            request = make_request()
            check_deep_cache(st, request.mode.cache_interval, request.mode.cache_depth, self.ranks)  # before any work
            st.check_shape(*request.shape)
            with timer.stage("read_inputs"):
                request, box = request.read_inputs_and_box()
        except MagicAnimateError as e:
            if self.ranks is None:
                raise
            error = str(e)
        if self.ranks is not None:  # the same request on every rank, or every rank stops here
            r = request
            digest = None if error is not None else request_digest(
                r.source, r.driving, r.shape, r.num_steps, float(r.guidance_scale), int(r.seed), self.options,
                self.ddim, st.name, st.dtype, r.fit, r.crop_output, r.mode)
            self.ranks.agree(digest, error)
        return request, box

    def _sample(self, request: AnimationRequest, image: Tensor, control: Tensor, latents: Tensor, sampler,
                plan: RequestPlan, timer: StageTimer, progress):
        """The backend set up for the request, the reference encoded (or taken from the
        cache), the banks and the denoising loop: (latents, the plan that ran, whether the
        reference was cached)."""
        st, o, m = self.stages, self.options, request.mode
        st.begin_request(*request.shape, plan)  # the backend follows the plan (until end_request)
        key = ReferenceCache.key(request.source, st.device, st.dtype)
        entry = self.reference_cache.lookup(key)
        cached = entry is not None
        if not cached or plan.banks_up_front:
            self._place(plan, "reference")
        with timer.stage("vae_encode"):
            if entry is None:
                entry = self.reference_cache.insert(key, st.encode_reference(image))
        bank_fn = self._bank_source(key, entry, sampler, plan, timer)
        self._place(plan, "loop")
        on_step, bar = self._step_callback(progress, request.num_steps)
        ran = [plan]
        try:
            latents = denoise(st, entry.latent, control, latents, sampler, float(request.guidance_scale), o.overlap,
                              o.controlnet_chunk, timer, on_step, plan=plan, bank_fn=bank_fn, ranks=self.ranks,
                              guided_steps=m.guided_steps(request.num_steps) if m.guidance_until < 1.0 else None,
                              cache_interval=m.cache_interval, cache_depth=m.cache_depth,
                              on_plan_change=lambda old, new: ran.append(new))
        finally:
            if bar is not None:
                bar.close()
        return latents, ran[-1], cached

    def _bank_source(self, key, entry, sampler, plan: RequestPlan, timer: StageTimer):
        """The loop's ``bank_fn(i, t)``: each timestep's reference bank, from the cache or
        computed (and offered to the cache); with ``banks_up_front`` every timestep's now,
        so the appearance encoder can leave the device before the loop."""
        st, cache = self.stages, self.reference_cache
        banks: dict[int, list[Tensor]] = {}  # banks up front: every timestep's, whatever the cache keeps

        def bank_fn(i: int, t: Tensor):
            ts = sampler.timesteps[i]
            bank = banks.get(ts) or entry.banks.get(ts)
            if bank is None:
                bank = st.bank(entry.latent, t)
                cache.add_bank(key, entry, ts, bank)
            return bank

        if plan.banks_up_front:
            with timer.stage("appearance_encoder"):
                for i, t in enumerate(sampler.timestep_tensors):
                    banks[sampler.timesteps[i]] = bank_fn(i, t)
        return bank_fn

    def _step_callback(self, progress, steps: int):
        """(the loop's on_step, the tqdm bar to close or None) of ``progress``."""
        if progress is True and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="denoising", unit="step")
            return (lambda i: bar.update(1)), bar
        if callable(progress):
            return (lambda i: progress(i + 1, steps)), None
        return None, None

    def _place(self, plan: RequestPlan, phase: str) -> None:
        """The stages ``phase`` needs on the device, the others off it (where the backend can)."""
        if self.stages.capabilities.residency:
            self.stages.set_resident(plan.resident(phase))

    def _end_request(self, failed: bool) -> None:
        """The end of a request: the backend's per-request state ends (its own UNet settings
        again; the compile key, what compiled saved); after a failed or stopped request every
        stage's weights are on the device again, as in a fresh pipeline. After a request
        that ran to its end they stay where its plan left them (the next request's plan
        places them before its first call, and moving every stage back could exceed
        ``memory_gb``)."""
        st = self.stages
        try:
            st.end_request()
        finally:
            if failed and st.capabilities.residency:
                st.set_resident(ALL_STAGES)


    def plan(self, size: Union[int, tuple[int, int]], num_frames: int,
             mode: Optional[SamplingMode] = None) -> LoopPlan:
        """The batching of a request of ``num_frames`` padded frames at output ``size`` (a
        square's side, or (width, height)): :meth:`plan_request`'s loop plan."""
        return self.plan_request(size, num_frames, mode).loop

    def plan_request(self, size: Union[int, tuple[int, int]], num_frames: int,
                     mode: Optional[SamplingMode] = None, steps: Optional[int] = None, guided: bool = True,
                     to_sink: bool = False) -> RequestPlan:
        """The plan of a request of ``num_frames`` padded frames at output ``size``
        (``planner.plan_request``): from the options, the budget (:meth:`budget_bytes`), the
        backend's capabilities, memory model and weights. With deep-feature reuse
        (``mode``) the kept features of every window (both CFG halves) are counted first.
        ``to_sink``: the frames go to a frame sink (none are kept on the device)."""
        st, o = self.stages, self.options
        width, height = (size, size) if isinstance(size, int) else size
        mode = mode or SamplingMode()
        steps = steps or mode.request_steps(None)
        caps = st.capabilities
        n_windows = len(context_windows(num_frames, st.window, o.overlap))
        win_cap, dec_cap = AUTO_LIMITS.get(st.device.type, AUTO_LIMITS["cpu"])
        kept = 0
        if mode.cache_interval > 1:
            kept = n_windows * st.deep_feature_bytes(width, height, mode.cache_depth)
        settings = dict(windows_per_call=o.windows_per_call, controlnet_residuals=o.controlnet_residuals,
                        controlnet_chunk=o.controlnet_chunk, decode_chunk=o.decode_chunk, max_auto_windows=win_cap,
                        max_auto_decode=dec_cap, embed_control=o.embed_control_once)
        memory = st.memory_model(width, height)
        item = torch.empty((), dtype=st.dtype).element_size()
        cache = self.reference_cache
        cached = 0 if memory is None or not cache.enabled else \
            min(cache.max_bytes, cache.nbytes + steps * memory.bank_per_step)
        shape = RequestShape(
            num_frames, n_windows, steps, width, height,
            state_bytes=state_bytes(num_frames, width, height, item, 1 if o.control_uint8 else item, guided),
            frames_bytes=0 if to_sink else 2 * num_frames * height * width * 3, cache_bytes=cached)
        return planner.plan_request(self.budget_bytes(), memory, st.weight_bytes(), shape, caps, st.window,
                                    deep_cache_bytes=kept, cfg_sequential=o.cfg_sequential, ff_chunk=o.ff_chunk,
                                    **settings)

    def budget_bytes(self) -> float:
        """What the planner may plan for, weights included: ``memory_gb`` times
        ``HEADROOM``, or what the device has (CUDA: free memory plus this process's
        allocations, times ``HEADROOM``; CPU: the weights plus half of ``MemAvailable``)."""
        if self.options.memory_gb is not None:
            return self.options.memory_gb * GIB * HEADROOM
        device = torch.device(self.stages.device)
        if device.type == "cuda":
            return float(torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)) * HEADROOM
        return float(sum(self.stages.weight_bytes().values()) + available_memory(device) / 2)

    # ------------------------------------------------------------------ pieces
    def _decode(self, latents: Tensor, plan: RequestPlan, sink: Optional[FrameSink] = None,
                shape: Optional[tuple[int, int]] = None) -> tuple[Optional[np.ndarray], RequestPlan]:
        """(1, 4, F0, h, w) -> ((F0, H, W, 3) uint8, the plan that ran), decoded
        ``plan.loop.decode_chunk`` frames at a time, each chunk made uint8 at once (the float
        video is never whole); the host sees the frames once. With ``sink`` each chunk goes
        there instead and no frames are returned. ``shape``: the frames' (width, height)
        (default: 8 x the latents').

        Out of device memory in a call (one process): the plan's next rung
        (``planner.next_rung``: a quarter of the chunk; each frame decodes alone, so the
        chunking changes nothing but rounding), once. With several ranks the chunks go
        round-robin over the ranks (:meth:`_decode_over_ranks`); the other ranks than 0
        return no frames."""
        frames = latents[0].transpose(0, 1).to(self.stages.dtype)
        out: list[Tensor] = []

        def emit(i: int, part: Tensor) -> None:
            if sink is None:
                out.append(part)
            else:
                sink(i, part.cpu().numpy())

        if self.ranks is not None:
            width, height = shape if shape is not None else (latents.shape[-1] * 8, latents.shape[-2] * 8)
            self._decode_over_ranks(frames, plan.loop.decode_chunk, emit, width, height)
            if self.ranks.rank != 0:
                return None, plan
        else:
            i, stepped = 0, False
            while i < frames.shape[0]:
                chunk = plan.loop.decode_chunk
                try:
                    part = self._decode_frames(frames[i : i + chunk])
                except torch.OutOfMemoryError:
                    lean = None if stepped else next_rung(plan, self.stages.capabilities)
                    if lean is None or lean.loop.decode_chunk == chunk:
                        raise
                    stepped, plan = True, lean
                    empty_device_cache(self.stages.device)
                    continue
                emit(i, part)
                i += part.shape[0]
        return (None if sink is not None else torch.cat(out).cpu().numpy()), plan

    def _decode_frames(self, latents: Tensor) -> Tensor:
        """(n, 4, h, w) -> (n, H, W, 3) uint8: (video * 255) truncated, as the original saves it."""
        video = self.stages.decode(latents).float()
        return (video * 255).to(torch.uint8).permute(0, 2, 3, 1)

    def _decode_over_ranks(self, frames: Tensor, chunk: int, emit, width: int, height: int) -> None:
        """The decode's chunks round-robin over the ranks: each round's chunks reach rank 0,
        which emits them in frame order (a round at a time)."""
        ranks, n = self.ranks, frames.shape[0]
        starts = list(range(0, n, chunk))
        for first in range(0, len(starts), ranks.size):
            k = first + ranks.rank
            part = self._decode_frames(frames[starts[k] : starts[k] + chunk]) if k < len(starts) else None
            padded = torch.zeros((chunk, height, width, 3), dtype=torch.uint8, device=self.stages.device)
            if part is not None:
                padded[: part.shape[0]].copy_(part)
            got = ranks.gather_to_root(padded, 0 if part is None else part.shape[0])
            if got is None:
                continue
            i = starts[first]
            for p in got:
                if p.shape[0]:
                    emit(i, p)
                    i += p.shape[0]


def available_memory(device: torch.device) -> int:
    """Bytes the device can still give: free CUDA memory, or the CPU's ``MemAvailable``
    (``/proc/meminfo``; without it, a conservative 4 GiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30
