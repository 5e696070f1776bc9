"""Comparing two graph views: a diff of nodes, wiring and tensor ownership, collapsed over repeated blocks.

Both graphs are first described as *views* (:mod:`peftc.tools.view`): every node under its qualified name, with
its type, inputs, example shape, FLOPs and the tensors it owns with their state (``frozen``, ``trainable``,
``task``, ``tied``; a raw backbone is the all-``frozen`` reference).

Comparing two views yields changes of six kinds, each keyed by qualified name:

- ``added`` / ``removed``: nodes only in one graph, grouped by insertion site (``conv1.clr`` and its helper
  nodes ``conv1.clr.add`` are one insertion), with the node each was attached to (its *anchor*);
- ``replaced``: same name, another module (type or configuration changed, or a rule put a block in its place);
- ``rewired``: same node, other inputs (``bn1`` now reads ``conv1.clr``);
- ``reshaped``: same node, another output shape (token merging, another class count);
- ``ownership``: same node, its tensors changed state (``frozen → task``).

Which two graphs are compared (a backbone, a spec on it, a model, an artifact) is :mod:`peftc.tools.diff`.
Renderers (text, DOT, HTML) live in :mod:`peftc.tools.render`; the JSON form is :meth:`GraphDiff.to_json`
(schema in docs/diff.md).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peftc.errors import PeftcError
from peftc.tools.collapse import Collapsed, collapse
from peftc.tools.view import (
    GraphView,
    NodeInfo,
    jsonable,
)

if TYPE_CHECKING:
    import networkx as nx



__all__ = ["KINDS", "SCHEMA", "Change", "GraphDiff", "compare"]

SCHEMA = "peftc.diff/1"
KINDS = ("added", "removed", "replaced", "rewired", "reshaped", "ownership")


# ------------------------------------------------------------------------------------------------------------
# Changes
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference between the two graphs (``data`` is its JSON payload, see docs/diff.md)."""

    kind: str
    name: str
    rule: str | None
    data: Mapping[str, Any]
    nodes: tuple[str, ...]  # the graph nodes it covers (an insertion covers its block and helper nodes)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, **self.data}

    def collapse_payload(self) -> dict[str, Any]:
        """What must be equal for two changes in repeated blocks to fold.

        Shapes and FLOPs may differ between members (a stage's first block downsamples); a reshape folds when
        the same dimensions change (token merging leaves fewer tokens in each later block).
        """
        if self.kind == "reshaped":
            return {"rule": self.rule, "a": self.data["a"], "b": _wildcard(self.data["a"], self.data["b"])}
        data = {k: v for k, v in self.data.items() if k not in ("shape", "flops")}
        for side in ("a", "b"):
            if self.kind == "replaced" and isinstance(data.get(side), Mapping):
                data[side] = {k: v for k, v in data[side].items() if k not in ("shape", "flops")}
        return {"rule": self.rule, **data}


def _wildcard(a: Any, b: Any) -> Any:
    """``b`` with every dimension that differs from ``a`` replaced by ``*``."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [_wildcard(x, y) for x, y in zip(a, b)]
    if isinstance(a, int) and isinstance(b, int):
        return b if a == b else "*"
    return b


def _clusters(names: Sequence[str], sites: Iterable[str] = ()) -> dict[str, list[str]]:
    """Group new (or gone) nodes by site: under the shortest new name or inserted module path that prefixes
    them (``x.lora`` + ``x.lora.add``; a tie's scalars ``layer1.1.tie.a`` and ``.b`` under ``layer1.1.tie``)."""
    pool = set(names) | set(sites)
    out: dict[str, list[str]] = {}
    for name in names:
        parts = name.split("#")[0].split(".")
        root = next(
            (".".join(parts[:cut]) for cut in range(1, len(parts)) if ".".join(parts[:cut]) in pool), name
        )
        out.setdefault(root, []).append(name)
    return out


def _anchor(root: str, info: NodeInfo, view: GraphView) -> tuple[str | None, str | None]:
    """The node a new module hangs off: its insertion site, else the module it was added under."""
    site = view.sites.get(root)
    if site is not None:
        return site.anchor, site.action
    parent = root.rpartition(".")[0]
    if info.op == "call_module" and parent in view.nodes and view.nodes[parent].op == "call_module":
        return parent, None
    return None, None


def _node_set_change(kind: str, root: str, members: list[str], view: GraphView) -> Change:
    info = view.nodes.get(root) or view.nodes[members[0]]
    infos = [view.nodes[m] for m in members]
    data: dict[str, Any] = {}
    if kind == "added":
        anchor, action = _anchor(root, info, view)
        data.update(anchor=anchor, action=action)
    states: dict[str, int] = {}
    for i in infos:
        for s, n in i.states().items():
            states[s] = states.get(s, 0) + n
    data.update(
        type=info.type,
        op=info.op,
        params=sum(i.params for i in infos),
        tied=sum(i.tied for i in infos),
        state=states,
        shape=jsonable(info.shape),
        flops=sum(i.flops for i in infos),
        nodes=list(members),
    )
    return Change(kind, root, info.rule, data, tuple(members))


def _side_facts(info: NodeInfo) -> dict[str, Any]:
    return {
        "type": info.type,
        "config": info.config,
        "params": info.params,
        "state": info.states(),
        "shape": jsonable(info.shape),
        "flops": info.flops,
    }


def _tensor_changes(a: NodeInfo, b: NodeInfo) -> list[dict[str, Any]]:
    ours = {(t.kind, t.name): t for t in a.tensors}
    theirs = {(t.kind, t.name): t for t in b.tensors}
    out = []
    for key in [*theirs, *(k for k in ours if k not in theirs)]:
        ta, tb = ours.get(key), theirs.get(key)
        sa, sb = (ta.state if ta else None), (tb.state if tb else None)
        if sa == sb and (ta is None or tb is None or (ta.source == tb.source and ta.numel == tb.numel)):
            continue
        entry: dict[str, Any] = {
            "tensor": key[1],
            "kind": key[0],
            "numel": (tb or ta).numel,
            "a": sa,
            "b": sb,
        }
        source = (tb.source if tb else None) or (ta.source if ta else None)
        if source:
            entry["source"] = source
        out.append(entry)
    return out


def _replacement(info: NodeInfo) -> str | None:
    return info.rule if info.origin == "replaced" else None


def compare(a: GraphView, b: GraphView) -> GraphDiff:
    """All changes from view ``a`` to view ``b``, node identity by qualified name.

    Works on the views' networkx graphs: node sets give what was added and removed; for a node in both, its
    ``info`` (type, configuration, ordered inputs, shape, tensors) gives what else changed.
    """
    ga, gb = a.graph, b.graph
    changes: dict[str, list[Change]] = {k: [] for k in KINDS}
    added = [n for n in gb.nodes if n not in ga]
    removed = [n for n in ga.nodes if n not in gb]
    for root, members in _clusters(added, b.sites).items():
        changes["added"].append(_node_set_change("added", root, members, b))
    for root, members in _clusters(removed, a.sites).items():
        changes["removed"].append(_node_set_change("removed", root, members, a))
    for name, nb in gb.nodes(data="info"):
        if name not in ga:
            continue
        na = ga.nodes[name]["info"]
        if (na.op, na.type, na.config, _replacement(na)) != (nb.op, nb.type, nb.config, _replacement(nb)):
            rule = nb.rule if nb.origin == "replaced" else na.rule
            changes["replaced"].append(
                Change("replaced", name, rule, {"a": _side_facts(na), "b": _side_facts(nb)}, (name,))
            )
            continue
        if na.inputs != nb.inputs:
            new = [i for i in nb.inputs if i not in na.inputs]
            rule = next((b.nodes[i].rule for i in new if b.nodes[i].origin == "inserted"), None)
            if rule is None:
                rule = next((a.nodes[i].rule for i in na.inputs if i not in b.nodes), None)
            changes["rewired"].append(
                Change("rewired", name, rule, {"a": list(na.inputs), "b": list(nb.inputs)}, (name,))
            )
        if na.shape != nb.shape:
            changes["reshaped"].append(
                Change(
                    "reshaped", name, nb.rule, {"a": jsonable(na.shape), "b": jsonable(nb.shape)}, (name,)
                )
            )
        tensors = _tensor_changes(na, nb)
        if tensors:
            rule = nb.rule if nb.rule is not None else na.rule
            changes["ownership"].append(Change("ownership", name, rule, {"tensors": tensors}, (name,)))
    return GraphDiff(a, b, changes)


# ------------------------------------------------------------------------------------------------------------
# The diff
# ------------------------------------------------------------------------------------------------------------


@dataclass
class GraphDiff:
    """The difference between two graph views, with folding, JSON and the renderers."""

    a: GraphView
    b: GraphView
    changes: dict[str, list[Change]]
    tensors: dict[str, Any] | None = None  # artifact diffs: which saved tensors differ
    _collapsed: dict[str, list[Collapsed[Change]]] | None = field(default=None, repr=False)

    # -- queries ---------------------------------------------------------------------------------------------
    def __getitem__(self, kind: str) -> list[Change]:
        return self.changes[kind]

    @property
    def empty(self) -> bool:
        return not any(self.changes.values()) and not (self.tensors and self.tensors.get("differ"))

    def collapsed(self, kind: str) -> list[Collapsed[Change]]:
        """The changes of ``kind`` with repeated structure folded (``layer3.{0..5}.conv2``)."""
        if self._collapsed is None:
            self._collapsed = {k: collapse(v, lambda c: c.name, Change.collapse_payload)
                               for k, v in self.changes.items()}
        return self._collapsed[kind]

    def node_kinds(self) -> dict[str, list[str]]:
        """Graph node → the kinds of change that touch it."""
        out: dict[str, list[str]] = defaultdict(list)
        for kind, items in self.changes.items():
            for change in items:
                for node in change.nodes:
                    if kind not in out[node]:
                        out[node].append(kind)
        return out

    def summary(self) -> dict[str, Any]:
        ta, tb = self.a.totals, self.b.totals

        def pair(key: str) -> dict[str, int]:
            return {"a": ta.get(key, 0), "b": tb.get(key, 0), "delta": tb.get(key, 0) - ta.get(key, 0)}

        return {
            "nodes": {"a": len(self.a.nodes), "b": len(self.b.nodes)},
            "changes": {k: len(v) for k, v in self.changes.items()},
            "params": pair("params"),
            "trainable": pair("trainable"),
            "task_params": pair("task_params"),
            "task_buffers": pair("task_buffers"),
            "flops": pair("flops"),
        }

    # -- the union graph the renderers draw ------------------------------------------------------------------
    def display_graph(self) -> nx.DiGraph:
        """Both graphs overlaid, in data-flow order: nodes carry ``status`` and ``kinds``; edges ``status``.

        Unchanged nodes that produce no tensor (shape arithmetic, guard asserts, unused optional inputs) are
        left out: they are noise in a picture of the data flow. Every changed node is kept.
        """
        import networkx as nx

        kinds = self.node_kinds()
        order = _merged_order(self.a, self.b)
        g = nx.DiGraph()
        for name in order:
            info = self.b.nodes.get(name) or self.a.nodes[name]
            node_kinds = kinds.get(name, [])
            if not info.is_tensor and not node_kinds and info.op not in ("output",):
                continue
            status = next(
                (
                    k
                    for k in ("added", "removed", "replaced", "rewired", "reshaped", "ownership")
                    if k in node_kinds
                ),
                "same",
            )
            g.add_node(name, info=info, before=self.a.nodes.get(name), status=status, kinds=node_kinds)
        edges_a, edges_b = set(self.a.graph.edges), set(self.b.graph.edges)
        for u, v in sorted(edges_a | edges_b, key=lambda e: (order.index(e[1]), order.index(e[0]))):
            if u in g and v in g:
                status = (
                    "same"
                    if (u, v) in edges_a and (u, v) in edges_b
                    else ("added" if (u, v) in edges_b else "removed")
                )
                g.add_edge(u, v, status=status)
        return g

    # -- output ----------------------------------------------------------------------------------------------
    def to_json(self, *, include_graph: bool = False) -> dict[str, Any]:
        """The stable JSON form (schema ``peftc.diff/1``, documented in docs/diff.md)."""
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "a": {"label": self.a.label, **self.a.source},
            "b": {"label": self.b.label, **self.b.source},
            "input": {"a": list(self.a.input), "b": list(self.b.input)},
            "summary": self.summary(),
        }
        for kind in KINDS:
            out[kind] = [c.to_json() for c in self.changes[kind]]
        out["folded"] = {
            kind: [
                {"pattern": f.pattern, "count": f.count, "members": [c.name for c in f.members]}
                for f in self.collapsed(kind)
            ]
            for kind in KINDS
        }
        if self.tensors is not None:
            out["tensors"] = self.tensors
        if include_graph:
            out["graph"] = {
                "a": [n.to_json() for n in self.a.nodes.values()],
                "b": [n.to_json() for n in self.b.nodes.values()],
            }
        return out

    def json(self, *, include_graph: bool = False) -> str:
        return json.dumps(self.to_json(include_graph=include_graph), indent=2, ensure_ascii=False) + "\n"

    def text(self, *, color: bool = False, width: int = 110) -> str:
        from peftc.tools.render.text import render_text

        return render_text(self, color=color, width=width)

    def dot(self) -> str:
        from peftc.tools.render.dot import render_dot

        return render_dot(self)

    def html(self) -> str:
        from peftc.tools.render.html import render_html

        return render_html(self)

    def render(self, fmt: str) -> str:
        """Render as ``text``, ``json``, ``dot`` or ``html``."""
        renderers = {"text": self.text, "json": self.json, "dot": self.dot, "html": self.html}
        if fmt not in renderers:
            from peftc.errors import did_you_mean

            raise PeftcError(
                f"unknown format {fmt!r}"
                + did_you_mean(fmt, renderers)
                + f"; formats: {', '.join(renderers)}"
            )
        return renderers[fmt]()


def _merged_order(a: GraphView, b: GraphView) -> list[str]:
    """``b``'s node order with each node only in ``a`` placed right after its predecessor in ``a``."""
    order = list(b.nodes)
    position = {n: i for i, n in enumerate(order)}
    previous: str | None = None
    pending: dict[str | None, list[str]] = defaultdict(list)
    for name in a.nodes:
        if name in position:
            previous = name
        else:
            pending[previous].append(name)
    if not pending:
        return order
    out = list(pending.get(None, []))
    for name in order:
        out.append(name)
        out.extend(pending.get(name, []))
    return out
