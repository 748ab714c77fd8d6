"""The PyTorch backend: the stage interface over :mod:`magicanimate_rt.models`, on the CPU
or on CUDA (the torch-CUDA backend is this module with ``device="cuda"``).

:class:`TorchOptions` chooses how the stages compute. Every combination is the same
function up to float rounding; :meth:`TorchOptions.original` computes the way the original
MagicAnimate does (the reference-schedule baseline of the benchmarks).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ...errors import InputError
from ...models import ModelSet, load_model_set
from ...models.layers import ORIGINAL, Arithmetic
from ...stage_names import WEIGHTS
from ..compiled import (COMPILE_MODES, STAGES, CompileCache, CompiledCall, CompileKey, backend_name,
                        default_cache_dir, detached_from_graph, environment)
from ..dtypes import float_torch_dtype
from ..stages import FF_CHUNK_TOKENS, Capabilities, MemoryModel, Stages

if TYPE_CHECKING:
    from ..planner import LoopPlan, RequestPlan

@dataclass(frozen=True)
class TorchOptions:
    """How the torch backend computes its stages.

    Fields:
        appearance_batch: copies of the reference latent the appearance encoder runs on.
            1 (ours); 2 is the original's two identical CFG copies (same bank, twice the work).
        share_cfg_prefix: the guided UNet call computes the two CFG halves' shared prefix
            (everything before the first mid-block self-attention) once. False runs a full
            forward per half, as the original.
        bank_kv_once: the reference bank's keys/values are projected once per block and
            shared by every frame. False projects ``concat([frame, bank])`` per frame, as
            the original.
        text_kv_once: cross-attention projects the text embedding's keys/values once per
            call. False projects them for every frame, as the original (which repeats the
            embedding per frame).
        temporal_attention: the motion modules' attention: "fused" (PyTorch's
            ``scaled_dot_product_attention``) or "materialised" (the original's
            ``baddbmm``/``softmax``/``bmm``, what it runs without xformers, i.e. on a CPU).
        channels_last: convolution weights and activations in NHWC. Converts the model
            set's weights in place (values unchanged). Measured: ~3% on the CPU (mid),
            within the noise on an H200 in fp16 (docs/PERFORMANCE.md), so off by default.
        compile_mode: None (eager), or the ``torch.compile`` mode of the compiled stages
            ("default", "reduce-overhead" (CUDA graphs), "max-autotune"); see "Compiled
            stages" below.
        compile_stages: which stages compile (``runtime/compiled.py`` ``STAGES``: all by
            default). On the CPU compiling the tiny set's UNet alone takes minutes, so a
            subset is how a quick check compiles at all.
        compile_backend: the ``torch.compile`` backend (a name or a callable; "inductor").
        compile_cache_dir: where compiled artifacts are kept between processes (None:
            ``compile/`` under ``$MAGICANIMATE_RT_CACHE`` or ``~/.cache/magicanimate-rt``).
        group_norm: the cross-frame GroupNorms: "explicit" (``var_mean`` and elementwise
            passes) or "fused" (one ``F.group_norm`` kernel over the frames transposed next
            to the pixels).
        spatial_sdpa, cross_sdpa, temporal_sdpa: the ``scaled_dot_product_attention``
            backends ("cudnn", "flash", "efficient", "math", in order of preference) of the
            spatial self-attention (with the reference bank), the cross-attention to the
            text and the motion modules' attention; ``()``: PyTorch's choice.
        All of these compute the same function (``models/layers.py`` ``Arithmetic``). The
        UNet's lean settings (``Arithmetic.cfg_sequential``, ``ff_chunk``) are the request
        plan's (``runtime/planner.py``; forced with ``PipelineOptions``), followed by
        :meth:`TorchStages.follow_plan`.

    Compiled stages: each call compiles at its first shape (``dynamic=False``), so a plan's
    fixed batches compile once each. A failed compile warns once and that stage runs eager.
    Under "reduce-overhead" every compiled call starts a new CUDA-graph step and returns
    copies of its outputs (the loop keeps residuals, the bank and the reference latent
    across calls, and the next graph step may overwrite the graph pool). The deep-feature
    reuse calls (``unet_cached``, ``controlnet_shallow``) run eager.
    """

    appearance_batch: int = 1
    share_cfg_prefix: bool = True
    bank_kv_once: bool = True
    text_kv_once: bool = True
    temporal_attention: str = "fused"
    channels_last: bool = False
    compile_mode: Optional[str] = None
    compile_stages: tuple[str, ...] = STAGES
    compile_backend: Union[str, Callable] = "inductor"
    compile_cache_dir: Optional[str] = None
    # the model-level defaults, in one place (models/layers.py Arithmetic)
    group_norm: str = Arithmetic.group_norm
    spatial_sdpa: tuple[str, ...] = Arithmetic.spatial_sdpa
    cross_sdpa: tuple[str, ...] = Arithmetic.cross_sdpa
    temporal_sdpa: tuple[str, ...] = Arithmetic.temporal_sdpa

    @classmethod
    def original(cls, device: str = "cpu") -> "TorchOptions":
        """The original implementation's schedule on ``device`` (same function, more work).
        Its motion modules use xformers' fused attention where xformers runs (CUDA) and the
        materialised ``baddbmm``/``softmax``/``bmm`` elsewhere."""
        a = ORIGINAL if torch.device(device).type != "cuda" else replace(ORIGINAL, temporal_attention="fused")
        return cls(appearance_batch=2, share_cfg_prefix=False, bank_kv_once=not a.bank_kv_per_frame,
                   text_kv_once=not a.text_kv_per_frame, temporal_attention=a.temporal_attention)

    @property
    def arithmetic(self) -> Arithmetic:
        """The model-level arrangement these options ask for (models/layers.py)."""
        return Arithmetic(bank_kv_per_frame=not self.bank_kv_once, text_kv_per_frame=not self.text_kv_once,
                          temporal_attention=self.temporal_attention, group_norm=self.group_norm,
                          spatial_sdpa=self.spatial_sdpa, cross_sdpa=self.cross_sdpa,
                          temporal_sdpa=self.temporal_sdpa)

    def __post_init__(self):
        if self.appearance_batch not in (1, 2):
            raise InputError(f"appearance_batch must be 1 or 2, got {self.appearance_batch!r}")
        try:
            self.arithmetic  # noqa: B018 (Arithmetic checks its own fields)
        except ValueError as e:
            raise InputError(str(e)) from None
        if self.compile_mode not in COMPILE_MODES:
            raise InputError(f"compile_mode {self.compile_mode!r} is not a torch.compile mode; choose one of "
                             f"{', '.join(m for m in COMPILE_MODES if m)}")
        unknown = [s for s in self.compile_stages if s not in STAGES]
        if isinstance(self.compile_stages, str) or unknown:
            raise InputError(f"compile_stages must be a tuple of {', '.join(STAGES)}; got {self.compile_stages!r}")

    def graph_options(self) -> str:
        """The options that change the traced graphs, as the compile cache key holds them
        (all but the compile fields the key names on its own)."""
        skip = ("compile_mode", "compile_backend", "compile_cache_dir")
        return repr({f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip})


#: measured peak working memory of this backend's calls, as multiples of a size that
#: follows from the shapes (docs/PERFORMANCE.md, "Memory"), per device type: a guided UNet
#: call per window, in units of its 16 frames' ControlNet residuals; a ControlNet call per
#: frame, in units of one frame's residuals; a VAE decode per frame, in units of one
#: frame's top decoder activation (first decoder channel count x H x W).
#: "cpu": measured on the tiny and mid model sets at 128 and 256 px, float32, rounded up.
#: "cuda": the H200 run of 2026-11-26 (SD 1.5, 512 px, fp16: the guided call's working
#: memory 2.48 GiB, the decode 512-610 MiB per frame; docs/PERFORMANCE.md "GPU"), where the
#: CPU factors over-estimated the loop 2.8x and the decode 3.2x; the ControlNet's CPU
#: factor scaled the same way (not measured alone). ``benchmarks/gpu_check.py`` measures
#: each call's peak and prints the factors it implies.
MEMORY_FACTORS = {
    "cpu": {"unet_window": 26, "controlnet_frame": 32, "decode_frame": 26},
    "cuda": {"unet_window": 10, "controlnet_frame": 12, "decode_frame": 10},
}
#: a guided call with its CFG halves one after the other, as a share of the batched one's
#: working memory: the down path and its skip features are shared, the mid/up path runs on
#: half the rows (an estimate from that split; gpu_check measures it)
UNET_SEQUENTIAL_SHARE = 0.6


def decode_bytes_per_frame(vae, width: int, dtype: torch.dtype, height: Optional[int] = None,
                           device_type: str = "cpu") -> int:
    """Estimated peak working memory of a VAE decode call per frame in it at output shape
    ``width`` x ``height`` (``height`` None: a square): one frame's top decoder activation
    (first decoder width x H x W) times the device type's decode factor."""
    item = torch.empty((), dtype=dtype).element_size()
    height = width if height is None else height
    factor = MEMORY_FACTORS.get(device_type, MEMORY_FACTORS["cpu"])["decode_frame"]
    return factor * vae.vae.config.block_out_channels[0] * height * width * item


class TorchStages(Stages):
    name = "torch"
    #: any number of windows per UNet call (``TemporalUNet.guided`` takes B windows), any
    #: batch per stage, and the ControlNet in two parts (``ControlNet.embed`` /
    #: ``forward_embedded``)
    capabilities = Capabilities(max_windows_per_call=None, controlnet_in_two_parts=True, deep_cache=True,
                                lean_unet=True)

    def __init__(self, models: ModelSet, device: torch.device, dtype: torch.dtype,
                 options: TorchOptions = TorchOptions()):
        self.models = models
        self.device = device
        self.dtype = dtype
        self.options = options
        self.text_embedding = models.text_embedding
        self._arithmetic = options.arithmetic
        # stages leave the device only where there is another place for them (CUDA: pinned host memory)
        self.capabilities = replace(type(self).capabilities, residency=self.device.type == "cuda")
        self._host_copies: dict[str, dict[str, Tensor]] = {}  # pinned host copies of offloaded stages' weights
        if options.channels_last:
            for m in (models.vae, models.appearance_encoder, models.controlnet, models.unet):
                m.to(memory_format=torch.channels_last)
        self._encode = models.vae.encode
        self._appearance = models.appearance_encoder
        self._controlnet = models.controlnet
        self._embed = models.controlnet.embed
        self._embedded = models.controlnet.forward_embedded
        self._guided = models.unet.guided
        self._forward = models.unet.forward
        self._decode = models.vae.decode
        self.compile_cache: Optional[CompileCache] = None
        self._compile_key: Optional[CompileKey] = None
        self._fingerprint: Optional[str] = None
        if options.compile_mode is not None:
            self._compile()

    @classmethod
    def from_pretrained(cls, models_dir, device="cpu", dtype="float32",
                        options: TorchOptions = TorchOptions()) -> "TorchStages":
        device, dtype = torch.device(device), float_torch_dtype(dtype)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but PyTorch sees no CUDA GPU; use --device cpu")
        if device.type == "cpu" and dtype == torch.float16:
            raise InputError("dtype float16 needs a CUDA device; use float32 (or bfloat16) on the CPU")
        return cls(load_model_set(models_dir, device=device, dtype=dtype), device, dtype, options)

    def residual_numel(self, width: int, height: Optional[int] = None) -> int:
        """Elements of one frame's 13 ControlNet residuals at output shape ``width`` x
        ``height`` (``height`` None: a square): one per skip feature of the UNet's down
        path (conv_in, every resnet, every downsampler) plus the mid block's output."""
        cfg = self.models.unet.config
        ch = cfg.block_out_channels
        h, w = (width if height is None else height) // 8, width // 8
        total = ch[0] * h * w  # conv_in
        for i, c in enumerate(ch):
            hi, wi = h >> i, w >> i
            total += cfg.layers_per_block * c * hi * wi
            if i < len(ch) - 1:
                total += c * (hi // 2) * (wi // 2)  # downsampler
        return total + ch[-1] * (h >> (len(ch) - 1)) * (w >> (len(ch) - 1))  # mid

    def memory_model(self, width: int, height: Optional[int] = None) -> MemoryModel:
        """Working-memory estimates of this backend's calls at output shape ``width`` x
        ``height`` (``height`` None: a square), with this device type's factors."""
        height = width if height is None else height
        item = torch.empty((), dtype=self.dtype).element_size()
        residuals = self.residual_numel(width, height) * item
        factors = MEMORY_FACTORS.get(self.device.type, MEMORY_FACTORS["cpu"])
        cn = self.models.controlnet.net.config  # its conditioning embedding has its conv_in's width
        unet = factors["unet_window"] * self.window * residuals
        controlnet = factors["controlnet_frame"] * residuals
        return MemoryModel(
            residuals_per_frame=residuals,
            unet_per_window=unet,
            controlnet_per_frame=controlnet,
            decode_per_frame=decode_bytes_per_frame(self.models.vae, width, self.dtype, height, self.device.type),
            control_embedding_per_frame=cn.block_out_channels[0] * (height // 8) * (width // 8) * item,
            bank_per_step=self.bank_numel(width, height) * item,
            appearance_call=2 * controlnet,  # one latent through a whole 2D UNet: the ControlNet's down path twice
            unet_per_window_sequential=int(UNET_SEQUENTIAL_SHARE * unet),
            ff_chunk_saving=self.ff_chunk_saving(width, height),
        )

    def bank_numel(self, width: int, height: Optional[int] = None) -> int:
        """Elements of one timestep's reference bank: one (1, h_j * w_j, C_j) tensor per
        self-attention of the mid block and the up path, at its block's resolution."""
        unet = self.models.unet
        ch = unet.config.block_out_channels
        h, w = (width if height is None else height) // 8, width // 8
        n = len(ch)
        low = (h >> (n - 1)) * (w >> (n - 1))
        total = len(unet.mid_block.attentions) * ch[-1] * low
        for i, blk in enumerate(unet.up_blocks):  # up block i runs at latent / 2^(n-1-i)
            scale = n - 1 - i
            total += len(blk.attentions) * list(reversed(ch))[i] * (h >> scale) * (w >> scale)
        return total

    def ff_chunk_saving(self, width: int, height: Optional[int] = None) -> int:
        """What chunked feed-forwards (``FF_CHUNK_TOKENS`` tokens per chunk) take off a
        guided window's working memory: at the top level, 2 x 16 rows of h x w tokens carry
        the GEGLU projection (8 C) and its gated half (4 C) at once; chunked, only
        ``FF_CHUNK_TOKENS`` tokens of each row do."""
        c = self.models.unet.config.block_out_channels[0]
        tokens = ((width if height is None else height) // 8) * (width // 8)
        item = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.window * max(tokens - FF_CHUNK_TOKENS, 0) * 12 * c * item

    def encode_reference(self, image: Tensor) -> Tensor:
        return self._call("vae_encode", self._encode, image)

    def bank(self, ref_latent: Tensor, t: Tensor) -> list[Tensor]:
        n = self.options.appearance_batch
        bank = self._call("appearance_encoder", self._appearance, ref_latent.expand(n, -1, -1, -1), t,
                          self.text_embedding, self._arithmetic)
        return bank if n == 1 else [b[:1] for b in bank]  # the copies are identical

    def controlnet(self, latents: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        return list(self._call("controlnet", self._controlnet, latents, t, self.text_embedding, cond))

    def controlnet_embed(self, cond: Tensor) -> Tensor:
        return self._call("controlnet_embed", self._embed, cond)

    def controlnet_embedded(self, latents: Tensor, t: Tensor, embedding: Tensor) -> list[Tensor]:
        return list(self._call("controlnet", self._embedded, latents, t, self.text_embedding, embedding))

    def _new_graph_step(self) -> None:
        """With CUDA graphs ("reduce-overhead") a compiled call's outputs live in the graph's
        memory pool; marking each compiled call as a new step tells torch.compile that the
        previous outputs (all copied out by :meth:`_call`) may be overwritten."""
        if self.options.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def unet_guided(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]):
        down, mid = residuals[:-1], residuals[-1]
        if self.options.share_cfg_prefix:
            return self._call("unet", self._guided, latents, t, self.text_embedding, down, mid, bank,
                              self._arithmetic)
        eps_u = self._call("unet", self._forward, latents, t, self.text_embedding, down, mid, None, self._arithmetic)
        return eps_u, self.unet_cond(latents, t, residuals, bank)

    def unet_cond(self, latents: Tensor, t: Tensor, residuals: Sequence[Tensor], bank: Sequence[Tensor]) -> Tensor:
        return self._call("unet", self._forward, latents, t, self.text_embedding, residuals[:-1], residuals[-1],
                          bank, self._arithmetic)

    def unet_cached(self, latents, t, residuals, bank, depth, deep, guided):
        down, mid = (residuals[:-1], residuals[-1]) if deep is None else (residuals, None)
        return self.models.unet.cached(latents, t, self.text_embedding, down, mid, bank, depth, deep, guided,
                                       self._arithmetic)

    def deep_feature_bytes(self, width: int, height: int, depth: int) -> int:
        """The input of the last ``depth`` up blocks: the output channels of the up block
        before them, at 1 / 2^(depth-1) of the latent size, for 2 x 16 rows."""
        self.shallow_skips(depth)  # checks the depth
        ch = list(reversed(self.models.unet.config.block_out_channels))
        n = len(ch)
        scale = 2 ** (depth - 1)
        item = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.window * ch[n - depth - 1] * (height // 8 // scale) * (width // 8 // scale) * item

    def shallow_skips(self, depth: int) -> int:
        try:
            return self.models.unet.shallow_skips(depth)
        except ValueError as e:
            raise InputError(str(e)) from None

    def controlnet_shallow(self, latents, t, control, skips, embedded):
        cn = self.models.controlnet
        embedding = control if embedded else cn.embed(control)
        return list(cn.forward_embedded(latents, t, self.text_embedding, embedding, skips_only=skips))

    def decode(self, latents: Tensor) -> Tensor:
        return self._call("vae_decode", self._decode, latents)

    # ------------------------------------------------------------------ memory
    def _stage_modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.models, name) for name in WEIGHTS}  # the model set's modules of those names

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of each stage's parameters and buffers (the text encoder is not here: it
        is freed once its embedding is computed, at load)."""
        return {name: sum(t.numel() * t.element_size() for t in (*mod.parameters(), *mod.buffers()))
                for name, mod in self._stage_modules().items()}

    def set_resident(self, stages: Sequence[str]) -> None:
        """Keep ``stages`` on the GPU, the others' weights in pinned host memory. The first
        time a stage leaves, its weights are copied to pinned buffers (queued on the
        current stream); they never change, so later it leaves by dropping its device
        copies, and comes back by an asynchronous copy. On the CPU nothing moves (the host
        is the device)."""
        if self.device.type != "cuda":
            return
        unknown = set(stages) - set(self._stage_modules())
        if unknown:
            raise InputError(f"unknown stage(s) {sorted(unknown)}; the stages are {sorted(self._stage_modules())}")
        for name, mod in self._stage_modules().items():
            tensors = dict(mod.named_parameters())
            tensors.update(mod.named_buffers())
            on_device = next(iter(tensors.values())).device.type == "cuda"
            if name in stages and not on_device:
                for key, t in tensors.items():
                    t.data = self._host_copies[name][key].to(self.device, non_blocking=True)
            elif name not in stages and on_device:
                host = self._host_copies.get(name)
                if host is None:
                    host = self._host_copies[name] = {}
                    for key, t in tensors.items():
                        host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                        host[key].copy_(t.data, non_blocking=True)
                    torch.cuda.current_stream(self.device).synchronize()  # the copies are done before the frees
                for key, t in tensors.items():
                    t.data = host[key]

    def follow_plan(self, plan: "RequestPlan") -> None:
        """The UNet calls that follow run the plan's lean settings: the guided call's CFG
        halves one after the other and/or the feed-forwards ``ff_chunk`` tokens at a time
        (``models/layers.py`` ``Arithmetic``; the same function)."""
        self._arithmetic = replace(self.options.arithmetic, cfg_sequential=plan.loop.cfg_sequential,
                                   ff_chunk=plan.loop.ff_chunk)

    def close(self) -> None:
        self.models = None  # type: ignore[assignment]
        self._host_copies.clear()
        for name in itertools.chain.from_iterable(COMPILED_CALLS.values()):
            setattr(self, name, None)

    # ------------------------------------------------------------------ compiled stages
    def _compile(self) -> None:
        """Put every call of ``options.compile_stages`` through torch.compile (compiled
        lazily, at each call's first shape) and open the compile cache."""
        o, warned = self.options, set()
        for stage in o.compile_stages:
            for name in COMPILED_CALLS[stage]:
                setattr(self, name, CompiledCall(stage, getattr(self, name), o.compile_mode, o.compile_backend, warned))
        self.compile_cache = CompileCache(o.compile_cache_dir or default_cache_dir())

    def compile_failures(self) -> dict[str, str]:
        """Compiled stages that fell back to eager: stage -> why."""
        calls = (getattr(self, name) for name in itertools.chain.from_iterable(COMPILED_CALLS.values()))
        return {c.stage: c.failed for c in calls if isinstance(c, CompiledCall) and c.failed is not None}

    def _call(self, stage: str, fn: Callable, *args):
        """``fn(*args)``. Under CUDA graphs ("reduce-overhead"), for a compiled stage: a new
        graph step first (the previous calls' outputs, all copied out, may be overwritten)
        and copies of the outputs, which the loop keeps across calls (residual stores, the
        bank cache, the reference latent; eps until it is added to the sums).

        A compiled stage gets its tensors dense (NCHW or NHWC): the loop hands it strided
        views (the permuted source image, a transposed slice of the latents), which eager
        kernels accept but a traced graph's group norm refuses ("Expected
        X.is_contiguous(memory_format)"), and each stride pattern would compile anew."""
        o = self.options
        if o.compile_mode is None or stage not in o.compile_stages:
            return fn(*args)
        args = tuple(dense(a) for a in args)
        if o.compile_mode != "reduce-overhead":
            return fn(*args)
        self._new_graph_step()
        return detached_from_graph(fn(*args))

    def compile_key(self, width: int, height: int, plan: "LoopPlan") -> CompileKey:
        """The compile cache key of a request at output ``width`` x ``height`` batched as
        ``plan``."""
        if self._fingerprint is None:
            self._fingerprint = architecture_fingerprint(self.models)
        o = self.options
        return CompileKey(**environment(self.device), dtype=str(self.dtype), mode=str(o.compile_mode),
                          backend=backend_name(o.compile_backend), options=o.graph_options(),
                          model_set=self._fingerprint, width=width, height=height,
                          windows_per_call=plan.windows_per_call, controlnet_chunk=plan.controlnet_chunk,
                          decode_chunk=plan.decode_chunk, controlnet_residuals=plan.controlnet_residuals,
                          embed_control_once=plan.embed_control_once, cfg_sequential=plan.cfg_sequential,
                          ff_chunk=plan.ff_chunk)

    def begin_request(self, width: int, height: int, plan: "RequestPlan") -> None:
        """The plan's lean UNet settings (:meth:`follow_plan`); compiling, the compile cache
        file of these shapes and this batching (loaded once per process)."""
        self.follow_plan(plan)
        if self.compile_cache is not None:
            self._compile_key = self.compile_key(width, height, plan.loop)
            self.compile_cache.load(self._compile_key)

    def end_request(self) -> None:
        """The options' own UNet settings again; compiling, what the request compiled that
        its cache file lacks is saved."""
        try:
            if self.compile_cache is not None and self._compile_key is not None:
                self.compile_cache.save(self._compile_key)
        finally:
            self._compile_key = None
            self._arithmetic = self.options.arithmetic


def dense(x):
    """``x`` itself when it is not a tensor or is dense in NCHW or NHWC order, else a
    contiguous copy (same values)."""
    if not isinstance(x, Tensor) or x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(
            memory_format=torch.channels_last)):
        return x
    return x.contiguous()


#: the attributes of :class:`TorchStages` each compile stage puts through torch.compile
COMPILED_CALLS = {
    "vae_encode": ("_encode",),
    "appearance_encoder": ("_appearance",),
    "controlnet_embed": ("_embed",),  # the conditioning embedding, once per request
    "controlnet": ("_controlnet", "_embedded"),
    "unet": ("_guided", "_forward"),
    "vae_decode": ("_decode",),
}


def architecture_fingerprint(models: ModelSet) -> str:
    """sha256 of a model set's architecture: every parameter's and buffer's name, shape,
    dtype and strides (channels_last changes them) and each model's config. Cheap (no
    weight is read) and what compiled graphs depend on: they take the weights as inputs."""
    h = hashlib.sha256()
    for name in ("vae", "appearance_encoder", "controlnet", "unet"):
        m = getattr(models, name)
        for key, t in itertools.chain(m.named_parameters(), m.named_buffers()):
            h.update(f"{name}.{key} {tuple(t.shape)} {t.dtype} {t.stride()}\n".encode())
    # diffusers' configs (dicts) without their bookkeeping keys ("_use_default_values" is a
    # set's order, different in every process)
    diffusers = [sorted((k, repr(v)) for k, v in c.items() if not k.startswith("_"))
                 for c in (models.vae.vae.config, models.controlnet.net.config)]
    ours = (models.appearance_encoder.config, models.unet.config, models.unet.motion_config)
    h.update(repr((diffusers, ours, tuple(models.text_embedding.shape))).encode())
    return h.hexdigest()
