"""A small YAML writer for the manifests and the endpoints file (no PyYAML at run time).

Block style for mappings and sequences; every string is a JSON string, which is a
valid YAML double-quoted scalar, so no value is ever read back as something else
(``"on"``, ``"0755"``, ``"8000"`` stay strings). Keys are written plain only when
they cannot be mistaken for anything but a string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
#: Words YAML 1.1 readers (PyYAML, go-yaml v2) take for booleans or null.
_RESERVED = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "none", "~"})


def _key(key: str) -> str:
    if _PLAIN_KEY.match(key) and key.lower() not in _RESERVED:
        return key
    return json.dumps(key)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _is_block(value: Any) -> bool:
    return isinstance(value, (Mapping, list, tuple)) and bool(value)


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if _is_block(item):
                out.append(f"{pad}{_key(str(key))}:")
                # A sequence under a key is not indented further (the common style).
                out += _lines(item, indent if isinstance(item, (list, tuple)) else indent + 2)
            else:
                out.append(f"{pad}{_key(str(key))}: {_empty_or_scalar(item)}")
        return out
    for item in value:
        if _is_block(item):
            inner = _lines(item, indent + 2)
            out.append(f"{pad}- {inner[0][indent + 2 :]}")
            out += inner[1:]
        else:
            out.append(f"{pad}- {_empty_or_scalar(item)}")
    return out


def _empty_or_scalar(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, (list, tuple)):
        return "[]"
    return _scalar(value)


def dump(doc: Mapping[str, Any]) -> str:
    """One YAML document for `doc` (mappings, sequences, str, int, float, bool, None)."""
    return "\n".join(_lines(doc, 0)) + "\n"


def dump_all(docs: Sequence[Mapping[str, Any]]) -> str:
    """Several documents, each introduced by ``---``."""
    return "".join(f"---\n{dump(doc)}" for doc in docs)


def comment(text: str) -> str:
    """`text` as YAML comment lines (``# ...``), one per line of `text`."""
    return "".join(f"# {line}".rstrip() + "\n" for line in text.splitlines())
