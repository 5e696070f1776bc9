"""The built-in specs shipped in ``peftc.specs``: names, files and summaries, read without torch.

``peftc specs`` and the loader's name lookup both start here; nothing in this module validates a spec, so
listing them costs a directory read and a YAML parse, not the import of the block registry (and torch).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from peftc.errors import SpecError
from peftc.language.reader import read_yaml_file

__all__ = ["builtin_specs", "iter_builtin_summaries"]


def builtin_specs() -> dict[str, Path]:
    """Built-in spec name → file (the YAML files shipped in ``peftc.specs``)."""
    root = resources.files("peftc.specs")
    return {entry.name[:-5]: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}


def iter_builtin_summaries() -> Iterator[tuple[str, str]]:
    """(name, one-line summary) of every built-in spec, without validating them."""
    for name, path in sorted(builtin_specs().items()):
        try:
            data = read_yaml_file(path, SpecError, "spec").data or {}
        except SpecError:
            data = {}
        summary = str(data.get("summary", "")).strip() if isinstance(data, dict) else ""
        yield name, summary.splitlines()[0] if summary else ""
