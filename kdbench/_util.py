"""Small shared helpers: canonical hashing, atomic publishing of files, checksums."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

#: ``dataclasses.field(metadata=OMIT_WHEN_DEFAULT)``: an optional setting that is off by default (e.g. a metric
#: the protocol can switch on). :func:`to_jsonable` leaves it out while it has its default, so adding such a
#: setting changes no existing hash, output path, resolved config or record.
OMIT_WHEN_DEFAULT = {"omit_when_default": True}


def to_jsonable(obj: Any) -> Any:
    """Converts dataclasses, tuples, paths and numpy scalars into plain JSON types.

    A dataclass field marked :data:`OMIT_WHEN_DEFAULT` is left out while it equals its default.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_jsonable(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("omit_when_default") and getattr(obj, f.name) == field_default(f))
        }
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (its ``default_factory``'s product for a mutable default)."""
    return f.default_factory() if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING else f.default


def did_you_mean(name: Any, choices: Iterable[Any]) -> str:
    """``"; did you mean 'kd'?"``: the closest of ``choices`` to a misspelt ``name`` (up to three, by
    :func:`difflib.get_close_matches`), to end an error message with; ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3)
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short sha256 of the canonical JSON of ``obj`` (sorted keys), stable across runs and machines."""
    blob = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The full sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``final``; on success fsyncs it and renames it to ``final``.

    A crash or an exception leaves no file under the final name, so nothing half-written ever looks
    complete (a leftover ``*.tmp-<pid>`` file is ignored by every reader and overwritten by a rerun).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Reads a JSON file, turning a missing or corrupt file into an error that names it and ``what`` it is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); delete it and rerun the step that writes it") from e
