"""What ``magicanimate-rt serve`` is told: models, devices, limits, storage, the key, and
the fleet's layout on Ray Serve. Declared once, here.

Each setting is a field of :class:`ServeSettings` (the service) or :class:`RayOptions` (the
fleet) with its default, and its :func:`setting` metadata: the help line, the command
line's flag, the key ``serve run magicanimate_rt.serve.ray_app:app key=value`` and a Serve
config file's ``args:`` take (``deploy/ray-serve.yaml``), how a given value is read and
its bounds. From that one declaration come the ``serve`` subcommand's flags
(:func:`add_arguments`, defaults in ``--help`` read from the fields), the keys Ray's
application builder accepts (:data:`RAY_ARGS`) and how either's values become the two
objects (:func:`from_given`). What each replica reserves on Ray is derived once, in
:class:`RayOptions`, whichever of the two made it.

Checked here once, before the server binds a port: every problem is one line naming the
flag (``InputError``), and the command exits 2.

Imports nothing heavy (``--help`` builds the flags from here).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..errors import InputError

#: the argument groups of ``magicanimate-rt serve --help``, in order
MODELS, NETWORK, LIMITS = "models", "network", "storage and limits"
RAY = "a fleet on Ray Serve (docs/ray-serve.md; needs pip install -e \".[ray]\")"


@dataclass(frozen=True)
class Declared:
    """How one setting is given (see :func:`setting`)."""

    help: str
    group: str
    flag: Optional[str]  #: the command line's flag; None: not on the command line
    key: str  #: the argparse dest and the Ray argument's name
    ray: bool  #: whether ``serve run``'s args (and a config file's) take it
    parse: Callable[[Any], Any]  #: a flag's text or an arg's value -> the given value
    to_field: Optional[Callable[[Any], Any]]  #: the given value -> the field's value
    low: Optional[float]  #: the least value (inclusive)
    above: Optional[float]  #: the value must be greater than this
    high: Optional[float]  #: the greatest value (inclusive)
    metavar: Optional[str]
    show_default: bool
    alias: Optional[str] = None  #: an old key (and its flag) that still gives this setting

    @property
    def flags(self) -> tuple[str, ...]:
        """The command line's flags: its own, then the old name's."""
        return (self.flag,) + (("--" + self.alias.replace("_", "-"),) if self.alias else ())


def setting(default: Any, help: str, group: str, *, flag: Optional[str] = "", key: str = "", ray: bool = True,
            parse: Callable[[Any], Any] = str, to_field: Optional[Callable[[Any], Any]] = None,
            low: Optional[float] = None, above: Optional[float] = None, high: Optional[float] = None,
            metavar: Optional[str] = None, show_default: bool = True, repr: bool = True,
            alias: Optional[str] = None):
    """A dataclass field with its declaration. ``flag`` "" is ``--<field name with dashes>``;
    ``key`` "" is the field's name (give another when the given value is not the field's
    own, e.g. ``api_key_file`` for ``api_key``); ``parse`` reads a flag's text or an arg's value;
    ``to_field`` turns the given value into the field's (e.g. reads the key file). ``help``
    gets "(default X)" appended from ``default`` unless that is None or ``show_default`` is off.
    ``alias``: an old name of the setting, still taken as a key and (with dashes) a flag."""
    declared = dict(help=help, group=group, flag=flag, key=key, ray=ray, parse=parse, to_field=to_field, low=low,
                    above=above, high=high, metavar=metavar, show_default=show_default, alias=alias)
    return field(default=default, repr=repr, metadata={"declared": declared})


def declared(cls) -> list[tuple[dataclasses.Field, Declared]]:
    """The declared fields of ``cls`` (ServeSettings or RayOptions) in order, names filled in."""
    out = []
    for f in dataclasses.fields(cls):
        d = f.metadata.get("declared")
        if d is None:
            continue
        flag = d["flag"] if d["flag"] != "" else "--" + f.name.replace("_", "-")
        out.append((f, Declared(**dict(d, flag=flag, key=d["key"] or f.name))))
    return out


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_bounds(obj) -> None:
    """The declared bounds of ``obj``'s fields: one line naming the flag (or the key) for the first outside."""
    for f, d in declared(type(obj)):
        value = getattr(obj, f.name)
        if value is None or isinstance(value, (str, Path, tuple)):
            continue
        name = d.flag or d.key
        if d.low is not None and d.high is not None and not d.low <= value <= d.high:
            raise InputError(f"{name} must be in {_number(d.low)}..{_number(d.high)}, got {_number(value)}")
        if d.low is not None and value < d.low:
            raise InputError(f"{name} must be >= {_number(d.low)}, got {_number(value)}")
        if d.above is not None and not value > d.above:
            raise InputError(f"{name} must be > {_number(d.above)}, got {_number(value)}")
        if d.high is not None and value > d.high:
            raise InputError(f"{name} must be <= {_number(d.high)}, got {_number(value)}")


def _devices(text: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in text.split(",") if d.strip())


def read_api_key(path: Path) -> str:
    """The key in ``path`` (its first line, stripped); InputError if unreadable, empty or short."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"--api-key-file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InputError(f"--api-key-file {path}: not UTF-8 text") from None
    lines = text.strip().splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < 16:
        raise InputError(f"--api-key-file {path}: the key must be at least 16 characters on the first line")
    return key


def _check_densepose_weights(path: Path) -> None:
    """InputError naming --densepose-weights unless ``path`` is a DensePose R-CNN checkpoint that
    loads (read safely and checked against the model, as ``check-models --densepose-weights``)."""
    from ..densepose.model import validate_state_dict
    from ..densepose.weights import CheckpointError, read_checkpoint

    try:
        validate_state_dict(read_checkpoint(path), path)
    except CheckpointError as e:
        raise InputError(f"--densepose-weights: {e}") from None


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings; each field's help is its declaration below (``--help`` shows it)."""

    models: Optional[Path] = setting(None, "model directory in the real layout (README 'Weights')", MODELS,
                                     parse=Path)
    engines: Optional[Path] = setting(None, "engine directory from build_engines.py (instead of --models)", MODELS,
                                      parse=Path)
    backend: Optional[str] = setting(None, "the stage backend: torch (default with --models) or onnxruntime "
                                           "(default with --engines)", MODELS)
    devices: tuple[str, ...] = setting(("cpu",), "one worker per device, each with its own warm pipeline, "
                                                 "comma-separated (e.g. cuda:0,cuda:1 or cpu,cpu); overrides --device",
                                       MODELS, ray=False, parse=_devices, show_default=False)
    dtype: str = setting("float32", "the stages' dtype: float32, float16 (CUDA) or bfloat16 (--models only)", MODELS)
    memory_gb: Optional[float] = setting(
        None, "memory each worker's requests may use on its device, weights included (runtime/planner.py; "
              "default: what the device has; --gpu-memory-gb is the old name)", MODELS, parse=float, metavar="G",
        alias="gpu_memory_gb")
    densepose_weights: Optional[Path] = setting(
        None, "DensePose R-CNN checkpoint (detectron2's model_final_162be9.pkl, README 'Driving videos from your own "
              "video'): jobs may then upload an ordinary video of a person (driving_kind=person), made a DensePose "
              "clip first; checked at start-up", MODELS, parse=Path, metavar="FILE")
    host: str = setting("127.0.0.1", "address to bind; any but a loopback one needs --api-key-file", NETWORK,
                        ray=False)
    port: int = setting(8000, "port", NETWORK, ray=False, parse=int, low=1, high=65535)
    api_key: Optional[str] = setting(
        None, "file whose first line is the key every request but /healthz and the page's static files must send "
              "as 'Authorization: Bearer <key>'", NETWORK, flag="--api-key-file", key="api_key_file", parse=Path,
        to_field=read_api_key, repr=False)
    data_dir: Path = setting(Path("magicanimate-data"), "uploads, the SQLite job store and the results", LIMITS,
                             parse=Path)
    max_queue: int = setting(16, "jobs that may wait (running ones not counted); more get 429", LIMITS, parse=int,
                             low=0)
    max_upload_mb: float = setting(200.0, "the largest request body in MiB; more get 413", LIMITS, parse=float,
                                   above=0)
    max_frames: int = setting(1024, "driving frames a job may animate", LIMITS, parse=int, low=1)
    max_steps: int = setting(100, "the largest steps a job may ask for; more get 422", LIMITS, parse=int, low=1)
    max_side: int = setting(1024, "the largest output width or height in px a job may ask for; more get 422", LIMITS,
                            parse=int, low=64)
    keep_hours: float = setting(24.0, "finished jobs, their results and unused references older than this many "
                                      "hours are deleted", LIMITS, parse=float, above=0)
    shutdown_grace_s: float = setting(0.0, "on SIGTERM, seconds running jobs may go on before they are cancelled "
                                           "at their next step boundary", LIMITS, flag="--shutdown-grace",
                                      parse=float, low=0)
    examples_dir: Optional[Path] = setting(None, "images and videos the page offers as examples, besides the "
                                                 "built-in one", LIMITS, parse=Path)

    @property
    def backend_name(self) -> str:
        return self.backend or ("torch" if self.models is not None else "onnxruntime")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def pipeline_options(self):
        """The options each worker's pipeline loads with (where ``memory_gb`` is checked)."""
        from ..runtime.pipeline import PipelineOptions

        return PipelineOptions(memory_gb=self.memory_gb)

    def check(self) -> "ServeSettings":
        """Raise InputError naming the first bad flag."""
        from ..engines.specs import MAX_SIZE  # (here: --help stays free of numpy)

        if (self.models is None) == (self.engines is None):
            raise InputError("give exactly one of --models DIR or --engines DIR")
        where = self.models if self.models is not None else self.engines
        flag = "--models" if self.models is not None else "--engines"
        if not Path(where).is_dir():
            raise InputError(f"{flag} {where}: directory not found")
        if not self.devices:
            raise InputError("--devices: give at least one device")
        self.pipeline_options()
        for d in self.devices:
            if d != "cpu" and not (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
                raise InputError(f"--devices: {d!r} is not cpu, cuda or cuda:N")
        _check_bounds(self)
        if self.max_side > MAX_SIZE:
            raise InputError(f"--max-side must be <= {MAX_SIZE}, got {self.max_side}")
        if not is_loopback(self.host) and self.api_key is None:
            raise InputError(f"--host {self.host} is not a loopback address: give --api-key-file, so that "
                             "requests from the network need a key")
        if self.densepose_weights is not None:
            _check_densepose_weights(Path(self.densepose_weights))
        if self.examples_dir is not None and not Path(self.examples_dir).is_dir():
            raise InputError(f"--examples-dir {self.examples_dir}: directory not found")
        data = Path(self.data_dir)
        if data.exists() and not data.is_dir():
            raise InputError(f"--data-dir {data}: exists and is not a directory")
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--data-dir {data}: cannot create it ({e.strerror or e})") from None
        if not os.access(data, os.W_OK):
            raise InputError(f"--data-dir {data}: not writable")
        return self


@dataclass(frozen=True)
class RayOptions:
    """How the fleet is laid out on Ray Serve (``serve --ray``, ``serve run ...:app``); the
    service's own limits are ServeSettings.

    What a replica reserves is derived here, once, from what was given: ``device`` (None:
    cuda when ``gpus_per_replica`` > 0), ``gpus_per_replica`` (None: one per rank on cuda,
    else 0) and ``cpus_per_replica`` (None: one per rank). With ``ranks_per_replica`` K > 1
    each clip's windows are split over K processes of one replica (``runtime/distributed.py``):
    the replica is rank 0 and starts the others as Ray actors in its placement group (one
    bundle per rank, STRICT_PACK: one host), each rank with 1/K of the replica's GPUs and CPUs.
    With ``min_replicas``/``max_replicas`` instead of ``replicas``, Serve's autoscaler keeps
    between these many (one more while jobs wait longer than ``upscale_delay_s``, one fewer
    after ``downscale_delay_s`` with a replica idle); the ingress hands out up to
    ``max_replicas`` jobs at once.
    """

    address: Optional[str] = setting(None, "the Ray cluster to join (auto: the one `ray start` runs on this host; "
                                           "default: start a local one)", RAY, ray=False)
    device: Optional[str] = setting(None, "cpu (default) or cuda[:N]: the one worker's device (with --ray, and as "
                                          "serve run's arg: cpu or cuda, the replicas'; there the default is cuda "
                                          "when gpus_per_replica > 0)", MODELS)
    replicas: int = setting(1, "worker replicas, one warm pipeline and one job at a time each", RAY, parse=int, low=1)
    min_replicas: Optional[int] = setting(None, "with --max-replicas instead of --replicas: Serve's autoscaler keeps "
                                                "between these many (one more while jobs wait, one fewer after 5 "
                                                "minutes idle; 0 frees every GPU when idle)", RAY, parse=int)
    max_replicas: Optional[int] = setting(None, "the most replicas the autoscaler starts", RAY, parse=int)
    upscale_delay_s: float = setting(5.0, "autoscaling: seconds jobs wait for a replica before one is added", RAY,
                                     flag=None, parse=float, low=0)
    downscale_delay_s: float = setting(300.0, "autoscaling: seconds a replica is idle before it is removed", RAY,
                                       flag=None, parse=float, low=0)
    gpus_per_replica: Optional[float] = setting(None, "GPUs each replica reserves (default: one per rank with "
                                                      "--device cuda, else 0)", RAY, parse=float, low=0)
    cpus_per_replica: Optional[float] = setting(None, "CPUs each replica reserves (default: one per rank)", RAY,
                                                parse=float, low=0)
    ranks_per_replica: int = setting(1, "split each clip's windows over K processes of one replica, one GPU each, "
                                        "on one host (torch.distributed; README 'Several GPUs')", RAY, parse=int,
                                     metavar="K")
    dashboard_port: int = setting(8265, "the local cluster's dashboard port on 127.0.0.1, where `serve status` and "
                                        "`serve shutdown -a http://127.0.0.1:PORT` reach the app", RAY, ray=False,
                                  parse=int)

    def __post_init__(self):
        # the one derivation of what a replica reserves (serve --ray and serve run both build this)
        k = self.ranks_per_replica
        k = k if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else 1  # (check() names a bad one)
        device = self.device if self.device is not None else (
            "cuda" if (self.gpus_per_replica or 0) > 0 else "cpu")
        gpus = self.gpus_per_replica if self.gpus_per_replica is not None else (
            float(k) if device == "cuda" else 0.0)
        cpus = self.cpus_per_replica if self.cpus_per_replica is not None else float(k)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "gpus_per_replica", gpus)
        object.__setattr__(self, "cpus_per_replica", cpus)

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def slots(self) -> int:
        """Jobs the ingress runs at once: one per replica there may be."""
        return self.max_replicas if self.autoscaling else self.replicas

    def autoscaling_config(self) -> dict:
        """Serve's ``autoscaling_config`` for the worker deployment: one ongoing job per
        replica is the target (each runs one at a time)."""
        return {"min_replicas": self.min_replicas, "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas, "target_ongoing_requests": 1,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "metrics_interval_s": 1.0, "look_back_period_s": 5.0}

    def rank_resources(self) -> dict:
        """What each rank of a replica reserves (the replica itself is rank 0; with one rank,
        the replica's whole reservation)."""
        k = self.ranks_per_replica
        return {"num_cpus": self.cpus_per_replica / k, "num_gpus": self.gpus_per_replica / k}

    def bundles(self) -> list[dict]:
        """The placement group of a replica that splits its clips: one bundle per rank."""
        r = self.rank_resources()
        bundle = {k: v for k, v in (("CPU", r["num_cpus"]), ("GPU", r["num_gpus"])) if v > 0}
        return [bundle] * self.ranks_per_replica

    def deployment_options(self) -> dict:
        """The worker deployment's Serve options: its width (fixed or autoscaled), each
        replica's reservation and, when it splits clips, its placement group."""
        width = ({"autoscaling_config": self.autoscaling_config()} if self.autoscaling
                 else {"num_replicas": self.replicas})
        if self.ranks_per_replica > 1:  # one bundle per rank on one host; the replica (rank 0) takes the first
            width.update(placement_group_bundles=self.bundles(), placement_group_strategy="STRICT_PACK")
        return dict(width, ray_actor_options=self.rank_resources())

    def describe(self) -> str:
        width = (f"{self.min_replicas}-{self.max_replicas} replicas (autoscaling)" if self.autoscaling
                 else f"{self.replicas} replica(s)")
        if self.ranks_per_replica > 1:
            width += f", each clip split over {self.ranks_per_replica} processes"
        return width

    def check(self) -> "RayOptions":
        if self.device not in ("cpu", "cuda"):
            raise InputError(f"--device {self.device}: with --ray give cpu or cuda (Ray gives each replica its own "
                             "GPUs)")
        if (self.gpus_per_replica > 0) != (self.device == "cuda"):
            raise InputError(f"--gpus-per-replica {self.gpus_per_replica:g} does not fit --device {self.device} "
                             "(GPUs need --device cuda)")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise InputError("autoscaling needs both --min-replicas and --max-replicas")
        if self.autoscaling:
            if self.min_replicas < 0:
                raise InputError(f"--min-replicas must be >= 0, got {self.min_replicas}")
            if self.max_replicas < max(self.min_replicas, 1):
                raise InputError(f"--max-replicas must be >= 1 and >= --min-replicas ({self.min_replicas}), got "
                                 f"{self.max_replicas}")
        _check_bounds(self)
        k = self.ranks_per_replica
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"--ranks-per-replica must be an integer >= 1, got {k!r}")
        if k > 1 and self.gpus_per_replica > 0 and self.gpus_per_replica != k:
            raise InputError(f"--ranks-per-replica {k} runs one process per GPU: give --gpus-per-replica {k} "
                             f"(got {self.gpus_per_replica:g})")
        if k > 1 and self.gpus_per_replica == 0 and self.cpus_per_replica == 0:
            raise InputError(f"--ranks-per-replica {k} reserves a share of the replica's resources for each rank: "
                             "give --cpus-per-replica > 0")
        if not 0 < self.dashboard_port < 65536:
            raise InputError(f"--dashboard-port must be a port number, got {self.dashboard_port}")
        return self


#: the keys ``serve run magicanimate_rt.serve.ray_app:app key=value ...`` and a Serve config
#: file's ``args:`` take (``deploy/ray-serve.yaml``), each with its declaration
RAY_ARGS: dict[str, Declared] = {d.key: d for cls in (ServeSettings, RayOptions) for _, d in declared(cls) if d.ray}
#: old keys still taken, and the key each gives
RAY_ALIASES: dict[str, str] = {d.alias: key for key, d in RAY_ARGS.items() if d.alias}


def parse_ray_args(args: Mapping[str, Any]) -> dict:
    """Ray's app args (text from ``serve run``, or a config file's YAML values) read as the
    command line reads its flags; an unknown key or a bad value is one line."""
    unknown = sorted(set(args) - set(RAY_ARGS) - set(RAY_ALIASES))
    if unknown:
        raise InputError(f"unknown argument {unknown[0]!r}; known: {', '.join(sorted(RAY_ARGS))}")
    given = {}
    for key, value in args.items():
        if value is None:
            continue
        key = RAY_ALIASES.get(key, key)
        try:
            given[key] = RAY_ARGS[key].parse(value)
        except (TypeError, ValueError) as e:
            raise InputError(f"a bad argument value: {key}={value!r} ({e})") from None
    return given


def from_given(given: Mapping[str, Any]) -> tuple[ServeSettings, dict]:
    """The ServeSettings (not yet checked) and RayOptions' keywords from given values keyed by
    each setting's key: argparse's namespace, or Ray's app args read by :func:`parse_ray_args`.
    None or absent: not given (the field's default)."""
    out: list[dict] = []
    for cls in (ServeSettings, RayOptions):
        kw = {}
        for f, d in declared(cls):
            value = given.get(d.key)
            if value is not None:
                kw[f.name] = d.to_field(value) if d.to_field is not None else value
        out.append(kw)
    return ServeSettings(**out[0]), out[1]


def _shown(default: Any) -> str:
    return _number(default) if isinstance(default, (int, float)) else str(default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's flags, from the declarations (every default None: not given;
    ``--help`` shows the field's default)."""
    groups = {name: parser.add_argument_group(name) for name in (MODELS, NETWORK, LIMITS, RAY)}
    groups[RAY].add_argument("--ray", action="store_true",
                             help="run as a Ray Serve app: one ingress (this API, the queue, the store) and "
                                  "--replicas worker replicas, each one warm pipeline")
    for cls in (ServeSettings, RayOptions):
        for f, d in declared(cls):
            if d.flag is None:
                continue
            shown = f" (default {_shown(f.default)})" if d.show_default and f.default is not None else ""
            metavar = d.metavar or d.flag[2:].upper().replace("-", "_")
            groups[d.group].add_argument(*d.flags, dest=d.key, type=d.parse, default=None, metavar=metavar,
                                         help=d.help + shown)
    groups[LIMITS].add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
