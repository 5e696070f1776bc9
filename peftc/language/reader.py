"""The one YAML reader: every file a user hands peftc (specs, ``tasks.yaml``, selectors) is read here, bounded.

YAML from anyone can be hostile: a 500-byte billion-laughs document expands to billions of nodes, ``&a [*a]``
refers to itself, a deep ``[[[[…]]]]`` overflows the (recursive) composer, a Latin-1 byte is not text. Before
anything is built, the event stream (parsed without recursion) is measured — nesting depth, and node count
with every alias expanded — and a document over a limit is refused with one message naming the file and the
place. What comes back is plain data plus the ``file:line:col`` of every key and item, so later checks can
point into the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from peftc.errors import Location, PeftcError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "YamlDocument", "read_yaml", "read_yaml_file"]

MAX_BYTES = 1 << 20  # a built-in spec is ~2 KB, a tasks.yaml for 100 tasks ~10 KB
MAX_DEPTH = 64  # nested collections
MAX_NODES = 100_000  # scalars and collections, every alias expanded

Path_ = tuple[str | int, ...]
Error = Callable[[str, Location], PeftcError]


@dataclass
class YamlDocument:
    """Plain data (dicts, lists, scalars) and where each key and item stands in the file."""

    data: Any
    positions: dict[Path_, Location]
    file: str | None


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: the same events, 5-10x faster

def read_yaml_file(path: str | Path, error: Error, what: str = "file") -> YamlDocument:
    """Read and measure ``path`` (at most :data:`MAX_BYTES`); problems become ``error(message, location)``."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}", Location(str(path))) from None
    return read_yaml(raw, str(path), error)


def read_yaml(source: str | bytes, file: str | None, error: Error) -> YamlDocument:
    """Parse one YAML document from text or UTF-8 bytes, within the limits; ``None`` data if it is empty."""
    if len(source) > MAX_BYTES:
        raise error(f"is larger than {MAX_BYTES:,} bytes; refusing to read it", Location(file))
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = source[: exc.start].count(b"\n") + 1
            raise error(f"is not UTF-8 text (byte 0x{source[exc.start]:02x})", Location(file, line, 1)) from None
    try:
        _measure(source, file, error)
        loader = _LOADER(source)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        problem = getattr(exc, "problem", None) or str(exc)
        if "maximum nesting depth" in problem:  # libyaml's scanner has its own cap and reads ahead of our count
            raise error(f"nests deeper than {MAX_DEPTH} levels", where) from None
        raise error(f"invalid YAML: {problem}", where) from None
    if root is None:
        return YamlDocument(None, {}, file)
    return _build(root, file, error)


def _measure(text: str, file: str | None, error: Error) -> None:
    """Refuse documents too deep, too large once aliases expand, or with an alias inside its own anchor."""
    sizes: dict[str, int] = {}  # anchor -> expanded node count
    open_: list[tuple[str | None, int]] = []  # open collections: (anchor, node count when opened)
    total = 0
    for event in yaml.parse(text, Loader=_LOADER):
        mark = event.start_mark
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            total += 1
            open_.append((event.anchor, total))
            if len(open_) > MAX_DEPTH:
                raise error(f"nests deeper than {MAX_DEPTH} levels", where)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, start = open_.pop()
            if anchor is not None:
                sizes[anchor] = total - start + 1
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_):
                raise error(f"alias *{event.anchor} refers to a collection that contains it", where)
            total += sizes.get(event.anchor, 1)
        if total > MAX_NODES:
            raise error(f"expands to more than {MAX_NODES:,} values (aliases counted each time used)", where)


def _build(root: yaml.Node, file: str | None, error: Error) -> YamlDocument:
    constructor = yaml.constructor.SafeConstructor()
    positions: dict[Path_, Location] = {}

    def at(node: yaml.Node, path: Path_) -> Location:
        return Location(file, node.start_mark.line + 1, node.start_mark.column + 1, path)

    def build(node: yaml.Node, path: Path_) -> Any:
        if isinstance(node, yaml.MappingNode):
            constructor.flatten_mapping(node)
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = construct(key_node, path)
                if not isinstance(key, str):
                    raise error(f"keys must be strings, got {key!r}", at(key_node, path))
                if key in out:
                    raise error(f"duplicate key {key!r}", at(key_node, (*path, key)))
                positions[(*path, key)] = at(key_node, (*path, key))
                out[key] = build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                positions[(*path, i)] = at(item, (*path, i))
                items.append(build(item, (*path, i)))
            return items
        return construct(node, path)

    def construct(node: yaml.Node, path: Path_) -> Any:
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise error(f"invalid value: {exc}", at(node, path)) from None
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. an unhashable (collection) mapping key
            raise error(f"invalid value: {exc}", at(node, path)) from None

    positions[()] = at(root, ())
    data = build(root, ())
    return YamlDocument(data, positions, file)
