"""Graph facts: what every node of a traced graph is, reads, makes, costs and owns.

The diff, ``peftc inspect`` and the HTML view all need the same facts about a graph — "``layer3.0.conv2`` is a
Conv2d reading ``layer3.0.relu``, makes a 1×256×14×14 map, costs 231 MFLOPs, owns 589,824 frozen parameters" —
so they come from one place:

- :func:`~peftc.analysis.propagation.propagate` runs the graph once on a deterministic example batch and
  records each node's output shape and FLOPs (measured, see :mod:`peftc.analysis.propagation`).
- :func:`build_view` turns a graph into a :class:`GraphView`: every node under its qualified name (a module
  called a second time, such as a ResNet block's ``relu``, is ``layer1.0.relu#2``), its type, inputs, shape,
  FLOPs, and the tensors it owns with their *state*: ``frozen`` (a constant), ``trainable`` (learned, shared
  by all tasks; for buffers: updated in training mode), ``task`` (each task has its own copy) or ``tied`` (the
  node computes with a tensor that belongs to another node). A raw backbone is the reference: all ``frozen``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from peftc.analysis.index import block_positions, enclosing_block, operation_name
from peftc.analysis.propagation import NodeStats, Shape, input_shape, propagate
from peftc.analysis.regions import trace_model
from peftc.analysis.trace import node_name, trace_info

if TYPE_CHECKING:
    import networkx as nx

    from peftc.analysis.backbones import Backbone
    from peftc.passes import Ledger
    from peftc.runtime.model import Compiled

__all__ = [
    "STATES",
    "GraphView",
    "NodeInfo",
    "NodeStats",
    "Shape",
    "TensorInfo",
    "build_view",
    "format_flops",
    "input_shape",
    "jsonable",
    "propagate",
    "view_backbone",
    "view_model",
]

STATES = ("frozen", "trainable", "task", "tied")

def format_flops(flops: int) -> str:
    """A short human figure: ``231.2M``, ``4.11G``; 0 → ``0``."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g}{unit}"
    return str(flops)


# ------------------------------------------------------------------------------------------------------------
# Views: one graph as data
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """A parameter or floating-point buffer as seen from the node that uses it."""

    name: (
        str  # local to the node's module: weight, bias, running_mean, base.weight; the attribute for get_attr
    )
    kind: str  # param | buffer
    numel: int
    state: str  # one of STATES
    source: str | None = None  # for tied tensors: the qualified name of the tensor it is

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tensor": self.name,
            "kind": self.kind,
            "numel": self.numel,
            "state": self.state,
        }
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass(frozen=True)
class NodeInfo:
    """One graph node: what it is, what it reads, what it makes and what it owns."""

    name: str
    op: str  # placeholder | get_attr | call_module | call_function | call_method | output
    type: str  # Conv2d, ChannelConv, fn:add, Parameter, input, output
    config: str  # the module's extra_repr (one line); "" for operations
    inputs: tuple[str, ...]
    shape: Shape
    flops: int
    tensors: tuple[TensorInfo, ...]
    block: str | None  # the repeated block around it (``layer1.0``, ``blocks.3``)
    origin: str  # backbone | inserted | replaced
    rule: str | None  # the rule label that inserted, replaced or last changed it

    @property
    def params(self) -> int:
        """Parameters this node owns (tied ones are another node's and are not counted)."""
        return sum(t.numel for t in self.tensors if t.kind == "param" and t.state != "tied")

    @property
    def tied(self) -> int:
        return sum(t.numel for t in self.tensors if t.state == "tied")

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    def states(self) -> dict[str, int]:
        """Parameter elements by state (``{"task": 576}``)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            if t.kind == "param":
                out[t.state] = out.get(t.state, 0) + t.numel
        return {s: out[s] for s in STATES if s in out}

    @property
    def state(self) -> str | None:
        """The dominant state: ``task`` > ``trainable`` > ``tied`` > ``frozen``; None without tensors."""
        states = {t.state for t in self.tensors}
        return next((s for s in ("task", "trainable", "tied", "frozen") if s in states), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "type": self.type,
            "config": self.config,
            "inputs": list(self.inputs),
            "shape": jsonable(self.shape),
            "flops": self.flops,
            "params": self.params,
            "tensors": [t.to_json() for t in self.tensors],
            "block": self.block,
            "origin": self.origin,
            "rule": self.rule,
        }


@dataclass(frozen=True)
class Attachment:
    """Where a rule attached a new module: the node it follows or bypasses."""

    module: str
    anchor: str
    rule: str
    action: str


@dataclass
class GraphView:
    """One graph as data (see the module docstring); ``graph`` is the same as a networkx DiGraph."""

    label: str
    source: dict[str, Any]
    input: tuple[int, ...]
    nodes: dict[str, NodeInfo]
    sites: dict[str, Attachment] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    fx_names: dict[fx.Node, str] = field(default_factory=dict, repr=False)
    _graph: Any = field(default=None, repr=False)

    @property
    def graph(self) -> nx.DiGraph:
        """This graph as a networkx DiGraph: nodes by qualified name (``info``: NodeInfo), input→user."""
        if self._graph is None:
            import networkx as nx

            g = nx.DiGraph(label=self.label)
            for name, info in self.nodes.items():
                g.add_node(name, info=info)
            for name, info in self.nodes.items():
                for inp in info.inputs:
                    g.add_edge(inp, name)
            self._graph = g
        return self._graph


def jsonable(shape: Shape) -> Any:
    if shape is None:
        return None
    if isinstance(shape, list):
        return [jsonable(s) for s in shape]
    return list(shape)


def _unique_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Qualified names made unique: a shared module's second call (a ResNet block's relu) is ``name#2``."""
    seen: Counter[str] = Counter()
    out: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        base = node_name(node)
        seen[base] += 1
        out[node] = base if seen[base] == 1 else f"{base}#{seen[base]}"
    return out


def _type_of(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str]:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return type(module).__name__, " ".join(module.extra_repr().split())
    if node.op == "get_attr":
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        kind = (
            "Parameter"
            if isinstance(value, nn.Parameter)
            else "Buffer"
            if isinstance(value, torch.Tensor)
            else "Constant"
        )
        return kind, ""
    if node.op in ("call_function", "call_method"):
        return operation_name(node), ""
    return ("input" if node.op == "placeholder" else "output"), ""


class _Ownership:
    """Which tensors a graph's nodes own and in which state, from the module tree and the compile ledger."""

    def __init__(self, gm: fx.GraphModule, ledger: Ledger | None, baseline: bool):
        self.ledger = ledger
        self.baseline = baseline
        inserted = tuple(f"{p}." for p in (ledger.inserted if ledger else ()))
        occurrences: dict[int, list[tuple[str, torch.Tensor, bool]]] = defaultdict(list)
        for full, p in gm.named_parameters(remove_duplicate=False):
            occurrences[id(p)].append((full, p, True))
        for full, b in gm.named_buffers(remove_duplicate=False):
            if b.is_floating_point():
                occurrences[id(b)].append((full, b, False))
        self.occurrences = occurrences
        # A shared tensor belongs where the backbone put it; references to it inside inserted or replaced
        # blocks (a layer computing with its neighbour's weight, FacT's shared factors) are "tied" to it.
        self.canonical = {
            tid: next((o for o in occ if not o[0].startswith(inserted)), occ[0])[0]
            for tid, occ in occurrences.items()
        }

    def state(self, full: str, tensor: torch.Tensor, is_param: bool) -> str:
        if self.baseline:
            return "frozen"
        ledger = self.ledger
        if ledger is not None and (
            full in ledger.tensor_slots or any(full.startswith(p + ".") for p in ledger.module_slots)
        ):
            return "task"
        if is_param:
            return "trainable" if tensor.requires_grad else "frozen"
        return "trainable" if ledger is not None and full in ledger.updating_buffers else "frozen"

    def by_owner(self, module_targets: set[str], attr_targets: set[str]) -> dict[str, list[TensorInfo]]:
        """Owner target → its tensors.

        A tensor belongs to the called module whose path is its longest prefix, else to the ``get_attr`` node
        reading it (``cls_token``). A ``get_attr`` node that reads a tensor some module owns, and a module
        holding a reference to a tensor that lives elsewhere, see it as ``tied`` to its owner.
        """
        out: dict[str, list[TensorInfo]] = defaultdict(list)
        for tid, occ in self.occurrences.items():
            canonical = self.canonical[tid]
            for full, tensor, is_param in occ:
                owner, local = _owner_of(full, module_targets, attr_targets)
                kind = "param" if is_param else "buffer"
                if owner is not None:
                    if full != canonical:
                        out[owner].append(TensorInfo(local, kind, tensor.numel(), "tied", canonical))
                    else:
                        state = self.state(full, tensor, is_param)
                        out[owner].append(TensorInfo(local, kind, tensor.numel(), state))
                if full in attr_targets and owner != full:
                    out[full].append(TensorInfo(full.rsplit(".", 1)[-1], kind, tensor.numel(), "tied", canonical))
        return out

    def totals(self) -> dict[str, int]:
        params = trainable = task_params = task_buffers = 0
        for tid, occ in self.occurrences.items():
            full, tensor, is_param = next(o for o in occ if o[0] == self.canonical[tid])
            state = self.state(full, tensor, is_param)
            if is_param:
                params += tensor.numel()
                trainable += tensor.numel() if tensor.requires_grad and not self.baseline else 0
                task_params += tensor.numel() if state == "task" else 0
            elif state == "task":
                task_buffers += tensor.numel()
        return {
            "params": params,
            "trainable": trainable,
            "task_params": task_params,
            "task_buffers": task_buffers,
        }


def _owner_of(full: str, module_targets: set[str], attr_targets: set[str]) -> tuple[str | None, str]:
    parts = full.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in module_targets:
            return prefix, ".".join(parts[cut:])
    if full in attr_targets:
        return full, parts[-1]
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in attr_targets:
            return prefix, ".".join(parts[cut:])
    return None, full


def _ledger_facts(ledger: Ledger | None) -> tuple[dict[str, Attachment], dict[str, str], dict[str, str]]:
    """Insertion sites, the last rule that touched each node, and the nodes a rule replaced."""
    sites: dict[str, Attachment] = {}
    last_rule: dict[str, str] = {}
    replaced: dict[str, str] = {}
    for r in ledger.rewrites if ledger else ():
        module = r.detail.get("module")
        if isinstance(module, str) and module != r.node:
            sites[module] = Attachment(module, r.node, r.rule, r.action)
        if r.action == "replace" or (r.action == "head" and not r.detail.get("reused", False)):
            replaced[r.node] = r.rule
        if not isinstance(module, str) or module == r.node:  # an insertion is not a change to its anchor
            last_rule[r.node] = r.rule
    return sites, last_rule, replaced


def build_view(
    gm: fx.GraphModule,
    *,
    shape: tuple[int, ...],
    positions: Mapping[str, tuple[str, int, int]],
    ledger: Ledger | None = None,
    baseline: bool = False,
    label: str = "",
    source: Mapping[str, Any] | None = None,
) -> GraphView:
    """Describe ``gm``: propagate an example batch of ``shape`` and collect every node's facts.

    ``baseline=True`` marks the graph as the frozen reference (a backbone as built); otherwise tensor states
    come from ``requires_grad`` and, when given, the compile ``ledger`` (task slots, updating buffers).
    """
    stats: dict[fx.Node, NodeStats] = propagate(gm, shape)
    names = _unique_names(gm)
    first_call: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            first_call.setdefault(str(node.target), node)
    module_targets = {t for t, n in first_call.items() if n.op == "call_module"}
    attr_targets = {t for t, n in first_call.items() if n.op == "get_attr"}
    ownership = _Ownership(gm, ledger, baseline)
    tensors = ownership.by_owner(module_targets, attr_targets)
    sites, last_rule, replaced = _ledger_facts(ledger)
    nodes: dict[str, NodeInfo] = {}
    for node in gm.graph.nodes:
        name = names[node]
        type_name, config = _type_of(node, gm)
        owned = tensors.get(str(node.target), []) if first_call.get(str(node.target)) is node else []
        plain = name.split("#")[0]
        if node.meta.get("peftc_rule"):
            origin, rule = "inserted", str(node.meta["peftc_rule"])
        elif plain in replaced:
            origin, rule = "replaced", replaced[plain]
        else:
            origin, rule = "backbone", last_rule.get(plain)
        st = stats[node]
        nodes[name] = NodeInfo(
            name=name,
            op=node.op,
            type=type_name,
            config=config,
            inputs=tuple(names[i] for i in node.all_input_nodes),
            shape=st.shape,
            flops=st.flops,
            tensors=tuple(owned),
            block=enclosing_block(name, positions),
            origin=origin,
            rule=rule,
        )
    totals = ownership.totals()
    totals["flops"] = sum(n.flops for n in nodes.values())
    tracing = trace_info(gm).describe()
    source = {**dict(source or {}), **({"tracing": tracing} if tracing else {})}
    return GraphView(label or "graph", source, tuple(shape), nodes, sites, totals, names)


def view_backbone(
    bb: Backbone, shape: tuple[int, ...], *, leaves: Iterable[type[nn.Module]] = ()
) -> GraphView:
    """The reference view of a built backbone (all tensors ``frozen``); ``bb`` is not modified."""
    gm = trace_model(bb.module, leaves=leaves, input_size=bb.input_size)
    return build_view(
        gm,
        shape=shape,
        positions=block_positions(bb.module),
        baseline=True,
        label=bb.id,
        source={"kind": "backbone", "backbone": bb.id},
    )


def view_model(
    model: Compiled,
    shape: tuple[int, ...],
    positions: Mapping[str, tuple[str, int, int]],
    *,
    label: str | None = None,
    source: Mapping[str, Any] | None = None,
) -> GraphView:
    """The view of a compiled model's rewritten graph (its active task)."""
    src = dict(source or {"kind": "model", "backbone": model.backbone.id, "spec": model.spec.name})
    return build_view(
        model.graph,
        shape=shape,
        positions=positions,
        ledger=model.ledger,
        label=label or model.spec.name,
        source=src,
    )
