"""What the project's three command lines share: ``magicanimate-rt`` (``cli.py``),
``build_engines.py`` (``export/build.py``) and ``python -m magicanimate_rt.plans``.

- :class:`OneLineParser`: argparse whose usage errors are one line on stderr and exit 2
  (argparse's default prints a usage block first);
- :func:`run_command`: the error tail. A :class:`~magicanimate_rt.errors.MagicAnimateError`
  (bad file, bad argument, mismatched engines) is one line ``PROG: error: MESSAGE`` and exit
  code 2; Ctrl-C one line and 130; running out of host or CUDA memory one line naming the
  options that lower memory, and 2. Anything else is a bug and keeps its traceback.

Imports nothing heavy (no torch): a command's ``--help`` and its usage errors stay fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import MagicAnimateError, user_message

#: exit codes
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``PROG: error: MESSAGE (see --help)``."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def fail(prog: str, message: str) -> int:
    """Print the one error line and return the error exit code."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def run_command(prog: str, body: Callable[[], int], *, interrupted: str = "no output written",
                out_of_memory: str = "lower --size or --max-frames",
                cuda_out_of_memory: str = "use --dtype float16, a smaller --size or fewer --max-frames, "
                                          "or the TensorRT engines (--engines)") -> int:
    """Run ``body()`` and turn the errors a user can cause into one line and an exit code
    (see the module docstring). ``interrupted``: what Ctrl-C leaves (e.g. "DIR left as it
    was"); ``out_of_memory`` / ``cuda_out_of_memory``: what to do about it."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MagicAnimateError, MemoryError, RuntimeError) as e:
        message = user_message(e, out_of_memory, cuda_out_of_memory)
        if message is None:
            raise
        return fail(prog, message)
