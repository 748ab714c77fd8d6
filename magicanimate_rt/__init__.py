"""magicanimate-rt: fast, faithful MagicAnimate inference.

``from magicanimate_rt import AnimationPipeline`` is the entry point; it is imported lazily
so that ``import magicanimate_rt.errors`` (or the CLI's ``--help``) stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["AnimationPipeline", "AnimationRequest", "AnimationResult", "__version__"]


def __getattr__(name):
    if name in ("AnimationPipeline", "AnimationResult"):
        from .runtime import pipeline

        return getattr(pipeline, name)
    if name == "AnimationRequest":
        from .runtime.request import AnimationRequest

        return AnimationRequest
    raise AttributeError(f"module 'magicanimate_rt' has no attribute {name!r}")
