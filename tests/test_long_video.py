"""Long clips in bounded memory (issue 7): frames stream from the decoder to the mp4, and
peak RSS grows by at most 1 MB per frame on the tiny model set at 128 px."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.long_video import MIB_PER_FRAME_BOUND, measure
from magicanimate_rt import AnimationPipeline
from magicanimate_rt.runtime.pipeline import PipelineOptions


def test_frame_sink_gets_every_frame_in_order(tiny_models):
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    driving = rng.integers(0, 256, (21, 64, 64, 3), dtype=np.uint8)
    with AnimationPipeline.from_pretrained(tiny_models, options=PipelineOptions(decode_chunk=4)) as pipe:
        whole = pipe.animate(source, driving, size=64, steps=1, seed=2)
        chunks = []
        streamed = pipe.animate(source, driving, size=64, steps=1, seed=2,
                                frame_sink=lambda i, f: chunks.append((i, f.copy())))
    assert streamed.frames is None and torch.equal(streamed.latents, whole.latents)
    assert [i for i, _ in chunks] == list(range(0, 21, 4))
    assert np.array_equal(np.concatenate([f for _, f in chunks]), whole.frames)


def test_memory_per_extra_frame_is_bounded(tiny_models, tmp_path):
    """320 vs 32 frames through the CLI (read mp4, denoise, write mp4), each in a fresh
    process: the difference of peak RSS per extra frame."""
    result = measure(tiny_models, [32, 320], size=128, steps=1, workdir=tmp_path)
    peaks = result["peak_rss_bytes"]
    assert peaks[320] > peaks[32]  # the extra frames do cost something: the test can fail
    assert result["mib_per_frame"] <= MIB_PER_FRAME_BOUND, result
