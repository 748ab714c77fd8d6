"""MkDocs hook: links from a docs page to files of the repository outside ``docs/``.

The pages link to the repository's own files (``../benchmarks/results/.../report.md``, which
``python -m benchmarks.runtime_bench`` writes into docs/PERFORMANCE.md, ``../deploy/ray-serve.yaml``):
links that work where the Markdown is read in the repository, but that MkDocs cannot follow
(the site holds ``docs/`` only) and reports as broken. This hook turns each such link into
the path as code text when the file exists, and warns (which fails ``mkdocs build
--strict``) when it does not, so a link to a moved or deleted file still fails CI.
Written here because MkDocs' own link check has one switch for every unfound link.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")

LINK = re.compile(r"\[([^\]\n]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


def _rewrite(text: str, page_dir: Path, docs: Path, repo: Path, where: str) -> str:
    def one(m: re.Match) -> str:
        label, target = m.group(1), m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return m.group(0)  # a URL or an anchor of this page
        path = (page_dir / target.split("#", 1)[0]).resolve()
        if path == docs or docs in path.parents:
            return m.group(0)  # a docs page or file: MkDocs checks it
        if repo not in path.parents:
            log.warning("%s: the link %r leaves the repository", where, target)
            return m.group(0)
        rel = path.relative_to(repo).as_posix()
        if not path.exists():
            log.warning("%s: the link %r names %s, which does not exist", where, target, rel)
        return f"`{rel}`" if label.strip("`") in (rel, target, path.name) else f"{label} (`{rel}`)"

    return LINK.sub(one, text)


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    page_dir = (docs / page.file.src_path).parent
    # FENCE.split gives text, fence, text, fence, ...: the texts alternate outside / inside fenced code
    parts = FENCE.split(markdown)
    return "".join(_rewrite(part, page_dir, docs, repo, page.file.src_path) if i % 4 == 0 else part
                   for i, part in enumerate(parts))
