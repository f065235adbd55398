"""The layering contract (docs/DESIGN.md), read from the source with `ast`: no import cycle
between the project's modules (function-level imports count: a lazy import only hides a
cycle), the executor never imports the simulator, and modules and functions stay small.
Each test reports every violation it finds in one message."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("devices", "workloads", "policies", "timeline", "sim", "executor", "experiments")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the packages (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _imports(name: str) -> dict[str, int]:
    """The project modules `name` imports, anywhere in the file -> the first line doing so.
    `from a import b` is a.b when that is a module, else a."""
    is_pkg = MODULES[name].name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    found: dict[str, int] = {}
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                up = package[: len(package) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            if t in MODULES and t != name:
                found.setdefault(t, node.lineno)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _components() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is one tangle
    of cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return sorted(sccs)


def _shortest_cycle(start: str, members: set[str]) -> list[str]:
    """A shortest cycle through `start` inside its component (breadth-first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(GRAPH[v]):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle in {sorted(members)}")


def _cycles() -> list[list[str]]:
    """A shortest cycle through every module that is on one, each cycle once."""
    out, seen = [], set()
    for scc in _components():
        for start in scc:
            cycle = _shortest_cycle(start, set(scc))
            edges = frozenset(zip(cycle, cycle[1:]))
            if edges not in seen:
                seen.add(edges)
                out.append(cycle)
    return out


def _edge(a: str, b: str) -> str:
    return f"{MODULES[a].relative_to(ROOT)}:{GRAPH[a][b]}"


def _report(problems: list[str], what: str) -> None:
    """Fail with every problem in one message (no assertion rewriting noise)."""
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n" + "\n".join(problems), pytrace=False)


def test_no_import_cycle():
    problems = []
    for cycle in _cycles():
        hops = ", ".join(f"{a} -> {b} ({_edge(a, b)})" for a, b in zip(cycle, cycle[1:]))
        problems.append(f"  {' -> '.join(cycle)}: {hops}")
    _report(problems, "import cycle(s) (function-level imports included)")


def test_the_executor_never_imports_the_simulator():
    problems = []
    for name in sorted(MODULES):
        if name.split(".")[0] != "executor":
            continue
        for node in ast.walk(TREES[name]):     # absolute names as written: `import sim` too
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            problems += [f"  {name} imports {n} ({MODULES[name].relative_to(ROOT)}:{node.lineno})"
                         for n in names if n.split(".")[0] == "sim"]
        problems += [f"  {name} imports {dep} ({_edge(name, dep)})"
                     for dep in sorted(GRAPH[name]) if dep.split(".")[0] == "sim"]
    _report(sorted(set(problems)), "import(s) of the simulator in executor/ (it may import timeline/, never sim/)")


def test_modules_and_functions_stay_small():
    problems = []
    for name, path in sorted(MODULES.items()):
        rel = path.relative_to(ROOT)
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"  {rel}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(TREES[name]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    problems.append(f"  {rel}:{node.lineno} {node.name}(): {n} lines (at most {MAX_FUNCTION_LINES})")
    _report(problems, "module(s) or function(s) too large")
