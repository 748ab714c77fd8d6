"""The package's import graph, read statically with ``ast`` (every import counts, those
inside functions too): the layers of docs/ARCHITECTURE.md ("Layers") hold and there is no
import cycle.

The walker itself is checked on a made-up package (it must see relative, absolute,
``from . import module`` and function-local imports, and find a cycle), so the rules below
cannot pass because the walker saw nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "magicanimate_rt"


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package directory ``root``."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file. ``from X import y``
    is an edge to ``X.y`` when that is a module, else to ``X``; importing ``a.b`` does not
    add an edge to the package ``a`` (Python runs ``a/__init__`` first, but what ``a``
    imports lazily is not what ``a.b`` depends on)."""
    mods = module_files(root)
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    edges.add(sub if sub in mods else target)
        graph[name] = {e for e in edges if e in mods and e != name and e.split(".")[0] == top}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


# --------------------------------------------------------------------------- the walker
def test_the_walker_sees_every_kind_of_import_and_finds_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("import os\nfrom .sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("import pkg.a\nfrom pkg import sub\n")
    g = import_graph(pkg)
    assert g == {"pkg": set(), "pkg.sub": {"pkg.sub.b"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.c"},
                 "pkg.c": {"pkg.a", "pkg.sub"}}
    assert cycles(g) == [["pkg.a", "pkg.c", "pkg.sub", "pkg.sub.b"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_the_walker_reads_this_package(graph):
    # a few edges that must be there, so the rules below are checked against the real graph
    assert "magicanimate_rt.engines.specs" in graph["magicanimate_rt.engines.manifest"]
    assert "magicanimate_rt.models" in graph["magicanimate_rt.export.build"]  # function-local
    assert "magicanimate_rt.runtime.backends.tensorrt_backend" in graph["magicanimate_rt.plans"]  # function-local
    assert len(graph) > 30


# --------------------------------------------------------------------------- the rules
def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_runtime_and_engines_never_import_export(graph):
    bad = [(m, e) for m, edges in graph.items() if under(m, "magicanimate_rt.runtime", "magicanimate_rt.engines")
           for e in edges if under(e, "magicanimate_rt.export")]
    assert bad == []


def test_engines_read_neither_models_nor_runtime(graph):
    # an engine directory runs without the PyTorch models; the runtime reads engines, not
    # the other way round
    bad = [(m, e) for m, edges in graph.items() if under(m, "magicanimate_rt.engines")
           for e in edges if under(e, "magicanimate_rt.models", "magicanimate_rt.runtime")]
    assert bad == []


def test_only_the_torch_backend_reads_the_models(graph):
    # the sampling loop and the pipeline know only the stage interface
    bad = [(m, e) for m, edges in graph.items()
           if under(m, "magicanimate_rt.runtime") and m != "magicanimate_rt.runtime.backends.torch_backend"
           for e in edges if under(e, "magicanimate_rt.models")]
    assert bad == []


def test_nothing_imports_the_command_line(graph):
    bad = [(m, e) for m, edges in graph.items() for e in edges if e == "magicanimate_rt.cli"]
    assert bad == []


def test_the_stage_contract_lives_in_engines(graph):
    assert "magicanimate_rt.engines.specs" in graph
    assert not (PACKAGE / "export" / "specs.py").exists()
    # the two TensorRT halves share the plan format and never import each other
    build, backend = "magicanimate_rt.engines.tensorrt_build", "magicanimate_rt.runtime.backends.tensorrt_backend"
    assert backend not in graph[build] and build not in graph[backend]
    assert "magicanimate_rt.engines.tensorrt_plan" in graph[build] & graph[backend]


def test_only_the_command_line_reads_the_service(graph):
    # the service (FastAPI, uvicorn) sits on top: nothing below it may need its packages
    bad = [(m, e) for m, edges in graph.items() for e in edges
           if under(e, "magicanimate_rt.serve") and not under(m, "magicanimate_rt.serve") and m != "magicanimate_rt.cli"]
    assert bad == []
    assert any(under(e, "magicanimate_rt.serve") for e in graph["magicanimate_rt.cli"])
    # and the service writes videos through the one writer the CLI uses
    assert "magicanimate_rt.render" in graph["magicanimate_rt.serve.jobs"]
    assert "magicanimate_rt.render" in graph["magicanimate_rt.config_run"]


def test_only_the_command_line_reads_compare(graph):
    # `magicanimate-rt compare` sits on the pipeline and its requests: nothing below it needs
    # scikit-image, and it needs neither the command line nor the service
    bad = [(m, e) for m, edges in graph.items() for e in edges
           if e == "magicanimate_rt.compare" and m != "magicanimate_rt.cli"]
    assert bad == []
    assert "magicanimate_rt.compare" in graph["magicanimate_rt.cli"]
    assert {"magicanimate_rt.runtime.request", "magicanimate_rt.runtime.media"} <= graph["magicanimate_rt.compare"]
    assert not any(under(e, "magicanimate_rt.serve", "magicanimate_rt.cli") for e in graph["magicanimate_rt.compare"])


def test_only_ray_app_imports_ray():
    # the base install has no ray: only the Ray Serve deployment (serve --ray) may import it
    found = []
    for name, path in module_files(PACKAGE).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.append(name)
    assert sorted(set(found)) == ["magicanimate_rt.serve.ray_app"]
