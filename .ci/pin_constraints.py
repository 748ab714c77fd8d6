#!/usr/bin/env python3
"""Write constraints.txt: the exact versions of every package the project's extras pull in, as
installed in this environment (the one the suite just passed in).

    python .ci/pin_constraints.py > constraints.txt

The project's own ranges (pyproject.toml) say what should work; this file says what was last
tested, so a fresh install does not take a release nobody has run the suite with (issue 25: a new
diffusers probed for a `kernels` package, whose name one of our modules shadowed). README
"Quick start" says how to try newer versions (install without -c constraints.txt).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

PROJECT = "magicanimate-rt"
EXTRAS = ("dev", "serve", "compare", "ray", "bench", "docs")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(project: str, extras: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """normalised name -> (name, installed version) of ``project[extras]`` and everything it requires."""
    seen: dict[str, tuple[str, str, set]] = {}

    def visit(name: str, wanted: set) -> None:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return  # a requirement whose marker excludes this platform, or not installed
        key = norm(name)
        entry = seen.setdefault(key, (dist.metadata["Name"], dist.version, set()))
        new = wanted - entry[2]
        if entry[2] and not new:
            return
        entry[2].update(wanted | {""})
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {""} | wanted):
                visit(req.name, set(req.extras))

    visit(project, set(extras))
    return {k: (n, v) for k, (n, v, _) in seen.items() if k != norm(project)}


def main() -> int:
    print("# Versions the suite last passed with (python .ci/pin_constraints.py > constraints.txt);")
    print("# pip install -c constraints.txt -e \".[...]\" installs exactly these. torch's local label is")
    print("# dropped: the CPU wheel (torch==2.13.0, installed first) satisfies it.")
    for _, (name, version) in sorted(closure(PROJECT, EXTRAS).items()):
        print(f"{name}=={version.split('+')[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
