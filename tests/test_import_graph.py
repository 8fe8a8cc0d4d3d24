"""llmspeed's imports run one way: no module reaches itself through imports (function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import llmspeed

ROOT = Path(llmspeed.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("llmspeed", *path.relative_to(ROOT).with_suffix("").parts)
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of nodes under ``if TYPE_CHECKING:`` (annotations only: never run)."""
    return {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of llmspeed it imports}``; a package importing its own submodules is not an edge."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        skip = _typing_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[tuple[str, str]] = []
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                targets = [(f"{source}.{alias.name}", source) for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [(alias.name, alias.name) for alias in node.names]
            for candidates in targets:
                for target in candidates:  # the submodule itself if it is one, else the module it comes from
                    if target in files:
                        if target != module and not target.startswith(module + "."):
                            graph[module].add(target)
                        break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_do_not_import_higher_ones():
    graph = import_graph()

    def reaches(start: str, prefix: str) -> list[str]:
        seen, todo = set(), [start]
        while todo:
            for w in graph[todo.pop()]:
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return sorted(w for w in seen if w == prefix or w.startswith(prefix + "."))

    # the kernel layer and the plain-data config never reach the benchmark suites or the module classes
    assert reaches("llmspeed.quant.kernels", "llmspeed.bench") == []
    assert reaches("llmspeed.quant.kernels.auto", "llmspeed.quant.modules") == []
    assert reaches("llmspeed.quant.config", "llmspeed") == []
    assert reaches("llmspeed.protocol", "llmspeed") == []
    assert reaches("llmspeed.quant.calibration", "llmspeed.quant.methods") == []
