"""The floor plan of docs/architecture.md, held: imports only go down, and no module imports
itself back through others. Every import counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Bottom to top; a package imports only from its own floor or below. Packages that share a floor
# (rollout and reward_server) do not import each other: they are peers, told apart by the driver.
FLOORS: list[tuple[str, ...]] = [
    ("common",),
    ("data",),
    ("rollout", "reward_server"),
    ("learner",),
    ("evaluation",),
    ("cluster",),
    ("bench",),
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every project module ``path`` imports (absolute or relative, anywhere in the file)."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` imports the module; `from module import name` the module
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in FLOOR)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (names that are not modules are dropped)."""
    files = [p for pkg in FLOOR for p in sorted((root / pkg).rglob("*.py"))]
    modules = {module_name(p, root): p for p in files}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports_of(path, root) if m in modules and m != name}
    return edges


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports that climb a floor, or cross between two peers of one floor."""
    found = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = src.split(".")[0], dst.split(".")[0]
            if FLOOR[b] > FLOOR[a] or (FLOOR[b] == FLOOR[a] and a != b):
                found.append(f"{src} -> {dst}")
    return sorted(found)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import circles between modules (the package __init__ files of this project are empty)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def test_every_package_is_on_a_floor():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages == set(FLOOR), "add the new package to FLOORS and docs/architecture.md"


def test_imports_only_go_down():
    assert upward(graph(REPO)) == []


def test_no_import_circles():
    assert circles(graph(REPO)) == []


def test_the_check_sees_an_upward_import_and_a_circle(tmp_path):
    for package, source in {
        "common": {"a.py": "def f():\n    from learner import b\n"},
        "learner": {"b.py": "from learner.c import x\n", "c.py": "from . import b\nx = 1\n"},
        "rollout": {"d.py": "import reward_server.e\n"},
        "reward_server": {"e.py": ""},
    }.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        for name, text in source.items():
            (tmp_path / package / name).write_text(text)
    edges = graph(tmp_path)
    assert upward(edges) == [
        "common.a -> learner",
        "common.a -> learner.b",
        "rollout.d -> reward_server.e",
    ]
    assert circles(edges) == [["learner.b", "learner.c", "learner.b"]]


def test_architecture_doc_names_every_floor():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for package in FLOOR:
        assert f"`{package}/`" in doc, f"docs/architecture.md does not place {package}/"


