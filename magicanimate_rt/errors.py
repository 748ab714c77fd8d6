"""The project's exception classes.

Every error a user can cause (a bad file, a bad argument, a mismatched engine directory)
is raised as one of these, with a one-line message that names the file or argument and
what is wrong. The CLI prints ``str(error)`` and exits with code 2; nothing else prints a
traceback for them.
"""


class MagicAnimateError(Exception):
    """Base class of every error this project raises on purpose."""


class ModelLoadError(MagicAnimateError):
    """A model directory, config or weights file is missing, corrupt or does not match."""


class InputError(MagicAnimateError):
    """A source image, driving video or argument cannot be used."""


class EngineError(MagicAnimateError):
    """An engine directory is missing, damaged, or built for something else."""


class DistributedError(MagicAnimateError):
    """Another rank of a multi-process run failed, stopped or did not answer in time."""
