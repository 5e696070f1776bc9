"""See a rewrite: two graphs → networkx → a diff of nodes, wiring and tensor ownership, folded and rendered.

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

Sides can be a backbone, a spec compiled on it, a compiled model or an artifact directory, so one function
answers "what does this spec do", "how do these two specs differ" and "how do these two checkpoints differ".
Renderers (text, DOT, HTML) live in :mod:`peftc.tools.render`; the JSON form is :meth:`GraphDiff.to_json`
(schema in docs/diff.md).
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from peftc.analysis.index import NodeIndex, block_positions
from peftc.analysis.select import select
from peftc.analysis.trace import trace
from peftc.errors import ArtifactError, Location, PeftcError
from peftc.language import MethodSpec, Selector, load_spec
from peftc.tools.render.collapse import Collapsed, collapse
from peftc.tools.view import (
    STATES,
    GraphView,
    NodeInfo,
    Shape,
    TensorInfo,
    build_view,
    input_shape,
    jsonable,
    view_backbone,
    view_model,
)

if TYPE_CHECKING:
    import networkx as nx

    from peftc.analysis.backbones import Backbone
    from peftc.runtime.model import Compiled

__all__ = [
    "KINDS",
    "SCHEMA",
    "STATES",
    "Change",
    "GraphDiff",
    "GraphView",
    "NodeInfo",
    "TensorInfo",
    "compare",
    "diff",
    "dry_run",
    "inspect_nodes",
    "view_backbone",
    "view_model",
]

SCHEMA = "peftc.diff/1"
KINDS = ("added", "removed", "replaced", "rewired", "reshaped", "ownership")


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(values), default=str))


def _spec_label(spec: MethodSpec, overrides: Mapping[str, Any] | None = None) -> str:
    if not overrides:
        return spec.name
    return f"{spec.name}(" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")"


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


# ------------------------------------------------------------------------------------------------------------
# The public entry point: sides from specs, models or artifacts
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Side:
    model: Compiled | None  # None: the backbone itself
    backbone: Backbone
    source: dict[str, Any]
    label: str
    artifact: Path | None = None


def _is_artifact(x: Any) -> bool:
    if not isinstance(x, (str, Path)):
        return False
    from peftc.storage.artifact import MANIFEST

    path = Path(x)
    return path.is_dir() and (path / MANIFEST).is_file()


def _rebuild(info: Mapping[str, Any], backbone: Any, seed: int) -> Backbone:
    """A backbone of the same structure as one a model or artifact was compiled on (random init suffices)."""
    from peftc.analysis.backbones import build_backbone
    from peftc.compiler import resolve_backbone

    if backbone is not None:
        return resolve_backbone(backbone, seed=seed)
    if info.get("source") == "module":
        raise PeftcError(f"{info['id']} is a custom module; pass it again as backbone= to diff against it")
    kwargs = dict(info.get("kwargs") or ())
    return build_backbone(str(info["id"]), seed=int(info.get("seed") or seed), **kwargs)


def _artifact_side(path: Path, backbone: Any, seed: int) -> _Side:
    from peftc.compiler import compile as compile_model
    from peftc.storage.artifact import read_manifest

    manifest = read_manifest(path)
    info = manifest["backbone"]
    bb = _rebuild(info, backbone, seed)
    try:
        model = compile_model(
            manifest["spec"], copy.deepcopy(bb), backbone_kwargs=dict(info.get("kwargs") or ())
        )
    except PeftcError as exc:
        raise ArtifactError(f"{path}: the stored spec no longer compiles: {exc}") from None
    for task in manifest.get("tasks", []):
        if task["name"] not in model.bank:
            model.add_task(task["name"], task.get("classes"))
    model.set_task(manifest.get("active_task", model.active_task))
    source = {
        "kind": "artifact",
        "path": str(path),
        "backbone": info["id"],
        "spec": manifest["spec"].get("name"),
        "params": manifest.get("params", {}),
        "tasks": [t["name"] for t in manifest.get("tasks", [])],
        "active_task": model.active_task,
    }
    return _Side(model, bb, source, path.name or str(path), path)


def _tensor_diff(a: Path, b: Path) -> dict[str, Any]:
    """Compare two artifacts' saved deltas tensor by tensor."""
    from peftc.storage.artifact import read_delta, read_manifest

    ta = read_delta(a, read_manifest(a))
    tb = read_delta(b, read_manifest(b))
    changed = []
    same = 0
    for key in sorted(set(ta) & set(tb)):
        x, y = ta[key], tb[key]
        if x.shape != y.shape:
            changed.append({"tensor": key, "shape": {"a": list(x.shape), "b": list(y.shape)}})
        elif x.dtype != y.dtype or not torch.equal(x, y):
            delta = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            changed.append({"tensor": key, "numel": x.numel(), "max_abs_diff": float(f"{delta:.6g}")})
        else:
            same += 1
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    return {
        "only_a": only_a,
        "only_b": only_b,
        "changed": changed,
        "same": same,
        "differ": bool(only_a or only_b or changed),
    }


def diff(
    a: Any,
    b: Any = None,
    *,
    backbone: str | nn.Module | Backbone | None = None,
    params: Mapping[str, Any] | None = None,
    params_b: Mapping[str, Any] | None = None,
    image_size: int | tuple[int, int] | None = None,
    seed: int = 0,
    leaves: Iterable[type[nn.Module]] = (),
    reference: GraphView | None = None,
) -> GraphDiff:
    """What a rewrite changes, as a :class:`GraphDiff`.

    - ``diff("clr", backbone="resnet50")`` — the backbone against the spec compiled on it;
    - ``diff("clr", "lora", backbone=...)`` — two specs (or one spec with ``params`` vs ``params_b``);
    - ``diff(model)`` / ``diff(model_a, model_b)`` — compiled models (the first against its rebuilt backbone);
    - ``diff("out/a", "out/b")`` — two artifact directories, including which saved tensors differ.

    Shapes and FLOPs come from one example batch at the backbone's input size, or ``image_size``.
    ``reference`` is a view of the backbone made earlier with :func:`peftc.tools.view.view_backbone` at the same
    input: diffing many specs against one backbone then traces and runs the backbone only once.
    """
    from peftc.compiler import compile as compile_model
    from peftc.compiler import resolve_backbone
    from peftc.runtime.model import Compiled

    built: dict[str, Backbone] = {}

    def base() -> Backbone:
        if "bb" not in built:
            if backbone is None:
                raise PeftcError("a spec needs a backbone to compile on: give backbone= (CLI: --backbone)")
            built["bb"] = resolve_backbone(backbone, seed=seed)
        return built["bb"]

    def side(x: Any, overrides: Mapping[str, Any] | None) -> _Side:
        if isinstance(x, Compiled):
            if overrides:
                raise PeftcError("params apply to specs, not to an already compiled model")
            info = {
                "id": x.backbone.id,
                "source": x.backbone.source,
                "seed": x.backbone.seed,
                "kwargs": x.backbone.kwargs,
            }
            return _Side(
                x,
                _rebuild(info, backbone, seed),
                {
                    "kind": "model",
                    "backbone": x.backbone.id,
                    "spec": x.spec.name,
                    "params": _plain(x.spec.values),
                    "active_task": x.active_task,
                },
                _spec_label(x.spec),
            )
        if _is_artifact(x):
            if overrides:
                raise PeftcError("params apply to specs, not to an artifact")
            return _artifact_side(Path(x), backbone, seed)
        method = load_spec(x, overrides)
        bb = base()
        model = compile_model(method, copy.deepcopy(bb), leaves=leaves)
        source = {"kind": "spec", "backbone": bb.id, "spec": method.name, "params": _plain(method.values)}
        return _Side(model, bb, source, _spec_label(method, overrides))

    if b is None:
        right = side(a, params)
        left = _Side(
            None, right.backbone, {"kind": "backbone", "backbone": right.backbone.id}, right.backbone.id
        )
    else:
        left, right = side(a, params), side(b, params_b)

    views = []
    for s in (left, right):
        shape = input_shape(tuple(s.backbone.input_size), image_size)  # type: ignore[arg-type]
        if s.model is None and reference is not None:
            if reference.source.get("kind") != "backbone" or reference.source.get("backbone") != s.backbone.id \
                    or reference.input != shape:
                raise PeftcError(f"reference= is a view of {reference.label} at {list(reference.input)}, "
                                 f"not of backbone {s.backbone.id} at {list(shape)}")
            views.append(reference)
        elif s.model is None:
            views.append(view_backbone(s.backbone, shape, leaves=leaves))
        else:
            views.append(
                view_model(s.model, shape, block_positions(s.backbone.module), label=s.label, source=s.source)
            )
    result = compare(*views)
    if left.artifact is not None and right.artifact is not None:
        result.tensors = _tensor_diff(left.artifact, right.artifact)
    return result


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
    import yaml
    from pydantic import ValidationError

    from peftc.errors import SpecError

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"not valid YAML: {str(exc).splitlines()[0]}", where) from None
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
        gm = model.net
    else:
        gm = trace(bb.module)
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
    gm = trace(bb.module)
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
