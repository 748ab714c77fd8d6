"""The model's stages: one vocabulary for engine files, compile, residency and timings.

A request runs six stage calls. Each is run by one file of an engine directory and needs
one module's weights on the device during one phase of the request; everything else names
them from this table:

- ``engines/specs.py`` ``STAGE_NAMES``: the engine files (:data:`ENGINES`);
- ``runtime/compiled.py`` ``STAGES``: the calls a torch backend compiles (:data:`CALLS`);
- ``runtime/planner.py`` ``ALL_STAGES`` / ``PHASE_STAGES``: the weights that may leave
  the device, and those each phase needs (:data:`WEIGHTS`, :data:`PHASE_WEIGHTS`);
- ``runtime/timing.py``: stage timings are labelled by the calls (the ControlNet's
  embedding is timed with it, as "controlnet") and by the request's and the loop's own
  work (:data:`TIMER_LABELS`).

It imports nothing, so every layer (``engines/`` included) may read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """call: the call's name (compile, timings); engine: the engine file that runs it;
    weights: the module whose weights it needs; phase: the request phase it runs in
    ("reference", "loop" or "decode")."""

    call: str
    engine: str
    weights: str
    phase: str


#: every stage call, in the order a request first runs it
STAGES = (
    Stage("vae_encode", "vae_encoder", "vae", "reference"),
    Stage("appearance_encoder", "appearance_encoder", "appearance_encoder", "reference"),
    Stage("controlnet_embed", "controlnet", "controlnet", "loop"),
    Stage("controlnet", "controlnet", "controlnet", "loop"),
    Stage("unet", "unet", "unet", "loop"),
    Stage("vae_decode", "vae_decoder", "vae", "decode"),
)
PHASES = ("reference", "loop", "decode")


def _distinct(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


#: the calls (compile's stage names; timer labels)
CALLS = tuple(s.call for s in STAGES)
#: the engine files, in the order a build exports them
ENGINES = _distinct(s.engine for s in STAGES)
#: the weights that live on the device, and those each phase needs
WEIGHTS = _distinct(s.weights for s in STAGES)
PHASE_WEIGHTS = {p: _distinct(s.weights for s in STAGES if s.phase == p) for p in PHASES}
#: what stage timings are labelled: the request's own work, the calls (but the embedding,
#: timed with the ControlNet), the loop's collectives and sampler updates
TIMER_LABELS = ("read_inputs", "prepare") + tuple(c for c in CALLS if c != "controlnet_embed") + ("gather", "scheduler")
