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
