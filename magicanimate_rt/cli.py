"""The ``magicanimate-rt`` command.

    magicanimate-rt animate --models DIR --source IMAGE --driving VIDEO --output OUT.mp4
    magicanimate-rt animate ... --driving PERSON.mp4 --densepose-weights model_final_162be9.pkl
    magicanimate-rt animate --engines DIR ... --driving PERSON.mp4 --person-video
    magicanimate-rt demo [--output OUT.mp4]
    magicanimate-rt warmup --models DIR --size S --frames N [--device cuda] [--compile-mode MODE]
    magicanimate-rt densepose VIDEO --weights model_final_162be9.pkl [--output OUT.mp4] [--size S]
    magicanimate-rt densepose VIDEO --engines DIR [--backend onnxruntime|torch|tensorrt] ...

Bad input ends with one line on stderr naming the file or argument, exit code 2, and no
output file (outputs are written to a temporary file and renamed when complete); Ctrl-C
ends with one line and exit code 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .command_line import OneLineParser, run_command
from .errors import InputError

PROG = "magicanimate-rt"
#: ``torch.compile`` modes the command line offers (runtime/compiled.py COMPILE_MODES; not
#: imported from there: usage errors and --help stay free of torch)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    """The models and the request's inputs, as ``animate`` and ``compare`` take them."""
    src = parser.add_argument_group("inputs")
    src.add_argument("--models", type=Path, help="model directory in the real layout (README 'Weights')")
    src.add_argument("--engines", type=Path, help="engine directory from build_engines.py (instead of --models)")
    src.add_argument("--source", type=Path, required=True, help="source image (any format PIL reads)")
    src.add_argument("--driving", type=Path, required=True, help="DensePose driving video (any format ffmpeg reads)")
    add_request_arguments(src, ("start_frame", "max_frames"))


def _add_densepose_weights(parser: argparse.ArgumentParser) -> None:
    """``animate --densepose-weights``: the driving video is a person video, made a DensePose clip first."""
    parser.add_argument("--densepose-weights", type=Path, default=None, metavar="FILE",
                        help="--driving is an ordinary video of a person: make its DensePose clip first with this "
                             "DensePose R-CNN checkpoint (model_final_162be9.pkl), at its own size and 25 fps, on "
                             "--device in --dtype, cached by content so a rerun skips it; --start-frame then counts "
                             "the person video's frames (README 'Driving videos from your own video')")
    parser.add_argument("--person-video", action="store_true",
                        help="--driving is an ordinary video of a person: make its DensePose clip first with the "
                             "DensePose stages of --engines (build_engines.py --densepose-weights), run by --backend "
                             "(implied by --densepose-weights, which uses that checkpoint instead)")


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    """Backend, device and dtype of the pipeline ``animate`` and ``compare`` load."""
    r = parser.add_argument_group("runtime")
    r.add_argument("--backend", default=None,
                   help="torch (default with --models) or onnxruntime (default with --engines)")
    r.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    r.add_argument("--dtype", default="float32", help="float32 (default), float16 (CUDA) or bfloat16")
    r.add_argument("--memory-gb", "--gpu-memory-gb", dest="memory_gb", type=float, default=None, metavar="G",
                   help="memory the request may use on its device, weights included: stages leave the GPU when "
                        "idle and the loop runs leaner until the plan fits (default: what the device has; "
                        "--gpu-memory-gb is the old name)")
    r.add_argument("--compile", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="torch backend: torch.compile the stages with this mode (default, reduce-overhead: CUDA "
                        "graphs, or max-autotune; off by default). The first request at a shape compiles (minutes) "
                        "and caches the result on disk; `magicanimate-rt warmup` fills that cache ahead of time")
    _add_compile_cache(r, "--compile-cache-dir")


def _add_compile_cache(group, cache_flag: str) -> None:
    """Where compiled artifacts live and which stages compile, as ``animate``, ``compare``
    and ``warmup`` take them (read by :func:`_compile_options`)."""
    group.add_argument(cache_flag, dest="compile_cache_dir", type=Path, default=None, metavar="DIR",
                       help="compile cache directory (default: compile/ under $MAGICANIMATE_RT_CACHE or "
                            "~/.cache/magicanimate-rt)")
    group.add_argument("--compile-stages", default=None, metavar="LIST",
                       help="comma-separated stages to compile, of vae_encode, appearance_encoder, controlnet_embed, "
                            "controlnet, unet, vae_decode (default: all)")


def _compile_options(mode, args):
    """The TorchOptions that compile with ``mode`` (None: eager, no options) and the
    ``--compile-stages`` / cache directory of ``args``."""
    if mode is None:
        if args.compile_stages is not None or args.compile_cache_dir is not None:
            raise InputError("--compile-stages and --compile-cache-dir need --compile MODE")
        return None
    from .runtime.backends.torch_backend import TorchOptions
    from .runtime.compiled import STAGES

    stages = STAGES
    if args.compile_stages is not None:
        stages = tuple(s.strip() for s in args.compile_stages.split(",") if s.strip())
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise InputError(f"--compile-stages: {'unknown stage ' + repr(unknown[0]) if unknown else 'no stage'}; "
                             f"choose from {', '.join(STAGES)}")
    cache = None if args.compile_cache_dir is None else str(args.compile_cache_dir)
    return TorchOptions(compile_mode=mode, compile_stages=stages, compile_cache_dir=cache)


def _backend_options(args):
    """``--compile``'s TorchOptions (None without it); an error line when it is given for an
    engine backend, which runs prebuilt engines."""
    if args.compile is not None and (args.engines is not None or (args.backend or "torch") != "torch"):
        raise InputError("--compile is for the torch backend (--models); engine backends run prebuilt engines")
    return _compile_options(args.compile, args)


def add_request_arguments(group, names) -> None:
    """A flag for each of the request fields ``names``, declared from the field
    (``runtime/request.py``): its flag (``--<field>``, or the field's own), type, choices,
    default and help, which ends with the default (``(default ...)``). The parsed value is
    at the field's name; :func:`_request` makes the request of them."""
    from .runtime.request import default_text, settings_fields

    declared = {f.name: f for f in settings_fields()}
    for name in names:
        f = declared[name]
        meta = f.metadata
        flag = meta["flag"] or "--" + name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, dest=name, action="store_true", default=f.default, help=meta["help"])
            continue
        kind = int if "int" in f.type else float if "float" in f.type else str
        # choices are the request's to check (its words on every surface), not argparse's
        group.add_argument(flag, dest=name, type=kind, default=f.default,
                           metavar=None if meta["choices"] is None else "{" + ",".join(meta["choices"]) + "}",
                           help=f"{meta['help']} (default {default_text(f)})")


#: the request's fields each surface that animates takes as flags (``--grid`` is a file there)
SHAPE_FIELDS = ("size", "width", "height", "fit", "crop_output")
SAMPLING_FIELDS = ("steps", "guidance_scale", "seed")
MODE_FIELDS = ("preset", "sampler", "cache_interval", "cache_depth", "guidance_until")


def _request(args, **inputs):
    """The :class:`~.runtime.request.AnimationRequest` of the parsed flags (those a command
    has; the others keep their defaults). Shape errors name the flags (--size, ...)."""
    from .engines.specs import output_shape
    from .runtime.request import AnimationRequest, settings_fields

    output_shape(args.size, args.width, args.height, names=("--size", "--width", "--height"))
    given = {f.name: getattr(args, f.name) for f in settings_fields() if f.metadata["cli"] and hasattr(args, f.name)}
    return AnimationRequest(**inputs, **given)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Fast, faithful MagicAnimate: one photo + a DensePose motion video -> an animation.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    a = sub.add_parser("animate", help="animate a source image with a DensePose driving video")
    _add_inputs(a)
    _add_densepose_weights(a)
    out = a.add_argument_group("outputs")
    out.add_argument("--output", type=Path, required=True, help="animation, H.264 mp4 at 25 fps")
    out.add_argument("--grid", type=Path, help="also write the original's [source | driving | result] grid video")
    add_request_arguments(a.add_argument_group("shape and sampling"), SHAPE_FIELDS + SAMPLING_FIELDS)
    add_request_arguments(a.add_argument_group("faster, approximately (README 'Faster, approximately'; off by "
                                               "default: the original's function)"), MODE_FIELDS)
    _add_runtime(a)
    a.set_defaults(func=cmd_animate)

    d = sub.add_parser("demo", help="run the whole pipeline on generated inputs and a tiny random model set")
    d.add_argument("--output", type=Path, default=Path("magicanimate-demo.mp4"), help="where to write the mp4")
    d.add_argument("--frames", type=int, default=48, help="driving frames to generate (default 48, ~2 s)")
    d.add_argument("--steps", type=int, default=6, help="DDIM steps (default 6)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("batch", help="run a config of the original's configs/prompts/animation.yaml format "
                                     "(README 'Config runs')")
    b.add_argument("config", type=Path, help="the YAML config: source_image and video_path lists, seed, steps, ...")
    b.add_argument("--models", type=Path, help="model directory in the real layout (README 'Weights'); "
                                               "replaces the config's pretrained_* and motion_module paths")
    b.add_argument("--output-dir", type=Path, default=None,
                   help="where the run's folder goes (default samples/, as the original)")
    b.add_argument("--backend", default="torch", help="torch (default)")
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    b.add_argument("--dtype", default="float32", help="float32 (default), float16 (CUDA) or bfloat16")
    b.set_defaults(func=cmd_batch)

    v = sub.add_parser("serve", help="the HTTP service: warm models, a job queue, progress events and a web page "
                                     "(README 'Serving'; needs pip install -e \".[serve]\")")
    from .serve.settings import add_arguments as add_serve_arguments  # (the one declaration; imports nothing heavy)

    add_serve_arguments(v)
    v.set_defaults(func=cmd_serve)

    w = sub.add_parser("warmup", help="compile the torch stages for one request shape and save them in the compile "
                                      "cache, so later processes at that shape start warm")
    w.add_argument("--models", type=Path, required=True, help="model directory in the real layout (README 'Weights')")
    add_request_arguments(w, ("size", "width", "height"))
    w.add_argument("--frames", type=int, default=16,
                   help="driving frames of the requests to warm up for (default 16): with the shape they set the "
                        "plan, whose batches are the compiled shapes")
    w.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    w.add_argument("--dtype", default="float32", help="float32 (default), float16 (CUDA) or bfloat16")
    w.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile mode: default (default), reduce-overhead (CUDA graphs) or max-autotune; the "
                        "same as the requests' --compile")
    w.add_argument("--memory-gb", "--gpu-memory-gb", dest="memory_gb", type=float, default=None, metavar="G",
                   help="the requests' --memory-gb, when they give one (it sets their plan, so the compiled "
                        "shapes)")
    _add_compile_cache(w, "--cache-dir")
    w.set_defaults(func=cmd_warmup)

    c = sub.add_parser("check-models", help="check a downloaded models directory from its headers, loading no "
                                            "weights (README 'Weights'), and/or a DensePose checkpoint")
    c.add_argument("models", type=Path, nargs="?", default=None,
                   help="model directory in the real layout (README 'Weights')")
    c.add_argument("--densepose-weights", type=Path, default=None, metavar="FILE",
                   help="also (or only) check a DensePose R-CNN checkpoint (model_final_162be9.pkl or a detectron2 "
                        ".pth): read safely, its arrays counted (README 'Driving videos from your own video')")
    c.set_defaults(func=cmd_check_models)

    _add_densepose_parser(sub)

    k = sub.add_parser("compare", help="render one request exact and with other sampling settings on your weights: "
                                       "a side-by-side video and a time / PSNR / SSIM / flicker report (README "
                                       "'Judging a mode on your weights'; needs pip install -e \".[compare]\")")
    _add_inputs(k)
    out = k.add_argument_group("outputs")
    out.add_argument("--output-dir", type=Path, required=True,
                     help="gets exact.mp4, other.mp4, side_by_side.mp4 ([exact | other | 4x difference]), "
                          "compare.json and compare.md (created if missing; its parent must exist)")
    s = k.add_argument_group("the request (--steps: the exact render's)")
    add_request_arguments(s, ("size", "width", "height") + SAMPLING_FIELDS)
    s.add_argument("--other-steps", type=int, default=None,
                   help="steps of the other render (default: its preset's, else --steps)")
    s.add_argument("--no-warmup", action="store_true",
                   help="skip the short untimed render of each mode before the timed ones (then the exact "
                        "render, first, also pays one-time start-up costs)")
    add_request_arguments(k.add_argument_group("the other settings (README 'Faster, approximately'; give a preset "
                                               "and/or knobs)"), MODE_FIELDS)
    _add_runtime(k)
    k.set_defaults(func=cmd_compare)
    return p


def _check_output(path: Path, what: str) -> Path:
    if path.suffix.lower() != ".mp4":
        raise InputError(f"{what} {path}: the output must be an .mp4 file")
    if not path.parent.is_dir():
        raise InputError(f"{what} {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path}: is a directory")
    return path


def _log(msg: str) -> None:
    # progress notes go to stdout; stderr carries the progress bar and, on failure, the
    # one error line. Under torchrun only rank 0 speaks (every rank prints its own error).
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)


def _run(pipe, request, output: Path, grid: Path | None, box=None):
    """Animate and write the mp4 (and the grid) with the progress bar and notes (render.py)."""
    from .render import animate_to_files

    return animate_to_files(pipe, request, output, grid, box, log=_log)


def _check_model_dirs(args) -> None:
    """Exactly one of --models / --engines, and an existing directory."""
    if (args.models is None) == (args.engines is None):
        raise InputError("give exactly one of --models DIR or --engines DIR")
    if args.models is not None and not args.models.is_dir():
        raise InputError(f"--models {args.models}: directory not found")
    if args.engines is not None and not args.engines.is_dir():
        raise InputError(f"--engines {args.engines}: directory not found")


def _load_pipeline(args, backend_options=None):
    """The pipeline of --models or --engines (checked by :func:`_check_model_dirs`);
    ``backend_options``: the torch backend's (:func:`_backend_options`)."""
    from .runtime.pipeline import AnimationPipeline, PipelineOptions

    options = PipelineOptions(memory_gb=args.memory_gb)  # checked before anything loads
    if args.models is not None:
        _log(f"loading models from {args.models} ...")
        return AnimationPipeline.from_pretrained(args.models, backend=args.backend or "torch", device=args.device,
                                                 dtype=args.dtype, options=options, backend_options=backend_options)
    _log(f"loading engines from {args.engines} ...")
    return AnimationPipeline.from_engines(args.engines, backend=args.backend or "onnxruntime", device=args.device,
                                          options=options)


def cmd_animate(args) -> int:
    request = _request(args, source=args.source, driving=args.driving)
    shape = request.shape
    _check_model_dirs(args)
    backend_options = _backend_options(args)
    _check_output(args.output, "--output")
    if args.grid is not None:
        _check_output(args.grid, "--grid")
        if args.grid.resolve() == args.output.resolve():
            raise InputError("--grid must differ from --output")
    if args.densepose_weights is not None or args.person_video:  # the DensePose clip, before any animation model loads
        request = _densepose_driving(args, request)
    # read the inputs before loading any model, so bad input fails fast
    request, box = request.read_inputs_and_box()
    box = request.crop_box(box)

    t0 = time.perf_counter()
    pipe = _load_pipeline(args, backend_options)
    with pipe:
        writer = pipe.writes_outputs  # rank 0 of a torchrun job (or the only process)
        if writer:
            _log(f"loaded in {time.perf_counter() - t0:.1f} s")
        result = _run(pipe, request, args.output, args.grid, box)
    if writer:
        _log(f"wrote {args.output}" + (f" and {args.grid}" if args.grid else "") +
             f" ({request.driving.shape[0]} frames, {result.timings['total']:.1f} s)")
    return 0


def _densepose_driving(args, request):
    """The request driven by the cached DensePose clip of the person video ``--driving``
    (densepose/prepare.py): prepared from ``--start-frame`` for ``--max-frames`` frames, which the
    clip then holds whole."""
    from .densepose.prepare import cached_driving_video, person_video_settings

    engines = None
    if args.densepose_weights is None:
        if args.engines is None:
            raise InputError("--person-video needs --engines DIR (with the DensePose stages) or --densepose-weights FILE")
        engines = args.engines
    clip = cached_driving_video(args.driving, args.densepose_weights,
                                person_video_settings(request.start_frame, request.max_frames),
                                device=args.device, dtype=args.dtype, progress=True, log=_log,
                                engines=engines, backend=args.backend or "onnxruntime")
    return replace(request, driving=clip, start_frame=0, max_frames=None)


def cmd_demo(args) -> int:
    from . import demo
    from .runtime.pipeline import AnimationPipeline
    from .runtime.request import AnimationRequest

    size = 128
    request = AnimationRequest(size=size, steps=args.steps)  # checks --steps
    if args.frames < 1:
        raise InputError(f"--frames must be >= 1, got {args.frames}")
    _check_output(args.output, "--output")
    t0 = time.perf_counter()
    models = demo.demo_models()
    _log(f"tiny random model set: {models}")
    request = replace(request, source=demo.source_image(size), driving=demo.driving_clip(args.frames, size))
    grid = args.output.with_name(args.output.stem + "-grid.mp4")
    with AnimationPipeline.from_pretrained(models) as pipe:
        _run(pipe, request, args.output, grid)
    print(f"demo animation: {args.output.resolve()}")
    print(f"side by side [source | driving | result]: {grid.resolve()}")
    print(f"({time.perf_counter() - t0:.0f} s.) The demo's weights are random, so the video shows the pipeline "
          "running, not a person: put real weights in with `magicanimate-rt animate --models DIR ...` "
          "(README 'Weights').")
    return 0


def cmd_warmup(args) -> int:
    """Load the models compiled, run one short request on generated inputs at the given
    shape and frame count (1 step with guidance: every compiled call, at the shapes of the
    plan real requests of that shape and length get) and save the compile cache. Prints a
    line per phase."""
    from . import demo
    from .runtime.compiled import graph_cache_counts
    from .runtime.pipeline import AnimationPipeline, PipelineOptions

    # 1 step with guidance: every compiled call, at the shapes of the plan of this shape
    request = replace(_request(args), steps=1)
    width, height = request.shape
    if args.frames < 1:
        raise InputError(f"--frames must be >= 1, got {args.frames}")
    if not args.models.is_dir():
        raise InputError(f"--models {args.models}: directory not found")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("warmup runs in one process, not under torchrun")
    options = _compile_options(args.compile_mode, args)
    planning = PipelineOptions(memory_gb=args.memory_gb)
    t0 = time.perf_counter()
    pipe = AnimationPipeline.from_pretrained(args.models, device=args.device, dtype=args.dtype,
                                             backend_options=options, options=planning)
    with pipe:
        cache = pipe.stages.compile_cache
        _log(f"loaded {args.models} in {time.perf_counter() - t0:.1f} s (compile mode {args.compile_mode}, "
             f"cache {cache.directory})")
        request = replace(request, source=demo.source_image(width, height),
                          driving=demo.driving_clip(args.frames, width, height))
        t1 = time.perf_counter()
        result = pipe.run(request)
        for path, count in cache.loaded.items():
            _log(f"loaded {count} compile artifacts from {path}")
        p, graphs = result.plan, graph_cache_counts()
        _log(f"compiled and ran one {width}x{height} request of {args.frames} frames in "
             f"{time.perf_counter() - t1:.1f} s ({graphs.get('miss', '?')} graph(s) compiled, "
             f"{graphs.get('hit', '?')} from the cache; plan: {p.describe()}, ControlNet {p.loop.controlnet_chunk} "
             f"frames per call)")
        for stage, why in pipe.stages.compile_failures().items():
            _log(f"{PROG}: warning: the {stage} stage did not compile and runs eager ({why[:200]})")
        for path, size in cache.saved.items():
            _log(f"wrote compile cache {path} ({size} bytes)")
        if not cache.saved:
            _log(f"compile cache up to date in {cache.directory} (nothing new to write)")
    return 0


def cmd_batch(args) -> int:
    from .config_run import load_batch, prepare_person_videos, run_batch
    from .runtime.pipeline import AnimationPipeline

    # the whole config is checked (keys, files, model layout) before any model is loaded
    batch = load_batch(args.config, models=args.models, output_dir=args.output_dir, backend=args.backend)
    for warning in batch.warnings:
        _log(f"{PROG}: warning: {warning}")
    # video_type "video": the person videos' DensePose clips, before the animation models load
    batch = prepare_person_videos(batch, device=args.device, dtype=args.dtype, log=_log)
    t0 = time.perf_counter()
    _log(f"{len(batch.pairs)} pair(s) from {args.config}; loading models from {batch.models} ...")
    with AnimationPipeline.from_pretrained(batch.models, backend=args.backend, device=args.device,
                                           dtype=args.dtype) as pipe:
        if pipe.writes_outputs:
            _log(f"loaded in {time.perf_counter() - t0:.1f} s; writing {batch.output}")
        return run_batch(batch, pipe, log=_log, prog=PROG)


def cmd_serve(args) -> int:
    """Check every flag (one line, exit 2, before binding a port), then serve until SIGTERM."""
    try:
        from .serve.server import serve
        from .serve.settings import RAY, RayOptions, declared, from_given
    except ImportError as e:
        raise InputError(f"serve needs the service's packages ({e.name} is missing): pip install -e \".[serve]\"") \
            from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("serve runs in one process; give it several devices with --devices, not torchrun")
    given = dict(vars(args))
    if args.ray and args.devices is not None:
        raise InputError("--ray runs one pipeline per replica and Ray places them: give --replicas N (and "
                         "--gpus-per-replica), not --devices")
    for _, d in declared(RayOptions):
        if d.group == RAY and d.flag is not None and given.get(d.key) is not None and not args.ray:
            raise InputError(f"{d.flag} is for a fleet on Ray Serve: add --ray")
    if args.devices is None and args.device is not None and not args.ray:
        given["devices"] = tuple(d.strip() for d in args.device.split(",") if d.strip())
    settings, ray_options = from_given(given)
    settings = settings.check()
    if args.models is not None:
        from .models.loading import check_model_set

        ok, lines = check_model_set(args.models)
        if not ok:
            print("\n".join(lines), file=sys.stderr)
            raise InputError(f"--models {args.models}: the models would not load (problems above)")
    if args.ray:
        return _serve_on_ray(args, settings, ray_options)
    return serve(settings, log_level=args.log_level)


def _serve_on_ray(args, settings, ray_options: dict) -> int:
    """``serve --ray``: the same settings, on a Ray Serve ingress and worker replicas (what each
    replica reserves: ``RayOptions``, as for ``serve run``)."""
    try:
        from .serve.ray_app import RayOptions, serve_on_ray
    except ImportError as e:
        raise InputError(f"serve --ray needs Ray Serve ({e.name} is missing): pip install -e \".[serve,ray]\"") \
            from None
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise InputError("give either --replicas N (a fixed fleet) or --min-replicas and --max-replicas (autoscaling)")
    if args.dashboard_port is not None and args.address is not None:
        raise InputError("--dashboard-port is for the local cluster serve --ray starts; a joined cluster (--address) "
                         "has its own dashboard")
    # the command line's device is cpu unless --device says cuda (GPUs alone do not imply it here)
    options = RayOptions(**dict(ray_options, device=args.device or "cpu")).check()
    return serve_on_ray(settings, options, log_level=args.log_level)


def cmd_check_models(args) -> int:
    """Print, per component, the file loading would read and why, its dtype, key count and
    size, the choices (what the motion checkpoint overrides, sd-vae-ft-mse, ...) and every
    problem loading would raise; exit 0 when the set would load, 2 otherwise. Headers only:
    no weights are read. ``--densepose-weights``: the DensePose checkpoint is read (safely)
    and described, or its problem printed."""
    from .command_line import fail

    if args.models is None and args.densepose_weights is None:
        raise InputError("give a models directory, --densepose-weights FILE, or both")
    problems = []
    if args.models is not None:
        from .models.loading import model_set_report, problems_summary

        ok, lines, found = model_set_report(args.models)
        print("\n".join(lines), flush=True)
        if not ok:  # the error line names the problem itself: stdout (the report) may be redirected
            problems.append(f"{args.models}: the models would not load: {problems_summary(found)}")
    if args.densepose_weights is not None:
        ok, line = _check_densepose_weights(args.densepose_weights)
        print(line, flush=True)
        if not ok:
            problems.append(f"{args.densepose_weights}: the DensePose weights would not load: "
                            f"{line.split('problem: ', 1)[-1]}")
    return fail(PROG, "; ".join(problems)) if problems else 0


def _check_densepose_weights(path: Path) -> tuple[bool, str]:
    """(usable, one line describing the DensePose checkpoint or its problem), for check-models."""
    from .densepose.model import resnet_depth, validate_state_dict
    from .densepose.weights import CheckpointError, read_checkpoint

    try:
        state = read_checkpoint(path)
        depth = resnet_depth(validate_state_dict(state, path)[1])
    except CheckpointError as e:
        return False, f"densepose weights: problem: {e}"
    values = sum(int(v.size) for v in state.values())
    dtypes = ", ".join(sorted({str(v.dtype) for v in state.values()}))
    return True, (f"densepose weights: {path}: DensePose R-CNN {depth} FPN, {len(state)} arrays, {values:,} values "
                  f"({dtypes})")


# --------------------------------------------------------------------------- densepose


def _add_densepose_parser(sub) -> None:
    e = sub.add_parser("densepose", help="make the DensePose driving video of an ordinary video of a person "
                                         "(README 'Driving videos from your own video')")
    e.add_argument("video", type=Path, help="the person video (any format ffmpeg reads)")
    e.add_argument("--weights", type=Path, default=None, metavar="FILE",
                   help="DensePose R-CNN checkpoint: detectron2's model_final_162be9.pkl (densepose_rcnn_R_50_FPN_s1x) "
                        "or a detectron2 .pth (this or --engines)")
    e.add_argument("--engines", type=Path, default=None, metavar="DIR",
                   help="an engine directory with the DensePose stages (build_engines.py --densepose-weights), "
                        "instead of --weights")
    e.add_argument("--backend", default="onnxruntime",
                   help="with --engines: what runs its stages, onnxruntime (default), torch, or tensorrt "
                        "(--device cuda; plans built by python -m magicanimate_rt.plans DIR)")
    e.add_argument("--output", type=Path, default=None,
                   help="the driving video, H.264 mp4 (default: VIDEO's name with -densepose.mp4)")
    e.add_argument("--size", type=int, default=None, help="output side of a square video (default: the input's own "
                                                          "size, as vid2densepose)")
    e.add_argument("--width", type=int, default=None, help="output width, with --height, instead of --size")
    e.add_argument("--height", type=int, default=None, help="output height, with --width")
    e.add_argument("--fit", choices=("crop", "pad", "stretch"), default="crop",
                   help="with a size: inputs of another aspect ratio are cropped to their centre (default), padded "
                        "with edge values or stretched, then resized, before estimation")
    e.add_argument("--fps", type=float, default=25.0,
                   help="output frame rate; frames are picked by nearest timestamp (default 25, the original's)")
    e.add_argument("--start-frame", type=_positive_int, default=0, help="input frames to skip (default 0)")
    e.add_argument("--max-frames", type=int, default=None, help="write at most this many frames")
    e.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    e.add_argument("--dtype", default="float32", help="float32 (default); float16 or bfloat16 on CUDA")
    e.add_argument("--batch", type=int, default=4, help="frames per forward pass (default 4)")
    e.add_argument("--save-iuv", type=Path, default=None, metavar="OUT.npz",
                   help="also save every frame's detections (boxes, scores, part labels, UV) in an .npz")
    e.set_defaults(func=cmd_densepose)


def _densepose_size(args):
    """None (the input's size), --size, or (--width, --height)."""
    if args.size is not None and (args.width is not None or args.height is not None):
        raise InputError("give either --size or --width and --height, not both")
    if (args.width is None) != (args.height is None):
        raise InputError("--width and --height go together")
    return args.size if args.width is None else (args.width, args.height)


def cmd_densepose(args) -> int:
    """Check every argument, the video (it opens and has a frame) and the weights (read safely: a
    DensePose R-CNN) before the model is built, then stream the video through it (densepose/video.py)."""
    from .densepose.video import PrepareSettings, prepare_driving_video
    from .densepose.model import resnet_depth, validate_state_dict
    from .densepose.weights import read_checkpoint
    from .runtime.media import iter_video_frames

    if (args.weights is None) == (args.engines is None):
        raise InputError("densepose needs --weights FILE or --engines DIR (one of them)")
    if args.engines is not None and args.dtype != "float32":
        raise InputError(f"--dtype {args.dtype}: with --engines the graphs' own precision is used "
                         "(build_engines.py --densepose-precision)")
    settings = PrepareSettings(size=_densepose_size(args), fit=args.fit, fps=args.fps, start_frame=args.start_frame,
                               max_frames=args.max_frames, batch=args.batch).check(flags=True)
    output = args.output if args.output is not None else args.video.with_name(args.video.stem + "-densepose.mp4")
    _check_output(output, "--output")
    if output.resolve() == args.video.resolve():
        raise InputError(f"--output {output}: would overwrite the input video")
    if args.save_iuv is not None:
        if args.save_iuv.suffix.lower() != ".npz":
            raise InputError(f"--save-iuv {args.save_iuv}: must be an .npz file")
        if not args.save_iuv.parent.is_dir():
            raise InputError(f"--save-iuv {args.save_iuv}: directory {args.save_iuv.parent} does not exist")
    frames = iter_video_frames(args.video, start_frame=args.start_frame, max_frames=1)
    next(frames)  # a non-video or a video with no frame fails here, in one line
    frames.close()
    t0 = time.perf_counter()
    from .densepose.estimator import DensePoseEstimator

    if args.engines is not None:
        estimator = DensePoseEstimator.from_engines(args.engines, backend=args.backend, device=args.device)
        _log(f"loaded the DensePose stages of {args.engines} ({args.backend}) in {time.perf_counter() - t0:.1f} s")
    else:
        state = read_checkpoint(args.weights)  # read once; checked against the model before it is built
        depth = resnet_depth(validate_state_dict(state, args.weights)[1])
        estimator = DensePoseEstimator.from_state_dict(state, args.weights, device=args.device, dtype=args.dtype)
        _log(f"loaded DensePose R-CNN {depth} FPN from {args.weights} in {time.perf_counter() - t0:.1f} s")
    summary = prepare_driving_video(args.video, output, estimator, settings, save_iuv=args.save_iuv, progress=True)
    _log(f"wrote {output}" + (f" and {args.save_iuv}" if args.save_iuv else "") + f": {summary.describe()}")
    return 0


def _compare_request(args):
    """The request of ``compare``, its preset and knobs the other settings (as ``animate``
    reads them); neither ``--preset`` nor any knob given is an error: there would be nothing
    to compare."""
    request = _request(args, source=args.source, driving=args.driving)
    if all(getattr(args, k) is None for k in MODE_FIELDS):
        raise InputError("compare needs the settings to compare with exact: --preset NAME, or any of --sampler, "
                         "--cache-interval, --cache-depth, --guidance-until")
    return request


def cmd_compare(args) -> int:
    """Render the request exact and with the other settings, write the videos and the report
    into --output-dir (compare.py) and print the table. Every argument and input is checked
    before a model loads."""
    from .compare import compare, require_scikit_image, summary_table

    require_scikit_image()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("compare runs in one process, not under torchrun")
    request = _compare_request(args)
    shape = request.shape
    if args.other_steps is not None and args.other_steps < 1:
        raise InputError(f"--other-steps must be >= 1, got {args.other_steps}")
    _check_model_dirs(args)
    backend_options = _backend_options(args)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise InputError(f"--output-dir {args.output_dir}: is not a directory")
    if not args.output_dir.parent.is_dir():
        raise InputError(f"--output-dir {args.output_dir}: directory {args.output_dir.parent} does not exist")
    request = request.read_inputs()

    t0 = time.perf_counter()
    pipe = _load_pipeline(args, backend_options)
    inputs = {"source": str(args.source), "driving": str(args.driving), "start_frame": args.start_frame}
    with pipe:
        _log(f"loaded in {time.perf_counter() - t0:.1f} s; {request.driving.shape[0]} frames at "
             f"{shape[0]}x{shape[1]}")
        report = compare(pipe, request, args.output_dir, other_steps=args.other_steps, warmup=not args.no_warmup,
                         progress=True, inputs=inputs, log=_log).report
    print(summary_table(report))
    print(f"\n{report['note']}\nwrote exact.mp4, other.mp4, side_by_side.mp4, compare.json and compare.md "
          f"into {args.output_dir}", flush=True)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
