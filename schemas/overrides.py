"""`--set key=value` command-line overrides: one parser for every CLI (the build, training, fine-tuning).

It lives at the schemas level because both `pipeline`/`flows` and `sapiensid` (which may depend only on
`schemas`) take overrides. Values are read as YAML scalars or flow collections, so `12`, `0.5`, `true`,
`null`, `[a, b]` and `{k: 1}` are typed, and JSON values (a subset of YAML's flow style) parse the same.
"""

from __future__ import annotations

from typing import Any

import yaml


class OverrideError(ValueError):
    """A `--set` item that is not `key=value`, or whose key is not a dotted name."""


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["a.b=1", "name=demo"]` -> `{"a.b": 1, "name": "demo"}`; later items win over earlier ones."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise OverrideError(f"--set expects key=value with a dotted key (e.g. run.executor=local), got {item!r}")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw  # not YAML (e.g. an unbalanced bracket in a path): the text as it was given
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for key "a.b", creating the intermediate mappings."""
    parts = key.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise OverrideError(f"--set {key}: '{part}' holds a value, not a section")
        cur = nxt
    cur[parts[-1]] = value
