"""Selectors: which nodes of a traced graph a rule applies to.

A selector's keys are applied in a fixed order, each narrowing the candidates left by the previous one:

1. ``type``  – the module class, matched along the MRO (``LayerNorm`` matches timm's subclass; ``_BatchNorm``
   matches every batch norm), or ``fn:NAME`` for operations (``fn:add``, ``fn:scaled_dot_product_attention``),
   or ``Parameter``/``Buffer`` for tensors read directly (``cls_token``);
2. ``name``  – a glob on the qualified name (``layer*.conv2``), or ``re:`` + a full-match regular expression;
3. ``role``  – a structural role that means the same on every library (``head``, ``qkv``, ``mlp_in``, …);
4. ``blocks`` – position inside a run of identical blocks (``1::2``, ``[0, 5]``; negative counts from the end);
5. ``where`` – a safe predicate over the module's attributes (``kernel_size != (1, 1) and groups == 1``);
6. ``exclude`` – a selector whose matches are removed.

Inside one key a list means "any of". A selector that ends up empty is an error naming the filter that emptied
it and the closest valid names, unless ``optional: true``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.analysis.index import Candidate, NodeIndex, block_positions
from peftc.analysis.roles import get_role, role_names, why_absent
from peftc.errors import Location, SpecError, did_you_mean
from peftc.language import Selector
from peftc.language.predicate import Predicate, PredicateEvalError, UnknownName

__all__ = ["Candidate", "NodeIndex", "block_positions", "select"]

# -- where ------------------------------------------------------------------------------------------------------

_SIMPLE = (int, float, bool, str, type(None))


def _simple(value: Any) -> Any:
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
        return tuple(value)
    raise KeyError


class _Attributes(Mapping[str, Any]):
    """What a ``where`` predicate sees: module attributes of plain types, plus a few synthetic names."""

    def __init__(self, cand: Candidate):
        self.cand = cand

    def __getitem__(self, key: str) -> Any:
        c = self.cand
        synthetic = {
            "name": lambda: c.name,
            "type": lambda: c.type_name,
            "block": lambda: c.block[1] if c.block else None,
            "params": lambda: sum(p.numel() for p in c.module.parameters()) if c.module is not None else (
                c.tensor.numel() if c.tensor is not None else 0),
        }
        if key in synthetic:
            return synthetic[key]()
        if c.tensor is not None and key in ("shape", "ndim", "numel"):
            return {"shape": tuple(c.tensor.shape), "ndim": c.tensor.ndim, "numel": c.tensor.numel()}[key]
        if c.module is not None and not key.startswith("_"):
            try:
                return _simple(getattr(c.module, key))
            except AttributeError:
                pass
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        names = ["name", "type", "block", "params"]
        if self.cand.module is not None:
            names += [k for k in vars(self.cand.module) if not k.startswith("_") and k in self]
        return iter(names)

    def __len__(self) -> int:
        return sum(1 for _ in self)


# -- matching ---------------------------------------------------------------------------------------------------


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _block_filter(spec: str | list[int], cand: Candidate) -> bool:
    if cand.block is None:
        return False
    _, index, count = cand.block
    if isinstance(spec, list):
        return any(index == (i if i >= 0 else count + i) for i in spec)
    parts = [int(p) if p.strip() else None for p in spec.split(":")]
    if len(parts) == 1:
        i = parts[0] or 0
        return index == (i if i >= 0 else count + i)
    return index in range(count)[slice(*parts)]


@dataclass
class _Step:
    key: str
    describe: str
    keep: Callable[[Candidate], bool]
    explain: Callable[[list[Candidate]], str]


def _steps(sel: Selector, index: NodeIndex) -> list[_Step]:
    steps: list[_Step] = []
    types = _as_list(sel.type)
    if types:
        def explain_type(_: list[Candidate]) -> str:
            present = {t for c in index for t in c.types}
            return f"no node has type {' or '.join(map(repr, types))}" + did_you_mean(types[0], present)

        steps.append(_Step("type", f"type {'|'.join(types)}", lambda c: any(t in c.types for t in types),
                           explain_type))
    names = _as_list(sel.name)
    if names:
        def explain_name(left: list[Candidate]) -> str:
            plain = names[0].removeprefix("re:").replace("*", "")
            pool = [c.name for c in left]
            return f"no node named {' or '.join(map(repr, names))}" + did_you_mean(plain, pool)

        steps.append(_Step("name", f"name {'|'.join(names)}",
                           lambda c: any(_name_matches(p, c.name) for p in names), explain_name))
    role_list = _as_list(sel.role)
    if role_list:
        members: set[fx.Node] = set()
        for role in role_list:
            fn = get_role(role)
            if fn is None:
                raise _SelectorKeyError(
                    "role", f"unknown role {role!r}" + did_you_mean(role, role_names())
                    + f"; roles: {', '.join(role_names())}"
                )
            members |= {c.node for c in fn(index)}
        def explain_role(_: list[Candidate]) -> str:
            why = next((w for w in (why_absent(r, index) for r in role_list) if w), "")
            return f"no node plays role {' or '.join(map(repr, role_list))} in this backbone" + (
                f": {why}" if why else "")

        steps.append(_Step("role", f"role {'|'.join(role_list)}", lambda c: c.node in members, explain_role))
    if sel.blocks is not None:
        spec = sel.blocks

        def explain_blocks(left: list[Candidate]) -> str:
            counts = sorted({c.block[2] for c in left if c.block})
            if not counts:
                return "none of the matching nodes sits inside a run of repeated blocks"
            return f"blocks {spec} selects none of them (their blocks count {', '.join(map(str, counts))})"

        steps.append(_Step("blocks", f"blocks {spec}", lambda c: _block_filter(spec, c), explain_blocks))
    if sel.where is not None:
        pred = Predicate(sel.where)
        unknown: dict[str, int] = {}
        failed: list[str] = []  # why evaluating failed, per node it failed on

        def keep_where(c: Candidate) -> bool:
            try:
                return bool(pred(_Attributes(c)))
            except UnknownName as exc:
                unknown[exc.name] = unknown.get(exc.name, 0) + 1
                return False
            except PredicateEvalError as exc:  # a node the expression does not apply to does not match
                failed.append(str(exc))
                return False

        def explain_where(left: list[Candidate]) -> str:
            if unknown and sum(unknown.values()) >= len(left):
                missing = next(iter(unknown))
                attrs = {k for c in left[:20] for k in _Attributes(c)}
                return f"the matching nodes have no attribute {missing!r}" + did_you_mean(missing, attrs)
            if failed and len(failed) >= len(left):
                return failed[0]
            return f"none of the {len(left)} matching nodes satisfies where {sel.where!r}"

        steps.append(_Step("where", f"where {sel.where}", keep_where, explain_where))
    return steps


class _SelectorKeyError(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def _match(sel: Selector, index: NodeIndex) -> tuple[list[Candidate], _Step | None, list[Candidate]]:
    """Apply the filters in order; returns (matches, the step that emptied them, survivors before it)."""
    left = list(index)
    for step in _steps(sel, index):
        kept = [c for c in left if step.keep(c)]
        if not kept:
            return [], step, left
        left = kept
    return left, None, left


Locate = Callable[[tuple[str, ...]], Location]


def select(sel: Selector, index: NodeIndex, locate: Locate | None = None) -> list[Candidate]:
    """The candidates ``sel`` matches, in graph order.

    When nothing matches (and the selector is not optional) a SpecError names the filter that emptied the
    selection; ``locate(key_path)`` turns the selector key into a position in the spec.
    """
    where = locate or (lambda path: Location(path=path))
    try:
        matched, failed, before = _match(sel, index)
        if failed is None and sel.exclude is not None:
            excluded, _, _ = _match(sel.exclude, index)
            gone = {c.node for c in excluded}
            remaining = [c for c in matched if c.node not in gone]
            if not remaining and not sel.optional:
                raise SpecError(f"exclude removes all {len(matched)} matching nodes", _sub(where, "exclude"))
            return remaining
    except _SelectorKeyError as exc:
        raise SpecError(exc.message, _sub(where, exc.key)) from None
    if failed is None or sel.optional:
        return matched
    context = "" if failed.key == "where" or len(before) == len(index.candidates) else (
        f" ({len(before)} nodes match the keys before it)")
    raise SpecError(failed.explain(before) + context, _sub(where, failed.key))


def _sub(locate: Locate, key: str) -> Location:
    return locate((key,))
