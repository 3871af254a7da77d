"""The import graph of the project: no module imports itself back, even through a function.

Every project .py file is parsed with ``ast``; each ``import`` / ``from ... import`` anywhere
in it (module level or inside a function) that names a project module becomes an edge, and
importing ``a.b`` also runs ``a/__init__.py``, so it is an edge to ``a`` too (except from inside
``a``, which is imported before any of its modules).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".venv", "venv", "data", "migrations", "__pycache__", ".git", "node_modules"}


def project_modules(root=ROOT):
    """Dotted module name -> file, for every .py file of the project."""
    modules = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if any(part in SKIPPED_DIRS or part.startswith(".") for part in relative.parts[:-1]):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            modules[".".join(parts)] = path
    return modules


def _with_parents(name, modules):
    """``name`` and the packages above it that are project modules (they run first)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)
            if ".".join(parts[:i]) in modules]


def imports_of(name, path, modules):
    """(imported project module, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found += [(target, node.lineno) for target in _with_parents(alias.name, modules)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = _with_parents(base, modules) if base else []
            for alias in node.names:
                submodule = f"{base}.{alias.name}" if base else alias.name
                if submodule in modules:
                    targets.append(submodule)
            found += [(target, node.lineno) for target in targets]
    # A module's own packages are imported before it runs: an edge to them is no cycle.
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return [(target, line) for target, line in found
            if target != name and target not in ancestors]


def import_graph(root=ROOT):
    """module -> {imported module: first line of the import}."""
    modules = project_modules(root)
    graph = {}
    for name, path in modules.items():
        edges = {}
        for target, line in imports_of(name, path, modules):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycles(graph):
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def describe(group, graph):
    """One cycle through ``group`` written as ``a:12 -> b:3 -> a`` (module:line of import)."""
    members = set(group)
    start = group[0]
    # Breadth-first back to ``start`` inside the group gives a shortest cycle.
    previous = {start: None}
    queue = [start]
    end = None
    while queue and end is None:
        node = queue.pop(0)
        for target in sorted(graph[node]):
            if target == start:
                end = node
                break
            if target in members and target not in previous:
                previous[target] = node
                queue.append(target)
    path = [end]
    while previous[path[-1]] is not None:
        path.append(previous[path[-1]])
    path.reverse()
    steps = [f"{a}:{graph[a][b]}" for a, b in zip(path, path[1:] + [start])]
    return " -> ".join(steps + [start])


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert {"app", "models", "worker", "tests.conftest"} <= set(graph)
    assert "models" in graph["app"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = [describe(group, graph) for group in find_cycles(graph)]
    assert not cycles, "Import cycles:\n" + "\n".join(cycles)


def test_cycles_are_found_and_named(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "c.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path)
    assert graph["c"] == {"pkg": 1, "pkg.a": 1}
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]
    assert describe(["pkg.a", "pkg.b"], graph) == "pkg.a:1 -> pkg.b:2 -> pkg.a"
