"""The package's import graph has no circle, and no module imports from a floor above its own
(the floors of the README's "Layout of the code": shells > functional core > rules > machinery).

Every ``import`` / ``from ... import`` statement counts, at module level and inside functions
(a function-local import is still an edge: the module needs the other one to run), relative
(``from . import x``, ``from .x import y``) and absolute (``import cusyncbn.torch``,
``from cusyncbn.bench import y``). Importing a submodule also runs the package's
``__init__``; that implicit step is not an edge (every module would otherwise sit in a circle
with ``__init__``), but an explicit ``import cusyncbn`` is.
"""
from __future__ import annotations

import ast
from pathlib import Path

import cusyncbn

PACKAGE = "cusyncbn"
ROOT = Path(cusyncbn.__file__).parent


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (anywhere in its body)."""
    files = {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)

    def known(name: str) -> str | None:
        """``name`` itself when it is one of the package's modules, else its longest module prefix."""
        while name:
            if name in modules:
                return name
            name = name.rpartition(".")[0]
        return None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]        # what "." means in this file
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        target = known(alias.name)
                        if target:
                            edges.add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                    if not (source == package or source.startswith(package + ".")):
                        continue
                subs = {f"{source}.{alias.name}" for alias in node.names} & modules
                edges |= subs                              # from . import _abort: the submodule
                if len(subs) < len(node.names):            # a name defined in ``source`` itself
                    target = known(source)
                    if target:
                        edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): the
    modules that reach each other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per tangle, from its first module (by name) back to it."""
    cycles = []
    for component in tangles(graph):
        members = set(component)
        start = component[0]
        # Shortest path back to the start inside the component (breadth first).
        parents: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in parents:
                        parents[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(parents[path[-1]])
        cycle = list(reversed(path)) + [start]
        cycles.append(cycle)
    return cycles


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20                                 # the walk found the package's modules
    cycles = find_cycles(graph)
    message = "\n".join(" -> ".join(cycle) + f"   (the circle joins {', '.join(component)})"
                        for cycle, component in zip(cycles, tangles(graph)))
    if cycles:
        print("import circles:\n" + message)
    assert cycles == [], "import circles:\n" + message


# The floors of the README's "Layout of the code", lowest first: a module may import modules of
# its own floor or below, never above. A new module must be given its floor here.
FLOORS = {
    "machinery": ["_abort", "_backend", "_backend_cupy", "_backend_factory", "_backend_numpy", "_comm",
                  "_comm_factory", "_device", "_dlpack", "_flags", "_kernels", "_launch", "_nccl", "_params",
                  "_stacklevel", "_streams", "_tuning", "_watchdog"],
    "rules": ["_convert", "_debug", "_grad_mode", "_options", "_rules", "_state"],
    "functional core": ["functional", "_pending", "_planned"],
    "shells": ["", "_bench_cases", "_bench_model", "_checkpoint", "_grads", "_hostcost", "_layer", "_ncu", "_recording",
               "_reference", "_sweep", "bench", "paddle", "torch"],
}


def floor_of() -> dict[str, int]:
    return {(f"{PACKAGE}.{name}" if name else PACKAGE): level
            for level, names in enumerate(FLOORS.values()) for name in names}


def upward_imports(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    names = list(FLOORS)
    return [f"{a} ({names[floors[a]]}) imports {b} ({names[floors[b]]})"
            for a in sorted(graph) for b in sorted(graph[a]) if floors[b] > floors[a]]


def test_every_module_has_a_floor():
    floors = floor_of()
    assert sorted(set(import_graph()) - set(floors)) == []            # give a new module its floor
    assert sorted(set(floors) - set(import_graph())) == []            # a module was removed or renamed


def test_no_module_imports_from_a_floor_above_its_own():
    assert upward_imports(import_graph(), floor_of()) == []


def test_the_floor_check_can_fail():
    graph = import_graph()
    graph[f"{PACKAGE}._rules"] = graph[f"{PACKAGE}._rules"] | {f"{PACKAGE}.functional"}
    assert upward_imports(graph, floor_of()) == [
        f"{PACKAGE}._rules (rules) imports {PACKAGE}.functional (functional core)"]


def test_the_circle_check_can_fail(tmp_path):
    """A circle through a function-local relative import and an absolute one is found and named."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g()\n")
    (pkg / "b.py").write_text("from . import c\n")
    (pkg / "c.py").write_text("def h():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg.a import f\n")   # into the circle, not part of it
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    (pkg / "c.py").write_text("def h():\n    pass\n")
    assert find_cycles(import_graph(pkg, "pkg")) == []
