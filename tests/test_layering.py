"""Dependencies flow one way: schemas <- pipeline <- flows; sapiensid depends only on schemas."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "schemas": {"schemas"},
    "sapiensid": {"sapiensid", "schemas"},
    "pipeline": {"pipeline", "schemas", "sapiensid"},
    "flows": {"flows", "pipeline", "schemas", "sapiensid"},
}


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def test_import_direction():
    bad = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for imp in _project_imports(path) - allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert not bad, "imports against the layering rule:\n" + "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports, at module level or inside functions (a lazy import is
    still a dependency); imports under `if TYPE_CHECKING:` are annotations only and do not count."""
    mods = {}
    for pkg in ALLOWED:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    def walk(node: ast.AST, out: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.update(m for a in child.names if (m := resolve(a.name)))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.update(m for a in child.names if (m := resolve(f"{child.module}.{a.name}")))
            walk(child, out)

    graph = {}
    for name, path in mods.items():
        found: set[str] = set()
        walk(ast.parse(path.read_text()), found)
        graph[name] = found - {name}
    return graph


def test_no_import_cycle():
    """No module reaches itself through imports (e.g. bundle/remove.py <-> bundle/writer.py once did)."""
    graph = _module_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
