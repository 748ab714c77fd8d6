"""detectron2's DensePose R-CNN timed on frames, for ``benchmarks/densepose.py``'s side-by-side rows.

Runs under detectron2's own Python (``../shared/tools/detectron2-cpu/setup.sh`` builds it in a venv
of its own: ``DETECTRON2_PY``, ``DETECTRON2_SRC``), never the project's: detectron2 is the reference
we measure against, not a dependency. It imports nothing of magicanimate_rt.

    $DETECTRON2_PY -P benchmarks/detectron2_worker.py --src $DETECTRON2_SRC --weights W.pkl --frames F.npy

loads ``DefaultPredictor`` once (``densepose_rcnn_R_50_FPN_s1x.yaml``, CPU), prints ``ready``, then
answers each line ``time`` on stdin with one JSON line: the wall and process CPU seconds of one pass
over the frames, each frame as vid2densepose's ``main.py`` handles it (``predictor(frame)`` then
``DensePoseResultExtractor()`` on its instances: the same work as our ``DensePoseEstimator.predict``),
and the detections per frame. ``quit`` (or end of input) ends it. ``-P`` keeps ``benchmarks/`` off
``sys.path``, where our ``densepose.py`` would shadow detectron2's ``densepose`` package.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, required=True, help="detectron2 checkout (DETECTRON2_SRC)")
    p.add_argument("--weights", type=Path, required=True, help="detectron2 .pkl")
    p.add_argument("--frames", type=Path, required=True, help=".npy of (N, H, W, 3) uint8 BGR frames")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-size", type=int, default=800, help="INPUT.MIN_SIZE_TEST")
    p.add_argument("--max-size", type=int, default=1333, help="INPUT.MAX_SIZE_TEST")
    a = p.parse_args()

    import numpy as np
    import torch
    from densepose import add_densepose_config
    from densepose.vis.extractor import DensePoseResultExtractor
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    torch.set_num_threads(a.threads)
    cfg = get_cfg()
    add_densepose_config(cfg)
    cfg.merge_from_file(str(a.src / "projects" / "DensePose" / "configs" / "densepose_rcnn_R_50_FPN_s1x.yaml"))
    cfg.MODEL.WEIGHTS = str(a.weights)
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = a.min_size, a.max_size
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    extractor = DensePoseResultExtractor()
    frames = np.load(a.frames)
    predictor(frames[0])  # warm-up, as ours gets one (allocator, oneDNN kernel choice)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        detections = []
        t0, c0 = time.perf_counter(), time.process_time()
        for frame in frames:
            instances = predictor(frame)["instances"]
            extractor(instances)
            detections.append(len(instances))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"wall_s": wall, "cpu_s": cpu, "detections": detections}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
