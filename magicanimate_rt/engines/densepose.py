"""The DensePose estimator's stages in an engine directory: their specs and manifest section.

``build_engines.py --densepose-weights FILE`` adds three graphs (see ``densepose/stages.py`` for
what each computes and docs/ENGINES.md for why the rest stays in the runtime):

| stage              | inputs                                   | outputs                                          |
|--------------------|------------------------------------------|--------------------------------------------------|
| densepose_backbone | images (B, 3, H, W) normalised BGR, zero-padded to a multiple of 32 | p2..p6 (B, 256, H/s, W/s), densepose_features (B, 256, H/4, W/4), objectness_pX (B, A_X), anchor_deltas_pX (B, A_X, 4) |
| densepose_box_head | pooled (R, 256, 7, 7)                    | class_logits (R, 2), box_deltas (R, 4)           |
| densepose_head     | pooled (K, 256, 28, 28)                  | coarse_segm (K, 2, 56, 56), fine_segm, u, v (K, 25, 56, 56) |

B, H, W, R, K are dynamic within the profiles of :func:`densepose_specs`; the outputs' spatial
and anchor axes follow from H and W (named ``height_4``, ``anchors_p2``, ...: names only, not
profiled). They are recorded under ``"densepose"`` in ``manifest.json``:

| field | meaning |
|---|---|
| weights | ``source`` (the checkpoint's path at build time), ``bytes``, ``sha256`` |
| blocks | ResNet blocks per stage (3, 4, 6, 3 for R-50) |
| min_size, max_size | ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` the profiles are built for |
| precision | "fp32" or "fp16" (``--densepose-precision``) |
| stages.<name> | as the animation's stages (``onnx``, ``files``, ``signature``, ``validation``, ``plans``) |
| tensorrt | null, or {version, gpu, compute_capability} of the stages' TensorRT plans (``python -m magicanimate_rt.plans DIR`` fills it and each stage's ``plans``) |

A directory may hold the DensePose stages alone (``--densepose-weights`` without ``--models``);
its manifest then has ``format_version`` and ``densepose`` only. Pure data, as ``manifest.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import EngineError
from .manifest import FORMAT_VERSION, MANIFEST, FileRecord, StageRecord, _sha256
from .specs import AxisRange, StageSpec, TensorSpec, float_dtype

DENSEPOSE_STAGES = ("densepose_backbone", "densepose_box_head", "densepose_head")
SECTION = "densepose"
LEVELS = (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32), ("p6", 64))
#: frames per backbone call, detections per image (``TEST.DETECTIONS_PER_IMAGE``) and proposals
#: per image (``RPN.POST_NMS_TOPK_TEST``) that bound the RoI axes
BATCH = AxisRange(1, 4, 8)
DETECTIONS_PER_IMAGE = 100
PROPOSALS_PER_IMAGE = 1000
SIZE_DIVISIBILITY = 32


def build_hint(engine_dir) -> str:
    return f"python build_engines.py --densepose-weights FILE --out {engine_dir}"


def _padded(n: int) -> int:
    return -(-n // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY


def densepose_specs(precision: str, min_size: int = 800, max_size: int = 1333,
                    batch: AxisRange = BATCH) -> dict[str, StageSpec]:
    """The three stages' specs. The image axes run from 32 to the padded ``max_size`` (opt: the
    padded ``min_size``), so any frame resized by ``ResizeShortestEdge(min_size, max_size)`` fits."""
    fp = float_dtype(precision)
    side = AxisRange(SIZE_DIVISIBILITY, _padded(min_size), _padded(max_size))
    levels = tuple(TensorSpec(p, ("batch", 256, f"height_{s}", f"width_{s}"), fp) for p, s in LEVELS)
    backbone = StageSpec(
        "densepose_backbone",
        inputs=(TensorSpec("images", ("batch", 3, "height", "width"), fp),),
        outputs=(*levels, TensorSpec("densepose_features", ("batch", 256, "height_4", "width_4"), fp),
                 *(TensorSpec(f"objectness_{p}", ("batch", f"anchors_{p}"), fp) for p, _ in LEVELS),
                 *(TensorSpec(f"anchor_deltas_{p}", ("batch", f"anchors_{p}", 4), fp) for p, _ in LEVELS)),
        axes={"batch": batch, "height": side, "width": side},
    )
    box_head = StageSpec(
        "densepose_box_head",
        inputs=(TensorSpec("pooled", ("rois", 256, 7, 7), fp),),
        outputs=(TensorSpec("class_logits", ("rois", 2), fp), TensorSpec("box_deltas", ("rois", 4), fp)),
        axes={"rois": AxisRange(1, PROPOSALS_PER_IMAGE, PROPOSALS_PER_IMAGE * batch.max)},
    )
    head = StageSpec(
        "densepose_head",
        inputs=(TensorSpec("pooled", ("instances", 256, 28, 28), fp),),
        outputs=(TensorSpec("coarse_segm", ("instances", 2, 56, 56), fp),
                 *(TensorSpec(n, ("instances", 25, 56, 56), fp) for n in ("fine_segm", "u", "v"))),
        axes={"instances": AxisRange(1, 4, DETECTIONS_PER_IMAGE * batch.max)},
    )
    return {s.name: s for s in (backbone, box_head, head)}


@dataclass(frozen=True)
class DensePoseManifest:
    """The ``"densepose"`` section of an engine directory's manifest (module docstring)."""

    directory: Path
    weights: Mapping[str, Any]
    blocks: tuple[int, ...]
    min_size: int
    max_size: int
    precision: str
    stages: Mapping[str, StageRecord]
    tensorrt: Optional[Mapping[str, Any]] = None  #: what the plans were built for (``PlanTarget.to_dict()``)

    def onnx_path(self, stage: str) -> Path:
        return self.directory / self.stages[stage].onnx

    def spec(self, stage: str) -> StageSpec:
        return self.stages[stage].spec

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "blocks": list(self.blocks), "min_size": self.min_size,
                "max_size": self.max_size, "precision": self.precision,
                "stages": {n: s.to_dict() for n, s in self.stages.items()},
                "tensorrt": None if self.tensorrt is None else dict(self.tensorrt)}

    @classmethod
    def from_dict(cls, directory: Path, d: Mapping[str, Any]) -> "DensePoseManifest":
        return cls(Path(directory), dict(d["weights"]), tuple(int(b) for b in d["blocks"]), int(d["min_size"]),
                   int(d["max_size"]), str(d["precision"]),
                   {n: StageRecord.from_dict(n, s) for n, s in d["stages"].items()}, d.get("tensorrt"))

    def content_hash(self) -> str:
        """sha256 of the section (it holds every graph file's sha256): equal hashes, equal stages.
        The TensorRT plans are left out: building them changes no graph, so the DensePose clips
        cached under this hash stay valid (and the hash is the one of a section without plans)."""
        d = self.to_dict()
        d.pop("tensorrt")
        for s in d["stages"].values():
            s["plans"] = {}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def weights_path(self) -> Path:
        """The checkpoint the stages were built from, checked against its recorded size and sha256
        (what ``--backend torch`` on an engine directory loads)."""
        p = Path(self.weights["source"])
        if not p.is_file() or p.stat().st_size != int(self.weights["bytes"]) or \
                _sha256(p).hexdigest() != self.weights["sha256"]:
            raise EngineError(f"{self.directory}: the DensePose weights it was built from ({p}) are gone or changed; "
                              f"--backend torch needs them (or use --backend onnxruntime)")
        return p


def read_densepose(engine_dir) -> DensePoseManifest:
    """The DensePose section of ``engine_dir``, its files checked (exist, recorded sizes);
    one-line EngineError naming the directory and how to build it otherwise."""
    d = Path(engine_dir)
    how = f"build them with: {build_hint(d)}"
    if not d.is_dir():
        raise EngineError(f"{d}: engine directory not found; {how}")
    path = d / MANIFEST
    if not path.is_file():
        raise EngineError(f"{d}: no {MANIFEST} (not an engine directory, or its build did not finish); {how}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path}: damaged manifest, not valid JSON ({e}); {how} --force") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: not an engine manifest of format version {FORMAT_VERSION}; {how} --force")
    if SECTION not in raw:
        raise EngineError(f"{d}: has no DensePose stages; {how}")
    try:
        m = DensePoseManifest.from_dict(d, raw[SECTION])
        float_dtype(m.precision)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise EngineError(f"{path}: damaged DensePose section ({what}); {how} --force") from None
    missing = [s for s in DENSEPOSE_STAGES if s not in m.stages]
    if missing:
        raise EngineError(f"{path}: damaged DensePose section (no stage {missing[0]!r}); {how} --force")
    for rec in (f for s in m.stages.values() for f in s.files):
        p = d / rec.name
        if not p.is_file() or p.stat().st_size != rec.bytes:
            raise EngineError(f"{d}: {rec.name} is missing or not the size the manifest records; {how} --force")
    return m


def write_densepose(engine_dir, section: DensePoseManifest) -> Path:
    """Record ``section`` in ``engine_dir``'s manifest (created with only it when there is none),
    keeping everything else there; atomically (a temporary file renamed into place)."""
    path = Path(engine_dir) / MANIFEST
    raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"format_version": FORMAT_VERSION}
    raw[SECTION] = section.to_dict()
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def weights_record(path) -> dict[str, Any]:
    rec = FileRecord.of(Path(path).parent, Path(path).name)
    return {"source": str(Path(path).resolve()), "bytes": rec.bytes, "sha256": rec.sha256}
