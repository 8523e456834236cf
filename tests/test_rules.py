"""The house rules, read from the source with the standard library's ``ast`` (no imports of the code).

Every module of ``search/`` and ``trainables/`` (packages included, recursively) is at most 500
lines and every function at most 80 (the files of ``tests/``, ``bench/`` and ``spaces/`` too); the modules
of the two packages import each other without cycles (every import statement counts, those inside
functions too); ``trainables/`` imports neither ``search`` nor Ray nor MLflow; the spec
(``search/spec.py`` or the ``search/spec/`` package) never imports ``search.tracking`` or MLflow,
directly or through the modules it imports.
Each failure lists every offender.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "trainables")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def scripts() -> list[Path]:
    """The Python files outside the packages that the size rules cover: tests, benchmarks, data makers."""
    found = (p for d in ("tests", "bench", "spaces") for p in (ROOT / d).rglob("*.py"))
    return sorted(p for p in found if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the packages: dotted name -> file (a package is its ``__init__.py``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(path)] = path
    return found


@cache
def tree(name: str) -> ast.Module:
    path = modules()[name]
    return ast.parse(path.read_text(), filename=str(path))


def _is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def _kinds(name: str) -> dict[int, str]:
    """Line of each import statement inside a function or under ``if TYPE_CHECKING`` -> that kind
    (shown in the messages: such imports count, but a reader wants to know)."""
    kinds: dict[int, str] = {}

    def walk(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = kind
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not kind:
                here = "in a function"
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                here = "under TYPE_CHECKING"
            if isinstance(child, (ast.Import, ast.ImportFrom)) and here:
                kinds[child.lineno] = here
            walk(child, here)

    walk(tree(name), "")
    return kinds


def imported(name: str) -> list[tuple[str, int]]:
    """(dotted target, line) for every import statement of module ``name``, anywhere in it (in
    functions and under ``if TYPE_CHECKING`` too); relative imports resolved; ``from X import y``
    gives ``X.y`` when that is a module, else ``X``."""
    own = modules()
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.append((sub if sub in own else source, node.lineno))
    return out


def _own_target(target: str) -> str | None:
    """The module of the packages that importing ``target`` names (its longest known prefix)."""
    own = modules()
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in own:
            return candidate
    return None


@cache
def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of the packages: first line importing it}."""
    edges: dict[str, dict[str, int]] = {}
    for name in modules():
        edges[name] = {}
        for target, line in imported(name):
            own = _own_target(target)
            if own is not None and own != name:
                edges[name].setdefault(own, line)
    return edges


def _where(name: str, line: int | None = None) -> str:
    path = modules()[name].relative_to(ROOT)
    if not line:
        return str(path)
    kind = _kinds(name).get(line)
    return f"{path}:{line}, {kind}" if kind else f"{path}:{line}"


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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


def _cycle_in(component: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first: a shortest one)."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v]):
            if w == start:
                return paths[v] + [start]
            if w in members and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


def _chain(cycle: list[str], edges: dict[str, dict[str, int]]) -> str:
    return " -> ".join(
        f"{a} ({_where(a, edges[a][b])})" if b else a for a, b in zip(cycle, [*cycle[1:], None], strict=True)
    )


# ---------------------------------------------------------------- the rules


def test_the_rules_see_the_code():
    """The reader finds the packages and resolves imports (else every rule would pass vacuously)."""
    names = modules()
    assert {"search", "search.cli", "trainables", "trainables.trial"} <= set(names), sorted(names)
    assert {"search_efficiency.py", "make_demo_data.py", "test_rules.py"} <= {p.name for p in scripts()}
    assert "trainables.config" in graph()["trainables.trial"], graph()["trainables.trial"]
    assert sum(len(targets) for targets in graph().values()) > len(names), "too few imports found"
    toy = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}  # the cycle finder itself
    assert strongly_connected(toy) == [["a", "b", "c"]]
    assert _cycle_in(["a", "b", "c"], toy) == ["a", "b", "c", "a"]


def test_every_module_is_at_most_500_lines():
    offenders = []
    for path in [*modules().values(), *scripts()]:
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            offenders.append(f"{path.relative_to(ROOT)}: {n} lines")
    head = f"{len(offenders)} module(s) over {MAX_MODULE_LINES} lines:\n"
    assert not offenders, head + "\n".join(offenders)


def _long_functions(root: ast.AST, where: Callable[[int], str]) -> list[tuple[int, str]]:
    """(lines, "where name: n lines") of every function in ``root`` over the limit."""
    found = []
    for node in ast.walk(root):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                found.append((n, f"{where(node.lineno)} {node.name}: {n} lines"))
    return found


def test_every_function_is_at_most_80_lines():
    offenders = []
    for name in modules():
        offenders += _long_functions(tree(name), lambda line, name=name: _where(name, line))
    for path in scripts():
        where = f"{path.relative_to(ROOT)}:{{}}".format
        offenders += _long_functions(ast.parse(path.read_text(), filename=str(path)), where)
    offenders.sort(reverse=True)
    assert not offenders, f"{len(offenders)} function(s) over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(
        text for _, text in offenders
    )


def test_no_import_cycles():
    edges = graph()
    cycles = [
        f"{_chain(_cycle_in(c, edges), edges)}  [modules in this cycle: {', '.join(c)}]"
        for c in strongly_connected(edges)
    ]
    assert not cycles, f"{len(cycles)} import cycle(s) (module (where it imports the next)):\n" + "\n".join(
        cycles
    )


def test_trainables_import_neither_search_nor_ray_nor_mlflow():
    offenders = []
    for name in modules():
        if name.split(".")[0] != "trainables":
            continue
        for target, line in imported(name):
            if target.split(".")[0] in ("search", "ray", "mlflow"):
                offenders.append(f"{_where(name, line)} imports {target}")
    assert not offenders, "trainables/ reaches up or out:\n" + "\n".join(offenders)


def _spec_modules() -> list[str]:
    return [n for n in modules() if n == "search.spec" or n.startswith("search.spec.")]


def _touches_mlflow(name: str) -> str | None:
    """Why module ``name`` is tracking: it is ``search.tracking`` (or under it), or imports mlflow."""
    if name == "search.tracking" or name.startswith("search.tracking."):
        return "is search.tracking"
    for target, line in imported(name):
        if target.split(".")[0] == "mlflow":
            return f"imports {target} ({_where(name, line)})"
    return None


def test_the_spec_never_imports_tracking_or_mlflow():
    """Directly or through the modules it imports (every import statement, as the cycle rule)."""
    specs = _spec_modules()
    assert specs, "no search/spec.py and no search/spec/ package"
    edges = graph()
    offenders = []
    for start in specs:
        for target, line in imported(start):
            if target.split(".")[0] == "mlflow" or (target + ".").startswith("search.tracking."):
                offenders.append(f"{_where(start, line)} imports {target}")
        paths = {start: [start]}
        queue = [start]
        while queue:  # breadth-first: the shortest path to each reachable module
            v = queue.pop(0)
            for w in sorted(edges[v]):
                if w in paths:
                    continue
                paths[w] = paths[v] + [w]
                why = _touches_mlflow(w)
                if why:
                    offenders.append(f"{_chain(paths[w], edges)}, which {why}")
                else:
                    queue.append(w)
    assert not offenders, "the spec reaches MLflow:\n" + "\n".join(sorted(set(offenders)))
