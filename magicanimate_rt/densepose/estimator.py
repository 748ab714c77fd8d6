"""The public entry point: frames in, one :class:`DensePoseResult` per frame out, as detectron2's
``DefaultPredictor`` followed by ``DensePoseResultExtractor`` computes them.

``predict`` is ``GeneralizedRCNN.inference`` (detectron2 02b5c4e ``modeling/meta_arch/rcnn.py``) for a batch:
preprocess, backbone, proposals, ROI heads, then ``detector_postprocess`` (``modeling/postprocessing.py:41-58``:
boxes scaled by float32 factors, clipped, empty ones dropped) and the extractor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DensePoseConfig
from .extractor import extract
from .head import upsample
from .ops import clip_boxes, nonempty
from .preprocess import network_input, resize_frames
from .result import DensePoseResult
from .stages import DensePoseStages, engine_stages, infer
from .weights import read_checkpoint

@dataclass(frozen=True)
class PreparedFrames:
    """Frames after the host half of preprocessing (:meth:`DensePoseEstimator.prepare`): the
    resized BGR pixels, (N, h, w, 3) uint8 on the CPU (pinned when the estimator is on CUDA, so
    the copy to the device is asynchronous), and the frames' own (height, width)."""

    resized: torch.Tensor
    frame_size: tuple[int, int]

    def __len__(self) -> int:
        return self.resized.shape[0]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")


class DensePoseEstimator:
    """DensePose R-CNN on frames. Build with :meth:`from_checkpoint` (PyTorch) or :meth:`from_engines`
    (an engine directory's graphs); call :meth:`predict`.

    The networks compute in ``dtype`` (float32 on the CPU; float16/bfloat16 are meant for CUDA);
    box decoding, softmax, NMS, RoIAlign sampling and the extractor are float32 whatever it is.
    Given a ``DensePoseRCNN``, the estimator takes the model over (moves and casts it in place);
    given :class:`~magicanimate_rt.densepose.stages.DensePoseStages` (with ``cfg``), it runs those.
    """

    def __init__(self, model, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 cfg: DensePoseConfig | None = None):
        if isinstance(model, DensePoseStages):
            self.model, self.stages = None, model
            self.device, self.dtype = model.device, model.dtype
            self.cfg = cfg or DensePoseConfig()
            return
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.model = model.to(self.device, self.dtype)
        self.stages = self.model.stages()
        self.cfg = model.cfg

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                        min_size: int = 800, max_size: int = 1333) -> "DensePoseEstimator":
        """Load detectron2's ``model_final_162be9.pkl`` (R_50) or an ``_R_101_FPN_s1x`` one: the depth
        comes from the weights. ``min_size``/``max_size`` are ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``."""
        return cls.from_state_dict(read_checkpoint(path), path, device, dtype, min_size, max_size)

    @classmethod
    def from_state_dict(cls, state, source: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32", min_size: int = 800,
                        max_size: int = 1333) -> "DensePoseEstimator":
        """:meth:`from_checkpoint` on a state dict already read (``read_checkpoint``), e.g. one a
        command checked with ``validate_state_dict`` first; ``source`` names it in errors."""
        from .model import DensePoseRCNN

        cfg = DensePoseConfig(min_size=min_size, max_size=max_size)
        return cls(DensePoseRCNN.from_state_dict(state, source, cfg), device, parse_dtype(dtype))

    @classmethod
    def from_engines(cls, engine_dir: str | Path, backend: str = "onnxruntime",
                     device: str | torch.device = "cpu") -> "DensePoseEstimator":
        """The estimator on an engine directory's DensePose stages (``build_engines.py
        --densepose-weights``), run by ``backend`` ("onnxruntime", "torch", or "tensorrt" with
        ``device="cuda"`` once ``python -m magicanimate_rt.plans DIR`` built its plans; see
        ``stages.BACKENDS``); the input sizes are the ones it was built for. Same
        :meth:`predict`/:meth:`render` as :meth:`from_checkpoint`."""
        from ..engines.densepose import read_densepose

        m = read_densepose(engine_dir)
        return cls(engine_stages(backend, engine_dir, device),
                   cfg=DensePoseConfig(min_size=m.min_size, max_size=m.max_size))

    def prepare(self, frames: np.ndarray) -> PreparedFrames:
        """The host half of :meth:`predict` (validation, detectron2's PIL resize, RGB -> BGR), which
        a reader thread runs for the next batch while this one computes (``video.prepare_driving_video``)."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames: need (H, W, 3) or (N, H, W, 3) uint8 RGB, got {frames.dtype} {frames.shape}")
        resized = torch.from_numpy(np.ascontiguousarray(resize_frames(frames, self.cfg)[..., ::-1]))  # BGR
        if self.device.type == "cuda" and len(resized):
            resized = resized.pin_memory()
        return PreparedFrames(resized, tuple(frames.shape[1:3]))

    @torch.inference_mode()
    def predict(self, frames: "np.ndarray | PreparedFrames") -> list[DensePoseResult]:
        """(H, W, 3) or (N, H, W, 3) uint8 RGB frames (one size), or :meth:`prepare`'s output for
        them -> one result per frame, in one forward."""
        prepared = frames if isinstance(frames, PreparedFrames) else self.prepare(frames)
        if len(prepared) == 0:
            return []
        height, width = prepared.frame_size
        image_size = tuple(prepared.resized.shape[1:3])
        x = network_input(prepared.resized, self.cfg, self.device, self.dtype)
        dets, lowres = infer(self.stages, x, image_size, self.cfg)
        maps = upsample(lowres)
        # detector_postprocess: scale to the frame (float32 factors), clip, drop empty boxes
        sx = torch.tensor(width / image_size[1], dtype=torch.float32)
        sy = torch.tensor(height / image_size[0], dtype=torch.float32)
        # every image's detections to the host in one copy (the one sync of the post-processing;
        # the extractor's per-detection maps are the output and come over as they are made)
        counts = [len(d[0]) for d in dets]
        host = torch.cat([torch.cat([d[0].float(), d[1].float()[:, None]], 1) for d in dets]).cpu() if dets \
            else torch.zeros((0, 5))
        results, start = [], 0
        for count in counts:
            sl = slice(start, start + count)
            start += count
            boxes = host[sl, :4] * torch.stack([sx, sy, sx, sy])
            boxes = clip_boxes(boxes, height, width)
            keep = torch.nonzero(nonempty(boxes)).flatten()  # on the host: no sync
            boxes, scores = boxes[keep], host[sl, 4][keep]
            labels, uv = extract(tuple(t[sl][keep.to(t.device)] for t in maps), boxes)
            results.append(DensePoseResult(boxes=boxes.numpy(), scores=scores.numpy(), labels=labels, uv=uv))
        return results

    def render(self, result: DensePoseResult, height: int, width: int) -> np.ndarray:
        """vid2densepose's picture of one result: (height, width, 3) uint8 RGB."""
        from .render import render_frame

        return render_frame(result, height, width)
