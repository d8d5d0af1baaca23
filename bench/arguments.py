"""Checks of the bench entry points' arguments, shared so that each says the same thing the same way.

Every check raises ValueError with one line naming the flag, the value and what was expected; the entry points
print it as ``error: ...`` and exit 2. They run before any work, so a bad output path is found before minutes of
profiling or benchmarking, not when the result is written. Standard library only: ``bench.kernel_summary`` runs
without torch (and writes its table with ``write_text_atomic``, not the torch-importing checkpoint helpers).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def description(doc: str | None) -> str:
    """An argparse description from a module docstring: its whole first paragraph on one line (the first line alone
    can stop mid-sentence), without the reStructuredText literal marks."""
    first = (doc or "").strip().split("\n\n", 1)[0]
    return " ".join(first.split()).replace("``", "")


def positive(flag: str, value: float | None, what: str = "number") -> None:
    """``value`` (None: not given) must be a finite number above zero; NaN and infinity are refused too, since a
    peak, a bandwidth or a time limit of either would silently give meaningless figures."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} {value:g}: expected a positive {what}")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a new file or folder would be created in)."""
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def _creatable(flag: str, path: Path) -> None:
    """The folders up to ``path`` can be made and written in: its nearest existing ancestor is a writable folder."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ValueError(f"{flag} {path}: {base} is a file; expected a folder on the way to it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {base} is not writable")


def output_file(flag: str, path: Path | None) -> None:
    """``path`` (None: not given) can be written as a file: not a folder, in a folder that exists or can be made."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; expected a file name")
    _creatable(flag, path)


def output_folder(flag: str, path: Path) -> None:
    """``path`` is a writable folder, or one that can be made."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder; expected a folder")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder is not writable")
    _creatable(flag, path)


def read_benchmark_json(path: Path, flag: str = "") -> dict[str, Any]:
    """A pytest-benchmark JSON: an object whose ``benchmarks`` is a list of objects, each with a ``name``.

    ``flag`` (when the file came from an option) leads the error, so the message says which argument it was.
    """
    where = f"{flag} {path}" if flag else str(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where}: cannot read a benchmark JSON ({e})") from None
    entries = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{where}: expected a pytest-benchmark JSON object with a 'benchmarks' list")
    bad = next((i for i, e in enumerate(entries) if not isinstance(e, dict) or not isinstance(e.get("name"), str)),
               None)
    if bad is not None:
        raise ValueError(f"{where}: benchmarks[{bad}]: expected an object with a 'name'")
    return data


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temp file beside it and a rename; the temp file removed if either step fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
