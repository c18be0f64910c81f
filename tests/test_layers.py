"""The package's imports point one way: no cycles, and no module imports from a layer above its own.

The graph is read from the source with `ast` (nothing is imported), counting every import,
including those inside functions: a lazy import is still a dependency. `python tests/test_layers.py`
prints the cycles and upward imports it finds.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mtpspec"

# Bottom to top. A module belongs to the layer of its longest matching name (relative to
# `mtpspec`; a name matches itself and its submodules) and may import from its own layer or below.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "paths", "plotting"),  # ground floor: no mtpspec imports
    ("sampling", "verify", "stats", "text", "families", "prompts", "tree"),  # pure math, text and facts
    ("kernels",),  # C++ kernels for torch models
    ("attention", "models", "devices"),  # where Hugging Face models come from, and how they run
    ("runtime.build",),  # GGUF runtime: its C++ kernels (quant.cpp), products on the block formats
    ("runtime.weights",),  # the file's tensors in their block formats, memory-mapped
    ("runtime",),  # the lean forward (model), its KV cache (target), the profile, the package's face
    ("target", "mtp"),  # the target wrapper every drafter reads; the MTP drafter model
    ("drafters",),
    ("engine",),
    ("batch",),  # continuous batching: many engine generations, one pass per step
    ("api",),
    ("cli_args",),  # the flags that `generate`, `chat` and `serve` share
    ("training", "bench", "server"),  # applications of the library, independent of each other
    ("cli", "__init__"),  # the command line's dispatch, and the package's public face
]

# Packages of one layer that must not import each other either.
SIBLINGS = ("training", "bench", "server")

# Cycles another change removes; each entry must still be a cycle, so a fixed one fails here
# until it is deleted.
ALLOWED_CYCLES: list[frozenset[str]] = []


def module_names() -> dict[str, Path]:
    """Dotted names relative to `mtpspec` ("__init__" for the package itself) → source files."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports."""
    is_package = path.name == "__init__.py"
    package = [] if name == "__init__" else name.split(".")[: None if is_package else -1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
            found.update(_resolve(b.split(".")[1:], [], known) for b in bases if b.split(".")[0] == "mtpspec")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level - 1 <= len(package), f"{path}:{node.lineno}: relative import beyond mtpspec"
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "mtpspec":
                base = node.module.split(".")[1:]
            else:
                continue
            found.update(_resolve(base, [a.name], known) for a in node.names)
    found.discard(None)
    found.discard(name)
    return found


def _resolve(base: list[str], attr: list[str], known: set[str]) -> str | None:
    """`from base import attr` reads submodule base.attr where there is one, else base itself."""
    for parts in (base + attr, base):
        dotted = ".".join(parts) or "__init__"
        if dotted in known:
            return dotted
    return None


def graph() -> dict[str, set[str]]:
    files = module_names()
    return {name: imports(name, path, set(files)) for name, path in files.items()}


def layer_of(name: str) -> int:
    best, rank = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"mtpspec.{name} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return rank


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})"
        for a in sorted(edges)
        for b in sorted(edges[a])
        if layer_of(b) > layer_of(a)
    ]


def sideways(edges: dict[str, set[str]]) -> list[str]:
    def app(name: str) -> str | None:
        return next((s for s in SIBLINGS if name == s or name.startswith(s + ".")), None)

    return [f"{a} -> {b}" for a in sorted(edges) for b in sorted(edges[a]) if app(a) and app(b) and app(a) != app(b)]


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)


def test_no_import_cycles():
    found = [frozenset(c) for c in cycles(graph())]
    assert [sorted(c) for c in found if c not in ALLOWED_CYCLES] == []
    assert [sorted(c) for c in ALLOWED_CYCLES if c not in found] == [], "a cycle allowed here is gone: delete its entry"


def test_no_upward_imports():
    assert upward(graph()) == []


def test_applications_do_not_import_each_other():
    assert sideways(graph()) == []


def test_the_graph_reader_resolves_relative_and_lazy_imports(tmp_path):
    source = "from . import api\nfrom ..errors import MtpspecError\ndef f():\n    from .run import go\n"
    path = tmp_path / "cli.py"
    path.write_text(source)
    known = {"bench.api", "bench.run", "bench.cli", "errors", "bench"}
    assert imports("bench.cli", path, known) == {"bench.api", "bench.run", "errors"}


if __name__ == "__main__":
    edges = graph()
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports")
    print("cycles:", *(" <-> ".join(c) for c in cycles(edges)) or ["none"], sep="\n  ")
    print("upward imports:", *upward(edges) or ["none"], sep="\n  ")
    print("imports between applications:", *sideways(edges) or ["none"], sep="\n  ")
    sys.exit(0)
