"""The UNet's two lean-memory settings and their check, in one place for the two layers that take
them: the model code (``models/layers.py`` ``Arithmetic``, which says what each does) and the
request's plan (``runtime/pipeline.py`` ``PipelineOptions``, read by ``runtime/planner.py``). The
runtime may not import the models (an engine directory runs without them), so the check lives
here, below both.

- ``cfg_sequential``: the guided UNet call computes its two CFG halves' mid/up path one after the
  other (about half its working memory);
- ``ff_chunk``: the transformer blocks' feed-forwards run on that many tokens at a time (None: whole).
"""

from __future__ import annotations

from typing import Optional


def check_unet_memory(cfg_sequential: object, ff_chunk: Optional[object]) -> None:
    """ValueError (one line naming the setting) unless ``cfg_sequential`` is a bool and
    ``ff_chunk`` None or a positive int."""
    if ff_chunk is not None and (isinstance(ff_chunk, bool) or not isinstance(ff_chunk, int) or ff_chunk < 1):
        raise ValueError(f"ff_chunk must be None or a positive number of tokens, got {ff_chunk!r}")
    if not isinstance(cfg_sequential, bool):
        raise ValueError(f"cfg_sequential must be True or False, got {cfg_sequential!r}")
