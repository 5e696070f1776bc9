"""Maps for writing specs: ``peftc inspect`` (the nodes a selector matches) and ``peftc select`` (a dry run of
every rule's selectors)."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from peftc.analysis.index import NodeIndex, block_positions
from peftc.analysis.regions import trace_model
from peftc.analysis.select import select
from peftc.errors import Location
from peftc.language import Selector, load_spec
from peftc.tools.view import (
    Shape,
    build_view,
    input_shape,
    jsonable,
    view_model,
)

if TYPE_CHECKING:

    from peftc.analysis.backbones import Backbone


__all__ = ["InspectRow", "RuleMatch", "dry_run", "inspect_nodes", "parse_selector"]


# ------------------------------------------------------------------------------------------------------------
# Inspection and selector dry runs (the maps for writing specs)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InspectRow:
    """One selectable node of a graph, as ``peftc inspect`` lists it."""

    name: str
    type: str
    op: str
    shape: Shape
    params: int
    flops: int
    block: str | None
    roles: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "op": self.op,
            "shape": jsonable(self.shape),
            "params": self.params,
            "flops": self.flops,
            "block": self.block,
            "roles": list(self.roles),
        }


def parse_selector(text: str, where: str = "--filter") -> Selector:
    """A selector from YAML flow text (``'type: Linear'``, ``'{role: qkv, blocks: "::2"}'``)."""
    from pydantic import ValidationError

    from peftc.errors import SpecError
    from peftc.language.reader import read_yaml

    data = read_yaml(text, None, lambda msg, _: SpecError(msg, where)).data
    if not isinstance(data, dict):
        raise SpecError(
            f"expected a selector mapping such as 'type: Linear' or 'name: \"layer4.*\"', got {text!r}", where
        )
    try:
        return Selector.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if p not in ("str", "list[str]", "int", "list[int]"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            loc = ""
            from peftc.errors import did_you_mean

            key = str(err["loc"][-1])
            msg = (
                f"unknown selector key {key!r}"
                + did_you_mean(key, Selector.model_fields)
                + f"; keys: {', '.join(Selector.model_fields)}"
            )
        raise SpecError(f"{loc + ': ' if loc else ''}{msg}", where) from None


def inspect_nodes(
    backbone: str | nn.Module | Backbone,
    selector: Selector | str | None = None,
    *,
    spec: Any = None,
    params: Mapping[str, Any] | None = None,
    image_size: int | tuple[int, int] | None = None,
    seed: int = 0,
) -> list[InspectRow]:
    """The selectable nodes of a backbone (or of ``spec`` compiled on it), optionally filtered."""
    from peftc.analysis.roles import role_names
    from peftc.compiler import compile as compile_model
    from peftc.compiler import resolve_backbone

    bb = resolve_backbone(backbone, seed=seed)
    positions = block_positions(bb.module)
    shape = input_shape(tuple(bb.input_size), image_size)  # type: ignore[arg-type]
    if spec is not None:
        model = compile_model(load_spec(spec, params), copy.deepcopy(bb))
        view = view_model(model, shape, positions)
        gm = model.graph
    else:
        gm = trace_model(bb.module, input_size=bb.input_size)
        view = build_view(gm, shape=shape, positions=positions, baseline=True, label=bb.id)
    index = NodeIndex(gm, positions)
    if isinstance(selector, str):
        selector = parse_selector(selector)
    locate = lambda key: Location(path=("--filter", *key))  # noqa: E731
    chosen = list(index) if selector is None else select(selector, index, locate)
    roles: dict[fx.Node, list[str]] = defaultdict(list)
    for role in role_names():
        for cand in select(Selector(role=role, optional=True), index):
            roles[cand.node].append(role)
    rows = []
    for cand in chosen:
        info = view.nodes[view.fx_names[cand.node]]
        rows.append(
            InspectRow(
                info.name,
                info.type,
                info.op,
                info.shape,
                info.params,
                info.flops,
                info.block,
                tuple(roles.get(cand.node, ())),
            )
        )
    return rows


@dataclass(frozen=True)
class RuleMatch:
    """What one selector of one rule matches on the unrewritten backbone."""

    rule: str
    op: str
    key: str  # the selector's place in the rule: "" (the rule itself, freeze/train), "after", "to", "from", …
    selector: str
    matches: tuple[str, ...]
    types: tuple[str, ...]
    error: str | None = None
    optional: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "op": self.op,
            "key": self.key,
            "selector": self.selector,
            "count": len(self.matches),
            "matches": list(self.matches),
            "error": self.error,
        }


def _rule_selectors(args: Any) -> list[tuple[str, Selector]]:
    out: list[tuple[str, Selector]] = []
    if isinstance(args, Selector):
        out.append(("", args))
    for name, info in type(args).model_fields.items():
        value = getattr(args, name)
        if name == "exclude" or not isinstance(value, Selector):
            continue
        out.append((info.alias or name, value))
    return out


def _selects_all(sel: Selector) -> bool:
    return all(getattr(sel, k) is None for k in ("name", "type", "role", "where", "blocks"))


def dry_run(
    spec: Any, backbone: str | nn.Module | Backbone, *, params: Mapping[str, Any] | None = None, seed: int = 0
) -> list[RuleMatch]:
    """For every rule of ``spec``, what each of its selectors matches on the backbone; nothing is rewritten.

    Later rules run on a graph earlier rules changed, so a selector for nodes a rule inserts (``type:
    ChannelConv``) matches nothing here; such rules are reported with their error rather than aborting.
    """
    from peftc.compiler import resolve_backbone
    from peftc.errors import SpecError

    method = load_spec(spec, params)
    bb = resolve_backbone(backbone, seed=seed)
    gm = trace_model(bb.module, input_size=bb.input_size)
    index = NodeIndex(gm, block_positions(bb.module))
    out = []
    for rule in method.rules:
        for key, sel in _rule_selectors(rule.args):
            error = None
            try:
                if key == "" and _selects_all(sel):
                    found = list(index)
                    if sel.exclude is not None:
                        gone = {
                            c.node for c in select(sel.exclude.model_copy(update={"optional": True}), index)
                        }
                        found = [c for c in found if c.node not in gone]
                else:
                    path = (key,) if key else ()
                    found = select(sel, index, lambda k, r=rule, p=path: method.locate((*r.path, *p, *k)))
            except SpecError as exc:
                found, error = [], str(exc)
            unique = list({c.name: c for c in found}.values())  # a module called twice is one match
            out.append(
                RuleMatch(
                    rule.label,
                    rule.op,
                    key,
                    sel.describe() if not _selects_all(sel) else "all",
                    tuple(c.name for c in unique),
                    tuple(c.type_name for c in unique),
                    error,
                    sel.optional,
                )
            )
    return out
