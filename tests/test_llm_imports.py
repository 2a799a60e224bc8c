"""No import circles among llm's modules (design.md's layer diagram: every arrow points down).

The graph is read from the source with `ast`, so it holds every import: at module level and
inside functions (a function-level import is still an arrow; deferring it only hides the
circle until the function runs). `from llm.pkg import name` points at llm.pkg.name when that
is a module, else at llm.pkg.
"""

import ast
from pathlib import Path

LLM = Path(__file__).resolve().parents[1] / "python" / "llm"


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module and package under root."""
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(module: str, path: Path) -> list[str]:
    """The absolute dotted names `module` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    files = module_files(root)

    def owning_module(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        targets = {owning_module(name) for name in imported_names(module, path)}
        graph[module] = {target for target in targets if target and target != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None if the graph is acyclic (depth-first search)."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_find_cycle_sees_circles_through_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("import os\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "high.py").write_text("from ..low import x\nfrom pkg import low\n")
    assert import_graph(package)["pkg.sub.high"] == {"pkg.low"}
    assert find_cycle(import_graph(package)) is None
    (package / "low.py").write_text("def f():\n    from pkg.sub import high\n")  # deferred, still a circle
    assert find_cycle(import_graph(package)) == ["pkg.low", "pkg.sub.high", "pkg.low"]


def test_llm_has_no_import_circles():
    graph = import_graph(LLM)
    assert {"llm.generate", "llm.generate_cli", "llm.apps.prompting"} <= graph.keys()
    assert "llm.apps.prompting" in graph["llm.generate_cli"]  # the graph holds function-level imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
