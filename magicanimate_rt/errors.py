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


def user_message(e: BaseException, out_of_memory: str, cuda_out_of_memory: str):
    """The one line for an error a user can cause, or None for anything else (a bug, which
    keeps its traceback): this project's errors say what is wrong themselves; running out of
    host or CUDA memory says what to lower (``out_of_memory`` / ``cuda_out_of_memory``).
    Shared by the command lines' error tail, config runs and the service's failed jobs."""
    if isinstance(e, MagicAnimateError):
        return str(e)
    if isinstance(e, MemoryError):
        return f"out of memory; {out_of_memory}"
    # torch.cuda.OutOfMemoryError, without importing torch here
    if isinstance(e, RuntimeError) and type(e).__name__ == "OutOfMemoryError":
        return f"CUDA out of memory; {cuda_out_of_memory}"
    return None
