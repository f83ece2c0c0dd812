"""The package's import graph: no circles, and no module imports a layer above its own.

Layers, from the bottom: contracts and metadata -> methods -> config -> data sources and views -> the plan ->
stage building blocks -> training loop and teacher sources -> stages (teacher, cache) -> distillation ->
reporting and verification -> the CLI. Function-level imports count like module-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdbench"

LAYERS: list[set[str]] = [
    {"kdbench", "errors", "_util", "_typed", "registry", "taps", "models", "_staged", "cifar_nets", "meta", "retrieval",
     "record", "prune", "space",
     "plugins", "scaffold"},
    {"methods", "methods.*"},
    {"config", "selection", "contract"},
    {"data", "data.codec", "data.encoded", "data.imagefolder", "data.wds_source", "data.sources", "data.layout",
     "data.views", "numerics", "distributed"},
    {"plan"},
    {"data.shards", "data.prepare", "data.stream", "runtime", "evaluate", "cache", "cache.store", "tuning",
     "preflight"},
    {"modeldir", "train", "train.optim", "train.loop", "train.checkpoint", "cache.source", "cache.inputs"},
    {"teacher", "cache.build", "cache.check"},
    {"distill"},
    {"verify", "report", "report.*", "tasearch", "estimate", "resources"},
    {"cli"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts) if parts else "kdbench"] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The kdbench modules that ``path`` imports (``from kdbench.x import y`` counts y when y is a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, ["kdbench", *package.split(".")[: len(package.split(".")) - node.level + 1], base]))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t == "kdbench" or t.startswith("kdbench."):
                short = t[len("kdbench."):] if t != "kdbench" else "kdbench"
                if short in known:
                    found.add(short)
    found.discard(name)
    return found


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        for pattern in layer:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return i
    raise AssertionError(f"module kdbench.{module} has no layer: add it to LAYERS in {__file__}")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, set(modules)) for m, p in modules.items()}


def test_every_module_has_a_layer_and_imports_only_downward():
    upward = [
        f"kdbench.{m} (layer {_layer(m)}) imports kdbench.{d} (layer {_layer(d)})"
        for m, deps in _graph().items()
        for d in deps
        if _layer(d) > _layer(m) and d != "kdbench"
    ]
    assert upward == []


def test_the_import_graph_has_no_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d == "kdbench":
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_graph_sees_imports_at_every_level():
    """The checker itself: it must see function-level imports, or the two tests above could not fail."""
    graph = _graph()
    assert "distill" in graph["verify"] and "plan" in graph["cli"] and "methods" in graph["config"]
