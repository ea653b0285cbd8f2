"""Readers and validators for the five data formats of SPEC section 4.

    load(path, kind=None, check_files=True) -> list[dict]

Each file is a JSON list. Paths inside are relative to the JSON file; `load` returns
copies of the entries with every path key made absolute, after checking keys and types
(and, with `check_files`, that the files exist). A bad entry raises `UserError` naming
the file, the entry index and the key. `kind=None` infers the kind from the first
entry's keys. Keys beyond the required ones are kept (the synthetic world adds `scene`,
`id`, `type`, `edit`, ...).

    kind       required                                  optional
    pairs      image, caption                            phrases [str], instances, scene
    edits      source, target, instruction               source_scene, target_scene, edit
    instruct   image, conversations [{from, value}]      id, type
    referring  image, expression, mask                   object, scene
    objects    image, instances                          scene
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError

KINDS = ("pairs", "edits", "instruct", "referring", "objects")

# kind -> (required {key: type}, optional {key: type}); type "path" = a relative path string
SCHEMA: dict[str, tuple[dict, dict]] = {
    "pairs": ({"image": "path", "caption": str}, {"phrases": list, "instances": "path", "scene": "path"}),
    "edits": ({"source": "path", "target": "path", "instruction": str},
              {"source_scene": "path", "target_scene": "path", "edit": dict}),
    "instruct": ({"image": "path", "conversations": list}, {"id": (str, int), "type": str}),
    "referring": ({"image": "path", "expression": str, "mask": "path"}, {"object": int, "scene": "path"}),
    "objects": ({"image": "path", "instances": "path"}, {"scene": "path"}),
}


def infer_kind(entry: dict) -> str:
    keys = set(entry)
    for kind in ("edits", "instruct", "referring", "pairs", "objects"):
        if set(SCHEMA[kind][0]) <= keys:
            return kind
    raise UserError(f"cannot tell the data format from the keys {sorted(keys)}; expected one of "
                    + "; ".join(f"{k}: {sorted(SCHEMA[k][0])}" for k in KINDS))


def read_json_list(path: str | Path) -> list:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p}")
    if p.is_dir():
        raise UserError(f"{p} is a directory; pass a JSON file such as {p}/pairs.json")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise UserError(f"{p} must hold a JSON list of entries, found {type(data).__name__}")
    return data


def _type_ok(value, typ) -> bool:
    if typ == "path":
        return isinstance(value, str) and value != ""
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _type_name(typ) -> str:
    if typ == "path":
        return "a path string"
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


def validate_entry(entry, kind: str, where: str) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a JSON object, found {type(entry).__name__}")
    req, opt = SCHEMA[kind]
    for key, typ in req.items():
        if key not in entry:
            raise UserError(f"{where}: missing key '{key}' (a {kind} entry needs {', '.join(req)})")
    for key, typ in {**req, **opt}.items():
        if key in entry and not _type_ok(entry[key], typ):
            raise UserError(f"{where}: key '{key}' must be {_type_name(typ)}, "
                            f"found {type(entry[key]).__name__}")
    if kind == "pairs" and "phrases" in entry and not all(isinstance(p, str) for p in entry["phrases"]):
        raise UserError(f"{where}: key 'phrases' must be a list of strings")
    if kind == "instruct":
        conv = entry["conversations"]
        if not conv:
            raise UserError(f"{where}: key 'conversations' is empty")
        for t, turn in enumerate(conv):
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") \
                    or not isinstance(turn.get("value"), str):
                raise UserError(f"{where}: key 'conversations'[{t}] must be "
                                '{"from": "human"|"gpt", "value": str}')


def path_keys(kind: str) -> list[str]:
    req, opt = SCHEMA[kind]
    return [k for k, t in {**req, **opt}.items() if t == "path"]


def load(path: str | Path, kind: str | None = None, check_files: bool = True) -> list[dict]:
    """Validated entries of a SPEC data file with absolute path strings."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    p = Path(path)
    data = read_json_list(p)
    if not data:
        return []
    if kind is None:
        kind = infer_kind(data[0] if isinstance(data[0], dict) else {})
    base = p.resolve().parent
    keys = path_keys(kind)
    out = []
    for i, e in enumerate(data):
        where = f"{p}: entry {i}"
        validate_entry(e, kind, where)
        e = dict(e)
        for k in keys:
            if k in e:
                full = os.path.normpath(os.path.join(base, e[k]))
                if check_files and not os.path.isfile(full):
                    raise UserError(f"{where}: key '{k}' names a file that does not exist: {full}")
                e[k] = full
        out.append(e)
    return out


def load_kind(path: str | Path, kinds: tuple[str, ...], check_files: bool = True) -> tuple[str, list[dict]]:
    """Like `load` with the kind inferred, which must be one of `kinds`."""
    data = read_json_list(path)
    if not data:
        raise UserError(f"{path} holds no entries")
    kind = infer_kind(data[0] if isinstance(data[0], dict) else {})
    if kind not in kinds:
        raise UserError(f"{path} looks like {kind} data; this needs {' or '.join(kinds)} data")
    return kind, load(path, kind, check_files)
